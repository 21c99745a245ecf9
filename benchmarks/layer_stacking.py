"""Unrolled `layer_{i}` loop against `nn.scan` for a BERT layer stack: compile and step time.
Prints a scan/loop ratio table for a jitted training step (forward, backward, SGD update).

Measured (CPU, 2 cores shared with other jobs, load 5-7; hidden 128, batch 8, seq 64;
three runs, `python benchmarks/layer_stacking.py`):

    layers  compile loop s  compile scan s  scan/loop  step loop ms  step scan ms  scan/loop
        12      8.8-10.4        7.8-8.6     0.82-0.89      588-723       563-690    0.96
        32     18.1-23.3        5.6-7.2     0.28-0.40     1174-2083      982-1357   0.48-1.11

Scan compiles 2.5-3.5x faster at 32 layers and about as fast at 12; step time is
equal within the noise of a shared machine. We keep the loop: the compile cost is
paid once (about 20 s at 32 layers on CPU), while scan would stack every layer
under ONE path ('layers/layer'), so adapters could no longer target a layer by
path, `flax.linen.intercept_methods` could not tell layers apart by `module.path`,
and merged layers that gain a bias would have to gain it in every layer.
"""
from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glora_jax.models import bert


class ScanLayer(nn.Module):
  config: bert.BertConfig

  @nn.compact
  def __call__(self, x, mask):
    return bert.BertLayer(self.config, name='layer')(x, mask, deterministic=True), None


class ScannedEncoder(nn.Module):
  """The same layers with stacked (layers, ...) parameters under one nn.scan."""
  config: bert.BertConfig

  @nn.compact
  def __call__(self, x, mask):
    stack = nn.scan(ScanLayer, variable_axes={'params': 0}, split_rngs={'params': True},
                    in_axes=nn.broadcast, length=self.config.num_hidden_layers)
    x, _ = stack(self.config, name='layers')(x, mask)
    return x


class LoopEncoder(nn.Module):
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
    loop_c, loop_s = measure(LoopEncoder(config), x, mask, args.steps)
    scan_c, scan_s = measure(ScannedEncoder(config), x, mask, args.steps)
    print(f'{n:>6} {loop_c:>14.2f} {scan_c:>14.2f} {scan_c / loop_c:>9.2f} '
          f'{loop_s:>12.2f} {scan_s:>12.2f} {scan_s / loop_s:>9.2f}')


if __name__ == '__main__':
  main()
