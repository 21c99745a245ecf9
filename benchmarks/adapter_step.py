"""Train-step time of the GLoRA supernet vs LoRA vs the frozen backbone, side by side.

A 12-layer width-384 BERT stack (random weights), batch 32 x 128 tokens, every
linear layer adapted. Each figure is the median of timed steps after warm-up,
all in one process, and the ratios are printed at the end.

  python benchmarks/adapter_step.py [--layers 12] [--steps 10] [--batch 32] [--tokens 128]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from glora_jax import peft
from glora_jax.adapters import glora, lora
from glora_jax.models import bert, registry
from glora_jax.train import steps, tasks


def median_step_ms(step_fn, state, frozen, batch, n_steps: int, warmup: int = 2) -> float:
  for _ in range(warmup):
    state, metrics, _ = step_fn(state, frozen, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(n_steps):
    t = time.perf_counter()
    state, metrics, _ = step_fn(state, frozen, batch)
    jax.block_until_ready((state, metrics))
    times.append(1e3 * (time.perf_counter() - t))
  return statistics.median(times)


def build_step(model, params, trainable_patterns, family, task):
  """A jitted train step (forward, backward, AdamW update) and its inputs."""
  model_trainable, frozen = peft.partition(params, trainable_patterns)
  spec, adapter_params = None, {}
  if family is not None:
    adapters = peft.attach(params, family, targets=bert.DEFAULT_TARGETS, key=1)
    spec, adapter_params = adapters.spec, adapters.params
  trainable = {'model': model_trainable, 'adapters': adapter_params}
  optimizer = steps.make_optimizer(1e-3, 0.01)
  subnet = np.zeros((1, 1) if spec is None else spec.num_options.shape, np.int32)
  state = steps.init_state(trainable, optimizer, 0, subnet)
  supernet = spec is not None and spec.searchable
  fn = jax.jit(steps.make_train_step(task, spec, optimizer, supernet), donate_argnums=(0,))
  return fn, state, frozen


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--layers', type=int, default=12)
  ap.add_argument('--width', type=int, default=384)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--tokens', type=int, default=128)
  ap.add_argument('--steps', type=int, default=10)
  ap.add_argument('--json', default='', help='also write the figures to this file')
  args = ap.parse_args()

  cfg = bert.BertConfig(hidden_size=args.width, num_hidden_layers=args.layers,
                        num_attention_heads=args.width // 64, intermediate_size=4 * args.width)
  model = bert.BertClassifier(cfg, 5)
  rng = np.random.default_rng(0)
  batch = {'input_ids': jnp.asarray(rng.integers(1000, 20000, (args.batch, args.tokens)), jnp.int32),
           'attention_mask': jnp.ones((args.batch, args.tokens), jnp.int32),
           'token_type_ids': jnp.zeros((args.batch, args.tokens), jnp.int32),
           'label': jnp.asarray(rng.integers(0, 5, args.batch), jnp.int32),
           'mask': jnp.ones((args.batch,), jnp.float32)}
  params = model.init(jax.random.key(0), batch['input_ids'][:1], batch['attention_mask'][:1])['params']

  task = steps.ForwardLoss(tasks.make_forward(registry.of_model(model), model),
                          steps.classification_loss)
  # The frozen backbone's forward + backward alone: only the head and the first
  # layer's query bias train, so the backward pass runs through every layer
  # (activation gradients) but computes no weight gradients for the stack.
  cases = {
      'frozen backbone fwd+bwd': (['head/.*', 'encoder/layer_0/attention/query/bias'], None),
      'LoRA r=8 (weight mode)': (['head/.*'], lora.family(rank=8, alpha=16)),
      'LoRA r=8 (activation mode)': (['head/.*'], lora.family(rank=8, alpha=16, mode='activation')),
      'GLoRA supernet (ranks 4)': (['head/.*'], glora.family(ranks=(4,))),
  }
  results = {}
  for name, (patterns, fam) in cases.items():
    fn, state, frozen = build_step(model, params, patterns, fam, task)
    results[name] = median_step_ms(fn, state, frozen, batch, args.steps)
    print(f'{name:<30} {results[name]:9.1f} ms/step', flush=True)

  base = results['frozen backbone fwd+bwd']
  lora_ms = results['LoRA r=8 (weight mode)']
  glora_ms = results['GLoRA supernet (ranks 4)']
  print(f'\n{args.layers} layers, width {args.width}, batch {args.batch} x {args.tokens} tokens, '
        f'{jax.devices()[0].device_kind} x{jax.device_count()}, jax {jax.__version__}, '
        f'{platform.processor() or platform.machine()}')
  print(f'{"case":<30} {"ms/step":>9} {"/ backbone":>11} {"/ LoRA":>8}')
  for name, ms in results.items():
    print(f'{name:<30} {ms:9.1f} {ms / base:11.3f} {ms / lora_ms:8.3f}')
  print(f'\nGLoRA / LoRA = {glora_ms / lora_ms:.3f} (goal <= 1.10); '
        f'GLoRA / frozen backbone = {glora_ms / base:.3f}')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'ms_per_step': results, 'args': vars(args)}, f, indent=1)


if __name__ == '__main__':
  main()
