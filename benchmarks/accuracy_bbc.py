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
  python benchmarks/accuracy_bbc.py --setting full --methods glora_sandwich,glora_distill --seeds 0,1,2
  python benchmarks/accuracy_bbc.py --setting full --methods glora_distill_lite --seeds 0,1,2 \
      --search_tie_break loss   # the same supernets searched again, ties by val loss
  python benchmarks/accuracy_bbc.py --setting full --methods glora_anchor_unshared_head75 \
      --seeds 0,1,2 --search_start anchor --search_population 16 --search_generations 5
      # the same supernets searched again with 96 candidates (rows tagged '96 candidates')
  python benchmarks/accuracy_bbc.py --setting full --methods glora_anchor_unshared_head75 --seeds 0 \
      --search_start anchor --search_population 50 --search_generations 20 --search_parents 10
      # the authors' search size: 1,050 candidates, top 10 parents
  python benchmarks/accuracy_bbc.py --setting full --methods glora_anchor_unshared_head75 \
      --seeds 0,1,2 --search_start anchor --search_rank_by loss   # ranked by mean val loss
  python benchmarks/accuracy_bbc.py --setting full --table    # mean ± std over seeds per row
  python benchmarks/accuracy_bbc.py --setting full --table --per_seed   # one line per run
  python benchmarks/accuracy_bbc.py --setting full --table --seeds 0,1,2  # those seeds' rows only
  python benchmarks/accuracy_bbc.py --setting full --table --compare lora subnet_b_d_e  # seed by seed

Methods glora_fair, glora_progressive, glora_sandwich, glora_distill,
glora_distill_lite and glora_distill_lite_slow_c (C's learning rate x 0.1 through
optim.lr_multipliers) train the supernet with config.supernet options (README,
"Supernet training options"). Every training row records its compute: steps,
backbone forward+backward passes per step (a forward alone counts 1/3; the linear
probe 1/3, a sandwich step with k subnets k, a distillation teacher that is not in
the sandwich 1/3) and in all; the table gives them relative to LoRA's.

Prints one row per run and writes runs/accuracy/<setting>/results.json; a finished
run is resumed and re-evaluated, not retrained, and keeps its recorded timings.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pathlib
import re
import shutil
import sys
import time

import jax
import numpy as np

sys.path.insert(0, '.')
from glora_jax import subnet as subnet_lib  # noqa: E402
from glora_jax.search import driver, evolution  # noqa: E402
from glora_jax.train import loop, setup, steps  # noqa: E402

SUBNETS = pathlib.Path(__file__).resolve().parent / 'subnets'
# The search of every three-seed row (population 8, 2 generations: 24 candidates); a
# search of another size is tagged '<N> candidates' in its row and folder names.
STUDY_SEARCH = (8, 2)
STUDY_PARENTS = 5  # its parents per generation; another count is tagged "<k> parents"
SEED_PART = re.compile(r'seed(\d+)')  # the part of a row's name that names its seed
DISTILL_LITE = {'supernet.sandwich': 'largest', 'supernet.num_random': 1, 'supernet.sampling': 'fair',
                'supernet.distill': 1.0}
SLOW_C = {**DISTILL_LITE, 'optim.lr_multipliers': (('adapters/.*/C[du]', 0.1),)}
ANCHOR_B_D_E = {**SLOW_C, 'supernet.anchor': str(SUBNETS / 'b_d_e.json')}
ANCHOR_UNSHARED = {**ANCHOR_B_D_E, 'adapter.share_vectors': False,
                   'optim.lr_multipliers': (('adapters/.*/C[duv]', 0.1),)}
