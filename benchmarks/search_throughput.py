"""Search throughput on a trained GLoRA supernet: candidates per second of one and the
same evolutionary search, run three ways side by side in one process (issue 15):

  default    chunk 8 (candidates per vmapped call), no racing: the search before issue 15
  probe      the chunk measured at start-up (fitness.probe_chunk), no racing
  race       the probed chunk, racing on (SearchConfig.race, default share 0.5)

Each way runs the whole search (same seed, same budget) after its evaluator is
compiled and warmed up; the rounds are interleaved (default, probe, race, default,
...) and the medians reported, with wall and process CPU time. The best subnet of
each way is compared with the default's: without racing it must be identical (the
chunk changes no score); with racing it is the same unless a first-heat loser would
have been the best or a parent of it.

  python benchmarks/search_throughput.py --ckpt runs/accuracy/full/glora/seed0
  python benchmarks/search_throughput.py --ckpt runs/bbc --population 8 --generations 2 --rounds 1

The candidates are scored on the checkpoint's eval split (val for BBC News).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from glora_jax import subnet as subnet_lib
from glora_jax.search import evolution, fitness
from glora_jax.train import setup, sharding


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--ckpt', required=True, help='a train.py workdir of a GLoRA supernet')
  ap.add_argument('--population', type=int, default=8)
  ap.add_argument('--generations', type=int, default=2)
  ap.add_argument('--param_limit', type=float, default=331_776)
  ap.add_argument('--race', type=float, default=0.5)
  ap.add_argument('--rounds', type=int, default=1)
  ap.add_argument('--seed', type=int, default=0)
  ap.add_argument('--eval_batch_size', type=int, default=32)
  args = ap.parse_args()

  run, trainable = setup.load_trained(args.ckpt)
  frozen_sh = sharding.named(run.mesh, setup.param_specs(run)[0])  # as search.py shards it
  frozen = jax.device_put(run.frozen, frozen_sh)
  base = dict(population=args.population, generations=args.generations, parents=5,
              mutations=args.population // 2, crossovers=args.population // 2,
              param_limit=args.param_limit, seed=args.seed)
  cfgs = {'default': evolution.SearchConfig(**base), 'probe': evolution.SearchConfig(**base),
          'race': evolution.SearchConfig(**base, race=args.race)}
  fits = {}
  for name, chunk in (('default', 8), ('probe', None)):
    fits[name] = fitness.Fitness(run.model_data.forward_loss, run.spec, run.mesh, trainable, frozen, frozen_sh,
                                 run.model_data.splits['eval'], chunk=chunk,
                                 batch_size=args.eval_batch_size, log=print)
  fits['race'] = fitness.Fitness(run.model_data.forward_loss, run.spec, run.mesh, trainable, frozen, frozen_sh,
                                 run.model_data.splits['eval'], chunk=fits['probe'].chunk,
                                 batch_size=args.eval_batch_size, race=args.race)
  warm = np.asarray(subnet_lib.largest(run.spec))[None]
  for f in fits.values():
    f(warm)  # compile outside the timed searches
  print(f"eval split: {len(fits['default'].batches)} batches of {args.eval_batch_size}; chunks: "
        f"default 8, probed {fits['probe'].chunk}; race share {args.race}")

  wall, cpu, rate, best = ({k: [] for k in fits} for _ in range(4))
  for _ in range(args.rounds):
    for name, fit in fits.items():
      before, evaluations = fit.evaluated, fit.batch_evaluations
      t, c = time.perf_counter(), time.process_time()
      archive = evolution.run(run.spec, fit, cfgs[name], None, log=lambda m: None)
      wall[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
      rate[name].append((fit.evaluated - before) / wall[name][-1])
      best[name].append(archive.cands[archive.top(1)[0]])
      print(f'{name:>8}: {fit.evaluated - before} candidates ({fit.batch_evaluations - evaluations} '
            f'candidate-batches) in {wall[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU; best '
            f'val {archive.accuracy[archive.top(1)[0]]:.4f}', flush=True)
  med = {k: statistics.median(v) for k, v in rate.items()}
  for name in fits:
    same = all(np.array_equal(b, d) for b, d in zip(best[name], best['default']))
    print(f'{name:>8}: {med[name]:.2f} candidates/s (median wall; CPU s median '
          f'{statistics.median(cpu[name]):.1f}), {med[name] / med["default"]:.2f} x default; '
          f'best subnet {"same as" if same else "DIFFERS from"} default')
  print(f"goal: race / default >= 1.5 with the same best subnet -> "
        f"{med['race'] / med['default']:.2f}")


if __name__ == '__main__':
  main()
