"""Speed ratios, each measured side by side in one run (MiniLM shapes, 32 x 128 tokens).

  python benchmarks/speed.py [--steps 3] [--rounds 3] [--peer /tmp/torchenv/bin/python] [--skip devices]

1. forward and train step: GLoRA supernet / LoRA r=8 (activation mode, the default;
   and weight mode) / frozen backbone forward+backward, in interleaved rounds; with
   --peer PYTHON also HF PEFT's LoRA step and torch's forward on the same shapes, in
   the same rounds (benchmarks/peer_torch.py says how to make that environment)
2. compiled: FLOPs, bytes, fused ops and conditionals of each step; GLoRA's FLOP floor
3. inference: merged model / base model (and the merged outputs equal the adapted ones)
4. search evaluation: vmapped chunk of 8 candidates / one candidate at a time
5. SURM circulant FFT product / dense product at widths 384, 768, 1024
6. 8 simulated CPU devices / 1 device for the same global batch (correctness + overhead)
7. quantized frozen base (issue 33): LoRA and GLoRA train steps over int8 and NF4
   kernels (blocks of 64; NF4 with double-quantized scales) / over the float base,
   in interleaved rounds

  python benchmarks/speed.py --skip train,compiled,inference,search,surm,devices   # 7 alone
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, '.')
sys.path.insert(0, 'benchmarks')
from adapter_step import build_step  # noqa: E402
from glora_jax import peft, subnet  # noqa: E402
from glora_jax.adapters import glora, lora, structured  # noqa: E402
from glora_jax.models import bert, registry  # noqa: E402
from glora_jax.search import fitness  # noqa: E402
from glora_jax.train import sharding, steps, tasks  # noqa: E402


def timed(fn, *args, repeats=5, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(1e3 * (time.perf_counter() - t))
  return statistics.median(ts)


def minilm_setup(batch, tokens):
  cfg, backbone = bert.load_minilm()
  params = bert.add_head(backbone, cfg, 5, jax.random.key(0))
  model = bert.BertClassifier(cfg, 5)
  rng = np.random.default_rng(0)
  b = {'input_ids': jnp.asarray(rng.integers(1000, 20000, (batch, tokens)), jnp.int32),
       'attention_mask': jnp.ones((batch, tokens), jnp.int32),
       'token_type_ids': jnp.zeros((batch, tokens), jnp.int32),
       'label': jnp.asarray(rng.integers(0, 5, batch), jnp.int32), 'mask': jnp.ones((batch,), jnp.float32)}

  forward = tasks.make_forward(registry.of_model(model), model)
  return model, params, b, steps.ForwardLoss(forward, steps.classification_loss)


class Peer:
  """benchmarks/peer_torch.py in its own Python (torch + transformers + peft), driven
  over stdin/stdout so that its rounds interleave with ours on the same cores."""

  def __init__(self, python, batch, tokens):
    from glora_jax import bundled
    env = dict(os.environ, HF_HUB_OFFLINE='1', TRANSFORMERS_VERBOSITY='error')
    self.proc = subprocess.Popen(
        [python, os.path.join(os.path.dirname(__file__), 'peer_torch.py'),
         '--minilm_dir', str(bundled.minilm_dir()), '--batch', str(batch), '--tokens', str(tokens)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    self.info = self._read()

  def _read(self):
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError('the PyTorch peer exited; run benchmarks/peer_torch.py by hand to see why')
    return json.loads(line)

  def __call__(self, case, n):
    self.proc.stdin.write(f'{case} {n}\n')
    self.proc.stdin.flush()
    r = self._read()
    return statistics.median(r['wall_ms']), statistics.median(r['cpu_ms'])

  def close(self):
    self.proc.stdin.write('quit\n')
    self.proc.stdin.flush()
    self.proc.wait(timeout=60)


def _medians(call, n):
  """(median wall ms, median CPU ms) of n calls of `call`, which blocks until done."""
  wall, cpu = [], []
  for _ in range(n):
    t, c = time.perf_counter(), time.process_time()
    call()
    wall.append(1e3 * (time.perf_counter() - t))
    cpu.append(1e3 * (time.process_time() - c))
  return statistics.median(wall), statistics.median(cpu)


def _ours(fn, state, frozen, batch):
  """A timer for one of our train steps that keeps its (donated) state."""
  box = [state]

  def step():
    box[0], metrics, _ = fn(box[0], frozen, batch)
    jax.block_until_ready((box[0], metrics))

  run = lambda n: _medians(step, n)
  run(2)  # compile + warm-up
  return run


def _ours_forward(model, params, batch):
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  fn = jax.jit(lambda p: model.apply({'params': p}, *args))
  run = lambda n: _medians(lambda: jax.block_until_ready(fn(params)), n)
  run(2)
  return run


def section_train(model, params, batch, task, n, rounds, peer_python=''):
  """Forward and train-step times, every case timed in each of `rounds` interleaved
  rounds (ours and the peer's alternating), medians of the round medians."""
  timers = {'forward (eval)': _ours_forward(model, params, batch)}
  for name, patterns, fam in [
      ('frozen backbone fwd+bwd', ['head/.*', 'encoder/layer_0/attention/query/bias'], None),
      # y + x A^T B^T beside the frozen matmul (the default): no full-size kernel gradient.
      ('LoRA r=8', ['head/.*'], lora.family(rank=8, alpha=16)),
      ('LoRA r=8 weight mode', ['head/.*'], lora.family(rank=8, alpha=16, mode='weight')),
      ('GLoRA supernet', ['head/.*'], glora.family())]:
    timers[name] = _ours(*build_step(model, params, patterns, fam, task), batch)
  peer = None
  if peer_python:
    peer = Peer(peer_python, len(batch['label']), batch['input_ids'].shape[1])
    print(f"peer: torch {peer.info['torch']} ({peer.info['threads']} threads), PEFT LoRA with "
          f"{peer.info['trainable_params']:,} trainable params", flush=True)
    timers['torch forward (eval)'] = lambda n: peer('forward', n)
    timers['PEFT LoRA r=8'] = lambda n: peer('lora', n)
  try:
    res = _interleaved(timers, n, rounds)
  finally:
    if peer:
      peer.close()
  ms = {name: r['wall_ms'] for name, r in res.items()}
  g, l, b = ms['GLoRA supernet'], ms['LoRA r=8'], ms['frozen backbone fwd+bwd']
  ratios = {'GLoRA/LoRA': g / l, 'GLoRA/backbone': g / b, 'LoRA/backbone': l / b,
            'LoRA weight mode/LoRA': ms['LoRA r=8 weight mode'] / l}
  if peer:
    ratios['forward ours/torch'] = ms['forward (eval)'] / ms['torch forward (eval)']
    ratios['LoRA step ours/PEFT'] = l / ms['PEFT LoRA r=8']
  goals = {'GLoRA/LoRA': 1.10, 'forward ours/torch': 0.85, 'LoRA step ours/PEFT': 0.85}
  print('ratios (wall): ' + ', '.join(
      f'{k} = {v:.3f}' + (f' (goal <= {goals[k]:.2f})' if k in goals else '') for k, v in ratios.items()),
      flush=True)
  res['ratios'] = ratios
  return res


def _interleaved(timers, n, rounds) -> dict:
  """{case: median wall and CPU ms}: every timer run for `n` steps in each of `rounds`
  interleaved rounds, medians of the round medians; the table printed."""
  rows = {name: [] for name in timers}
  for _ in range(rounds):
    for name, run in timers.items():
      rows[name].append(run(n))
  res = {name: {'wall_ms': statistics.median(w for w, _ in r), 'cpu_ms': statistics.median(c for _, c in r)}
         for name, r in rows.items()}
  print(f'{"case":<28} {"wall ms":>8} {"cpu ms":>8}   ({rounds} interleaved rounds of {n})')
  for name, r in res.items():
    print(f"{name:<28} {r['wall_ms']:8.0f} {r['cpu_ms']:8.0f}")
  return res


def section_quant(model, params, batch, task, n, rounds):
  """Train-step time over a quantized frozen base / over the float one, LoRA r=8 and
  the GLoRA supernet: every adapted kernel quantized as model.frozen_quant does
  (setup.quantize_kernels) and dequantized inside its layer at each call. Interleaved
  rounds, medians of the round medians."""
  from glora_jax.train import setup
  timers = {}
  for method, fam in [('LoRA r=8', lora.family(rank=8, alpha=16)), ('GLoRA supernet', glora.family())]:
    fn, state, frozen = build_step(model, params, ['head/.*'], fam, task)
    for kind in ('float', 'int8', 'nf4'):
      base = frozen if kind == 'float' else setup.quantize_kernels(
          frozen, bert.DEFAULT_TARGETS, kind, 64, double=kind == 'nf4')
      # Each case its own copy of the state: the step donates it.
      timers[f'{method}, {kind} base'] = _ours(fn, jax.tree.map(jnp.copy, state), base, batch)
  res = _interleaved(timers, n, rounds)
  ratios = {f'{method} {kind}/float': res[f'{method}, {kind} base']['wall_ms']
            / res[f'{method}, float base']['wall_ms']
            for method in ('LoRA r=8', 'GLoRA supernet') for kind in ('int8', 'nf4')}
  print('ratios (wall): ' + ', '.join(f'{k} = {v:.3f}' for k, v in ratios.items()), flush=True)
  res['ratios'] = ratios
  return res


def section_compiled(model, params, batch, task):
  """What XLA compiled for each train step: FLOPs and bytes (cost_analysis, which
  counts both branches of a conditional), fused ops and conditionals in the HLO, and
  GLoRA's FLOP floor: its FLOPs with the low-rank-A weight gradients (in conditional
  branches) counted at the rate uniform sampling runs them, over LoRA's."""
  out = {}
  cases = [('frozen backbone fwd+bwd', ['head/.*', 'encoder/layer_0/attention/query/bias'], None),
           ('LoRA r=8', ['head/.*'], lora.family(rank=8, alpha=16)),
           ('GLoRA supernet', ['head/.*'], glora.family())]
  for name, patterns, fam in cases:
    fn, state, frozen = build_step(model, params, patterns, fam, task)
    compiled = fn.lower(state, frozen, batch).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    hlo = compiled.as_text()
    out[name] = {'gflop': cost['flops'] / 1e9, 'gbytes': cost.get('bytes accessed', 0) / 1e9,
                 'fusions': hlo.count(' fusion('), 'conditionals': hlo.count('conditional(')}
    print(f"compiled {name:<24} {out[name]['gflop']:7.1f} GFLOP {out[name]['gbytes']:6.2f} GB "
          f"{out[name]['fusions']:5d} fusions {out[name]['conditionals']:3d} conditionals", flush=True)
  # The weight gradient x^T g of every adapted layer: 2 x tokens x in x out FLOPs.
  tokens = batch['input_ids'].size
  adapters = peft.attach(params, glora.family(), targets=bert.DEFAULT_TARGETS)
  wgrad = sum(2 * tokens * l.kernel_shape[0] * l.kernel_shape[1] for l in adapters.spec.layers) / 1e9
  p_low = 1 / int(adapters.spec.num_options[0, 0])  # A's options: lora_4, vector, constant, none
  run = out['GLoRA supernet']['gflop'] - (1 - p_low) * wgrad
  floor = run / out['LoRA r=8']['gflop']
  print(f'GLoRA weight gradients in conditional branches: {wgrad:.1f} GFLOP, run with p = {p_low:.2f}: '
        f"GLoRA's FLOPs run {run:.1f} GFLOP = {floor:.3f} x LoRA's (the floor of GLoRA/LoRA "
        f'where time follows FLOPs)', flush=True)
  out['glora_flop_floor'] = floor
  return out


def section_inference(model, params, batch, n):
  adapters = peft.attach(params, glora.family(), targets=bert.DEFAULT_TARGETS, key=1)
  leaves, tree = jax.tree.flatten(adapters.params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  adapters = adapters.replace(params=jax.tree.unflatten(
      tree, [0.01 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
  sub = subnet.sample(jax.random.key(3), adapters)
  merged = peft.merge(params, adapters, sub)
  args = (batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  plain = jax.jit(lambda p: model.apply({'params': p}, *args))
  adapted = jax.jit(lambda a: peft.forward(model, params, a, sub, *args))
  diff = float(jnp.abs(plain(merged) - adapted(adapters)).max())
  base_ms, merged_ms = timed(plain, params, repeats=n), timed(plain, merged, repeats=n)
  adapted_ms = timed(adapted, adapters, repeats=n)
  print(f'inference ms: base {base_ms:.0f}, merged {merged_ms:.0f} (ratio {merged_ms / base_ms:.3f}, '
        f'goal 1.00), unmerged adapters {adapted_ms:.0f}; max |merged - adapted| = {diff:.2e}',
        flush=True)
  return {'base': base_ms, 'merged': merged_ms, 'adapted': adapted_ms, 'max_abs_diff': diff}


def section_search(model, params, batch, task, num_candidates=16):
  adapters = peft.attach(params, glora.family(), targets=bert.DEFAULT_TARGETS, key=1)
  trainable_model, frozen = peft.partition(params, ['head/.*'])
  trainable = {'model': trainable_model, 'adapters': adapters.params}
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  fsh = sharding.tree_shardings(frozen, [('.*', jax.sharding.PartitionSpec())], mesh)
  arrays = {k: np.asarray(v) for k, v in batch.items() if k != 'mask'}
  cands = np.asarray(jax.vmap(lambda k: subnet.sample(k, adapters))(
      jax.random.split(jax.random.key(0), num_candidates)))
  res = {}
  for chunk in (8, 1):
    fit = fitness.Fitness(task, adapters.spec, mesh, trainable, frozen, fsh, arrays, chunk=chunk,
                          batch_size=len(arrays['label']))
    fit(cands[:chunk])  # compile
    t = time.perf_counter()
    fit(cands)
    res[chunk] = num_candidates / (time.perf_counter() - t)
  print(f'search evaluation: {res[8]:.2f} candidates/s vmapped (chunk 8) vs {res[1]:.2f} one at a '
        f'time: ratio {res[8] / res[1]:.2f}; search_throughput.py times whole searches', flush=True)
  return {'vmapped_per_s': res[8], 'single_per_s': res[1]}


def section_surm(n_repeats):
  out = {}
  x_shape = (32, 128)
  for n in (384, 768, 1024):
    st = structured.Structure('circulant', n, n, 0)
    keys = jax.random.split(jax.random.key(0), len(st.shapes()))
    p = {name: jax.random.normal(k, shape) for k, (name, shape) in zip(keys, st.shapes().items())}
    x = jax.random.normal(jax.random.key(1), x_shape + (n,))
    ms = {}
    for how in ('fft', 'dense'):
      step = jax.jit(jax.value_and_grad(lambda p, x: 0.5 * jnp.mean(st.product(p, x, how) ** 2), (0, 1)))
      ms[how] = timed(step, p, x, repeats=n_repeats)
    out[n] = ms
    print(f'SURM circulant n={n}: fft {ms["fft"]:.1f} ms, dense {ms["dense"]:.1f} ms, '
          f'dense/fft = {ms["dense"] / ms["fft"]:.2f}', flush=True)
  return out


DEVICE_CHILD = r'''
import os, sys, json, time
sys.path.insert(0, '.')
from configs import tiny_bbc_glora
from glora_jax.train import loop
c = tiny_bbc_glora.get_config(); c.checkpoint.async_save = False
c.mesh.data, c.mesh.model = int(sys.argv[1]), int(sys.argv[2]); c.num_epochs = 2
t = time.perf_counter()
s = loop.train_and_evaluate(c, sys.argv[3], progress=False)
print('RESULT', json.dumps({'median_step_ms': s['median_step_ms'], 'val_accuracy': s['val_accuracy']}))
'''


def section_devices(tmp):
  out = {}
  for label, n, data, model in (('1 device', 1, 1, 1), ('8 devices (data 4 x model 2)', 8, 4, 2)):
    env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={n}')
    # A fresh workdir, removed after: a finished checkpoint left by an earlier run
    # would be resumed with no steps to time.
    with tempfile.TemporaryDirectory(prefix='glora_speed_', dir=tmp) as workdir:
      r = subprocess.run([sys.executable, '-c', DEVICE_CHILD, str(data), str(model), workdir],
                         env=env, capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if l.startswith('RESULT')]
    out[label] = json.loads(line[-1][7:]) if line else {'error': r.stderr[-500:]}
  a, b = out['1 device'], out['8 devices (data 4 x model 2)']
  if 'error' not in a and 'error' not in b:
    print(f"devices (tiny model, 2 pretrained layers, batch 16 x 32): 1 device {a['median_step_ms']:.0f} ms, "
          f"8 simulated {b['median_step_ms']:.0f} ms (ratio {b['median_step_ms'] / a['median_step_ms']:.2f}); "
          f"val accuracy {a['val_accuracy']:.4f} vs {b['val_accuracy']:.4f}", flush=True)
  return out


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--steps', type=int, default=3, help='timed steps per case and round')
  ap.add_argument('--rounds', type=int, default=3, help='interleaved rounds (train section)')
  ap.add_argument('--peer', default='', help='a Python with torch, transformers and peft: '
                  'time HF PEFT side by side (benchmarks/peer_torch.py)')
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--tokens', type=int, default=128)
  ap.add_argument('--skip', default='', help='comma list of: train,compiled,inference,search,surm,'
                  'devices,quant')
  ap.add_argument('--json', default='')
  ap.add_argument('--tmp', default=tempfile.gettempdir())
  args = ap.parse_args()
  skip = set(args.skip.split(','))
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} x{jax.device_count()}', flush=True)
  model, params, batch, task = minilm_setup(args.batch, args.tokens)
  results = {}
  if 'train' not in skip:
    results['train'] = section_train(model, params, batch, task, args.steps, args.rounds, args.peer)
  if 'compiled' not in skip:
    results['compiled'] = section_compiled(model, params, batch, task)
  if 'inference' not in skip:
    results['inference_ms'] = section_inference(model, params, batch, args.steps)
  if 'search' not in skip:
    results['search'] = section_search(model, params, batch, task)
  if 'surm' not in skip:
    results['surm_ms'] = section_surm(args.steps)
  if 'devices' not in skip:
    results['devices'] = section_devices(args.tmp)
  if 'quant' not in skip:
    results['quant'] = section_quant(model, params, batch, task, args.steps, args.rounds)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(results, f, indent=1)


if __name__ == '__main__':
  main()