CONFIGS = {
    'linear_probe': ('bbc_minilm_linear_probe', {}),
    'full': ('bbc_minilm_full', {}),
    'lora': ('bbc_minilm_lora', {}),
    'glora': ('bbc_minilm_glora', {}),
    'surm': ('bbc_minilm_surm', {}),
    'glora_structured': ('bbc_minilm_glora', {'adapter.structured_b': ('circulant',)}),
    # Supernet training options (config.supernet); passes = forward+backward per step.
    'glora_fair': ('bbc_minilm_glora', {'supernet.sampling': 'fair'}),  # 1 pass
    'glora_progressive': ('bbc_minilm_glora', {  # 1 pass; widening over the first half
        'supernet.progressive_epochs': lambda c: c.num_epochs / 2}),
    'glora_sandwich': ('bbc_minilm_glora', {  # BigNAS: largest + smallest + 2 random, 4 passes
        'supernet.sandwich': 'largest_smallest', 'supernet.num_random': 2}),
    'glora_distill': ('bbc_minilm_glora', {  # the sandwich + in-place distillation, 4 passes
        'supernet.sandwich': 'largest_smallest', 'supernet.num_random': 2, 'supernet.distill': 1.0}),
    'glora_distill_lite': ('bbc_minilm_glora', DISTILL_LITE),  # largest teaches 1 fair draw: 2 passes
    # distill_lite with C (GLoRA's input shift W0 @ C) at a tenth of the learning rate:
    # its step moves every output by about lr x |row of W0|_1, tens of times what E's does.
    'glora_distill_lite_slow_c': ('bbc_minilm_glora', SLOW_C),
    # distill_lite_slow_c with the anchor B + D + E (benchmarks/subnets/b_d_e.json: B low
    # rank, D and E vectors, A and C none, in every layer) in the largest's roles: it is
    # trained in every step and teaches the fair-sampled subnet. 2 passes.
    'glora_anchor_b_d_e': ('bbc_minilm_glora', ANCHOR_B_D_E),
    # glora_anchor_b_d_e with unshared vector and constant options (adapter.share_vectors
    # False, our departure): B's vector, whose step is scaled by the input's sum, no
    # longer moves the first rank of the anchor's low-rank B. C's own vector is slowed too.
    'glora_anchor_b_d_e_unshared': ('bbc_minilm_glora', ANCHOR_UNSHARED),
    # glora_anchor_b_d_e_unshared with the anchor weighing w in each step's loss and the
    # fair-sampled subnet 1 - w (supernet.head_weight; the mean, 0.5, above): the params
    # the anchor shares with the sampled subnet follow the anchor more, those only the
    # sampled subnets use still take full Adam steps. Still 2 passes.
    'glora_anchor_unshared_head75': ('bbc_minilm_glora', {**ANCHOR_UNSHARED, 'supernet.head_weight': 0.75}),
    'glora_anchor_unshared_head90': ('bbc_minilm_glora', {**ANCHOR_UNSHARED, 'supernet.head_weight': 0.9}),
    # Diagnostic, not a supernet: only the largest subnet is trained (1 pass), to tell
    # GLoRA's parameterisation apart from the sharing between sampled subnets.
    'glora_largest_only': ('bbc_minilm_glora', {
        'supernet.sandwich': 'largest', 'supernet.num_random': 0}),
    # References, not supernets: one GLoRA subnet (benchmarks/subnets/, the same choice
    # in every layer) trained alone from scratch at 1 pass per step, LoRA's compute.
    # What a searched subnet could reach if its inherited weights were as good as
    # its own training's. No search follows them.
    'subnet_b_d_e': ('bbc_minilm_glora', {'subnet': str(SUBNETS / 'b_d_e.json')}),
    'subnet_b_only': ('bbc_minilm_glora', {'subnet': str(SUBNETS / 'b_only.json')}),
}
# A quantized frozen base (issue 33): every adapted kernel of the backbone stored as
# model.frozen_quant says, in blocks of 64 (NF4 with double-quantized scales, QLoRA's
# recipe), dequantized inside its layer; the head and embeddings stay float. Rows
# '<method>_int8' and '<method>_nf4' of LoRA and of the few-shot GLoRA recipe.
QUANT = {'int8': {'model.frozen_quant': 'int8'},
         'nf4': {'model.frozen_quant': 'nf4', 'model.frozen_quant_double': True}}
for _base in ('lora', 'glora_anchor_b_d_e_unshared', 'glora_anchor_unshared_head75'):
  for _kind, _quant in QUANT.items():
    CONFIGS[f'{_base}_{_kind}'] = (CONFIGS[_base][0], {**CONFIGS[_base][1], **_quant})


