"""train_and_evaluate(config, workdir): the training loop, top to bottom.

Sections: build the run (train/setup.py), restore, loop (log, evaluate,
checkpoint), final summary.
"""
from __future__ import annotations

import json
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
  # Several processes share the workdir: one writes the files beside the checkpoints
  # (orbax coordinates the checkpoint writes of all processes itself).
  primary = jax.process_index() == 0
  if primary:
    metrics_lib.write_json(workdir / 'config.json', json.loads(config.to_json_best_effort()))
    # The labels' mapping and how the splits were drawn (k-shot, a val carved off train).
    metrics_lib.write_json(workdir / 'data.json', run.model_data.metadata.get('data', {}))

  jit_step, state_sh, frozen_sh = setup.make_jitted_step(run, optimizer, state)
  mesh = run.mesh
  frozen = jax.device_put(run.frozen, frozen_sh)
  state = jax.device_put(state, state_sh)
  skip_nonfinite = config.on_nonfinite == 'skip'
  evaluate = setup.make_evaluator(run, config.get('eval_batch_size', config.batch_size))
  metric = run.model_data.metric

  # Restore.
  fp = setup.training_fingerprint(config, run.spec, run.trainable)
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
  metrics_log = metrics_lib.MetricsLog(workdir / 'metrics.csv' if primary else None, int(state['step']))

  def save(step, force=False):
    checkpoint.save(mngr, step, state, {'data': batches.state, 'fingerprint': fp}, force=force)

  every = config.checkpoint.get('every_steps', 0) or per_epoch
  bar = None
  if progress:
    from tqdm import tqdm
    tty = sys.stdout.isatty()
    bar = tqdm(total=total_steps, initial=int(state['step']), unit='step', file=sys.stdout,
               dynamic_ncols=True, mininterval=0.1 if tty else 30.0)
  val_scores, val_loss = {}, float('nan')
  step = first_step = int(state['step'])
  log_every = config.get('log_every_steps', 10)
  eval_every = config.get('eval_every_epochs', 1)
  stopped_early = False
  # No host sync per step: metrics stay on the device and are fetched together at
  # logging, evaluation and checkpoint steps, so the host dispatches the next
  # batch while the device runs. A non-finite step is found at the next fetch,
  # which comes before any save: the last good checkpoint is never overwritten.
  pending: list[tuple[int, int, dict]] = []  # (step, epoch, device metrics)
  window = {'t': time.perf_counter(), 'examples': 0, 'steps': 0, 'full': True}
  step_ms = []  # mean step time of each fetch window of full batches (not the first)

  def fetch():
    nonlocal pending
    fetched = jax.device_get([m for _, _, m in pending])
    for (s, e, _), m in zip(pending, fetched):
      if not m['finite'] and not skip_nonfinite:
        mngr.wait_until_finished()
        raise NonFiniteLossError(
            f'non-finite loss ({float(m["loss"])}) at step {s} (epoch {e}); the last good '
            f'checkpoint in {workdir}/checkpoints is kept. Lower optim.lr, set optim.clip_norm, '
            'or pass --config.on_nonfinite=skip')
      window['examples'] += int(m['examples'])
    now = time.perf_counter()
    if window['full'] and window['steps'] and pending[0][0] > first_step + 2:
      step_ms.append(1e3 * (now - window['t']) / window['steps'])
    last = (pending[-1][0], pending[-1][1], fetched[-1])
    pending = []
    return last, now

  for batch in batches:
    epoch = batches.state['epoch'] - (batches.state['position'] == 0)  # epoch of this batch
    state, metrics, _ = jit_step(state, frozen, sharding.put_batch(batch, mesh))
    step += 1
    pending.append((step, epoch, metrics))
    window['steps'] += 1
    window['full'] &= bool(batch['mask'].all())
    if bar is not None:
      bar.update(1)
    epoch_done = batches.state['position'] == 0
    evaluate_now = (epoch_done and 'eval' in run.model_data.splits and eval_every
                    and (epoch + 1) % eval_every == 0)
    save_now = step % every == 0 or epoch_done
    stop_now = stop_after_steps is not None and step >= stop_after_steps
    log_now = step % log_every == 0 or epoch_done
    if log_now or save_now or stop_now:
      (_, _, m), now = fetch()
    if log_now:
      lr = float(schedule(step) if callable(schedule) else schedule)
      metrics_log.add(step=step, epoch=epoch, train_loss=float(m['loss']),
                      train_accuracy=float(m['accuracy']), lr=lr,
                      subnet_params=int(m['subnet_params']),
                      examples_per_s=window['examples'] / max(now - window['t'], 1e-9))
      if bar is not None:
        bar.set_postfix(loss=f'{float(m["loss"]):.4f}', epoch=epoch)
    if evaluate_now:
      val_loss, val_scores = evaluate(state['trainable'], frozen, run.model_data.splits['eval'],
                                      setup.eval_subnet(run))
      metrics_log.add(step=step, epoch=epoch, val_loss=val_loss, val_score=val_scores[metric],
                      val_accuracy=val_scores.get('accuracy', ''))
      msg = f'epoch {epoch}: val_loss={val_loss:.4f} ' + _scores_text(val_scores)
      bar.write(msg) if bar is not None else print(msg, flush=True)
    if save_now:
      save(step)
    if not pending:  # a fetch happened: the next window starts after this step's host work
      window.update(t=time.perf_counter(), examples=0, steps=0, full=True)
    if stop_now:
      stopped_early = True
      break
  if pending:
    fetch()
  if 'eval' in run.model_data.splits and not val_scores:  # resumed after the last epoch
    val_loss, val_scores = evaluate(state['trainable'], frozen, run.model_data.splits['eval'],
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
  summary = {'step': step, 'epoch': batches.state['epoch'], 'val_metric': metric,
             **{f'val_{name}': value for name, value in val_scores.items()}, 'val_loss': val_loss,
             'trainable_params': trainable_params,
             'stored_adapter_params': None if report is None else report.stored_adapter_params,
             'finished': not stopped_early,
             # median over fetch windows of full batches, after the first 2 steps
             # (compile, warm-up) of this process: fwd, bwd and update, back to back
             'median_step_ms': float(np.median(step_ms)) if step_ms else None}
  if primary:
    metrics_lib.write_json(workdir / 'summary.json', summary)
  if primary and metrics_log.rows:
    metrics_lib.plot_curves(metrics_log.rows, workdir / 'curves.png', metric)
  print(f'final: step={step} {_scores_text(val_scores)} trainable_params={trainable_params:,}',
        flush=True)
  return summary


def _scores_text(scores: dict) -> str:
  """'val_accuracy=0.9250' (each metric of a validation); 'val: none' without an eval split."""
  return ' '.join(f'val_{k}={v:.4f}' for k, v in scores.items()) or 'val: none'
