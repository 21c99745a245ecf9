"""Pure train and eval steps over (trainable, frozen) pytrees, jitted with shardings.

Supernet training draws fresh subnets from the step's key inside the jitted step
(one, as the authors, or several under SupernetOptions: sandwich, fair sampling,
in-place distillation, progressive shrinking); fixed-subnet training reads the
subnet from the state. Neither recompiles.
"""
from __future__ import annotations

import dataclasses
import pathlib
import re
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glora_jax import paths, peft
from glora_jax import subnet as subnet_lib

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ForwardLoss:
  """What a step needs to know about a model and its data.

  forward(params, adapters, subnet, batch, train, rng) -> model outputs
  loss(outputs, batch) -> (sum of per-example losses, number of examples,
                          sum of correct predictions); rows with batch['mask'] == 0
                          count for nothing, so padded batches keep static shapes.
  """

  forward: Callable[..., Any]
  loss: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]


def classification_loss(logits, batch):
  mask = batch.get('mask', jnp.ones(logits.shape[0], jnp.float32)).astype(jnp.float32)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, batch['label'][:, None].astype(jnp.int32), -1)[:, 0]
  correct = (jnp.argmax(logits, -1) == batch['label']).astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct * mask)


def make_optimizer(lr, weight_decay: float, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8, clip_norm: float | None = None,
                   lr_multipliers: Sequence[tuple[str, float]] = ()) -> optax.GradientTransformation:
  """AdamW on every trainable leaf (as torch.optim.AdamW), optional global-norm clip.

  lr_multipliers: (path regex, m) pairs; a trainable leaf whose path (paths.flatten's,
  e.g. 'adapters/encoder/layer_0/attention/query/Cd') fully matches a regex has its
  whole AdamW update scaled by that regex's m (the first that matches): the learning
  rate and the decoupled weight decay of a torch param group with lr x m."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  if lr_multipliers:
    parts.append(scale_by_path(lr_multipliers))
  return optax.chain(*parts)


def _path_multiplier(rules, path) -> float:
  name = paths.path_name(path)
  return next((m for pattern, m in rules if re.fullmatch(pattern, name)), 1.0)


def scale_by_path(rules: Sequence[tuple[str, float]]) -> optax.GradientTransformation:
  """Multiplies each leaf's update by the m of the first (regex, m) rule its path fully
  matches (1 if none). Stateless; a rule matching no leaf is refused where the
  trainable tree is known (setup.build, by paths.match_paths)."""
  rules = [(str(p), float(m)) for p, m in rules]
  for pattern, m in rules:
    re.compile(pattern)
    if not m > 0:
      raise ValueError(f"lr multiplier for '{pattern}' must be > 0, got {m}")

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(
        lambda path, u: u if (m := _path_multiplier(rules, path)) == 1.0 else u * jnp.asarray(m, u.dtype),
        updates), state

  return optax.GradientTransformation(init, update)


def init_state(trainable, optimizer, seed: int, subnet) -> State:
  """The training state. `trainable` is copied: the jitted step donates the state,
  and the caller's arrays (e.g. a params dict it still uses) must survive that."""
  trainable = jax.tree.map(jnp.array, trainable)
  return {'step': jnp.zeros((), jnp.int32), 'key': jax.random.key_data(jax.random.key(seed)),
          'trainable': trainable, 'opt_state': optimizer.init(trainable),
          'subnet': jnp.asarray(subnet, jnp.int32)}


