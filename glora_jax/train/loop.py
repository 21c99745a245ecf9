"""train_and_evaluate(config, workdir): the whole training run, top to bottom.

Sections: validate config, mesh, task and data, adapters and trainable split,
optimizer and state, shardings and jit, restore, loop (log, evaluate,
checkpoint), final summary.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from glora_jax import data, peft
from glora_jax.adapters import glora, lora
from glora_jax.search import subnet as subnet_lib
from glora_jax.train import checkpoint, sharding, steps, tasks

METHODS = ('glora', 'lora', 'surm', 'full', 'linear_probe')
ADAPTER_METHODS = ('glora', 'lora', 'surm')


class ConfigError(ValueError):
  """A configuration value that cannot work; raised before anything is written."""


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN/Inf; the last good checkpoint is kept."""


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
  need(config.on_nonfinite in ('stop', 'skip'),
       f"on_nonfinite '{config.on_nonfinite}' is unknown; allowed: stop, skip")
  if config.method in ADAPTER_METHODS:
    family(config)  # raises for bad ranks / names
  if config.method == 'glora' and config.get('subnet'):
    need(pathlib.Path(config.subnet).is_file(), f'subnet file {config.subnet} does not exist')
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


def family(config):
  """The adapter family a config asks for."""
  a = config.adapter
  try:
    if config.method == 'glora':
      return glora.space(ranks=tuple(a.ranks), structured_b=tuple(a.get('structured_b', ())))
    if config.method == 'lora':
      return lora.space(rank=a.lora_rank, alpha=a.lora_alpha, mode=a.get('lora_mode', 'weight'))
    if config.method == 'surm':
      from glora_jax.adapters import surm
      return surm.space(**dict(a.surm))
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


# --------------------------------------------------------------------------- #
# Pieces shared with search.py
# --------------------------------------------------------------------------- #


@dataclasses.dataclass
class Run:
  """Everything built from a config, before any step runs."""
  config: Any
  bundle: tasks.Bundle
  mesh: Any
  spec: peft.AdapterSpec | None
  trainable: dict
  frozen: dict
  fixed_subnet: np.ndarray | None


