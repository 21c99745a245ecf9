"""Pure train and eval steps over (trainable, frozen) pytrees, jitted with shardings.

Supernet training draws a fresh subnet from the step's key inside the jitted step;
fixed-subnet training reads the subnet from the state. Neither recompiles.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from glora_jax import peft
from glora_jax import subnet as subnet_lib

State = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Task:
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
                   eps: float = 1e-8, clip_norm: float | None = None) -> optax.GradientTransformation:
  """AdamW on every trainable leaf (as torch.optim.AdamW), optional global-norm clip."""
  parts = []
  if clip_norm:
    parts.append(optax.clip_by_global_norm(clip_norm))
  parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
  return optax.chain(*parts)


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


def make_train_step(task: Task, spec: peft.AdapterSpec | None, optimizer, supernet: bool):
  """train_step(state, frozen, batch) -> (state, metrics). `frozen` is never
  differentiated: gradients are taken w.r.t. state['trainable'] only."""

  def train_step(state, frozen, batch):
    k_subnet, k_dropout = step_keys(state)
    if spec is not None and supernet:
      subnet = subnet_lib.sample(k_subnet, spec)
    else:
      subnet = state['subnet']

    def loss_fn(trainable):
      out = task.forward(_model_params(trainable, frozen), _adapters(spec, trainable), subnet,
                         batch, True, k_dropout)
      loss_sum, n, correct = task.loss(out, batch)
      return loss_sum / jnp.maximum(n, 1.0), (n, correct)

    (loss, (n, correct)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['trainable'])
    updates, opt_state = optimizer.update(grads, state['opt_state'], state['trainable'])
    trainable = optax.apply_updates(state['trainable'], updates)
    metrics = {'loss': loss, 'accuracy': correct / jnp.maximum(n, 1.0), 'examples': n,
               'grad_norm': optax.tree.norm(grads),
               'subnet_params': (subnet_lib.count_params(spec, subnet) if spec is not None
                                 else jnp.zeros((), jnp.int32))}
    new_state = dict(state, step=state['step'] + 1, trainable=trainable, opt_state=opt_state)
    return new_state, metrics, subnet

  return train_step


def make_eval_step(task: Task, spec: peft.AdapterSpec | None):
  """eval_step(trainable, frozen, batch, subnet) -> sums (loss, examples, correct)."""

  def eval_step(trainable, frozen, batch, subnet):
    out = task.forward(_model_params(trainable, frozen), _adapters(spec, trainable), subnet,
                       batch, False, None)
    return task.loss(out, batch)

  return eval_step
