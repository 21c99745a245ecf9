"""Everything a run is built from its config before a step runs: checks, the BuiltRun,
optimizer and state, jitted steps and evaluator, and restoring a trained workdir.

Sections: config, the BuiltRun, evaluation, training state, restore.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from glora_jax import data, paths, peft, quant
from glora_jax import metrics as task_metrics
from glora_jax import subnet as subnet_lib
from glora_jax.adapters import glora, lora
from glora_jax.errors import CheckpointMismatchError, ConfigError, DataError
from glora_jax.models import registry, stacking
from glora_jax.train import checkpoint, sharding, steps, tasks

METHODS = ('glora', 'lora', 'surm', 'full', 'linear_probe')
ADAPTER_METHODS = ('glora', 'lora', 'surm')


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


def validate(config) -> None:
  """Cheap checks of everything that can be checked without loading data."""
  def need(cond, msg):
    if not cond:
      raise ConfigError(msg)

  need(config.method in METHODS, f"method '{config.method}' is unknown; allowed: {list(METHODS)}")
  if config.task == 'causal_lm':
    need(config.method in ADAPTER_METHODS + ('full',),
         f"method '{config.method}' needs a task head; causal_lm allows {list(ADAPTER_METHODS + ('full',))}")
  need(config.task in tasks.KNOWN_TASKS, f"task '{config.task}' is unknown; allowed: {list(tasks.KNOWN_TASKS)}")
  need(config.optim.lr > 0, f'optim.lr must be > 0, got {config.optim.lr}')
  need(config.optim.weight_decay >= 0, f'optim.weight_decay must be >= 0, got {config.optim.weight_decay}')
  need(config.batch_size > 0, f'batch_size must be > 0, got {config.batch_size}')
  need(config.num_epochs > 0, f'num_epochs must be > 0, got {config.num_epochs}')
  need(config.optim.schedule in ('constant', 'cosine'),
       f"optim.schedule '{config.optim.schedule}' is unknown; allowed: constant, cosine")
  for rule in config.optim.get('lr_multipliers', ()):
    ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
    need(ok and isinstance(rule[1], (int, float)) and rule[1] > 0,
         f'optim.lr_multipliers: each rule is a (path regex, multiplier > 0) pair, got {rule!r}')
    try:
      re.compile(rule[0])
    except re.error as e:
      need(False, f"optim.lr_multipliers: bad regex '{rule[0]}': {e}")
  need(config.on_nonfinite in ('stop', 'skip'),
       f"on_nonfinite '{config.on_nonfinite}' is unknown; allowed: stop, skip")
  if config.method in ADAPTER_METHODS:
    adapter_family(config)  # raises for bad ranks / names
  if config.method == 'glora' and config.get('subnet'):
    need(pathlib.Path(config.subnet).is_file(), f'subnet file {config.subnet} does not exist')
  validate_supernet(config)
  validate_quant(config)
  if config.get('data', {}).get('metrics'):
    try:
      task_metrics.check_names(tuple(config.data.metrics))
    except ValueError as e:
      raise ConfigError(f'data.metrics: {e}') from None
  mesh_data, mesh_model = config.mesh.data, config.mesh.model
  n = config.mesh.get('num_devices', 0) or jax.device_count()
  need(n <= jax.device_count(), f'mesh.num_devices={n} but only {jax.device_count()} devices exist')
  need(mesh_model > 0 and n % mesh_model == 0,
       f'mesh.model={mesh_model} must divide the {n} devices')
  data = n // mesh_model if mesh_data == -1 else mesh_data
  need(data * mesh_model == n, f'mesh data x model = {data} x {mesh_model} must equal the {n} devices')
  need(config.batch_size % data == 0,
       f'batch_size={config.batch_size} is not divisible by the data-parallel size {data}; '
       f'use a multiple of {data}')


def validate_supernet(config) -> None:
  """config.supernet (steps.SupernetOptions): known values, and options other than
  the defaults only where a supernet trains (a fixed subnet ignores them, so a
  searched subnet retrains from its supernet's config)."""
  c = config.get('supernet', None)
  if c is None:
    return
  def need(cond, msg):
    if not cond:
      raise ConfigError(f'supernet.{msg}')
  sandwich, sampling = c.get('sandwich', 'none'), c.get('sampling', 'uniform')
  need(sandwich in steps.SANDWICH, f"sandwich '{sandwich}' is unknown; allowed: {list(steps.SANDWICH)}")
  need(sampling in steps.SAMPLING, f"sampling '{sampling}' is unknown; allowed: {list(steps.SAMPLING)}")
  num_random = c.get('num_random', 1)
  need(isinstance(num_random, int) and not isinstance(num_random, bool) and num_random >= 0,
       f'num_random must be an integer >= 0, got {num_random!r}')
  need(num_random >= 1 or sandwich != 'none',
       "num_random=0 trains no subnet without a sandwich; use num_random >= 1 or "
       "sandwich 'largest' / 'largest_smallest'")
  distill, temperature = c.get('distill', 0.0), c.get('temperature', 1.0)
  need(0.0 <= distill <= 1.0, f'distill must be in [0, 1] (the weight of the KL term), got {distill}')
  need(temperature > 0, f'temperature must be > 0, got {temperature}')
  head_weight = c.get('head_weight', 0.0)
  need(0.0 <= head_weight < 1.0, f'head_weight must be in [0, 1) (0: the mean over subnets), got {head_weight}')
  need(not head_weight or (sandwich != 'none' and num_random >= 1),
       "head_weight weighs the sandwich's head against the other subnets: it needs sandwich "
       "'largest' / 'largest_smallest' and num_random >= 1")
  epochs = c.get('progressive_epochs', 0.0)
  need(0.0 <= epochs <= config.num_epochs,
       f'progressive_epochs must be in [0, num_epochs={config.num_epochs}], got {epochs}')
  anchor = c.get('anchor', '')
  if anchor:
    need(pathlib.Path(anchor).is_file(), f'anchor: subnet file {anchor} does not exist')
    need(sandwich != 'none' or distill > 0,
         "anchor takes the largest subnet's roles, which only sandwich 'largest' / "
         "'largest_smallest' or distill > 0 use; set one of them")
  options = steps.supernet_options(config, steps_per_epoch=1)
  if options != steps.SupernetOptions(widen_steps=options.widen_steps) or epochs:
    if config.method != 'glora':
      raise ConfigError(f"supernet options other than the defaults train a GLoRA supernet; method "
                        f"is '{config.method}' (leave config.supernet at its defaults)")
    need(not (distill > 0 and config.task == 'causal_lm'),
         'distill needs a classification task (soft labels over classes); task is causal_lm')


def adapter_family(config):
  """The adapter family (glora.GLoRA, lora.LoRA, surm.SURM) a config asks for."""
  a = config.adapter
  try:
    if config.method == 'glora':
      return glora.family(ranks=tuple(a.ranks), structured_b=tuple(a.get('structured_b', ())),
                          share_vectors=a.get('share_vectors', True))
    if config.method == 'lora':
      return lora.family(rank=a.lora_rank, alpha=a.lora_alpha, mode=a.get('lora_mode', 'activation'))
    if config.method == 'surm':
      from glora_jax.adapters import surm
      return surm.family(**dict(a.surm))
  except (ValueError, TypeError) as e:
    raise ConfigError(f'adapter: {e}') from None
  raise ConfigError(f"method '{config.method}' has no adapter family")


def fingerprint(config, spec: peft.AdapterSpec | None, trainable) -> dict:
  """What a checkpoint must match to be restored into this run."""
  return {
      'task': config.task, 'model': config.model.name, 'method': config.method,
      'adapted_layers': None if spec is None else len(spec.layers),
      'adapter_family': None if spec is None else repr(sorted({repr(l.family) for l in spec.layers})),
      'trainable_shapes': {k: list(np.shape(v)) for k, v in peft.flatten(trainable).items()},
  }


def training_fingerprint(config, spec: peft.AdapterSpec | None, trainable) -> dict:
  """fingerprint plus how the run trains (checkpoint.TRAINING_KEYS): a supernet's
  options (config.supernet) and the frozen base's quantization, so a resume with
  other options fails instead of mixing two recipes in one run. Progressive
  shrinking is fingerprinted in epochs."""
  fp = fingerprint(config, spec, trainable)
  fp['frozen_quant'] = frozen_quant_name(config)
  if config.method == 'glora' and not config.get('subnet'):
    options = steps.supernet_options(config, steps_per_epoch=1)
    fp['supernet'] = dict(dataclasses.asdict(options), widen_steps=None,
                          progressive_epochs=float(config.get('supernet', {}).get('progressive_epochs', 0.0)))
    for field in ('anchor', 'head_weight'):  # at the default: as checkpoints written
      if not getattr(options, field):          # before the field existed have it
        del fp['supernet'][field]
  return fp


def load_config(workdir) -> ml_collections.ConfigDict:
  """The config a train.py workdir was trained with (its config.json)."""
  path = pathlib.Path(workdir) / 'config.json'
  if not path.is_file():
    raise CheckpointMismatchError(
        f'{workdir} is not a train.py workdir: {path} does not exist')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


FROZEN_QUANT = ('none',) + quant.KINDS


def frozen_quant_name(config) -> str:
  """'none', or e.g. 'nf4, block 64, double-quantized scales': the frozen base's
  quantization as the fingerprint and a summary name it."""
  mc = config.model
  return quant_name(mc.get('frozen_quant', 'none'), mc.get('frozen_quant_block', 64),
                    mc.get('frozen_quant_double', False), mc.get('frozen_quant_pad', False))


def quant_name(kind: str, block: int, double: bool, pad: bool) -> str:
  """'none', or e.g. 'nf4, block 64, double-quantized scales'."""
  if kind == 'none':
    return kind
  return (f'{kind}, block {block}' + (', double-quantized scales' if double else '')
          + (', padded' if pad else ''))


def validate_quant(config) -> None:
  """config.model.frozen_quant and its block, double and pad options."""
  mc = config.model
  kind = mc.get('frozen_quant', 'none')
  if kind not in FROZEN_QUANT:
    raise ConfigError(f"model.frozen_quant '{kind}' is unknown; allowed: {list(FROZEN_QUANT)}")
  block = mc.get('frozen_quant_block', 64)
  if kind != 'none':
    try:
      quant.check_block((block,), block, kind)
    except ValueError as e:
      raise ConfigError(f'model.frozen_quant_block: {e}') from None
  for field in ('frozen_quant_double', 'frozen_quant_pad'):
    if not isinstance(mc.get(field, False), bool):
      raise ConfigError(f'model.{field} must be True or False, got {mc.get(field)!r}')


def quantize_frozen(config, frozen: dict, model_trainable: dict, targets: str) -> dict:
  """`frozen` with the 2-D kernels `targets` matches (the model's default adapter
  targets: every linear layer but the head) quantized as config.model.frozen_quant
  says. As QLoRA, only linear layers: embeddings, norms, biases and the head (read by
  the chunked loss and tied embeddings) stay float. A trained kernel (method 'full'),
  a block that does not divide a kernel (without frozen_quant_pad) or no kernel to
  quantize is a ConfigError."""
  mc = config.model
  kind = mc.get('frozen_quant', 'none')
  if kind == 'none':
    return frozen
  trained = _kernel_paths(model_trainable, targets)
  if trained:
    raise ConfigError(f"model.frozen_quant='{kind}' quantizes frozen kernels; method "
                      f"'{config.method}' trains {paths.examples(trained, 3)}: use "
                      "model.frozen_quant='none' or a method with a frozen backbone")
  if not _kernel_paths(frozen, targets):
    raise ConfigError(f"model.frozen_quant='{kind}': no frozen 2-D kernel matches '{targets}'; "
                      f'frozen paths look like {paths.examples(paths.flatten(frozen), 3)}')
  try:
    return quantize_kernels(frozen, targets, kind, mc.get('frozen_quant_block', 64),
                            mc.get('frozen_quant_double', False), mc.get('frozen_quant_pad', False))
  except ValueError as e:
    said = str(e).replace('(pad=True)', '(model.frozen_quant_pad=True)')
    raise ConfigError(f'model.frozen_quant_block: {said}') from None


def _is_kernel(targets: str, path: str, x) -> bool:
  return bool(re.fullmatch(targets, path)) and np.ndim(x) == 2


def _kernel_paths(tree: dict, targets: str) -> list[str]:
  return [p for p, x in paths.flatten(tree).items() if _is_kernel(targets, p, x)]


def quantize_kernels(tree: dict, targets: str, kind: str, block: int = 64, double: bool = False,
                     pad: bool = False) -> dict:
  """`tree` with each 2-D leaf whose path fully matches `targets` quantized
  (quant.quantize; arrays or, under jax.eval_shape, shapes). A ValueError names a
  kernel the block does not divide."""
  flat = paths.flatten(tree)
  for p in _kernel_paths(tree, targets):
    flat[p] = quant.quantize(flat[p], kind, block, double, pad=pad, name=f"kernel '{p}'")
  return paths.unflatten(flat)


# --------------------------------------------------------------------------- #
# The BuiltRun: shared by training, search and the benchmarks
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class BuiltRun:
  """Everything built from a config, before any step runs."""
  config: Any
  model_data: tasks.ModelAndData
  mesh: Any
  spec: peft.AdapterSpec | None
  trainable: dict
  frozen: dict
  fixed_subnet: np.ndarray | None
  # How frozen and trainable model params stack the layers (model.scan_layers), or None;
  # model_data.params, adapters and merges keep the per-layer layout.
  stack: stacking.Stack | None = None


def build(config) -> BuiltRun:
  validate(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model,
                            jax.devices()[:config.mesh.get('num_devices', 0) or None])
  try:
    model_data = tasks.build(config)
  except DataError as e:  # a file, field, label or split that cannot be read as asked
    raise ConfigError(f'data: {e}') from None
  except (ValueError, KeyError, AttributeError) as e:  # unknown dataset, model, config field
    raise ConfigError(f'{type(e).__name__ if not isinstance(e, ValueError) else "config"}: {e}') from None
  params = model_data.params
  adapters = None
  if config.method in ADAPTER_METHODS:
    targets = config.adapter.get('targets') or model_data.default_targets
    try:
      adapters = peft.attach(params, adapter_family(config), targets=targets,
                             exclude=config.adapter.get('exclude') or None,
                             key=jax.random.fold_in(jax.random.key(config.seed), 1))
    except ValueError as e:
      raise ConfigError(f'adapter: {e}') from None
  if config.method == 'full':
    model_trainable, frozen = params, {}
  elif model_data.head_pattern is None:  # no task head (causal LM): only adapters train
    model_trainable, frozen = {}, params
  else:
    model_trainable, frozen = peft.partition(params, [model_data.head_pattern])
  frozen = quantize_frozen(config, frozen, model_trainable, model_data.default_targets)
  frozen_dtype = jnp.dtype(config.model.get('frozen_dtype', 'float32'))

  def cast(x):  # a quantized kernel is dequantized to the frozen dtype
    if quant.is_quantized(x):
      return dataclasses.replace(x, dtype_name=frozen_dtype.name)
    return x.astype(frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
  frozen = jax.tree.map(cast, frozen, is_leaf=quant.is_quantized)
  stack = registry.stack_of(model_data.model)  # scan_layers: the layers' params stacked
  frozen, model_trainable = stacking.stack(frozen, stack), stacking.stack(model_trainable, stack)
  try:
    model_data.splits  # read the data now that the cheap checks have passed
  except ValueError as e:
    raise ConfigError(f'data: {e}') from None
  # scan_layers: the blocks' adapters trained stacked too (one leaf per module and
  # adapter leaf, not one per layer: the optimizer's program stays flat in depth).
  trainable = {'model': model_trainable,
               'adapters': {} if adapters is None else stacking.stack_by_path(
                   adapters.params, adapters.spec.paths, stack)}
  trainable_paths = paths.flatten(trainable)
  for pattern, _ in config.optim.get('lr_multipliers', ()):
    try:  # a rule that matches nothing would change nothing, silently
      paths.match_paths(trainable_paths, pattern, 'lr multiplier pattern')
    except ValueError as e:
      raise ConfigError(f'optim.lr_multipliers: {e}') from None
  spec = None if adapters is None else adapters.spec
  if spec is not None and model_data.metadata.get('loss_chunk'):
    on_head = [l.path for l in spec.layers if l.path.split('/')[0] in ('lm_head', 'embed_tokens')]
    if on_head:  # the chunked loss reads the head's kernel itself, past the interception point
      raise ConfigError(f'model.loss_chunk={model_data.metadata["loss_chunk"]} computes the loss '
                        f'from the frozen output kernel; adapters on {on_head} would be '
                        'skipped: set model.loss_chunk=0 or leave the head out of adapter.targets')
  fixed = None
  if spec is not None:
    if config.get('subnet'):
      try:  # malformed JSON, a layer missing, an unknown option: one line naming the file
        fixed = subnet_lib.loads(spec, pathlib.Path(config.subnet).read_text())
      except ValueError as e:
        raise ConfigError(f'subnet file {config.subnet}: {e}; expected a subnet JSON as '
                          "search.py writes (best_subnet.json)") from None
    elif not spec.searchable:
      fixed = np.zeros(spec.num_options.shape, np.int32)
    elif config.get('supernet', {}).get('anchor'):
      try:  # a subnet of another model or space is refused before anything trains
        steps.anchor_subnet(spec, steps.supernet_options(config, steps_per_epoch=1))
      except ValueError as e:
        raise ConfigError(f'supernet.anchor: {e}') from None
  return BuiltRun(config, model_data, mesh, spec, trainable, frozen, fixed, stack)


def merge_base(run: BuiltRun) -> dict:
  """The params a merge starts from (export.merged_params): the model's own, each
  leaf in its own dtype, with the run's quantized frozen kernels in place of their
  float ones, so the adapters fold into the dequantized W0 the run trained with."""
  flat = paths.flatten(run.model_data.params)
  for path, leaf in paths.flatten(stacking.unstack(run.frozen, run.stack)).items():
    if quant.is_quantized(leaf):
      flat[path] = dataclasses.replace(leaf, dtype_name=jnp.dtype(flat[path].dtype).name)
  return paths.unflatten(flat)


# --------------------------------------------------------------------------- #
# Evaluation
# --------------------------------------------------------------------------- #


def eval_subnet(run: BuiltRun) -> np.ndarray:
  """The subnet used to evaluate during training: the fixed one, or for a
  supernet the largest (every support at its biggest option), a stable monitor."""
  if run.spec is None:
    return np.zeros((1, 1), np.int32)
  return run.fixed_subnet if run.fixed_subnet is not None else subnet_lib.largest(run.spec)


def make_evaluator(run: BuiltRun, batch_size: int):
  """evaluate(trainable, frozen, split, subnet) -> (mean loss, {metric: value}) over a
  whole split (run.model_data.score), jitted once."""
  model_data = run.model_data
  step = steps.make_eval_step(model_data.forward_loss, run.spec,
                              model_data.predictions if model_data.scored else None)

  def eval_step(trainable, frozen, batch, subnet):
    # A scored task's labels and row mask come back with its predictions: with several
    # hosts each holds only its own rows of the batch, the outputs are global.
    out = step(trainable, frozen, batch, subnet)
    return out if not model_data.scored else (*out, batch['label'], batch['mask'])
  frozen_specs, trainable_specs = param_specs(run)
  rep = sharding.replicated(run.mesh)
  jitted = jax.jit(sharding.under_mesh(run.mesh, eval_step),
                   in_shardings=(sharding.named(run.mesh, trainable_specs),
                                 sharding.named(run.mesh, frozen_specs),
                                 sharding.batch_sharding(run.mesh), rep),
                   out_shardings=rep)

  def evaluate(trainable, frozen, arrays, subnet):
    totals, preds, targets = np.zeros(3), [], []
    for batch in data.eval_iterator(arrays, batch_size):
      out = jax.device_get(jitted(trainable, frozen, sharding.put_batch(batch, run.mesh),
                                  jnp.asarray(subnet)))
      if model_data.scored:
        out, p, labels, mask = out
        real = np.asarray(mask) > 0
        preds.append(np.asarray(p)[real])
        targets.append(np.asarray(labels)[real])
      totals += np.asarray(out, np.float64)
    scores = (model_data.score(totals, np.concatenate(preds), np.concatenate(targets))
              if model_data.scored else model_data.score(totals))
    return totals[0] / max(totals[1], 1), scores

  return evaluate


# --------------------------------------------------------------------------- #
# Training state
# --------------------------------------------------------------------------- #


def _schedule(config, total_steps: int, steps_epoch: int):
  o = config.optim
  if o.schedule == 'constant':
    return o.lr
  warmup = o.get('warmup_steps', 0) or o.get('warmup_epochs', 0) * steps_epoch
  return optax.warmup_cosine_decay_schedule(
      init_value=o.get('warmup_init_lr', 0.0), peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=o.get('min_lr', 0.0))


def optimizer_and_schedule(config, steps_per_epoch: int):
  """(optimizer, lr schedule) of a config; the schedule's length is counted in
  batches of the training set, `steps_per_epoch` of them an epoch."""
  schedule = _schedule(config, steps_per_epoch * config.num_epochs, steps_per_epoch)
  optimizer = steps.make_optimizer(schedule, config.optim.weight_decay, config.optim.b1,
                                   config.optim.b2, config.optim.eps,
                                   config.optim.get('clip_norm') or None,
                                   config.optim.get('lr_multipliers', ()))
  return optimizer, schedule


def _state_subnet(run: BuiltRun) -> np.ndarray:
  # A supernet draws its subnet in each step; the state's entry only keeps the shape.
  return (run.fixed_subnet if run.fixed_subnet is not None
          else np.zeros((1, 1) if run.spec is None else run.spec.num_options.shape, np.int32))


def make_training(run: BuiltRun):
  """(batches, optimizer, lr schedule, initial state) of a run."""
  config = run.config
  # Training batches keep the protocol's partial last batch, padded to a static
  # shape and masked out of the mean: the same update as a smaller batch, one compile.
  batches = data.BatchIterator(run.model_data.splits['train'], config.batch_size, shuffle=True,
                               seed=config.seed, num_epochs=config.num_epochs,
                               drop_remainder=config.drop_remainder,
                               pad_remainder=not config.drop_remainder)
  optimizer, schedule = optimizer_and_schedule(config, batches.batches_per_epoch)
  return batches, optimizer, schedule, steps.init_state(run.trainable, optimizer, config.seed,
                                                        _state_subnet(run))


def abstract_state(run: BuiltRun) -> dict:
  """The shapes and dtypes of a run's training state, by jax.eval_shape: a restore
  template without a data iterator or allocated optimizer state. The schedule's
  length (any will do) changes its values, never the optimizer state's structure."""
  optimizer, _ = optimizer_and_schedule(run.config, steps_per_epoch=1)
  shapes = jax.eval_shape(
      lambda trainable: steps.init_state(trainable, optimizer, run.config.seed, _state_subnet(run)),
      run.trainable)
  # On the default device, where make_training's state lives. Left unset, orbax
  # restores onto the mesh the checkpoint was saved from, which may not exist here.
  default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return checkpoint.abstract(shapes, jax.tree.map(lambda _: default, shapes))


def partition_rules(run: BuiltRun) -> list:
  """The config's rules (mesh.rules) first, then the model's own."""
  return sharding.as_rules(run.config.mesh.get('rules', ())) + list(run.model_data.partition_rules)


def param_specs(run: BuiltRun, notes: list[str] | None = None) -> tuple[dict, dict]:
  """(frozen specs, trainable specs) of a run (sharding.param_specs)."""
  return sharding.param_specs(run.frozen, run.trainable['model'], run.spec, partition_rules(run),
                              run.mesh, fsdp=bool(run.config.mesh.get('fsdp', False)), notes=notes,
                              stack=run.stack)


def plain_param_specs(run: BuiltRun, params) -> dict:
  """Specs of a plain param tree (a merge: no adapters, layers unrolled, kernels float or
  quantized) by the run's rules and FSDP, as param_specs places the run's own."""
  return sharding.partition_specs(params, partition_rules(run), run.mesh,
                                  fsdp=bool(run.config.mesh.get('fsdp', False)))


def make_jitted_step(run: BuiltRun, optimizer, state):
  """(jitted step, state shardings, frozen shardings). The frozen backbone is
  sharded by the partition rules, adapters and their optimizer state like their
  kernels, batches split over 'data'; the state is donated. Non-finite steps are
  flagged, and with on_nonfinite='skip' they leave params and optimizer state
  unchanged. Leaves a mesh axis does not divide are replicated and listed once."""
  mesh = run.mesh
  rep = sharding.replicated(mesh)
  notes: list[str] = []
  frozen_specs, trainable_specs = param_specs(run, notes)
  specs = sharding.train_state_specs(state, optimizer, trainable_specs)
  if notes and jax.process_index() == 0:
    print(f'sharding: {len(notes)} leaves replicated on dimensions the mesh does not divide, '
          f'e.g. {notes[0]}', flush=True)
  state_sh, frozen_sh = sharding.named(mesh, specs), sharding.named(mesh, frozen_specs)
  supernet = False
  if run.spec is not None and run.fixed_subnet is None:
    per_epoch = None
    if run.config.get('supernet', {}).get('progressive_epochs', 0):
      per_epoch = data.BatchIterator(run.model_data.splits['train'], run.config.batch_size, shuffle=False,
                                     drop_remainder=run.config.drop_remainder).batches_per_epoch
    supernet = steps.supernet_options(run.config, per_epoch)
  train_step = steps.make_train_step(run.model_data.forward_loss, run.spec, optimizer, supernet)
  skip_nonfinite = run.config.on_nonfinite == 'skip'

  def guarded_step(state, frozen, batch):
    new_state, metrics, subnet = train_step(state, frozen, batch)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    if skip_nonfinite:  # keep the old params/optimizer state, still advance the step
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = dict(new_state, trainable=keep(new_state['trainable'], state['trainable']),
                       opt_state=keep(new_state['opt_state'], state['opt_state']))
    return new_state, dict(metrics, finite=finite), subnet

  jit_step = jax.jit(sharding.under_mesh(mesh, guarded_step),
                     in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sh, rep, rep), donate_argnums=(0,))
  return jit_step, state_sh, frozen_sh


# --------------------------------------------------------------------------- #
# Restore a trained workdir
# --------------------------------------------------------------------------- #


def restore_trainable(run: BuiltRun, state, directory) -> dict:
  """The trainable params of the latest checkpoint under `directory` (a train.py
  workdir), checked against this run's configuration. `state` (arrays or
  ShapeDtypeStructs) gives the structure and the placement of what is restored."""
  mngr = checkpoint.manager(pathlib.Path(directory) / 'checkpoints')
  try:
    restored = checkpoint.restore(mngr, checkpoint.abstract(state),
                                  fingerprint(run.config, run.spec, run.trainable))
  finally:
    mngr.close()
  if restored is None:
    raise CheckpointMismatchError(f'no checkpoint in {directory}/checkpoints')
  return restored[1]['trainable']


def load_trained(workdir, config=None, *, run: BuiltRun | None = None) -> tuple[BuiltRun, dict]:
  """(run, trainable params) of the latest checkpoint in a train.py workdir.

  config: defaults to the workdir's config.json. run: an already built run to
  restore into (e.g. a retrained subnet of the same supernet) instead of building
  one. Only shapes are built for the template (`abstract_state`)."""
  if run is None:
    run = build(load_config(workdir) if config is None else config)
  return run, restore_trainable(run, abstract_state(run), workdir)
