"""Memory and FLOPs of one training step at the users' scale, proven by compiling
the real step ahead of time for the real shapes: nothing is allocated.

For LLaMA-2-7B shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000), Llama-3-8B
shapes (hidden 4096, MLP 14336, 32 heads and 8 KV heads, vocab 128256, llama3 rope)
(batch 1 x 2048 tokens per device, frozen weights and activations in bf16) and
ViT-B/16 (224², batch 64 per device), for each method (frozen backbone, LoRA r=8 in
activation and weight mode, GLoRA supernet at ranks (4,), SURM circulant, full
fine-tuning; LoRA and GLoRA over an int8 or NF4 frozen base: lora_int8, glora_nf4, ...)
on 1 device and on 8 devices (FSDP over 'data'), it builds the same
train step as train.py (the family's entry in glora_jax.models.registry gives the
forward through tasks.make_forward, the default targets and the partition rules;
glora_jax.train.steps builds the step, glora_jax.train.sharding its shardings),
lowers it with jax.ShapeDtypeStructs, compiles it and reads
`compiled.memory_analysis()` (per-device peak = arguments + temporaries + outputs
- aliased) and `compiled.cost_analysis()` (FLOPs per device per step).

The decoders are compiled at 2 and 4 layers and extrapolated to 32 (memory and
FLOPs are linear in depth; --check_depth 8 compiles 8 layers to show it). ViT-B/16
is compiled whole.

--scan builds the models with their layers under nn.scan (model.scan_layers: frozen
params, trained model params and adapters stacked per layer, as setup.build holds
them), whose program is one layer's whatever the depth, so every depth is compiled
whole: 32 layers of LLaMA-7B, and LLaMA-2-70B (llama70b: 80 layers, hidden 8192, MLP
28,672, 64 heads, 8 KV heads) on 8 devices. Its table and goals (FSDP's per-device
bound, compile time 32 vs 2 layers, ViT GLoRA vs LoRA, 70B <= 70 GiB) follow the
unrolled ones:

    python benchmarks/scale.py --scan --models llama7b --methods glora,lora --devices 1,8 --layers 2,32
    python benchmarks/scale.py --scan --models llama70b --methods glora --devices 8 --layers 80

Backends:
  --backend tpu (default): XLA's TPU compiler through jax.experimental.topologies,
      for a TPU v5p topology, on this CPU machine: compile only, no TPU needed,
      but libtpu must be installed: pip install "jax[tpu]==$(python -c 'import jax;
      print(jax.__version__)')" (in its own environment; never in CI).
  --backend cpu: XLA's CPU compiler. It drops jax.checkpoint's rematerialisation
      (its pipeline removes the optimisation barriers before CSE), so its peak
      shows what the step would hold without remat; use it for FLOPs, or where
      libtpu is absent.

    python benchmarks/scale.py                       # everything, writes --out
    python benchmarks/scale.py --table               # the tables from --out
    python benchmarks/scale.py --models llama7b --methods glora,lora --devices 1
    python benchmarks/scale.py --models llama3_8b --methods frozen,lora,glora --devices 1
    python benchmarks/scale.py --models llama7b --methods glora_nf4,lora_int8 --devices 1

The "frozen" method is the floor of every adapter method: one rank-1 LoRA on the
first layer's query projection, so the backward pass runs through every layer
(activation gradients) but computes no weight gradient of any size.

--xent compiles only the causal-LM head's loss and gradient at Llama-3-8B shapes
(hidden 4096, vocab 128,256, 1 x 2048 tokens, float32 loss): today's full logits
(the model's head, then tasks.lm_loss), glora_jax.train.xent's full_xent, and its
chunked_xent at each of --xent_chunks tokens, each differentiated w.r.t. the hidden
states (frozen head: LoRA, GLoRA) and w.r.t. the hidden states and the kernel (a
trained head), for each of --xent_dtypes (activations and kernel). It writes
--xent_out. The chunked backward recomputes each chunk's logits: one more
(tokens x hidden x vocab) product than the full path.

    python benchmarks/scale.py --xent --backend cpu
    python benchmarks/scale.py --xent --table        # the table from --xent_out
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import time
from typing import Any, Callable


GiB = 2 ** 30
# A method with a quantization suffix runs over a quantized frozen base (the model's
# default targets, as model.frozen_quant): int8, or NF4 with double-quantized scales
# (QLoRA's recipe), blocks of 64.
QUANT_METHODS = ('lora_int8', 'lora_nf4', 'glora_int8', 'glora_nf4')
METHODS = ('frozen', 'lora', 'lora_weight', 'glora', 'surm', 'full') + QUANT_METHODS


def _llama2_7b(layers: int, remat: str, attention: str, scan: bool = False):
  from glora_jax.models import llama
  return llama.LlamaConfig(num_hidden_layers=layers, remat=remat, attention=attention,
                           max_position_embeddings=4096, scan_layers=scan)


def _llama3_8b(layers: int, remat: str, attention: str, scan: bool = False):
  from glora_jax.models import llama
  return llama.LlamaConfig(
      vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
      num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
      rope_type='llama3', rope_factor=8.0, rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
      rope_original_max_position_embeddings=8192, max_position_embeddings=8192,
      remat=remat, attention=attention, scan_layers=scan)


def _vit_b16(layers: int, remat: str, attention: str, scan: bool = False):
  from glora_jax.models import vit
  del layers  # compiled whole
  # At 197 tokens the score matrix is small: ViT's recorded cases run XLA's attention.
  return vit.preset('B/16', num_classes=100, remat=remat, scan_layers=scan,
                    attention='xla' if attention == 'chunked' else attention)


def _llama2_70b(layers: int, remat: str, attention: str, scan: bool = False):
  from glora_jax.models import llama
  return llama.LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=layers,
                           num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5,
                           max_position_embeddings=4096, remat=remat, attention=attention,
                           scan_layers=scan)


_LM_BATCH = {'input_ids': ((1, 2048), 'int32'), 'attention_mask': ((1, 2048), 'int32'),
             'mask': ((1,), 'float32')}


@dataclasses.dataclass(frozen=True)
class ModelCase:
  """A model this benchmark compiles. Its family's registry entry gives the forward,
  the adapter targets and the partition rules; the case fixes the shapes. `depth`
  layers are extrapolated from the compiled --layers where `extrapolated` and the
  depth itself was not compiled, else the model is compiled whole."""
  family: str
  title: str
  config: Callable[..., Any]  # (layers, remat, attention, scan) -> module config
  batch: dict  # per-device input: name -> (shape, dtype)
  floor_target: str  # the frozen floor's one rank-1 LoRA: the first layer's query
  depth: int
  extrapolated: bool


MODELS = {
    'llama7b': ModelCase(
        'llama', 'LLaMA-2-7B shapes, batch 1 x 2048 per device, bf16 frozen and activations, '
        '32 layers (extrapolated from the compiled depths)', _llama2_7b, _LM_BATCH,
        r'layers_0/self_attn/q_proj/kernel', depth=32, extrapolated=True),
    'llama3_8b': ModelCase(
        'llama', 'Llama-3-8B shapes (vocab 128,256, MLP 14,336, 8 KV heads, llama3 rope), batch '
        '1 x 2048 per device, bf16 frozen and activations, 32 layers (extrapolated from the '
        'compiled depths)', _llama3_8b, _LM_BATCH, r'layers_0/self_attn/q_proj/kernel',
        depth=32, extrapolated=True),
    'llama70b': ModelCase(
        'llama', 'LLaMA-2-70B shapes (hidden 8192, MLP 28,672, 64 heads, 8 KV heads, vocab '
        '32,000), batch 1 x 2048 per device, bf16 frozen and activations, 80 layers',
        _llama2_70b, _LM_BATCH, r'layers_0/self_attn/q_proj/kernel', depth=80, extrapolated=True),
    'vitb16': ModelCase(
        'vit', 'ViT-B/16, 224², batch 64 per device, bf16 frozen and activations', _vit_b16,
        {'image': ((64, 224, 224, 3), 'float32'), 'label': ((64,), 'int32'),
         'mask': ((64,), 'float32')},
        r'blocks_0/attn/qkv/kernel', depth=12, extrapolated=False),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--backend', choices=('tpu', 'cpu'), default='tpu')
  p.add_argument('--models', default=','.join(MODELS), help=f'of {", ".join(MODELS)}')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--devices', default='1,8', help='1 and/or 8 (FSDP over data)')
  p.add_argument('--layers', default='2,4', help='decoder depths compiled for the extrapolation')
  p.add_argument('--check_depth', type=int, default=0, help='also compile this depth (decoders)')
  p.add_argument('--remat', default='full', help="per-layer remat policy ('none' = as before)")
  p.add_argument('--attention', default='chunked', help="xla | chunked | dot_product")
  p.add_argument('--scan', action='store_true',
                 help='layers under nn.scan (model.scan_layers): compile whole depths, e.g. '
                      '--layers 2,32')
  p.add_argument('--baseline', action='store_true',
                 help="also compile LoRA and GLoRA with remat 'none' and attention 'xla'")
  p.add_argument('--out', default='benchmarks/results/scale.json')
  p.add_argument('--table', action='store_true', help='print the tables from --out and exit')
  p.add_argument('--xent', action='store_true',
                 help="only the causal-LM head's loss and gradient at Llama-3-8B shapes: full "
                      'logits vs glora_jax.train.xent.chunked_xent; writes --xent_out')
  p.add_argument('--xent_chunks', default='1024,256', help='tokens per chunk, one case each')
  p.add_argument('--xent_dtypes', default='bfloat16,float32',
                 help='activation and kernel dtypes, one case each')
  p.add_argument('--xent_out', default='benchmarks/results/xent.json')
  return p.parse_args(argv)


def setup_backend(backend: str):
  """Before jax is imported: 8 host devices for the CPU backend; for the TPU
  compiler, a topology description (no TPU needed)."""
  os.environ['JAX_PLATFORMS'] = 'cpu'
  if backend == 'cpu':
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '')
                               + ' --xla_force_host_platform_device_count=8').strip()
  else:  # libtpu asks the (absent) TPU metadata server otherwise
    os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5p-16')
    os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  import jax
  if backend == 'cpu':
    return list(jax.devices()), 'XLA CPU'
  from jax.experimental import topologies
  topology = topologies.get_topology_desc(platform='tpu', topology_name='v5p:2x2x2')
  return list(topology.devices), f'XLA TPU ({topology.devices[0].device_kind}, compile only)'


# --------------------------------------------------------------------------- #
# The step, from shapes only
# --------------------------------------------------------------------------- #


def model_case(name: str, layers: int, remat: str, attention: str, scan: bool = False):
  """(model, init, forward(params, adapters, subnet, batch, train, rng), loss, abstract
  per-device batch, default targets, frozen-floor target, head pattern or None,
  partition rules): the forward, targets and rules are the family's, as train.py's."""
  import jax
  import jax.numpy as jnp
  from glora_jax.models import registry
  from glora_jax.train import steps, tasks

  if name not in MODELS:
    raise ValueError(f"unknown model '{name}'; known: {', '.join(MODELS)}")
  case = MODELS[name]
  family = registry.get(case.family)
  config = dataclasses.replace(case.config(layers, remat, attention, scan), dtype=jnp.bfloat16)
  model = family.module(config)
  # The per-layer layout, as importers give it; setup.build stacks it for a scanned model.
  init = lambda: registry.unrolled(model).init(jax.random.key(0),
                                               *family.example_inputs(config))['params']
  # The task's loss and trainable head, as tasks.causal_lm / image_classification.
  loss, head = {'causal_lm': (tasks.lm_loss, None),
                'image_classification': (steps.classification_loss, r'head/.*')}[family.task]
  batch = {k: (shape, jnp.dtype(dtype)) for k, (shape, dtype) in case.batch.items()}
  return (model, init, tasks.make_forward(family, model), loss, batch, family.default_targets,
          case.floor_target, head, family.partition_rules(), registry.stack_of(model))


def split_method(method: str) -> tuple[str, str]:
  """(adapter method, frozen quantization 'none' | 'int8' | 'nf4') of a method name."""
  base, _, kind = method.rpartition('_')
  return (base, kind) if method in QUANT_METHODS else (method, 'none')


def family_for(method: str):
  from glora_jax.adapters import glora, lora, surm
  return {'frozen': lambda: lora.family(rank=1, mode='activation'),
          'lora': lambda: lora.family(rank=8, alpha=16, mode='activation'),
          'lora_weight': lambda: lora.family(rank=8, alpha=16, mode='weight'),
          'glora': lambda: glora.family(ranks=(4,)),
          'surm': lambda: surm.family('circulant')}[method]()


def compile_case(devices, model_name: str, method: str, layers: int, num_devices: int,
                 remat: str, attention: str, scan: bool = False) -> dict:
  """Lowers and compiles one train step from abstract arguments; returns the
  compiled memory and cost figures (per device)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  from glora_jax import peft
  from glora_jax.train import setup, sharding, steps

  from glora_jax.models import stacking

  (model, init, forward, loss, batch_shapes, targets, floor_target, head,
   rules, stack) = model_case(model_name, layers, remat, attention, scan)
  method, frozen_quant = split_method(method)
  abstract = jax.eval_shape(init)
  bf16 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), abstract)
  spec = None
  if method == 'full':  # float32 master weights, all trained
    model_trainable, frozen = abstract, {}
  else:
    model_trainable, frozen = peft.partition(bf16, [head]) if head else ({}, bf16)
    model_trainable = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.float32),
                                   model_trainable)
  adapter_params = {}
  if method != 'full':
    fam = family_for(method)
    target = floor_target if method == 'frozen' else targets
    if method == 'frozen' and stack is not None:  # a scan adapts every block alike
      target = target.replace('_0/', r'_\d+/')
    adapters = jax.eval_shape(lambda: peft.attach(frozen, fam, targets=target))
    spec, adapter_params = adapters.spec, adapters.params
  if frozen_quant != 'none':  # as setup.build's model.frozen_quant, from shapes only
    frozen = jax.eval_shape(lambda f: setup.quantize_kernels(
        f, targets, frozen_quant, 64, double=frozen_quant == 'nf4'), frozen)
  # scan_layers: frozen, trained model params and adapters stacked, as setup.build does.
  frozen, model_trainable = stacking.stack(frozen, stack), stacking.stack(model_trainable, stack)
  if spec is not None:
    adapter_params = stacking.stack_by_path(adapter_params, spec.paths, stack)
  supernet = spec is not None and spec.searchable
  subnet0 = np.zeros((1, 1) if spec is None else spec.num_options.shape, np.int32)
  optimizer = steps.make_optimizer(1e-4, 1e-4)
  trainable = {'model': model_trainable, 'adapters': adapter_params}
  state = jax.eval_shape(lambda t: steps.init_state(t, optimizer, 0, subnet0), trainable)
  train_step = steps.make_train_step(steps.ForwardLoss(forward, loss), spec, optimizer, supernet)

  mesh = Mesh(np.asarray(devices[:num_devices]).reshape(num_devices, 1), ('data', 'model'))
  fsdp = num_devices > 1
  frozen_specs, trainable_specs = sharding.param_specs(frozen, model_trainable, spec, rules, mesh,
                                                       fsdp=fsdp, stack=stack)
  state_specs = sharding.train_state_specs(state, optimizer, trainable_specs)
  with_sharding = lambda tree, specs: jax.tree.map(
      lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=NamedSharding(mesh, p)),
      tree, specs)
  batch = {k: jax.ShapeDtypeStruct((shape[0] * num_devices,) + shape[1:], dtype,
                                   sharding=NamedSharding(mesh, P('data')))
           for k, (shape, dtype) in batch_shapes.items()}
  args = (with_sharding(state, state_specs), with_sharding(frozen, frozen_specs), batch)
  rep = NamedSharding(mesh, P())
  state_sh = sharding.named(mesh, state_specs)
  t0 = time.perf_counter()
  # Traced under the mesh, as setup.make_jitted_step: the blocks pin their activations'
  # batch dimension over 'data' (models.common.batch_sharded).
  lowered = jax.jit(sharding.under_mesh(mesh, train_step), out_shardings=(state_sh, rep, rep),
                    donate_argnums=(0,)).lower(*args)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  nbytes = lambda tree: int(sum(np.prod(s.shape) * np.dtype(s.dtype).itemsize
                                for s in jax.tree.leaves(tree)))
  return {
      'model': model_name, 'method': method + ('' if frozen_quant == 'none' else f'_{frozen_quant}'),
      'layers': layers, 'devices': num_devices, 'scan': scan,
      'remat': remat, 'attention': attention, **memory_figures(compiled),
      'flops': float(cost.get('flops', 0.0)),
      'frozen_bytes': nbytes(frozen), 'train_state_bytes': nbytes(state),
      'adapter_params': int(sum(np.prod(s.shape) for s in jax.tree.leaves(adapter_params))),
      'compile_seconds': seconds,
  }