# k-shot settings: k documents of each class drawn from train with the run's seed
# (data.shots, shots_seed = seed), 20 epochs; '8shot' is the split file's own 8-shot split.
SHOT_SETTINGS = {'1shot': 1, '2shot': 2, '4shot': 4, '16shot': 16}
SETTINGS = ('full', '8shot') + tuple(SHOT_SETTINGS)


def config_arg(setting: str, seed: int) -> str | None:
  """The BBC config's argument of a study setting (configs/common.BBC_OPTIONS)."""
  if setting in SHOT_SETTINGS:
    return f'shots={SHOT_SETTINGS[setting]},shots_seed={seed}'
  return '8shot' if setting == '8shot' else None


def make_config(method: str, setting: str, seed: int, lr: float | None):
  module, overrides = CONFIGS[method]
  config = importlib.import_module(f'configs.{module}').get_config(config_arg(setting, seed))
  config.update_from_flattened_dict({k: v(config) if callable(v) else v for k, v in overrides.items()})
  config.seed = seed
  config.eval_every_epochs = 0  # val once, at the last epoch
  config.checkpoint.keep = 1
  if lr:
    config.optim.lr = lr
  return config


def passes_per_step(config) -> float:
  """Backbone compute of one training step in forward+backward passes (a forward
  alone counts 1/3): a GLoRA supernet by its options (steps.SupernetOptions), the
  linear probe a forward, every other method one pass."""
  if config.method == 'linear_probe':
    return 1 / 3
  if is_supernet(config):
    return steps.supernet_options(config, steps_per_epoch=1).backbone_passes()
  return 1.0


def is_supernet(config) -> bool:
  """A GLoRA run that trains a supernet (its rows are '/largest' and searched ones);
  a fixed subnet (config.subnet) is a plain row, like LoRA's."""
  return config.method == 'glora' and not config.get('subnet')


