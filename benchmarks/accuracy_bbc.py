"""Accuracy study on BBC News with pretrained all-MiniLM-L6-v2 (BENCH_PROTOCOL.md).

Every method uses the protocol: mean pooling, fresh Linear(384, 5) head, max length
128, batch 32, AdamW (0.9, 0.999, 1e-8, weight decay 0.01), constant lr, dropout
0.1, the canonical split; val and test accuracy at the last epoch (nothing selected
on test). GLoRA: the supernet is evaluated with its largest subnet, then searched
on val at LoRA's adapter-parameter count and at a quarter of it.

  python benchmarks/accuracy_bbc.py --setting 8shot --out runs/accuracy
  python benchmarks/accuracy_bbc.py --setting full --methods lora,glora --seeds 0,1,2
  python benchmarks/accuracy_bbc.py --setting 8shot --methods surm --lr surm=1e-2   # val-only sweep
  python benchmarks/accuracy_bbc.py --setting full --methods glora --retrain_epochs 5
  python benchmarks/accuracy_bbc.py --setting full --table    # BENCHMARKS.md's table

Prints one row per run and writes runs/accuracy/<setting>/results.json; a finished
run is resumed and re-evaluated, not retrained, and keeps its recorded timings.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import shutil
import sys
import time

import jax
import numpy as np

sys.path.insert(0, '.')
from glora_jax import subnet as subnet_lib  # noqa: E402
from glora_jax.search import driver, evolution  # noqa: E402
from glora_jax.train import loop, setup  # noqa: E402

CONFIGS = {
    'linear_probe': ('bbc_minilm_linear_probe', {}),
    'full': ('bbc_minilm_full', {}),
    'lora': ('bbc_minilm_lora', {}),
    'glora': ('bbc_minilm_glora', {}),
    'surm': ('bbc_minilm_surm', {}),
    'glora_structured': ('bbc_minilm_glora', {'adapter.structured_b': ('circulant',)}),
}


def make_config(method: str, setting: str, seed: int, lr: float | None):
  module, overrides = CONFIGS[method]
  config = importlib.import_module(f'configs.{module}').get_config('8shot' if setting == '8shot' else None)
  config.update_from_flattened_dict(overrides)
  config.seed = seed
  config.eval_every_epochs = 0  # val once, at the last epoch
  config.checkpoint.keep = 1
  if lr:
    config.optim.lr = lr
  return config


def evaluate_test(config, workdir):
  """(test accuracy, adapter params, head params) of a finished run."""
  run, trainable = setup.load_trained(workdir, config)
  evaluate = setup.make_evaluator(run, config.eval_batch_size)
  sub = setup.eval_subnet(run)
  _, test_acc = evaluate(trainable, run.frozen, run.bundle.splits['test'], sub)
  head = int(sum(np.size(x) for x in jax.tree.leaves(trainable['model'])))
  adapter = 0 if run.spec is None else int(subnet_lib.count_params(run.spec, sub))
  if config.method == 'full':
    adapter, head = head, 0  # every parameter trains
  return test_acc, adapter, head


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--setting', choices=('full', '8shot'), default='8shot')
  ap.add_argument('--methods', default=','.join(CONFIGS))
  ap.add_argument('--seeds', default='0')
  ap.add_argument('--out', default='runs/accuracy')
  ap.add_argument('--lr', default='', help='method=lr,... overrides (tune on val only)')
  ap.add_argument('--search_population', type=int, default=10)
  ap.add_argument('--search_generations', type=int, default=3)
  ap.add_argument('--retrain_epochs', type=int, default=0,
                  help='GLoRA: also retrain each searched subnet (fixed) for this many epochs')
  ap.add_argument('--table', action='store_true',
                  help='print the rows recorded so far as a markdown table; run nothing')
  ap.add_argument('--skip_search', action='store_true',
                  help='GLoRA: report the largest subnet only (for learning-rate sweeps on val)')
  args = ap.parse_args()
  lrs = dict(kv.split('=') for kv in args.lr.split(',') if kv)
  out = pathlib.Path(args.out) / args.setting
  out.mkdir(parents=True, exist_ok=True)
  results_file = out / 'results.json'
  results = json.loads(results_file.read_text()) if results_file.exists() else {}
  lora_budget = None

  def record(name, row):
    results[name] = row
    results_file.write_text(json.dumps(results, indent=1))
    print(f"{name:<28} {row['adapter_params']:>9,} {row['adapter_params'] + row['head_params']:>10,} "
          f"{row['val_accuracy']:8.4f} {row['test_accuracy']:8.4f} {row['median_step_ms'] or 0:9.0f} "
          f"{row['wall_s']:8.0f}", flush=True)

  if args.table:
    print(markdown(results))
    return
  print(f"{'method':<28} {'adapter':>9} {'with head':>10} {'val':>8} {'test':>8} {'step ms':>9} {'wall s':>8}")
  for method in args.methods.split(','):
    for seed in [int(s) for s in args.seeds.split(',')]:
      # An lr override (a val-only sweep) gets its own row and workdir, so it never
      # resumes, or overwrites, the run at the configured rate.
      tag = f'/lr={lrs[method]}' if method in lrs else ''
      name = f'{method}/seed{seed}{tag}'
      config = make_config(method, args.setting, seed, float(lrs[method]) if method in lrs else None)
      workdir = out / method / f'seed{seed}{tag.replace("/", "_")}'
      t0 = time.perf_counter()
      summary = loop.train_and_evaluate(config, workdir, progress=False)
      wall = time.perf_counter() - t0
      test_acc, adapter, head = evaluate_test(config, workdir)
      row = name + ('/largest' if method.startswith('glora') else '')
      # A resumed finished run has no step times: keep the row of the run that trained.
      if row not in results or summary.get('median_step_ms') is not None:
        record(row, {
            'adapter_params': adapter, 'head_params': head, 'val_accuracy': summary['val_accuracy'],
            'test_accuracy': test_acc, 'median_step_ms': summary['median_step_ms'], 'wall_s': wall,
            'lr': config.optim.lr})
      if method == 'lora':
        lora_budget = adapter
      if method.startswith('glora') and not args.skip_search:
        budget = lora_budget or results.get(f'lora/seed{seed}', {}).get('adapter_params') or 331_776
        for label, limit in (('lora budget', budget), ('quarter', budget // 4)):
          cfg = evolution.SearchConfig(population=args.search_population,
                                       generations=args.search_generations, parents=5,
                                       mutations=args.search_population // 2,
                                       crossovers=args.search_population // 2, param_limit=limit,
                                       seed=seed)
          row = f'{name}/search<={limit:,} ({label})'
          if row not in results or not (workdir / f'search_{limit}' / 'summary.json').exists():
            t0 = time.perf_counter()
            s = driver.search_and_export(workdir, cfg, out=workdir / f'search_{limit}',
                                         log=lambda m: None)
            record(row, search_row(s, summary['median_step_ms'], time.perf_counter() - t0,
                                   config.optim.lr))
          if args.retrain_epochs:
            # Same search (copied, so it resumes finished), then the chosen subnet is
            # trained alone from the supernet's weights: more compute than the row above.
            retrain_dir = workdir / f'search_{limit}_retrain{args.retrain_epochs}'
            if not retrain_dir.exists():
              shutil.copytree(workdir / f'search_{limit}', retrain_dir,
                              ignore=shutil.ignore_patterns('merged_params*', 'retrain'))
            t0 = time.perf_counter()
            s = driver.search_and_export(workdir, cfg, out=retrain_dir, log=lambda m: None,
                                         retrain_epochs=args.retrain_epochs)
            record(f'{row} +retrain {args.retrain_epochs} ep',
                   search_row(s, None, time.perf_counter() - t0, config.optim.lr))
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}; '
        f'results in {results_file}')
  print(markdown(results))


def search_row(s: dict, step_ms, wall_s: float, lr: float) -> dict:
  """A results row from a search summary (driver.search_and_export), merged test accuracy."""
  return {'adapter_params': s['adapter_params'], 'head_params': s['head_params'],
          'val_accuracy': s['val_accuracy'], 'test_accuracy': s['test_accuracy_merged'],
          'median_step_ms': step_ms, 'wall_s': wall_s, 'lr': lr,
          'candidates': s['candidates_evaluated']}


def markdown(results: dict) -> str:
  """Every row recorded so far in this setting, as the table in BENCHMARKS.md."""
  lines = ['| row | lr | adapter params | with head | val | test | median step ms | wall s |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  order = list(CONFIGS)  # rows grouped by method, in the order of CONFIGS, then as recorded
  for name, r in sorted(results.items(), key=lambda kv: order.index(kv[0].split('/')[0])):
    step = f"{r['median_step_ms']:,.0f}" if r.get('median_step_ms') else '-'
    lines.append(f"| {name} | {r['lr']:g} | {r['adapter_params']:,} | "
                 f"{r['adapter_params'] + r['head_params']:,} | {r['val_accuracy']:.4f} | "
                 f"{r['test_accuracy']:.4f} | {step} | {r['wall_s']:,.0f} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