def memory_figures(compiled) -> dict:
  """Per-device bytes of a compiled function; peak = arguments + temporaries + outputs
  - aliased (donated)."""
  mem = compiled.memory_analysis()
  return {'argument_bytes': int(mem.argument_size_in_bytes),
          'temp_bytes': int(mem.temp_size_in_bytes),
          'output_bytes': int(mem.output_size_in_bytes),
          'alias_bytes': int(mem.alias_size_in_bytes),
          'peak_bytes': int(mem.argument_size_in_bytes + mem.temp_size_in_bytes
                            + mem.output_size_in_bytes - mem.alias_size_in_bytes)}


# --------------------------------------------------------------------------- #
# The causal-LM head alone: full logits vs chunked cross-entropy
# --------------------------------------------------------------------------- #

XENT_GRADIENTS = {'hidden': (0,), 'hidden+kernel': (0, 1)}  # frozen head; trained head


def xent_loss(path: str, dtype):
  """loss(hidden, kernel, input_ids, attention_mask) -> the NLL sum over the next-token
  predictions: 'lm_loss' as the model and the task compute it today (the head's
  full logits in float32, then tasks.lm_loss), 'full' xent.full_xent, 'chunked:N'
  xent.chunked_xent at N tokens a chunk, the latter two on the same shifted tokens."""
  import flax.linen as nn
  import jax.numpy as jnp
  from glora_jax.train import tasks, xent

  if path == 'lm_loss':
    def loss(hidden, kernel, ids, mask):
      head = nn.Dense(kernel.shape[1], use_bias=False, dtype=dtype)  # LlamaForCausalLM's lm_head
      logits = head.apply({'params': {'kernel': kernel}}, hidden).astype(jnp.float32)
      return tasks.lm_loss(logits, {'input_ids': ids, 'attention_mask': mask})[0]
    return loss
  if path == 'full':
    xent_fn = xent.full_xent
  elif path.startswith('chunked:'):
    xent_fn = lambda *a: xent.chunked_xent(*a, chunk=int(path.split(':')[1]))
  else:
    raise ValueError(f"unknown loss path '{path}'; expected lm_loss, full or chunked:N")
  return lambda hidden, kernel, ids, mask: xent_fn(hidden[:, :-1], kernel, ids[:, 1:],
                                                   mask[:, 1:])[0]


