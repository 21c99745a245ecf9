"""Can the search be trusted? Kendall's tau between inherited-weight and retrained
val accuracy of subnets spread over a search's Pareto front (issue 16).

For a trained GLoRA supernet (a train.py workdir) and a search of it (search.py's
pareto.json, or search_state.json's whole archive), picks about --points subnets
spread evenly over the front by parameter count (topped up from the archive when
the front is shorter), measures each one's val accuracy with the supernet's weights
as inherited, retrains each alone from those weights for --retrain_epochs (the
config's recipe with the subnet fixed, as search.py --retrain_epochs does) and
measures val accuracy again. With --from_scratch each subnet is instead trained alone
from a fresh init for the supernet config's own epochs (its stand-alone accuracy,
the ground truth of one-shot NAS's ranking studies, not a fine-tuning of inherited
weights). Only the val split is read; test never. Besides tau of
the accuracies (the issue's measure) it prints tau of the mean val losses: on a
200-document val split accuracies move in steps of 0.005 and tie often, the loss
does not.

With --seeds S (several) every subnet is retrained once per seed (the config's seed
sets the fresh init, the data order and dropout), the ground truth is the mean over
seeds, and the seeds' own agreement is printed: the mean Kendall tau between the
retrained values of every two seeds. That is how far the ground truth reproduces
itself, a ceiling no inherited-weight ranking can be expected to pass.

  python benchmarks/search_trust.py --ckpt runs/bbc --search runs/bbc/search --retrain_epochs 5
  python benchmarks/search_trust.py --ckpt runs/bbc --source archive --points 8
  python benchmarks/search_trust.py --ckpt runs/bbc --search runs/bbc/search --from_scratch
  python benchmarks/search_trust.py --ckpt runs/bbc --search runs/bbc/search --from_scratch --seeds 0,1,2

Prints one row per subnet and tau; writes <out>/search_trust.json (default out:
<search>/trust). A rerun resumes: finished retrains are re-evaluated, not retrained.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np

from glora_jax import subnet as subnet_lib
from glora_jax.train import loop, metrics, setup


def kendall_tau(x, y) -> float:
  """Kendall's tau-b (ties in either list corrected, as scipy.stats.kendalltau):
  (concordant - discordant pairs) / sqrt(pairs untied in x * pairs untied in y).
  NaN when either list is constant."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.shape != y.shape or x.ndim != 1:
    raise ValueError(f'kendall_tau needs two equally long lists, got shapes {x.shape} and {y.shape}')
  upper = np.triu(np.ones((len(x), len(x)), bool), k=1)
  dx, dy = np.sign(x[:, None] - x[None])[upper], np.sign(y[:, None] - y[None])[upper]
  untied_x, untied_y = np.count_nonzero(dx), np.count_nonzero(dy)
  if not untied_x or not untied_y:
    return float('nan')
  return float(np.sum(dx * dy) / np.sqrt(untied_x * untied_y))


def spread(params, n: int) -> list[int]:
  """Indices of up to n entries spread evenly over the order of `params` (both ends
  included): positions round(linspace(0, len - 1, n)) of the sorted list."""
  order = np.argsort(np.asarray(params), kind='stable')
  if len(order) <= n:
    return order.tolist()
  return order[np.unique(np.round(np.linspace(0, len(order) - 1, n)).astype(int))].tolist()


