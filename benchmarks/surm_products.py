"""Times SURM's FFT product against a dense matmul with the materialised matrix.

Forward + backward (jit of value_and_grad over parameters and input), median of repeats
after warm-up; the dense side rebuilds M every step, as it must while M trains.
Run:  python benchmarks/surm_products.py [--sizes 64,128,...] [--kinds circulant,ldr:2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from glora_jax.adapters import structured


def _structure(spec: str, n: int) -> structured.Structure:
  """'ldr:2' -> LDR of displacement rank 2 on n x n; block_circulant's default block is n."""
  kind, _, arg = spec.partition(':')
  default = {'kronecker': 4, 'ldr': 1, 'block_circulant': n}.get(kind, 0)
  return structured.Structure(kind, n, n, int(arg) if arg else default)


def _random_params(st: structured.Structure, key):
  keys = jax.random.split(key, len(st.shapes()))
  return {name: jax.random.normal(k, shape, jnp.float32)
          for k, (name, shape) in zip(keys, st.shapes().items())}


def time_step(st: structured.Structure, how: str, x, params, warmup: int, repeats: int) -> float:
  """Median seconds of one jitted forward + backward step of 0.5 * mean((M x)^2)."""

  def loss(p, xs):
    y = st.product(p, xs, how)
    return 0.5 * jnp.mean(jnp.square(y))

  step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  for _ in range(warmup):
    jax.block_until_ready(step(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(step(params, x))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='64,128,256,384,768,1024,4096')
  parser.add_argument('--kinds', default='circulant',
                      help=f'comma-separated, from {structured.KINDS}, with an optional '
                      ':rank or :block (ldr:2, block_circulant:64)')
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--seq', type=int, default=128)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--repeats', type=int, default=5)
  args = parser.parse_args()
  sizes = [int(s) for s in args.sizes.split(',')]
  kinds = args.kinds.split(',')

  dev = jax.devices()[0]
  print(f'device: {dev.platform} ({dev.device_kind}), {jax.device_count()} device(s); '
        f'jax {jax.__version__}; x float32 of shape ({args.batch}, {args.seq}, n); '
        f'forward + backward (grads of params and x), median of {args.repeats} after '
        f'{args.warmup} warm-up')
  print(f'structured.DENSE_BELOW = {structured.DENSE_BELOW}\n')
  print('| kind | n | fft ms | dense ms | dense / fft | faster | auto picks |')
  print('|---|---:|---:|---:|---:|---|---|')
  crossover = {}
  for kind in kinds:
    fft_wins = []
    for n in sizes:
      st = _structure(kind, n)
      kx, kp = jax.random.split(jax.random.key(n))
      x = jax.random.normal(kx, (args.batch, args.seq, n), jnp.float32)
      params = _random_params(st, kp)
      fft = time_step(st, 'fft', x, params, args.warmup, args.repeats)
      dense = time_step(st, 'dense', x, params, args.warmup, args.repeats)
      ratio = dense / fft
      fft_wins.append(ratio > 1)
      auto = 'dense' if st.prefers_dense() else 'fft'
      print(f'| {kind} | {n} | {1e3 * fft:.2f} | {1e3 * dense:.2f} | {ratio:.2f} | '
            f"{'fft' if ratio > 1 else 'dense'} | {auto} |", flush=True)
    # The smallest measured n from which the FFT wins at every larger n.
    wins_from = [n for k, n in enumerate(sizes) if all(fft_wins[k:])]
    crossover[kind] = wins_from[0] if wins_from else None
  print()
  for kind, n in crossover.items():
    print(f'crossover {kind}: ' + (f'fft from n = {n}' if n else 'dense at every measured n'))


if __name__ == '__main__':
  main()