def compile_xent(path: str, gradient: str, dtype_name: str) -> dict:
  """Compiles the head's loss and gradient at Llama-3-8B shapes (one device) from
  abstract arguments; returns its memory figures."""
  import jax
  import jax.numpy as jnp

  config = _llama3_8b(1, 'full', 'chunked')
  (batch, seq), _ = _LM_BATCH['input_ids']
  dtype = jnp.dtype(dtype_name)
  args = (jax.ShapeDtypeStruct((batch, seq, config.hidden_size), dtype),
          jax.ShapeDtypeStruct((config.hidden_size, config.vocab_size), dtype),
          jax.ShapeDtypeStruct((batch, seq), jnp.int32),
          jax.ShapeDtypeStruct((batch, seq), jnp.int32))
  step = jax.value_and_grad(xent_loss(path, dtype), XENT_GRADIENTS[gradient])
  t0 = time.perf_counter()
  compiled = jax.jit(step).lower(*args).compile()
  return {'path': path, 'gradient': gradient, 'dtype': dtype_name, 'tokens': batch * seq,
          'hidden': config.hidden_size, 'vocab': config.vocab_size, **memory_figures(compiled),
          'compile_seconds': time.perf_counter() - t0}


def run_xent(args, backend: str) -> list[dict]:
  paths = ['lm_loss', 'full'] + [f'chunked:{int(c)}' for c in args.xent_chunks.split(',')]
  cases = []
  for dtype in args.xent_dtypes.split(','):
    for gradient in XENT_GRADIENTS:
      for path in paths:
        r = compile_xent(path, gradient, dtype)
        print(f"{dtype} d/d {gradient} {path}: temp {r['temp_bytes'] / GiB:.2f} GiB, "
              f"peak {r['peak_bytes'] / GiB:.2f} GiB", flush=True)
        cases.append(r)
        save(args.xent_out, backend, cases)
  return cases