def step_keys(state: State):
  """(subnet key, dropout key) of this step: a function of seed and step only, so
  a resumed run draws exactly what the uninterrupted run would have drawn."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state['key']), state['step'])
  return jax.random.split(key)


def _model_params(trainable, frozen):
  return peft.combine(frozen, trainable['model'])


def _adapters(spec, trainable):
  return None if spec is None else peft.Adapters(params=trainable['adapters'], spec=spec)


SANDWICH = ('none', 'largest', 'largest_smallest')
SAMPLING = ('uniform', 'fair')


@dataclasses.dataclass(frozen=True)
class SupernetOptions:
  """How a supernet step picks and weighs its subnets (config.supernet). The
  defaults are the authors': one subnet per step, each support uniform.

  num_random: random subnets per step. sandwich: 'largest' adds the largest
  subnet, 'largest_smallest' also the smallest allowed one (BigNAS's sandwich
  rule). The step's loss is the mean of its subnets' losses, or, with head_weight
  > 0 (ours), head_weight x the sandwich head's loss + the rest split evenly over
  the other subnets: parameters that only the sampled subnets use still take
  full-sized Adam steps (its update is invariant to a gradient's scale), while the
  parameters the head shares with them follow the head more. sampling 'fair':
  random draws follow `subnet.fair_sample` (FairNAS), draw g = step * num_random + j.
  distill: weight α of in-place distillation, each subnet but the largest learns
  (1 - α) CE + α T² KL(teacher_T || student_T) from the largest subnet's outputs
  (stop_gradient; classification only). widen_steps > 0: progressive shrinking,
  `subnet.allowed_options`. anchor (ours): a subnet JSON that takes the largest
  subnet's two roles, the sandwich's first subnet and the distillation teacher
  (BigNAS assumes the largest subnet is the best one; in GLoRA's space it need not
  be). The count of subnets is static: one compile."""
  num_random: int = 1
  sandwich: str = 'none'
  sampling: str = 'uniform'
  distill: float = 0.0
  temperature: float = 1.0
  widen_steps: int = 0
  anchor: str = ''
  head_weight: float = 0.0

  def loss_weights(self) -> tuple[float, ...]:
    """Each subnet's weight in the step's loss, in draw_subnets' order: equal, or
    head_weight for the sandwich's head and the rest shared evenly."""
    n = self.num_subnets
    if not self.head_weight or n == 1:
      return (1.0 / n,) * n
    return (self.head_weight,) + ((1.0 - self.head_weight) / (n - 1),) * (n - 1)

  @property
  def num_subnets(self) -> int:
    """Subnets trained (forward and backward) in one step."""
    return self.num_random + {'none': 0, 'largest': 1, 'largest_smallest': 2}[self.sandwich]

  @property
  def teacher_forwards(self) -> int:
    """Forward-only passes per step: the teacher, when it is not trained in the step."""
    return int(self.distill > 0 and self.sandwich == 'none')

  def backbone_passes(self) -> float:
    """Backbone compute of a step in forward+backward passes, a forward counted
    as 1/3 of one (backward = 2 forwards): num_subnets + teacher_forwards / 3."""
    return self.num_subnets + self.teacher_forwards / 3


def supernet_options(config, steps_per_epoch: int | None = None) -> SupernetOptions:
  """A config's supernet options (config.supernet; absent fields keep the defaults,
  so workdirs written before the options existed still load). Progressive
  shrinking is given in epochs and needs `steps_per_epoch`."""
  c = config.get('supernet', None) or {}
  get = c.get
  epochs = float(get('progressive_epochs', 0.0))
  widen = 0
  if epochs > 0:
    if not steps_per_epoch:
      raise ValueError('supernet.progressive_epochs needs the number of steps per epoch')
    widen = max(1, int(round(epochs * steps_per_epoch)))
  return SupernetOptions(num_random=int(get('num_random', 1)), sandwich=str(get('sandwich', 'none')),
                         sampling=str(get('sampling', 'uniform')), distill=float(get('distill', 0.0)),
                         temperature=float(get('temperature', 1.0)), widen_steps=widen,
                         anchor=str(get('anchor', '')), head_weight=float(get('head_weight', 0.0)))


def anchor_subnet(spec: peft.AdapterSpec, options: SupernetOptions) -> np.ndarray:
  """The subnet in the largest's roles (sandwich head, teacher): options.anchor's
  subnet JSON, or the largest subnet."""
  if options.anchor:
    return subnet_lib.loads(spec, pathlib.Path(options.anchor).read_text())
  return subnet_lib.largest(spec)


def draw_subnets(spec: peft.AdapterSpec, options: SupernetOptions, state: State,
                 anchor=None) -> jax.Array:
  """(options.num_subnets, layers, supports) subnets of a step: `anchor_subnet` (the
  largest, or the anchor; pass it as `anchor` to skip working it out), the smallest allowed
  (as options.sandwich says), then the random ones. A function of the state's seed
  and step only, identical on every replica."""
  k_subnet, _ = step_keys(state)
  num = spec.num_options
  step = state['step']
  allowed = subnet_lib.allowed_options(num, step, options.widen_steps)
  order = jnp.asarray(subnet_lib.option_order(num, spec.option_costs))
  out = []
  if options.sandwich != 'none':
    out.append(jnp.asarray(anchor_subnet(spec, options) if anchor is None else anchor))
  if options.sandwich == 'largest_smallest':
    cheapest, _ = subnet_lib.cheapest_and_largest(num, spec.option_costs)
    smallest = jnp.take_along_axis(order, (allowed - 1)[..., None], -1)[..., 0]
    out.append(jnp.where(allowed == jnp.asarray(num), cheapest, smallest))  # cheapest: first on ties
  k = options.num_random
  if k and options.sampling == 'fair':
    # The permutations' key depends on the seed only: a cycle spans several steps.
    fair_key = jax.random.split(jax.random.wrap_key_data(state['key']))[1]
    draws = step * k + jnp.arange(k, dtype=jnp.int32)
    out.extend(jax.vmap(lambda g: subnet_lib.fair_sample(fair_key, g, order, allowed))(draws))
  elif k == 1 and not options.widen_steps:
    out.append(subnet_lib.sample(k_subnet, spec))  # the authors' draw, as before these options
  elif k:
    out.extend(subnet_lib.sample_allowed(k_subnet, order, allowed, (k,)))
  return jnp.stack([jnp.asarray(s, jnp.int32) for s in out])


def distillation_loss(student, teacher, batch, temperature: float):
  """Sum over real rows (batch['mask']) of T² KL(softmax(teacher / T) ||
  softmax(student / T)); the teacher's logits are constants."""
  mask = batch.get('mask', jnp.ones(student.shape[0], jnp.float32)).astype(jnp.float32)
  t = jax.nn.log_softmax(jax.lax.stop_gradient(teacher).astype(jnp.float32) / temperature)
  s = jax.nn.log_softmax(student.astype(jnp.float32) / temperature)
  kl = jnp.sum(jnp.exp(t) * (t - s), axis=-1)
  return temperature ** 2 * jnp.sum(kl * mask)


def make_train_step(task: ForwardLoss, spec: peft.AdapterSpec | None, optimizer,
                    supernet: bool | SupernetOptions):
  """train_step(state, frozen, batch) -> (state, metrics, subnet). `frozen` is never
  differentiated: gradients are taken w.r.t. state['trainable'] only.

  supernet: False trains state['subnet']; True draws one subnet per step (the
  authors); SupernetOptions as they say (the third output is then the
  (subnets, layers, supports) stack when a step trains more than one)."""
  options = (SupernetOptions() if supernet is True else supernet) if spec is not None else None
  options = options or None  # False -> fixed subnet
  # The sandwich's head and the distillation teacher (without a sandwich a separate
  # forward): the largest subnet or the anchor, read here: numpy, not traced.
  anchor = anchor_subnet(spec, options) if options is not None else None

  def train_step(state, frozen, batch):
    k_subnet, k_dropout = step_keys(state)
    if options is not None:
      subnets = draw_subnets(spec, options, state, anchor)
    else:
      subnets = jnp.asarray(state['subnet'])[None]
    num = subnets.shape[0]
    has_teacher = options is not None and options.sandwich != 'none'
    distill = options is not None and options.distill > 0

    def loss_fn(trainable):
      params, adapters = _model_params(trainable, frozen), _adapters(spec, trainable)
      forward = lambda subnet, key: task.forward(params, adapters, subnet, batch, True, key)
      # One subnet: the step's dropout key, as before these options; several: one each.
      keys = [k_dropout] if num == 1 else [jax.random.fold_in(k_dropout, i) for i in range(num)]
      outs = [forward(subnets[i], keys[i]) for i in range(num)]
      teacher = None
      if distill:
        teacher = (outs[0] if has_teacher else
                   forward(jnp.asarray(anchor), jax.random.fold_in(k_dropout, num)))
        teacher = jax.lax.stop_gradient(teacher)
      losses, corrects = [], []
      for i, out in enumerate(outs):
        loss_sum, n, correct = task.loss(out, batch)
        loss = loss_sum / jnp.maximum(n, 1.0)
        if distill and not (has_teacher and i == 0):
          kl = distillation_loss(out, teacher, batch, options.temperature) / jnp.maximum(n, 1.0)
          loss = (1.0 - options.distill) * loss + options.distill * kl
        losses.append(loss)
        corrects.append(correct)
      if num == 1:
        return losses[0], (n, corrects[0])
      if options.head_weight:
        loss = sum(w * l for w, l in zip(options.loss_weights(), losses))
      else:  # the mean, computed as before head_weight existed (the same float32 rounding)
        loss = sum(losses) / num
      return loss, (n, sum(corrects) / num)

    (loss, (n, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['trainable'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['trainable'])
    trainable = optax.apply_updates(state['trainable'], updates)
    if spec is None:
      subnet_params = jnp.zeros((), jnp.int32)
    elif num == 1:
      subnet_params = subnet_lib.count_params(spec, subnets[0])
    else:  # the mean over the step's subnets
      counts = jax.vmap(lambda s: subnet_lib.count_params(spec, s))(subnets)
      subnet_params = jnp.round(jnp.mean(counts.astype(jnp.float32))).astype(counts.dtype)
    metrics = {'loss': loss, 'accuracy': correct / jnp.maximum(n, 1.0), 'examples': n,
               'grad_norm': optax.tree.norm(grads), 'subnet_params': subnet_params}
    new_state = dict(state, step=state['step'] + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics, (subnets[0] if num == 1 else subnets)

  return train_step


def make_eval_step(task: ForwardLoss, spec: peft.AdapterSpec | None, predictions=None):
  """eval_step(trainable, frozen, batch, subnet) -> sums (loss, examples, correct); with
  `predictions` ((outputs, batch) -> (per-example predictions, weights), a task's),
  (sums, predictions): the metrics of a whole split are computed from them on the host."""

  def eval_step(trainable, frozen, batch, subnet):
    out = task.forward(_model_params(trainable, frozen), _adapters(spec, trainable), subnet,
                       batch, False, None)
    sums = jnp.stack(task.loss(out, batch))
    return sums if predictions is None else (sums, predictions(out, batch)[0])

  return eval_step