def pick_subnets(spec, search_dir: pathlib.Path, n: int, source: str) -> list[dict]:
  """[{'params', 'search_val_accuracy', 'subnet' (array), 'from'}] of about n
  subnets: spread over the Pareto front, topped up from the archive (source
  'front'), or spread over the whole archive by parameters (source 'archive')."""
  points = []
  if source == 'front':
    front = json.loads((search_dir / 'pareto.json').read_text())
    metric = next(k for k in front[0] if k.startswith('val_'))
    for i in spread([p['params'] for p in front], n):
      p = front[i]
      points.append({'params': p['params'], 'search_val_accuracy': p[metric],
                     'subnet': subnet_lib.from_dict(spec, p['subnet']), 'from': 'front'})
  state_file = search_dir / 'search_state.json'
  if len(points) < n and state_file.exists():
    archive = json.loads(state_file.read_text())['archive']
    cands = np.asarray(archive['cands'], np.int32).reshape((-1,) + spec.num_options.shape)
    taken = {p['subnet'].tobytes() for p in points}
    complete = archive.get('complete', [True] * len(cands))  # a race's heat losers: partial val
    rest = [i for i in range(len(cands)) if complete[i] and cands[i].tobytes() not in taken]
    for j in spread([archive['params'][i] for i in rest], n - len(points)):
      i = rest[j]
      points.append({'params': archive['params'][i], 'search_val_accuracy': archive['accuracy'][i],
                     'subnet': cands[i], 'from': 'archive'})
  if len(points) < 2:
    raise SystemExit(f'error: {search_dir} holds fewer than 2 subnets to compare; run a longer search')
  return sorted(points, key=lambda p: p['params'])


def seed_agreement(values) -> float:
  """Mean Kendall tau-b between the rows of `values` ([seeds, subnets]), over every
  two seeds (pairs whose tau is undefined, a constant row, are left out; NaN when
  fewer than two seeds or none defined)."""
  values = np.asarray(values, np.float64)
  taus = [kendall_tau(values[a], values[b])
          for a in range(len(values)) for b in range(a + 1, len(values))]
  taus = [t for t in taus if not np.isnan(t)]
  return float(np.mean(taus)) if taus else float('nan')


def run_dir(out: pathlib.Path, point: int, seed: int, config_seed: int) -> pathlib.Path:
  """Where point `point` is retrained with `seed`: point<i> for the config's own seed
  (the layout of runs made before --seeds, which a rerun then resumes),
  point<i>_seed<s> for any other."""
  return out / (f'point{point}' if seed == config_seed else f'point{point}_seed{seed}')