def xent_table(cases: list[dict], backend: str) -> str:
  lines = [f'Compiled by {backend}. The causal-LM head alone at Llama-3-8B shapes (hidden '
           '4096, vocab 128,256, 1 x 2048 tokens, float32 loss), per device: its loss and '
           'gradient w.r.t. the hidden states (a frozen head: LoRA, GLoRA) or the hidden '
           'states and the kernel (a trained head). Peak = arguments + temporaries + outputs.', '',
           '| dtype | gradient of | loss | temp GiB | peak GiB | temp / lm_loss | peak / lm_loss |',
           '|---|---|---|---:|---:|---:|---:|']
  for r in cases:
    base = next(b for b in cases if (b['dtype'], b['gradient'], b['path'])
                == (r['dtype'], r['gradient'], 'lm_loss'))
    lines.append(f"| {r['dtype']} | {r['gradient']} | {r['path']} | {r['temp_bytes'] / GiB:.2f} | "
                 f"{r['peak_bytes'] / GiB:.2f} | {r['temp_bytes'] / base['temp_bytes']:.3f} | "
                 f"{r['peak_bytes'] / base['peak_bytes']:.3f} |")
  bf16 = [r for r in cases if r['dtype'] == 'bfloat16']
  if 'CPU' in backend and bf16:
    copy = bf16[0]['hidden'] * bf16[0]['vocab'] * 4
    lines += ['', "XLA CPU computes a bfloat16 product in float32: every bfloat16 row's "
              f'temporaries include a float32 copy of the kernel ({copy / GiB:.2f} GiB), '
              'which a TPU or GPU does not make.']
  return '\n'.join(lines)