def build(config) -> Run:
  validate(config)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.model,
                            jax.devices()[:config.mesh.get('num_devices', 0) or None])
  try:
    bundle = tasks.build(config)
  except (ValueError, KeyError, AttributeError) as e:  # unknown dataset, model, config field
    raise ConfigError(f'{type(e).__name__ if not isinstance(e, ValueError) else "config"}: {e}') from None
  params = bundle.params
  adapters = None
  if config.method in ADAPTER_METHODS:
    targets = config.adapter.get('targets') or bundle.default_targets
    try:
      adapters = peft.attach(params, family(config), targets=targets,
                             exclude=config.adapter.get('exclude') or None,
                             key=jax.random.fold_in(jax.random.key(config.seed), 1))
    except ValueError as e:
      raise ConfigError(f'adapter: {e}') from None
  if config.method == 'full':
    model_trainable, frozen = params, {}
  elif bundle.head_pattern is None:  # no task head (causal LM): only adapters train
    model_trainable, frozen = {}, params
  else:
    model_trainable, frozen = peft.partition(params, [bundle.head_pattern])
  frozen_dtype = jnp.dtype(config.model.get('frozen_dtype', 'float32'))
  frozen = jax.tree.map(lambda x: x.astype(frozen_dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                        frozen)
  try:
    bundle.splits  # read the data now that the cheap checks have passed
  except ValueError as e:
    raise ConfigError(f'data: {e}') from None
  trainable = {'model': model_trainable, 'adapters': {} if adapters is None else adapters.params}
  spec = None if adapters is None else adapters.spec
  fixed = None
  if spec is not None:
    if config.get('subnet'):
      fixed = subnet_lib.loads(spec, pathlib.Path(config.subnet).read_text())
    elif not spec.searchable:
      fixed = np.zeros(spec.num_options.shape, np.int32)
  return Run(config, bundle, mesh, spec, trainable, frozen, fixed)


def eval_subnet(run: Run) -> np.ndarray:
  """The subnet used to evaluate during training: the fixed one, or for a
  supernet the largest (every support at its biggest option), a stable monitor."""
  if run.spec is None:
    return np.zeros((1, 1), np.int32)
  return run.fixed_subnet if run.fixed_subnet is not None else subnet_lib.largest(run.spec)


def make_evaluator(run: Run, batch_size: int):
  """evaluate(trainable, arrays, subnet) -> (mean loss, accuracy), jitted once."""
  eval_step = steps.make_eval_step(run.bundle.task, run.spec)
  frozen_sh = sharding.tree_shardings(run.frozen, run.bundle.partition_rules, run.mesh)
  rep = sharding.replicated(run.mesh)
  jitted = jax.jit(eval_step, in_shardings=(rep, frozen_sh, sharding.batch_sharding(run.mesh), rep),
                   out_shardings=rep)

  def evaluate(trainable, frozen, arrays, subnet):
    totals = np.zeros(3)
    for batch in data.eval_iterator(arrays, batch_size):
      out = jitted(trainable, frozen, sharding.put_batch(batch, run.mesh), jnp.asarray(subnet))
      totals += np.asarray(jax.device_get(out), np.float64)
    return totals[0] / max(totals[1], 1), totals[2] / max(totals[1], 1)

  return evaluate


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #


def _schedule(config, total_steps: int, steps_epoch: int):
  o = config.optim
  if o.schedule == 'constant':
    return o.lr
  warmup = o.get('warmup_steps', 0) or o.get('warmup_epochs', 0) * steps_epoch
  return optax.warmup_cosine_decay_schedule(
      init_value=o.get('warmup_init_lr', 0.0), peak_value=o.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=o.get('min_lr', 0.0))


def _plot(rows: list[dict], path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  steps_ = [r['step'] for r in rows if r.get('train_loss') not in (None, '')]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot(steps_, [float(r['train_loss']) for r in rows if r.get('train_loss') not in (None, '')])
  axes[0].set(xlabel='step', ylabel='train loss', title='training loss')
  ev = [r for r in rows if r.get('val_accuracy') not in (None, '')]
  axes[1].plot([r['step'] for r in ev], [float(r['val_accuracy']) for r in ev], 'o-')
  axes[1].set(xlabel='step', ylabel='accuracy', title='validation accuracy')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


class _Metrics:
  """Appends rows to workdir/metrics.csv (kept across resumes)."""
  FIELDS = ('step', 'epoch', 'train_loss', 'train_accuracy', 'lr', 'subnet_params',
            'examples_per_s', 'val_loss', 'val_accuracy')

  def __init__(self, path: pathlib.Path, resume_step: int):
    self.path = path
    self.rows = []
    if path.exists():  # drop rows a killed run logged after its last checkpoint
      with open(path) as f:
        self.rows = [r for r in csv.DictReader(f) if int(r['step']) <= resume_step]
    with open(path, 'w', newline='') as f:
      w = csv.DictWriter(f, self.FIELDS)
      w.writeheader()
      w.writerows(self.rows)

  def add(self, **row):
    row = {k: row.get(k, '') for k in self.FIELDS}
    self.rows.append(row)
    with open(self.path, 'a', newline='') as f:
      csv.DictWriter(f, self.FIELDS).writerow(row)


def make_training(run: Run):
  """(batches, optimizer, lr schedule, initial state) of a run."""
  config = run.config
  # Training batches keep the protocol's partial last batch, padded to a static
  # shape and masked out of the mean: the same update as a smaller batch, one compile.
  batches = data.BatchIterator(run.bundle.splits['train'], config.batch_size, shuffle=True,
                               seed=config.seed, num_epochs=config.num_epochs,
                               drop_remainder=config.drop_remainder,
                               pad_remainder=not config.drop_remainder)
  per_epoch = batches.batches_per_epoch
  schedule = _schedule(config, per_epoch * config.num_epochs, per_epoch)
  optimizer = steps.make_optimizer(schedule, config.optim.weight_decay, config.optim.b1,
                                   config.optim.b2, config.optim.eps,
                                   config.optim.get('clip_norm') or None)
  subnet = (run.fixed_subnet if run.fixed_subnet is not None
            else np.zeros((1, 1) if run.spec is None else run.spec.num_options.shape, np.int32))
  return batches, optimizer, schedule, steps.init_state(run.trainable, optimizer, config.seed, subnet)


def restore_trainable(run: Run, state, directory) -> dict:
  """The trainable params of the latest checkpoint under `directory` (a train.py
  workdir), checked against this run's configuration."""
  mngr = checkpoint.manager(pathlib.Path(directory) / 'checkpoints')
  try:
    restored = checkpoint.restore(mngr, checkpoint.abstract(state),
                                  fingerprint(run.config, run.spec, run.trainable))
  finally:
    mngr.close()
  if restored is None:
    raise checkpoint.CheckpointMismatchError(f'no checkpoint in {directory}/checkpoints')
  return restored[1]['trainable']


def make_jitted_step(run: Run, optimizer, state):
  """(jitted step, state shardings, frozen shardings). Trainable state is
  replicated (it is small), the frozen backbone sharded by the model's rules,
  batches split over 'data'; the state is donated. Non-finite steps are flagged,
  and with on_nonfinite='skip' they leave params and optimizer state unchanged."""
  mesh = run.mesh
  rep = sharding.replicated(mesh)
  state_sh = jax.tree.map(lambda _: rep, state)
  frozen_sh = sharding.tree_shardings(run.frozen, run.bundle.partition_rules, mesh)
  supernet = run.spec is not None and run.fixed_subnet is None
  train_step = steps.make_train_step(run.bundle.task, run.spec, optimizer, supernet)
  skip_nonfinite = run.config.on_nonfinite == 'skip'

  def guarded_step(state, frozen, batch):
    new_state, metrics, subnet = train_step(state, frozen, batch)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    if skip_nonfinite:  # keep the old params/optimizer state, still advance the step
      keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
      new_state = dict(new_state, trainable=keep(new_state['trainable'], state['trainable']),
                       opt_state=keep(new_state['opt_state'], state['opt_state']))
    return new_state, dict(metrics, finite=finite), subnet

  jit_step = jax.jit(guarded_step, in_shardings=(state_sh, frozen_sh, sharding.batch_sharding(mesh)),
                     out_shardings=(state_sh, rep, rep), donate_argnums=(0,))
  return jit_step, state_sh, frozen_sh


def train_and_evaluate(config, workdir, *, stop_after_steps: int | None = None,
                       progress: bool = True) -> dict:
  """Trains, evaluates each epoch, checkpoints, and resumes from `workdir`.

  Returns a summary dict (also written to workdir/summary.json)."""
  run = build(config)  # all config errors surface here, before the workdir is touched
  batches, optimizer, schedule, state = make_training(run)
  per_epoch = batches.batches_per_epoch
  total_steps = per_epoch * config.num_epochs

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  checkpoint.write_json(workdir / 'config.json', json.loads(config.to_json_best_effort()))

  jit_step, state_sh, frozen_sh = make_jitted_step(run, optimizer, state)
  mesh = run.mesh
  frozen = jax.device_put(run.frozen, frozen_sh)
  state = jax.device_put(state, state_sh)
  skip_nonfinite = config.on_nonfinite == 'skip'
  evaluate = make_evaluator(run, config.get('eval_batch_size', config.batch_size))

  # Restore.
  fp = fingerprint(config, run.spec, run.trainable)
  mngr = checkpoint.manager(workdir / 'checkpoints', keep=config.checkpoint.keep,
                            async_save=config.checkpoint.get('async_save', True))
  restored = checkpoint.restore(mngr, checkpoint.abstract(state, state_sh), fp)
  if restored is not None:
    step0, state, extra = restored
    batches.restore(extra['data'])
    print(f'resumed from {workdir}/checkpoints/{step0} (iterator at {extra["data"]})', flush=True)
  elif config.get('init_from'):
    state = dict(state, trainable=jax.device_put(restore_trainable(run, state, config.init_from),
                                                 state_sh['trainable']))
    print(f'initialised the trainable params from {config.init_from}', flush=True)
  metrics_log = _Metrics(workdir / 'metrics.csv', int(state['step']))

  def save(step, force=False):
    checkpoint.save(mngr, step, state, {'data': batches.state, 'fingerprint': fp}, force=force)

  every = config.checkpoint.get('every_steps', 0) or per_epoch
  bar = None
  if progress:
    from tqdm import tqdm
    tty = sys.stdout.isatty()
    bar = tqdm(total=total_steps, initial=int(state['step']), unit='step', file=sys.stdout,
               dynamic_ncols=True, mininterval=0.1 if tty else 30.0)
  val_acc, val_loss = float('nan'), float('nan')
  step = int(state['step'])
  t_last, ex_since = time.perf_counter(), 0
  step_ms = []  # full batches only
  eval_every = config.get('eval_every_epochs', 1)
  stopped_early = False
  for batch in batches:
    epoch = batches.state['epoch'] - (batches.state['position'] == 0)  # epoch of this batch
    t_step = time.perf_counter()
    state, metrics, _ = jit_step(state, frozen, sharding.put_batch(batch, mesh))
    step += 1
    m = jax.device_get(metrics)  # waits for the step: the timing covers fwd, bwd and update
    if batch['mask'].all():
      step_ms.append(1e3 * (time.perf_counter() - t_step))
    if not m['finite'] and not skip_nonfinite:
      mngr.wait_until_finished()
      raise NonFiniteLossError(
          f'non-finite loss ({float(m["loss"])}) at step {step} (epoch {epoch}); the last good '
          f'checkpoint in {workdir}/checkpoints is kept. Lower optim.lr, set optim.clip_norm, '
          'or pass --config.on_nonfinite=skip')
    ex_since += int(m['examples'])
    epoch_done = batches.state['position'] == 0
    if step % config.get('log_every_steps', 10) == 0 or epoch_done:
      now = time.perf_counter()
      lr = float(schedule(step) if callable(schedule) else schedule)
      metrics_log.add(step=step, epoch=epoch, train_loss=float(m['loss']),
                      train_accuracy=float(m['accuracy']), lr=lr,
                      subnet_params=int(m['subnet_params']),
                      examples_per_s=ex_since / max(now - t_last, 1e-9))
      t_last, ex_since = now, 0
    if bar is not None:
      bar.update(1)
      bar.set_postfix(loss=f'{float(m["loss"]):.4f}', epoch=epoch)
    if epoch_done and 'eval' in run.bundle.splits and eval_every and (epoch + 1) % eval_every == 0:
      val_loss, val_acc = evaluate(state['trainable'], frozen, run.bundle.splits['eval'],
                                   eval_subnet(run))
      metrics_log.add(step=step, epoch=epoch, val_loss=val_loss, val_accuracy=val_acc)
      msg = f'epoch {epoch}: val_loss={val_loss:.4f} val_accuracy={val_acc:.4f}'
      bar.write(msg) if bar is not None else print(msg, flush=True)
    if step % every == 0 or epoch_done:
      save(step)
    if stop_after_steps is not None and step >= stop_after_steps:
      stopped_early = True
      break
  if 'eval' in run.bundle.splits and math.isnan(val_acc):  # resumed after the last epoch
    val_loss, val_acc = evaluate(state['trainable'], frozen, run.bundle.splits['eval'],
                                 eval_subnet(run))
  if mngr.latest_step() != step:
    save(step, force=True)
  mngr.wait_until_finished()
  mngr.close()
  if bar is not None:
    bar.close()

  report = (peft.report(run.frozen, peft.Adapters(params=state['trainable']['adapters'], spec=run.spec),
                        eval_subnet(run), head=state['trainable']['model'])
            if run.spec is not None else None)
  trainable_params = int(sum(np.size(x) for x in jax.tree.leaves(state['trainable'])))
  summary = {'step': step, 'epoch': batches.state['epoch'], 'val_accuracy': val_acc, 'val_loss': val_loss,
             'trainable_params': trainable_params,
             'stored_adapter_params': None if report is None else report.stored_adapter_params,
             'finished': not stopped_early,
             # median over full batches after the first 2 (compile, warm-up) of this process
             'median_step_ms': float(np.median(step_ms[2:])) if len(step_ms) > 2 else None}
  checkpoint.write_json(workdir / 'summary.json', summary)
  if metrics_log.rows:
    _plot(metrics_log.rows, workdir / 'curves.png')
  print(f'final: step={step} val_accuracy={val_acc:.4f} trainable_params={trainable_params:,}',
        flush=True)
  return summary