def evaluate_test(config, workdir, anchor: bool = False):
  """(val accuracy, test accuracy, adapter params, head params) of a finished run's
  evaluation subnet (a supernet's largest), or with `anchor` of the supernet's anchor
  (supernet.anchor). Val is measured only for the anchor (None otherwise): the
  training summary already has the evaluation subnet's."""
  run, trainable = setup.load_trained(workdir, config)
  evaluate = setup.make_evaluator(run, config.eval_batch_size)
  sub = (steps.anchor_subnet(run.spec, steps.supernet_options(config, steps_per_epoch=1))
         if anchor else setup.eval_subnet(run))
  test_acc = evaluate(trainable, run.frozen, run.model_data.splits['test'], sub)[1]['accuracy']
  head = int(sum(np.size(x) for x in jax.tree.leaves(trainable['model'])))
  adapter = 0 if run.spec is None else int(subnet_lib.count_params(run.spec, sub))
  if config.method == 'full':
    adapter, head = head, 0  # every parameter trains
  val_acc = (evaluate(trainable, run.frozen, run.model_data.splits['eval'], sub)[1]['accuracy']
             if anchor else None)
  return val_acc, test_acc, adapter, head


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--setting', choices=SETTINGS, default='8shot',
                  help="'full', '8shot' (the split file's) or k-shot drawn per seed: "
                       + ', '.join(SHOT_SETTINGS))
  ap.add_argument('--methods', default=','.join(CONFIGS))
  ap.add_argument('--seeds', default=None,
                  help="seeds to run (default '0'); with --table, the seeds whose rows are "
                       'summarised (default: every seed recorded)')
  ap.add_argument('--out', default='runs/accuracy')
  ap.add_argument('--lr', default='', help='method=lr,... overrides (tune on val only)')
  ap.add_argument('--search_population', type=int, default=STUDY_SEARCH[0],
                  help='GLoRA search: first population (and per generation); a size other '
                       'than the default tags its rows and folders')
  ap.add_argument('--search_generations', type=int, default=STUDY_SEARCH[1],
                  help='GLoRA search: rounds of evolution after the first population')
  ap.add_argument('--search_parents', type=int, default=STUDY_PARENTS,
                  help='GLoRA search: the top candidates that parent each generation (the '
                       'authors: 10 of 50); another count than the default tags its rows and folders')
  ap.add_argument('--search_tie_break', choices=evolution.TIE_BREAKS, default='params',
                  help="GLoRA search: rank equal val accuracies by fewer parameters ('params') "
                       "or by lower val loss ('loss'; its rows and folders are tagged)")
  ap.add_argument('--search_rank_by', choices=evolution.RANKS, default='accuracy',
                  help="GLoRA search: candidates ranked by val accuracy (the authors) or by "
                       "mean val loss ('loss'; its rows and folders are tagged 'loss ranked')")
  ap.add_argument('--search_start', choices=evolution.STARTS, default='random',
                  help="GLoRA search: first population random (the authors) or opened by the "
                       "supernet's anchor ('anchor'; its rows and folders are tagged)")
  ap.add_argument('--retrain_epochs', type=int, default=0,
                  help='GLoRA: also retrain each searched subnet (fixed) for this many epochs')
  ap.add_argument('--table', action='store_true',
                  help='print the rows recorded so far as a markdown table; run nothing')
  ap.add_argument('--fewshot_table', action='store_true',
                  help='print the k-shot study (every <k>shot and 8shot setting recorded under '
                       '--out): LoRA, SURM and searched GLoRA per k, and GLoRA >= LoRA; run nothing')
  ap.add_argument('--per_seed', action='store_true',
                  help='with --table: one line per run instead of mean +- std over seeds')
  ap.add_argument('--compare', nargs=2, metavar=('ROW_A', 'ROW_B'),
                  help='with --table: test accuracy of ROW_B minus ROW_A seed by seed (rows as '
                       "the summary names them, e.g. 'lora'), their mean, std and standard error")
  ap.add_argument('--budgets', default='lora,quarter',
                  help="GLoRA: search budgets, 'lora' (LoRA's adapter parameters) and/or 'quarter'")
  ap.add_argument('--skip_search', action='store_true',
                  help='GLoRA: report the largest subnet only (for learning-rate sweeps on val)')
  args = ap.parse_args()
  lrs = dict(kv.split('=') for kv in args.lr.split(',') if kv)
  if bad := set(args.budgets.split(',')) - {'lora', 'quarter'}:
    ap.error(f"--budgets: unknown {sorted(bad)}; choose from 'lora', 'quarter'")
  out = pathlib.Path(args.out) / args.setting
  out.mkdir(parents=True, exist_ok=True)
  results_file = out / 'results.json'
  results = json.loads(results_file.read_text()) if results_file.exists() else {}
  lora_budget = None

  def record(name, row):
    # Re-read first: another study process may have recorded rows in the meantime.
    if results_file.exists():
      results.update(json.loads(results_file.read_text()))
    results[name] = row
    results_file.write_text(json.dumps(results, indent=1))
    print(f"{name:<28} {row['adapter_params']:>9,} {row['adapter_params'] + row['head_params']:>10,} "
          f"{row['val_accuracy']:8.4f} {row['test_accuracy']:8.4f} {row['median_step_ms'] or 0:9.0f} "
          f"{row['wall_s']:8.0f}", flush=True)

  if args.fewshot_table:
    found = {k: json.loads(f.read_text()) for k in (1, 2, 4, 8, 16)
             if (f := pathlib.Path(args.out) / f'{k}shot' / 'results.json').exists()}
    print(fewshot_table(found))
    return
  if args.table:
    if args.seeds is not None:
      results = only_seeds(results, {int(s) for s in args.seeds.split(',')})
    print(markdown(results) if args.per_seed else summary_table(results))
    if args.compare:
      print(compare(results, *args.compare))
    return
  print(f"{'method':<28} {'adapter':>9} {'with head':>10} {'val':>8} {'test':>8} {'step ms':>9} {'wall s':>8}")
  for method in args.methods.split(','):
    for seed in [int(s) for s in (args.seeds or '0').split(',')]:
      # An lr override (a val-only sweep) gets its own row and workdir, so it never
      # resumes, or overwrites, the run at the configured rate.
      tag = f'/lr={lrs[method]}' if method in lrs else ''
      name = f'{method}/seed{seed}{tag}'
      config = make_config(method, args.setting, seed, float(lrs[method]) if method in lrs else None)
      workdir = out / method / f'seed{seed}{tag.replace("/", "_")}'
      t0 = time.perf_counter()
      summary = loop.train_and_evaluate(config, workdir, progress=False)
      wall = time.perf_counter() - t0
      _, test_acc, adapter, head = evaluate_test(config, workdir)
      compute = {'train_steps': summary['step'], 'passes_per_step': passes_per_step(config),
                 'backbone_passes': summary['step'] * passes_per_step(config)}
      row = name + ('/largest' if is_supernet(config) else '')
      # A resumed finished run has no step times: keep the row of the run that trained.
      if row not in results or summary.get('median_step_ms') is not None:
        record(row, {
            'adapter_params': adapter, 'head_params': head, 'val_accuracy': summary['val_accuracy'],
            'test_accuracy': test_acc, 'median_step_ms': summary['median_step_ms'], 'wall_s': wall,
            'lr': config.optim.lr, **compute})
      if is_supernet(config) and config.supernet.anchor:
        # The anchor as the supernet trained it (inherited weights, no search): what a
        # search that kept its starting subnet would give. The '/largest' row above is
        # the largest subnet, a different one.
        val_acc, test_acc, adapter_anchor, _ = evaluate_test(config, workdir, anchor=True)
        record(f'{name}/anchor', {
            'adapter_params': adapter_anchor, 'head_params': head, 'val_accuracy': val_acc,
            'test_accuracy': test_acc, 'median_step_ms': results[row]['median_step_ms'],
            'wall_s': results[row]['wall_s'], 'lr': config.optim.lr, **compute})
      if method == 'lora':
        lora_budget = adapter
      if is_supernet(config) and not args.skip_search:
        budget = lora_budget or results.get(f'lora/seed{seed}', {}).get('adapter_params') or 331_776
        budgets = {'lora': ('lora budget', budget), 'quarter': ('quarter', budget // 4)}
        for label, limit in (budgets[b] for b in args.budgets.split(',')):
          cfg = evolution.SearchConfig(population=args.search_population,
                                       generations=args.search_generations,
                                       parents=args.search_parents,
                                       mutations=args.search_population // 2,
                                       crossovers=args.search_population // 2, param_limit=limit,
                                       seed=seed, tie_break=args.search_tie_break,
                                       start=args.search_start, rank_by=args.search_rank_by)
          size = (args.search_population, args.search_generations)
          tags = [t for t, on in (('loss ties', args.search_tie_break == 'loss'),
                                  ('loss ranked', args.search_rank_by == 'loss'),
                                  ('from anchor', args.search_start == 'anchor'),
                                  (f'{search_candidates(*size)} candidates', size != STUDY_SEARCH),
                                  (f'{args.search_parents} parents',
                                   args.search_parents != STUDY_PARENTS))
                  if on]
          row = f'{name}/search<={limit:,} ({", ".join([label] + tags)})'
          search_dir = workdir / '_'.join(['search', str(limit)] + [t.replace(' ', '_') for t in tags])
          if row not in results or not (search_dir / 'summary.json').exists():
            t0 = time.perf_counter()
            s = driver.search_and_export(workdir, cfg, out=search_dir,
                                         export_formats=('flax',), log=lambda m: None)
            record(row, dict(search_row(s, summary['median_step_ms'], time.perf_counter() - t0,
                                        config.optim.lr), **compute))
          if args.retrain_epochs:
            # Same search (copied, so it resumes finished), then the chosen subnet is
            # trained alone from the supernet's weights: more compute than the row above.
            retrain_dir = search_dir.with_name(f'{search_dir.name}_retrain{args.retrain_epochs}')
            if not retrain_dir.exists():
              shutil.copytree(search_dir, retrain_dir,
                              ignore=shutil.ignore_patterns('merged_params*', 'retrain'))
            t0 = time.perf_counter()
            s = driver.search_and_export(workdir, cfg, out=retrain_dir, log=lambda m: None,
                                         export_formats=('flax',),
                                         retrain_epochs=args.retrain_epochs)
            record(f'{row} +retrain {args.retrain_epochs} ep',
                   search_row(s, None, time.perf_counter() - t0, config.optim.lr))
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind} x{jax.device_count()}; '
        f'results in {results_file}')
  print(summary_table(results))