# --------------------------------------------------------------------------- #
# Results, extrapolation and goals
# --------------------------------------------------------------------------- #


def key(r) -> tuple:
  return (r['model'], r['method'], r['layers'], r['devices'], r['remat'], r['attention'],
          r.get('scan', False))


def load(path) -> list[dict]:
  path = pathlib.Path(path)
  return json.loads(path.read_text())['cases'] if path.exists() else []


def save(path, backend: str, cases: list[dict]) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps({'backend': backend, 'cases': cases}, indent=1))
  tmp.replace(path)


def at_depth(cases, model, method, devices, remat, attention, depth=None,
             scan: bool = False) -> dict | None:
  """A model's figures at `depth` layers (None: its own): as compiled where that depth
  was compiled (or the model is compiled whole), else linear through the two smallest
  compiled depths (bytes and FLOPs per layer from their difference)."""
  rows = sorted((r for r in cases if (r['model'], r['method'], r['devices'], r['remat'],
                                      r['attention'], r.get('scan', False))
                 == (model, method, devices, remat, attention, scan)),
                key=lambda r: r['layers'])
  if not rows:
    return None
  if not MODELS[model].extrapolated:
    return dict(rows[-1], extrapolated=False)
  depth = depth or MODELS[model].depth
  whole = [r for r in rows if r['layers'] == depth]
  if whole:
    return dict(whole[0], extrapolated=False)
  if len(rows) < 2:
    return None
  a, b = rows[0], rows[1]
  out = dict(b, layers=depth, extrapolated=True)
  for field in ('peak_bytes', 'temp_bytes', 'argument_bytes', 'flops', 'frozen_bytes',
                'train_state_bytes', 'adapter_params'):
    per_layer = (b[field] - a[field]) / (b['layers'] - a['layers'])
    out[field] = b[field] + per_layer * (depth - b['layers'])
    out[f'{field}_per_layer'] = per_layer
  return out


