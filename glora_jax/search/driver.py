"""search.py's work: load a supernet checkpoint, search, optionally retrain, merge,
measure the test split once (adapted and merged) and export.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from glora_jax import errors, peft, quant
from glora_jax import subnet as subnet_lib
from glora_jax.models import registry, stacking
from glora_jax.search import evolution, export, fitness as fitness_lib
from glora_jax.train import loop, metrics, setup, sharding, steps, tasks


def search_and_export(ckpt, cfg: evolution.SearchConfig, *, out=None, chunk: int | None = None,
                      eval_batch_size: int = 32, retrain_epochs: int = 0,
                      stop_after_generations: int | None = None,
                      export_formats=export.FORMATS, fitness: str = '', mc_file: str = '',
                      requantize: str = '', log=print) -> dict:
  """Searches the supernet in `ckpt`, then merges, checks and exports the best subnet
  under `out` in `export_formats` (export.FORMATS: ours, and the model's PyTorch
  layout in <out>/hf or <out>/timm); returns the summary (also written to summary.json).

  Fitness is the task's headline metric on the eval split (ModelAndData.metric:
  'accuracy' for a classifier, GLUE's F1 / matthews_corrcoef / pearson, or
  'next_token_accuracy' over real tokens for a causal LM): `val_metric` names it and
  the summary carries val_<metric>, and test_<m>, test_<m>_merged for each of the
  task's metrics, beside the mean test loss.

  fitness: another of the task's metrics to rank by ('' = its headline): for a causal
  LM 'token_log_likelihood' (the default: minus the mean response loss),
  'next_token_accuracy', or 'mc_acc' / 'mc_acc_norm' of the multiple-choice JSON lines
  `mc_file` (lm-eval-harness's log-likelihood accuracy; the test report stays the LM's).

  chunk: candidates per vmapped evaluation; None measures the fastest at start-up
  (fitness.probe_chunk; the summary records the probe).

  requantize: 'int8' or 'nf4' ('' = off): the merged float kernels quantized again
  (the model's adapter targets, the run's frozen_quant block and double options) and
  the test split scored on them: the summary's 'requantized' entry reports the metric,
  the predictions' agreement with the adapted model and the weight error it adds.
  The exports stay float."""
  ckpt = pathlib.Path(ckpt)
  export_formats = export.check_formats(export_formats)
  if requantize not in ('',) + quant.KINDS:
    raise errors.ConfigError(f"--requantize '{requantize}' is unknown; expected one of "
                             f'{list(quant.KINDS)} (or nothing)')
  config = setup.load_config(ckpt)
  if config.method != 'glora':
    raise errors.ConfigError(f"{ckpt} trained method '{config.method}'; search needs a GLoRA "
                             'supernet (method glora)')
  if not config.data.get('test_split', ''):
    raise errors.ConfigError(f'{ckpt} was trained without data.test_split; the search reports '
                             'the chosen subnet and its merge on a test split: train with one')
  out = pathlib.Path(out) if out else ckpt / 'search'
  _check_writable(out)
  run = setup.build(config)
  evolution.check_budget(run.spec, cfg)  # fail before any expensive work
  ranked = _fitness_task(run, fitness, mc_file)
  out.mkdir(parents=True, exist_ok=True)
  _, trainable = setup.load_trained(ckpt, run=run)
  fit, archive, search_s = _search(run, ranked, trainable, cfg, out, chunk, eval_batch_size,
                                   stop_after_generations, log)
  if stop_after_generations is not None and stop_after_generations < cfg.generations + 1:
    return {'stopped_after_generations': stop_after_generations}
  best = int(archive.top(1)[0])
  best_subnet = archive.cands[best]
  if retrain_epochs:
    trainable = _retrain(run, ckpt, out, retrain_epochs, log)
    fit.trainable = trainable  # the val fitness reported below is the retrained one
  val = float(fit(best_subnet[None])[0][0]) if retrain_epochs else float(archive.accuracy[best])
  summary = {
      'subnet_file': str(out / 'best_subnet.json'),
      'adapter_params': int(subnet_lib.count_params(run.spec, best_subnet)),
      'head_params': int(sum(np.size(x) for x in jax.tree.leaves(trainable['model']))),
      'val_metric': ranked.metric,
      f'val_{ranked.metric}': val,
      **({'mc_file': str(mc_file)} if mc_file else {}),
      **_test_and_export(run, trainable, best_subnet, out, export_formats, eval_batch_size,
                         requantize),
      'candidates_evaluated': int(archive.size), 'pareto_points': int(len(archive.front())),
      'search_seconds': search_s, 'candidates_per_second': fit.evaluated / max(search_s, 1e-9),
      'eval_chunk': fit.chunk, 'chunk_probe_seconds_per_candidate': fit.probe,
      'candidate_batch_evaluations': fit.batch_evaluations,
      'retrain_epochs': retrain_epochs, 'search_config': dataclasses.asdict(cfg),
  }
  metrics.write_json(out / 'summary.json', summary)
  return summary


def _check_writable(out: pathlib.Path) -> None:
  """An output directory that cannot be made or written fails before the search
  (not minutes later at its first file); nothing is created here."""
  existing = next(p for p in [out, *out.parents] if p.exists())
  if not existing.is_dir():
    raise errors.ConfigError(f'output directory {out}: {existing} is a file; expected a '
                             'directory (or a path that can be created)')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise errors.ConfigError(f'output directory {out} cannot be written ({existing} is not '
                             'writable); expected a directory this user can write')


class Ranked(NamedTuple):
  """What the search ranks candidates by: a task over `arrays` whose sums (and, with
  model_data, its scores) give the metric named `metric`."""
  task: steps.ForwardLoss
  arrays: Any
  model_data: Any
  metric: str


def _fitness_task(run: setup.BuiltRun, fitness: str, mc_file: str) -> Ranked:
  """The run's headline on its eval split, another of its metrics, or (a causal LM)
  multiple-choice accuracy on mc_file; a fitness the task cannot give is refused here,
  before anything is searched."""
  md = run.model_data
  if fitness in tasks.MC_METRICS:
    if md.family.task != 'causal_lm':
      raise errors.ConfigError(f"--fitness {fitness} scores a causal LM's log-likelihoods; this "
                               f'run is {md.family.task}')
    if not mc_file:
      raise errors.ConfigError(f'--fitness {fitness} needs --mc_file: JSON lines of '
                               '{"context", "choices", "gold"}')
    try:
      task, arrays = tasks.multiple_choice(md, mc_file, registry.tokenizer_path(run.config.model),
                                           run.config.data.max_len, fitness)
    except (ValueError, OSError) as e:
      raise errors.ConfigError(f'--mc_file {mc_file}: {e}') from None
    return Ranked(task, arrays, None, fitness)
  if mc_file:
    raise errors.ConfigError(f'--mc_file is read by --fitness {" or ".join(tasks.MC_METRICS)} only; '
                             f"fitness is {fitness or md.metric}")
  if fitness:
    allowed = [m for m in md.metrics if m != 'perplexity']
    allowed += list(tasks.MC_METRICS) if md.family.task == 'causal_lm' else []
    if fitness not in allowed:
      raise errors.ConfigError(f"--fitness '{fitness}' is not a metric this task ranks by; "
                               f'expected one of {allowed}')
    md.metrics = (fitness,) + tuple(m for m in md.metrics if m != fitness)
  return Ranked(md.forward_loss, md.splits['eval'], md, md.metric)


def _search(run: setup.BuiltRun, ranked: Ranked, trainable, cfg: evolution.SearchConfig,
            out: pathlib.Path, chunk, eval_batch_size: int, stop_after_generations, log):
  """(fitness, archive, seconds): the evolution on `ranked`'s data, its best subnet,
  Pareto front and plot written under `out`."""
  # The run's own shardings: mesh.rules, FSDP and stacked layers, as training had them.
  frozen_sh = sharding.named(run.mesh, setup.param_specs(run)[0])
  frozen = jax.device_put(run.frozen, frozen_sh)
  fit = fitness_lib.Fitness(ranked.task, run.spec, run.mesh, trainable, frozen, frozen_sh,
                            ranked.arrays, chunk=chunk, batch_size=eval_batch_size,
                            race=cfg.race, rank_by=cfg.rank_by, log=log,
                            model_data=ranked.model_data)
  t0 = time.perf_counter()
  initial = None
  if cfg.start == 'anchor':  # the subnet the supernet trained in every step
    initial = steps.anchor_subnet(run.spec, steps.supernet_options(run.config, steps_per_epoch=1))[None]
  archive = evolution.run(run.spec, fit, cfg, out, log=log,
                          stop_after_generations=stop_after_generations, initial=initial)
  search_s = time.perf_counter() - t0
  if archive.size == 0:
    raise errors.BudgetError(
        f'no candidate within the parameter budget [{cfg.min_param_limit:,.0f}, '
        f'{cfg.param_limit:,.0f}] was found by random sampling; widen the budget')
  front = archive.front()
  (out / 'best_subnet.json').write_text(subnet_lib.dumps(run.spec, archive.cands[int(archive.top(1)[0])]))
  metrics.write_json(out / 'pareto.json', [
      {'params': int(archive.params[i]), f'val_{ranked.metric}': float(archive.accuracy[i]),
       'val_loss': None if np.isnan(archive.loss[i]) else float(archive.loss[i]),
       'generation': int(archive.generation[i]), 'subnet': subnet_lib.to_dict(run.spec, archive.cands[i])}
      for i in front])
  metrics.plot_search(archive, front, out / 'search.png')
  return fit, archive, search_s


def _retrain(run: setup.BuiltRun, ckpt: pathlib.Path, out: pathlib.Path, epochs: int, log) -> dict:
  """The chosen subnet (out/best_subnet.json) trained on from the supernet's weights for
  `epochs` in out/retrain; its trainable params."""
  retrain_config = ml_collections.ConfigDict(run.config.to_dict())
  retrain_config.subnet = str(out / 'best_subnet.json')
  retrain_config.init_from = str(ckpt)
  retrain_config.num_epochs = epochs
  log(f'retraining the chosen subnet for {epochs} epochs in {out / "retrain"}')
  loop.train_and_evaluate(retrain_config, out / 'retrain')
  return setup.load_trained(out / 'retrain', run=run)[1]


def _test_and_export(run: setup.BuiltRun, trainable, subnet, out: pathlib.Path, formats,
                     batch_size: int, requantize: str = '') -> dict:
  """The test split measured once with the task's metrics: the adapted supernet with
  `subnet`, and the merged plain model, which `plain_model` checks holds exactly the
  parameters it reads before anything is written; then the export, with the labels'
  mapping (labels.json). A quantized base is merged from its dequantized kernels
  (setup.merge_base). Returns the summary's test and export entries."""
  model_data, test = run.model_data, run.model_data.splits['test']
  fl = model_data.forward_loss
  adapters = peft.Adapters(params=trainable['adapters'], spec=run.spec)
  # Both checks placed as training placed the run (its mesh, rules, FSDP and stack).
  frozen_specs, trainable_specs = setup.param_specs(run)
  sums_adapted, preds_adapted, targets = export.evaluate(
      fl.forward, fl.loss, model_data.predictions, peft.combine(run.frozen, trainable['model']),
      adapters, jax.numpy.asarray(subnet), test, batch_size, mesh=run.mesh,
      param_specs=peft.combine(frozen_specs, trainable_specs['model']),
      adapter_specs=trainable_specs['adapters'])
  # Merged params keep the per-layer layout of files (the plain model's layers unrolled).
  trainable_per_layer = {**trainable, 'model': stacking.unstack(trainable['model'], run.stack)}
  plain_model, merged = export.plain_model(
      registry.unrolled(model_data.model),
      export.merged_params(setup.merge_base(run), trainable_per_layer, run.spec, subnet))
  sums_merged, preds_merged, _ = export.evaluate(
      model_data.forward_with(plain_model), fl.loss, model_data.predictions, merged, None, None,
      test, batch_size, mesh=run.mesh, param_specs=setup.plain_param_specs(run, merged))
  requantized = {}
  if requantize:  # before anything is written: a kernel the block does not divide fails here
    requantized = _requantized(run, plain_model, merged, requantize, preds_adapted, targets,
                               batch_size)
  files = export.save_merged(out, plain_model, merged, formats,
                             copy_files_from=registry.checkpoint_dir(run.config.model),
                             merged_from={'frozen_quant': setup.frozen_quant_name(run.config)})
  if model_data.metadata.get('data'):
    metrics.write_json(out / 'labels.json', model_data.metadata['data'])
  adapted = model_data.score(sums_adapted, preds_adapted, targets)
  merged_scores = model_data.score(sums_merged, preds_merged, targets)
  return {
      **{f'test_{k}': v for k, v in adapted.items()},
      **{f'test_{k}_merged': v for k, v in merged_scores.items()},
      'test_loss': _ratio(sums_adapted, 0), 'test_loss_merged': _ratio(sums_merged, 0),
      'merged_prediction_agreement': _agreement(preds_adapted, preds_merged),
      # The merge is float (W0 dequantized); the adapted model above ran on this base.
      'frozen_quant': setup.frozen_quant_name(run.config),
      **({'requantized': requantized} if requantize else {}),
      'exports': files,
  }


