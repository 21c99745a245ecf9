"""Unrolled `layer_{i}` loop against `model.scan_layers` (one nn.scan over stacked
params) for the library's BertEncoder: compile and step time of a jitted training step
(forward, backward, SGD update). Prints a scan/loop ratio table.

    python benchmarks/layer_stacking.py [--layers 12 32]

Scan is the library's (bert.BertEncoder with scan_layers=True), so adapters keep their
per-layer paths (peft stacks them per call); BENCHMARKS.md "Layer stacking" has the
measured table.
"""
from __future__ import annotations

import argparse
import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glora_jax.models import bert


class Encoder(nn.Module):
  config: bert.BertConfig

  @nn.compact
  def __call__(self, x, mask):
    return bert.BertEncoder(self.config, name='encoder')(x, mask, deterministic=True)


def measure(model, x, mask, steps: int) -> tuple[float, float]:
  """(compile seconds, median step milliseconds) of a jitted SGD step."""
  params = model.init(jax.random.key(0), x, mask)['params']

  def loss_fn(p):
    return jnp.mean(model.apply({'params': p}, x, mask) ** 2)

  def step(p):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    return jax.tree.map(lambda a, g: a - 1e-3 * g, p, grads), loss

  start = time.perf_counter()
  compiled = jax.jit(step, donate_argnums=0).lower(params).compile()
  compile_s = time.perf_counter() - start
  params, loss = compiled(params)  # warm-up
  jax.block_until_ready(loss)
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    params, loss = compiled(params)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - start)
  return compile_s, 1e3 * float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--layers', type=int, nargs='+', default=[12, 32])
  parser.add_argument('--hidden', type=int, default=128)
  parser.add_argument('--heads', type=int, default=4)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--seq', type=int, default=64)
  parser.add_argument('--steps', type=int, default=10)
  args = parser.parse_args()

  print(f'backend {jax.default_backend()}, hidden {args.hidden}, batch {args.batch}, '
        f'seq {args.seq}, median of {args.steps} steps')
  print(f"{'layers':>6} {'compile loop s':>14} {'compile scan s':>14} {'scan/loop':>9} "
        f"{'step loop ms':>12} {'step scan ms':>12} {'scan/loop':>9}")
  for n in args.layers:
    config = bert.BertConfig(vocab_size=8, hidden_size=args.hidden, num_hidden_layers=n,
                             num_attention_heads=args.heads, intermediate_size=4 * args.hidden)
    x = jax.random.normal(jax.random.key(1), (args.batch, args.seq, args.hidden))
    mask = jnp.ones((args.batch, args.seq), bool)
    loop_c, loop_s = measure(Encoder(config), x, mask, args.steps)
    scan_c, scan_s = measure(Encoder(dataclasses.replace(config, scan_layers=True)), x, mask,
                             args.steps)
    print(f'{n:>6} {loop_c:>14.2f} {scan_c:>14.2f} {scan_c / loop_c:>9.2f} '
          f'{loop_s:>12.2f} {scan_s:>12.2f} {scan_s / loop_s:>9.2f}')


if __name__ == '__main__':
  main()