def tables(cases: list[dict], backend: str, remat: str, attention: str) -> str:
  scanned = [r for r in cases if r.get('scan')]
  cases = [r for r in cases if not r.get('scan')]
  lines = [f'Compiled by {backend}; remat {remat!r}, attention {attention!r}. Per-device peak '
           '(arguments + temporaries + outputs - aliased) and FLOPs per device per step.', '']
  for model, case in MODELS.items():
    if not any(r['model'] == model for r in cases):
      continue
    lines += [f'**{case.title}**', '',
              '| method | devices | adapter params | peak GiB | per layer GiB | TFLOPs | '
              'FLOPs / frozen | compiled depths |', '|---|---:|---:|---:|---:|---:|---:|---|']
    for devices in (1, 8):
      floor = at_depth(cases, model, 'frozen', devices, remat, attention)
      for method in METHODS:
        r = at_depth(cases, model, method, devices, remat, attention)
        if r is None:
          continue
        depths = sorted({c['layers'] for c in cases if c['model'] == model and c['method'] == method
                         and c['devices'] == devices and c['remat'] == remat})
        ratio = f"{r['flops'] / floor['flops']:.2f}" if floor else '-'
        per_layer = (f"{r['peak_bytes_per_layer'] / GiB:.3f}" if r.get('extrapolated') else '-')
        lines.append(f"| {method} | {devices} | {int(r['adapter_params']):,} | "
                     f"{r['peak_bytes'] / GiB:.2f} | {per_layer} | {r['flops'] / 1e12:.1f} | {ratio} | "
                     f"{','.join(map(str, depths))} |")
    lines.append('')
  base = [r for r in cases if r['remat'] == 'none' and r['attention'] == 'xla']
  if base:
    lines += ["**Before: remat 'none', attention 'xla' (the full score matrix kept per layer)**", '',
              '| model | method | devices | peak GiB | per layer GiB |', '|---|---|---:|---:|---:|']
    for model in MODELS:
      for method in METHODS:
        r = at_depth(cases, model, method, 1, 'none', 'xla')
        if r is not None:
          per_layer = (f"{r['peak_bytes_per_layer'] / GiB:.3f}" if r.get('extrapolated') else '-')
          lines.append(f"| {model} | {method} | 1 | {r['peak_bytes'] / GiB:.2f} | {per_layer} |")
    lines.append('')
  lines += goals(cases, remat, attention)
  lines += scan_tables(scanned, remat, attention)
  return '\n'.join(lines)