def search_candidates(population: int, generations: int) -> int:
  """Candidates the study's search evaluates: the first population, then each
  generation refilled to `population` (SearchConfig.refill='population')."""
  return population * (generations + 1)


def search_row(s: dict, step_ms, wall_s: float, lr: float) -> dict:
  """A results row from a search summary (driver.search_and_export), merged test accuracy."""
  return {'adapter_params': s['adapter_params'], 'head_params': s['head_params'],
          'val_accuracy': s['val_accuracy'], 'test_accuracy': s['test_accuracy_merged'],
          'median_step_ms': step_ms, 'wall_s': wall_s, 'lr': lr,
          'candidates': s['candidates_evaluated']}


def _method_rank(name: str) -> int:
  order = list(CONFIGS)
  method = name.split('/')[0]
  return order.index(method) if method in order else len(order)


def group_name(name: str) -> str:
  """A run's row without its seed: 'glora/seed1/search<=331,776 (lora budget)' ->
  'glora/search<=331,776 (lora budget)'."""
  return '/'.join(part for part in name.split('/') if not SEED_PART.fullmatch(part))


def only_seeds(results: dict, seeds: set[int]) -> dict:
  """The rows of runs with one of `seeds`."""
  return {name: r for name, r in results.items() if seed_of(name) in seeds}