def _requantized(run: setup.BuiltRun, plain_model, merged: dict, kind: str, preds_adapted,
                 targets, batch_size: int) -> dict:
  """The merged float kernels of the model's adapter targets quantized as `kind` (the
  run's block and double options), scored on the test split like the merged model: its
  metrics, the share of its predictions equal to the adapted model's, and the weight
  error it adds (largest absolute, and relative Frobenius over those kernels)."""
  mc = run.config.model
  block, double = mc.get('frozen_quant_block', 64), mc.get('frozen_quant_double', kind == 'nf4')
  pad = mc.get('frozen_quant_pad', False)
  try:
    requant = setup.quantize_kernels(merged, run.model_data.default_targets, kind, block, double,
                                     pad)
  except ValueError as e:
    raise errors.ConfigError(f'--requantize {kind}: {e}') from None
  flat_merged, flat_requant = peft.flatten(merged), peft.flatten(requant)
  kernels = [p for p, x in flat_requant.items() if quant.is_quantized(x)]
  diff = {p: np.asarray(quant.dequantize(flat_requant[p]), np.float64)
          - np.asarray(flat_merged[p], np.float64) for p in kernels}
  norm = np.sqrt(sum(np.sum(np.asarray(flat_merged[p], np.float64) ** 2) for p in kernels))
  model_data = run.model_data
  sums, preds, _ = export.evaluate(
      model_data.forward_with(plain_model), model_data.forward_loss.loss, model_data.predictions,
      requant, None, None, model_data.splits['test'], batch_size, mesh=run.mesh,
      param_specs=setup.plain_param_specs(run, requant))
  scores = model_data.score(sums, preds, targets)
  return {'kind': setup.quant_name(kind, block, double, pad),
          **{f'test_{k}': v for k, v in scores.items()}, 'test_loss': _ratio(sums, 0),
          'prediction_agreement': _agreement(preds_adapted, preds),
          'kernels': len(kernels),
          'max_abs_weight_error': float(max(np.max(np.abs(d)) for d in diff.values())),
          'relative_weight_error': float(np.sqrt(sum(np.sum(d ** 2) for d in diff.values())) / norm)}


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
  """Share of equal predictions; a regressor's within 1e-4 of each other."""
  if np.issubdtype(a.dtype, np.floating):
    return float(np.mean(np.abs(a - b) <= 1e-4))
  return float((a == b).mean())


def _ratio(sums, i: int) -> float:
  """sums[i] / count of a task's (loss, count, correct) sums: mean loss or accuracy."""
  return float(sums[i] / max(sums[1], 1))