def scan_tables(cases, remat, attention) -> list[str]:
  """The rows compiled with layers under scan (--scan), each depth compiled whole, and
  the goals of the multi-device issue."""
  rows = [r for r in cases if r.get('scan') and (r['remat'], r['attention']) == (remat, attention)]
  if not rows:
    return []
  out = ['**Layers under scan** (model.scan_layers; every depth compiled whole, nothing '
         'extrapolated)', '',
         '| model | method | layers | devices | peak GiB | frozen GiB | train state GiB | '
         'compile s |', '|---|---|---:|---:|---:|---:|---:|---:|']
  order = lambda r: (list(MODELS).index(r['model']), r['devices'], r['method'], r['layers'])
  for r in sorted(rows, key=order):
    out.append(f"| {r['model']} | {r['method']} | {r['layers']} | {r['devices']} | "
               f"{r['peak_bytes'] / GiB:.2f} | {r['frozen_bytes'] / GiB:.2f} | "
               f"{r['train_state_bytes'] / GiB:.3f} | {r['compile_seconds']:.0f} |")
  out += ['', "No FLOPs here: XLA's cost analysis counts a loop's body once, so a scanned "
          "step's figure is one layer's; the unrolled tables above have the step's FLOPs."]
  out += ['', '**Goals with layers under scan**', '']
  get = lambda model, method, devices, depth=None: at_depth(cases, model, method, devices, remat,
                                                             attention, depth, scan=True)

  def line(name, value, goal, ok):
    out.append(f"- {name}: {value} (goal {goal}): {'met' if ok else 'MISSED'}")

  fsdp_goals(get, line)
  for devices in (1, 8):
    deep, shallow = get('llama7b', 'glora', devices), get('llama7b', 'glora', devices, 2)
    if deep and shallow and deep['layers'] != shallow['layers']:
      ratio = deep['compile_seconds'] / shallow['compile_seconds']
      line(f'LLaMA-7B GLoRA compile, 32 layers / 2 layers, {devices} device(s)',
           f"{deep['compile_seconds']:.0f} s / {shallow['compile_seconds']:.0f} s = {ratio:.2f}",
           '<= 1.5', ratio <= 1.5)
  g, l = get('vitb16', 'glora', 1), get('vitb16', 'lora', 1)
  if g and l:
    ratio = g['compile_seconds'] / l['compile_seconds']
    line('ViT-B/16 GLoRA compile / LoRA compile, 1 device',
         f"{g['compile_seconds']:.0f} s / {l['compile_seconds']:.0f} s = {ratio:.2f}", '<= 1.5',
         ratio <= 1.5)
  nf4 = get('llama7b', 'glora_nf4', 1)
  if nf4:
    line('LLaMA-7B GLoRA supernet over an NF4 base, 32 layers, 1 device',
         f"{nf4['peak_bytes'] / GiB:.2f} GiB", '<= 9 GiB', nf4['peak_bytes'] <= 9 * GiB)
  big = get('llama70b', 'glora', 8)
  if big:
    line('LLaMA-2-70B GLoRA supernet, 80 layers, 8 devices (FSDP): per-device peak',
         f"{big['peak_bytes'] / GiB:.2f} GiB", '<= 70 GiB', big['peak_bytes'] <= 70 * GiB)
  return out


def fsdp_goals(get, line) -> None:
  """FSDP's goal for LLaMA-7B and ViT-B/16, GLoRA and LoRA: the 8-device per-device peak
  within 1.1 x (frozen / 8 + adapters and optimizer state + one device's activations)."""
  for model in ('llama7b', 'vitb16'):
    for method in ('glora', 'lora'):
      one, eight = get(model, method, 1), get(model, method, 8)
      if one and eight:
        activations = one['peak_bytes'] - one['argument_bytes']
        bound = 1.1 * (one['frozen_bytes'] / 8 + one['train_state_bytes'] + activations)
        line(f'{model} {method}, 8 devices: per-device peak vs (frozen/8 + adapters and optimizer '
             'state + activations) x 1.1', f"{eight['peak_bytes'] / GiB:.2f} vs {bound / GiB:.2f} GiB",
             '<=', eight['peak_bytes'] <= bound)