def seed_of(name: str) -> int | None:
  """A row's seed: 'lora/seed3' and 'glora/seed3/largest' are seed 3's."""
  found = [int(m.group(1)) for part in name.split('/') if (m := SEED_PART.fullmatch(part))]
  return found[0] if found else None


def compare(results: dict, row_a: str, row_b: str) -> str:
  """Test accuracy of row_b minus row_a on every seed both have (rows named as in
  the summary table): the differences, their mean, sample std and standard error
  (std / sqrt(seeds)). Runs of one seed share its data order."""
  def by_seed(row):
    found = {}
    for name, r in results.items():
      if group_name(name) == row and (seed := seed_of(name)) is not None:
        found[seed] = r['test_accuracy']
    if not found:
      raise SystemExit(f'error: --compare: no row {row!r}; rows: {sorted({group_name(n) for n in results})}')
    return found
  a, b = by_seed(row_a), by_seed(row_b)
  seeds = sorted(set(a) & set(b))
  if not seeds:
    raise SystemExit(f'error: --compare: {row_a!r} (seeds {sorted(a)}) and {row_b!r} '
                     f'(seeds {sorted(b)}) have no seed in common')
  diff = np.asarray([b[s] - a[s] for s in seeds], np.float64)
  lines = [f'test accuracy, {row_b} minus {row_a}:',
           *(f'  seed {s}: {b[s]:.4f} - {a[s]:.4f} = {d:+.4f}' for s, d in zip(seeds, diff))]
  if len(diff) > 1:
    se = diff.std(ddof=1) / np.sqrt(len(diff))
    lines.append(f'  mean {diff.mean():+.4f} ± {diff.std(ddof=1):.4f} (std), standard error {se:.4f}, '
                 f'{len(diff)} seeds')
  return '\n'.join(lines)