def retrain_config(ckpt: pathlib.Path, subnet_file: pathlib.Path, from_scratch: bool,
                   retrain_epochs: int, seed: int | None = None):
  """The supernet's config (its recipe) with the subnet fixed: from the supernet's
  weights for retrain_epochs, or from_scratch (a fresh init) for its own epochs;
  `seed` replaces the config's seed (init, data order, dropout) when given."""
  config = setup.load_config(ckpt)
  config.subnet, config.eval_every_epochs = str(subnet_file), 0
  if seed is not None:
    config.seed = seed
  if not from_scratch:
    config.init_from, config.num_epochs = str(ckpt), retrain_epochs
  config.checkpoint.keep = 1
  return config


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--ckpt', required=True, help='a train.py workdir holding a GLoRA supernet')
  ap.add_argument('--search', default='', help="search.py's --out (default <ckpt>/search)")
  ap.add_argument('--source', choices=('front', 'archive'), default='front')
  ap.add_argument('--points', type=int, default=8)
  ap.add_argument('--retrain_epochs', type=int, default=5)
  ap.add_argument('--from_scratch', action='store_true',
                  help="train each subnet from a fresh init for the config's epochs instead "
                       'of retraining inherited weights for --retrain_epochs')
  ap.add_argument('--seeds', default='',
                  help="comma-separated seeds to retrain each subnet with; the ground truth is "
                       "their mean (default: the supernet config's seed only)")
  ap.add_argument('--eval_batch_size', type=int, default=32)
  ap.add_argument('--out', default='')
  args = ap.parse_args()
  ckpt = pathlib.Path(args.ckpt)
  search_dir = pathlib.Path(args.search) if args.search else ckpt / 'search'
  out = pathlib.Path(args.out) if args.out else search_dir / ('trust_scratch' if args.from_scratch else 'trust')
  (out / 'subnets').mkdir(parents=True, exist_ok=True)

  config = setup.load_config(ckpt)
  try:
    seeds = [int(x) for x in args.seeds.split(',')] if args.seeds else [int(config.seed)]
  except ValueError:
    raise SystemExit(f'error: --seeds takes comma-separated integers, got {args.seeds!r}')
  if len(set(seeds)) != len(seeds):
    raise SystemExit(f'error: --seeds repeats a seed: {args.seeds!r}')
  run, trainable = setup.load_trained(ckpt, config)
  evaluate = setup.make_evaluator(run, args.eval_batch_size)
  val = run.model_data.splits['eval']
  points = pick_subnets(run.spec, search_dir, args.points, args.source)
  print(f"{'#':>2} {'from':<7} {'params':>9} {'inherited val':>13} {'retrained val':>13} "
        f"{'inh. loss':>9} {'ret. loss':>9} {'wall s':>7}"
        + ('   retrained val per seed ' + ','.join(map(str, seeds)) if len(seeds) > 1 else ''))
  rows = []
  for i, p in enumerate(points):
    inherited_loss, scores = evaluate(trainable, run.frozen, val, p['subnet'])
    inherited = scores[run.model_data.metric]
    subnet_file = out / 'subnets' / f'point{i}.json'
    subnet_file.write_text(subnet_lib.dumps(run.spec, p['subnet']))
    t0 = time.perf_counter()
    per_seed = []
    for seed in seeds:
      retrain = retrain_config(ckpt, subnet_file, args.from_scratch, args.retrain_epochs, seed)
      per_seed.append(loop.train_and_evaluate(retrain, run_dir(out, i, seed, int(config.seed)),
                                              progress=False))
    row = {'params': int(p['params']), 'from': p['from'],
           'search_val_accuracy': float(p['search_val_accuracy']),
           'inherited_val_accuracy': float(inherited),
           'retrained_val_accuracy': float(np.mean([s['val_accuracy'] for s in per_seed])),
           'inherited_val_loss': float(inherited_loss),
           'retrained_val_loss': float(np.mean([s['val_loss'] for s in per_seed])),
           'seeds': seeds,
           'retrained_val_accuracy_per_seed': [float(s['val_accuracy']) for s in per_seed],
           'retrained_val_loss_per_seed': [float(s['val_loss']) for s in per_seed],
           'retrain_wall_s': time.perf_counter() - t0, 'subnet_file': str(subnet_file)}
    rows.append(row)
    print(f"{i:>2} {row['from']:<7} {row['params']:>9,} {row['inherited_val_accuracy']:>13.4f} "
          f"{row['retrained_val_accuracy']:>13.4f} {row['inherited_val_loss']:>9.4f} "
          f"{row['retrained_val_loss']:>9.4f} {row['retrain_wall_s']:>7.0f}"
          + ('   ' + ', '.join(f'{a:.3f}' for a in row['retrained_val_accuracy_per_seed'])
             if len(seeds) > 1 else ''), flush=True)
  tau = kendall_tau([r['inherited_val_accuracy'] for r in rows],
                    [r['retrained_val_accuracy'] for r in rows])
  tau_loss = kendall_tau([r['inherited_val_loss'] for r in rows],
                         [r['retrained_val_loss'] for r in rows])
  # [subnets, seeds] -> [seeds, subnets]: each seed's values over the subnets
  agreement = {m: seed_agreement(np.transpose([r[f'retrained_val_{m}_per_seed'] for r in rows]))
               for m in ('accuracy', 'loss')}
  result = {'ckpt': str(ckpt), 'search': str(search_dir), 'source': args.source,
            'retrain_epochs': None if args.from_scratch else args.retrain_epochs,
            'from_scratch': args.from_scratch, 'epochs': retrain.num_epochs, 'seeds': seeds,
            'kendall_tau': tau, 'kendall_tau_loss': tau_loss,
            'seed_agreement_tau': agreement, 'points': rows}
  metrics.write_json(out / 'search_trust.json', result)
  print(f'Kendall tau (inherited vs retrained, {len(rows)} subnets'
        + (f', retrained = mean of seeds {",".join(map(str, seeds))}' if len(seeds) > 1 else '')
        + f'): val accuracy {tau:.3f}, val loss {tau_loss:.3f}')
  if len(seeds) > 1:
    print(f"Seeds' agreement (mean tau between every two seeds' retrained values): "
          f"val accuracy {agreement['accuracy']:.3f}, val loss {agreement['loss']:.3f}")
  print(f'written to {out / "search_trust.json"}')


if __name__ == '__main__':
  main()
