"""train_and_evaluate(config, workdir): the training loop, top to bottom.

Sections: build the run (train/setup.py), restore, loop (log, evaluate,
checkpoint), final summary.
"""
from __future__ import annotations

import json
import math
import pathlib
import sys
import time

import jax
import numpy as np

from glora_jax import peft
from glora_jax.errors import NonFiniteLossError
from glora_jax.train import checkpoint, setup, sharding
from glora_jax.train import metrics as metrics_lib


def train_and_evaluate(config, workdir, *, stop_after_steps: int | None = None,
                       progress: bool = True) -> dict:
  """Trains, evaluates each epoch, checkpoints, and resumes from `workdir`.

  Returns a summary dict (also written to workdir/summary.json)."""
  run = setup.build(config)  # all config errors surface here, before the workdir is touched
  batches, optimizer, schedule, state = setup.make_training(run)
  per_epoch = batches.batches_per_epoch
  total_steps = per_epoch * config.num_epochs

  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  metrics_lib.write_json(workdir / 'config.json', json.loads(config.to_json_best_effort()))

  jit_step, state_sh, frozen_sh = setup.make_jitted_step(run, optimizer, state)
  mesh = run.mesh
  frozen = jax.device_put(run.frozen, frozen_sh)
  state = jax.device_put(state, state_sh)
  skip_nonfinite = config.on_nonfinite == 'skip'
  evaluate = setup.make_evaluator(run, config.get('eval_batch_size', config.batch_size))

  # Restore.
  fp = setup.fingerprint(config, run.spec, run.trainable)
  mngr = checkpoint.manager(workdir / 'checkpoints', keep=config.checkpoint.keep,
                            async_save=config.checkpoint.get('async_save', True))
  restored = checkpoint.restore(mngr, checkpoint.abstract(state, state_sh), fp)
  if restored is not None:
    step0, state, extra = restored
    batches.restore(extra['data'])
    print(f'resumed from {workdir}/checkpoints/{step0} (iterator at {extra["data"]})', flush=True)
  elif config.get('init_from'):
    state = dict(state, trainable=jax.device_put(setup.restore_trainable(run, state, config.init_from),
                                                 state_sh['trainable']))
    print(f'initialised the trainable params from {config.init_from}', flush=True)
  metrics_log = metrics_lib.MetricsLog(workdir / 'metrics.csv', int(state['step']))

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
                                   setup.eval_subnet(run))
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
                                 setup.eval_subnet(run))
  if mngr.latest_step() != step:
    save(step, force=True)
  mngr.wait_until_finished()
  mngr.close()
  if bar is not None:
    bar.close()

  report = (peft.report(run.frozen, peft.Adapters(params=state['trainable']['adapters'], spec=run.spec),
                        setup.eval_subnet(run), head=state['trainable']['model'])
            if run.spec is not None else None)
  trainable_params = int(sum(np.size(x) for x in jax.tree.leaves(state['trainable'])))
  summary = {'step': step, 'epoch': batches.state['epoch'], 'val_accuracy': val_acc, 'val_loss': val_loss,
             'trainable_params': trainable_params,
             'stored_adapter_params': None if report is None else report.stored_adapter_params,
             'finished': not stopped_early,
             # median over full batches after the first 2 (compile, warm-up) of this process
             'median_step_ms': float(np.median(step_ms[2:])) if len(step_ms) > 2 else None}
  metrics_lib.write_json(workdir / 'summary.json', summary)
  if metrics_log.rows:
    metrics_lib.plot_curves(metrics_log.rows, workdir / 'curves.png')
  print(f'final: step={step} val_accuracy={val_acc:.4f} trainable_params={trainable_params:,}',
        flush=True)
  return summary