def goals(cases, remat, attention) -> list[str]:
  get = lambda model, method, devices: at_depth(cases, model, method, devices, remat, attention)
  out = ['**Goals** (LLaMA-7B at 32 layers unless named)', '']

  def line(name, value, goal, ok):
    out.append(f"- {name}: {value} (goal {goal}): {'met' if ok else 'MISSED'}")

  glora1, lora1, loraw1 = get('llama7b', 'glora', 1), get('llama7b', 'lora', 1), get('llama7b', 'lora_weight', 1)
  frozen1 = get('llama7b', 'frozen', 1)
  if glora1:
    line('GLoRA supernet peak, 1 device', f"{glora1['peak_bytes'] / GiB:.2f} GiB", '<= 24 GiB',
         glora1['peak_bytes'] <= 24 * GiB)
  if lora1:
    line('LoRA r=8 peak, 1 device', f"{lora1['peak_bytes'] / GiB:.2f} GiB", '<= 20 GiB',
         lora1['peak_bytes'] <= 20 * GiB)
  glora_nf4 = get('llama7b', 'glora_nf4', 1)
  if glora_nf4:
    line('GLoRA supernet peak over an NF4 base, 1 device', f"{glora_nf4['peak_bytes'] / GiB:.2f} GiB",
         '<= 9 GiB', glora_nf4['peak_bytes'] <= 9 * GiB)
  if glora1 and lora1:
    ratio = glora1['peak_bytes'] / lora1['peak_bytes']
    line('GLoRA peak / LoRA peak (activation mode)', f'{ratio:.3f}', '<= 1.25', ratio <= 1.25)
  if glora1 and loraw1:
    ratio = glora1['peak_bytes'] / loraw1['peak_bytes']
    line('GLoRA peak / LoRA peak (weight mode)', f'{ratio:.3f}', '<= 1.25', ratio <= 1.25)
  fsdp_goals(get, line)
  if glora1 and frozen1:
    ratio = glora1['flops'] / frozen1['flops']
    line("GLoRA step FLOPs / frozen backbone's forward+backward", f'{ratio:.2f}', '<= 1.5', ratio <= 1.5)
  g, f = get('vitb16', 'glora', 1), get('vitb16', 'frozen', 1)
  if g and f:
    line('ViT-B/16 GLoRA FLOPs / frozen', f"{g['flops'] / f['flops']:.2f}", '<= 1.5',
         g['flops'] / f['flops'] <= 1.5)
  return out


def main(argv=None):
  args = parse_args(argv)
  if args.xent:
    if not args.table:
      _, backend = setup_backend(args.backend)
      run_xent(args, backend)
    data = json.loads(pathlib.Path(args.xent_out).read_text())
    print(xent_table(data['cases'], data['backend']))
    return
  if args.table:
    data = json.loads(pathlib.Path(args.out).read_text())
    print(tables(data['cases'], data['backend'], args.remat, args.attention))
    return
  devices, backend = setup_backend(args.backend)
  cases = load(args.out)
  done = {key(r) for r in cases}
  plan = []
  for model in args.models.split(','):
    if model not in MODELS:
      raise ValueError(f"--models: unknown model '{model}'; known: {', '.join(MODELS)}")
    case = MODELS[model]
    depths = [int(d) for d in args.layers.split(',')] if case.extrapolated else [case.depth]
    if case.extrapolated and args.check_depth:
      depths.append(args.check_depth)
    for devices_n in (int(d) for d in args.devices.split(',')):
      for method in args.methods.split(','):
        for depth in depths:
          plan.append((model, method, depth, devices_n, args.remat, args.attention, args.scan))
    if args.baseline:
      for method in ('frozen', 'lora', 'glora'):
        for depth in depths[:2]:
          plan.append((model, method, depth, 1, 'none', 'xla', False))
  for case in plan:
    if case in done:
      continue
    r = compile_case(devices, *case[:4], remat=case[4], attention=case[5], scan=case[6])
    print(f"{case}: peak {r['peak_bytes'] / GiB:.2f} GiB (args {r['argument_bytes'] / GiB:.2f}, "
          f"temp {r['temp_bytes'] / GiB:.2f}), {r['flops'] / 1e12:.2f} TFLOPs, "
          f"compiled in {r['compile_seconds']:.0f} s", flush=True)
    cases.append(r)
    save(args.out, backend, cases)
  print(tables(cases, backend, args.remat, args.attention))


if __name__ == '__main__':
  main()