def summary_table(results: dict) -> str:
  """Mean +- sample standard deviation over the seeds present of every row (the
  seed count beside it), with each supernet's training compute: forward+backward
  backbone passes per step and in all, relative to LoRA's in this setting."""
  groups: dict[str, list[dict]] = {}
  for name, r in results.items():
    groups.setdefault(group_name(name), []).append(r)
  lora = [r['backbone_passes'] for r in groups.get('lora', []) if r.get('backbone_passes')]
  lora_passes = float(np.mean(lora)) if lora else None

  def stat(rows, key, fmt):
    v = np.asarray([r[key] for r in rows if r.get(key) is not None], np.float64)
    if not len(v):
      return '-'
    return (f'{v.mean():{fmt}} ± {v.std(ddof=1):{fmt}}' if len(v) > 1 else f'{v.mean():{fmt}}')

  lines = ['| row | seeds | lr | adapter params | with head | val | test | passes/step | '
           'compute vs LoRA | median step ms |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
  for name, rows in sorted(groups.items(), key=lambda kv: _method_rank(kv[0])):
    passes = [r['backbone_passes'] for r in rows if r.get('backbone_passes')]
    per_step = rows[0].get('passes_per_step')
    ratio = f'{np.mean(passes) / lora_passes:.2f}x' if passes and lora_passes else '-'
    step = stat(rows, 'median_step_ms', ',.0f')
    lines.append(
        f"| {name} | {len(rows)} | {rows[0]['lr']:g} | {stat(rows, 'adapter_params', ',.0f')} | "
        f"{stat([dict(r, p=r['adapter_params'] + r['head_params']) for r in rows], 'p', ',.0f')} | "
        f"{stat(rows, 'val_accuracy', '.4f')} | {stat(rows, 'test_accuracy', '.4f')} | "
        f"{'-' if per_step is None else f'{round(per_step, 2):g}'} | {ratio} | {step} |")
  return '\n'.join(lines)


# The few-shot study's rows (issue 30): k in 1, 2, 4, 8, 16, three seeds; GLoRA is the
# recipe chosen in 8-shot, searched from its anchor at LoRA's parameter count.
FEWSHOT_ROWS = {'LoRA': 'lora', 'SURM circulant': 'surm',
                'GLoRA searched': 'glora_anchor_b_d_e_unshared/search<=331,776 (lora budget, from anchor)'}


def fewshot_table(results_by_k: dict[int, dict]) -> str:
  """Test accuracy per k (mean ± sample std over seeds, seed count) of FEWSHOT_ROWS,
  and the paper's claim GLoRA >= LoRA: the paired difference over the seeds both ran
  (the same seed draws the same k-shot documents for both), met when its mean >= 0."""
  def by_seed(results, row):
    return {seed_of(n): r['test_accuracy'] for n, r in results.items()
            if group_name(n) == row and seed_of(n) is not None}

  def stat(values):
    v = np.asarray(list(values), np.float64)
    if not len(v):
      return '-'
    return f'{v.mean():.4f} ± {v.std(ddof=1):.4f} ({len(v)})' if len(v) > 1 else f'{v.mean():.4f} (1)'

  lines = ['| k | ' + ' | '.join(FEWSHOT_ROWS) + ' | GLoRA - LoRA (paired) | GLoRA >= LoRA |',
           '|---:|' + '---:|' * (len(FEWSHOT_ROWS) + 2)]
  for k, results in sorted(results_by_k.items()):
    rows = {label: by_seed(results, row) for label, row in FEWSHOT_ROWS.items()}
    lora, glora = rows['LoRA'], rows['GLoRA searched']
    seeds = sorted(set(lora) & set(glora))
    diff = np.asarray([glora[s] - lora[s] for s in seeds], np.float64)
    paired = ('-' if not len(diff) else f'{diff.mean():+.4f} ± {diff.std(ddof=1):.4f}'
              if len(diff) > 1 else f'{diff.mean():+.4f}')
    verdict = ('-' if not len(diff) else 'met' if diff.mean() >= 0
               else f'missed by {-diff.mean():.4f}')
    lines.append(f'| {k} | ' + ' | '.join(stat(r.values()) for r in rows.values())
                 + f' | {paired} | {verdict} |')
  return '\n'.join(lines)


def markdown(results: dict) -> str:
  """Every row recorded so far in this setting, as the table in BENCHMARKS.md."""
  lines = ['| row | lr | adapter params | with head | val | test | median step ms | wall s |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  # rows grouped by method, in the order of CONFIGS, then as recorded
  for name, r in sorted(results.items(), key=lambda kv: _method_rank(kv[0])):
    step = f"{r['median_step_ms']:,.0f}" if r.get('median_step_ms') else '-'
    lines.append(f"| {name} | {r['lr']:g} | {r['adapter_params']:,} | "
                 f"{r['adapter_params'] + r['head_params']:,} | {r['val_accuracy']:.4f} | "
                 f"{r['test_accuracy']:.4f} | {step} | {r['wall_s']:,.0f} |")
  return '\n'.join(lines)


if __name__ == '__main__':
  main()
