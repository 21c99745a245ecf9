"""LoRA adapters in PEFT's files, both ways: adapter_config.json and
adapter_model.safetensors, with the trained head saved as PEFT's modules_to_save.

Conventions (PEFT's LoraLayer): a targeted nn.Linear gets `lora_A` = Linear(in, r) and
`lora_B` = Linear(r, out), so `lora_A.weight` is (r, in) and `lora_B.weight` (out, r),
and the layer computes W x + scaling * B A x with scaling = lora_alpha / r
(lora_alpha / sqrt(r) with use_rslora). Ours (adapters/lora.py): 'A' (r, in), 'B'
(out, r), kernel' = kernel + (alpha / r) * A^T B^T on the (in, out) Flax kernel, in both
modes: the same matrices, stored as they are. Keys are
`base_model.model.<torch module path>.lora_A.weight`; a module of modules_to_save is
stored under its own keys, `base_model.model.<module path>.weight` (PEFT strips the
`modules_to_save.<adapter name>` part when it saves). Module paths are the torch names of
each model's importer table: BERT's are those of HF's BertModel
('encoder.layer.0.attention.self.query') plus our head as 'head'; LLaMA's those of
LlamaForCausalLM ('model.layers.0.self_attn.q_proj'); ViT's timm's ('blocks.0.attn.qkv').
"""
from __future__ import annotations

import json
import math
import pathlib
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as st_numpy

from glora_jax import errors, peft
from glora_jax.adapters import lora
from glora_jax.interop import layouts
from glora_jax.models import importers, registry, stacking
from glora_jax.paths import flatten, natural_key, unflatten

ADAPTER_CONFIG = 'adapter_config.json'
ADAPTER_WEIGHTS = 'adapter_model.safetensors'
PREFIX = 'base_model.model.'
# adapter_config.json options we cannot honour: (field, the value we support).
_UNSUPPORTED = (('use_dora', False), ('fan_in_fan_out', False), ('bias', 'none'),
                ('lora_bias', False), ('layer_replication', None), ('rank_pattern', {}),
                ('alpha_pattern', {}), ('layers_to_transform', None))


def _linear_modules(lay: layouts.Layout) -> dict[str, str]:
  """{our Dense module path: torch module path} of the layout's Linear layers: the rules
  that transpose one '<module>.weight' into '<path>/kernel'."""
  return {r.target[:-len('/kernel')]: r.sources[0][:-len('.weight')] for r in lay.rules
          if r.transform is importers.transpose and r.target.endswith('/kernel')
          and len(r.sources) == 1 and r.sources[0].endswith('.weight')}


def _examples(names, n: int = 4) -> str:
  names = sorted(names, key=natural_key)
  return ', '.join(f"'{x}'" for x in names[:n]) + (f', ... ({len(names)} in all)'
                                                    if len(names) > n else '')


def _lora_family(adapters: peft.Adapters) -> lora.LoRA:
  families = {l.family for l in adapters.spec.layers}
  if not all(isinstance(f, lora.LoRA) for f in families):
    names = sorted({f.name for f in families})
    raise errors.ExportError(f'PEFT LoRA files hold LoRA adapters only; these adapters are '
                             f'{names}')
  if len({(f.rank, f.alpha) for f in families}) > 1:
    raise errors.ExportError('adapters of several (rank, alpha) pairs '
                             f'{sorted({(f.rank, f.alpha) for f in families})}; one pair is '
                             'written (PEFT would need rank_pattern / alpha_pattern)')
  return next(iter(families))


def save_peft_adapter(out, model: nn.Module, adapters: peft.Adapters, *,
                      head: Mapping[str, Any] | None = None,
                      base_model_name_or_path: str | None = None) -> dict[str, str]:
  """Writes `out`/adapter_config.json and `out`/adapter_model.safetensors, which
  `peft.PeftModel.from_pretrained(base, out)` reads.

  `adapters`: LoRA adapters of `model` (one rank and alpha). `head`: the trained
  non-adapter params to save as modules_to_save (e.g. {'head': params['head']}, or the
  'model' part of a trained state); each is written under its torch module's keys
  ('head.weight', 'head.bias' for BERT) and listed in modules_to_save.
  Returns {file name: path}."""
  family = _lora_family(adapters)
  lay = layouts.layout(model)
  modules = _linear_modules(lay)
  tensors, targets = {}, []
  per_layer = stacking.per_layer(adapters.params, adapters.spec.paths)  # stacked: scan_layers
  for layer in adapters.spec.layers:
    if layer.path not in modules:
      raise errors.ExportError(f"'{layer.path}' has no torch Linear in the {lay.description} "
                               f'layout; Linear layers: {_examples(modules)}')
    name = modules[layer.path]
    targets.append(name)
    params = per_layer[layer.path]
    tensors[f'{PREFIX}{name}.lora_A.weight'] = np.asarray(jax.device_get(params['A']))
    tensors[f'{PREFIX}{name}.lora_B.weight'] = np.asarray(jax.device_get(params['B']))
  modules_to_save = None
  if head:
    head_paths = set(flatten(head))
    rules = [r for r in lay.rules if r.target in head_paths]
    try:
      state = importers.invert(head, rules, model=lay.description)
    except ValueError as e:
      raise errors.ExportError(f'head: {e}') from None
    tensors.update({PREFIX + k: v for k, v in state.items()})
    modules_to_save = sorted({k.rsplit('.', 1)[0] for k in state}, key=natural_key)
  config = {
      'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': base_model_name_or_path,
      'revision': None, 'r': family.rank, 'lora_alpha': family.alpha,
      'target_modules': sorted(targets, key=natural_key), 'modules_to_save': modules_to_save,
      'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False,
      'use_dora': False, 'init_lora_weights': True, 'inference_mode': True,
      'rank_pattern': {}, 'alpha_pattern': {}, 'layers_to_transform': None,
      'layers_pattern': None,
  }
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                     str(out / ADAPTER_WEIGHTS), metadata={'format': 'pt'})
  (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + '\n')
  return {ADAPTER_CONFIG: str(out / ADAPTER_CONFIG), ADAPTER_WEIGHTS: str(out / ADAPTER_WEIGHTS)}


def read_peft_config(path) -> dict:
  """adapter_config.json of a PEFT LoRA directory, checked for options we cannot honour."""
  file = pathlib.Path(path) / ADAPTER_CONFIG
  if not file.is_file():
    raise errors.ExportError(f'{file} does not exist; expected a PEFT adapter directory '
                             f'({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})')
  config = json.loads(file.read_text())
  if config.get('peft_type') != 'LORA':
    raise errors.ExportError(f"{file}: peft_type is {config.get('peft_type')!r}; only 'LORA' "
                             'is read')
  for field, supported in _UNSUPPORTED:
    if config.get(field) and config[field] != supported:
      raise errors.ExportError(f'{file}: {field} is {config[field]!r}; supported: '
                               f'{supported!r}')
  for field in ('r', 'lora_alpha'):
    if not isinstance(config.get(field), (int, float)) or config[field] <= 0:
      raise errors.ExportError(f'{file}: {field} is {config.get(field)!r}; expected a positive '
                               'number')
  return config


def load_peft_adapter(path, model: nn.Module, params: Mapping[str, Any], *,
                      mode: str | None = None) -> tuple[dict, peft.Adapters]:
  """(params with the saved modules_to_save put in, LoRA adapters) from PEFT files.

  `params`: the model's params (the head included, of the saved head's shape); the
  adapters are attached to the Linear layers the file holds `lora_A` / `lora_B` for,
  with PEFT's scaling (lora_alpha / r, or / sqrt(r) with use_rslora). `mode`: LoRA's
  'weight' or 'activation' (None: lora.family's default). Logits are then
  `peft.forward(model, params, adapters, None, ...)`."""
  path = pathlib.Path(path)
  config = read_peft_config(path)
  file = path / ADAPTER_WEIGHTS
  if not file.is_file():
    raise errors.ExportError(f'{file} does not exist')
  state = importers.read_safetensors(file)
  outside = [k for k in state if not k.startswith(PREFIX)]
  if outside:
    raise errors.ExportError(f"{file}: keys {_examples(outside)} do not start with '{PREFIX}'")
  lay = layouts.layout(model)
  factors, rest = _lora_factors({k[len(PREFIX):]: v for k, v in state.items()}, lay, file)
  if rest:
    params = _with_saved_modules(params, rest, config, lay, file)
  return params, _attach_factors(params, factors, config, mode, lay, file)


def _lora_factors(state, lay: layouts.Layout, file) -> tuple[dict, dict]:
  """({our layer path: {'A': lora_A, 'B': lora_B}}, the other tensors) of a PEFT state
  dict, each LoRA pair on a Linear of the layout."""
  ours = {torch: path_ for path_, torch in _linear_modules(lay).items()}
  factors: dict[str, dict[str, np.ndarray]] = {}
  rest = {}
  for key, value in state.items():
    m = re.fullmatch(r'(.*)\.lora_([AB])\.weight', key)
    if m is None:
      rest[key] = value
      continue
    if m.group(1) not in ours:
      raise errors.ExportError(f"{file}: '{key}' adapts '{m.group(1)}', which is not a Linear "
                               f'of the {lay.description} layout; Linear modules look like '
                               f'{_examples(ours)}')
    factors.setdefault(ours[m.group(1)], {})[m.group(2)] = value
  if not factors:
    raise errors.ExportError(f'{file} holds no lora_A / lora_B weights')
  unpaired = [p for p, f in factors.items() if len(f) != 2]
  if unpaired:
    raise errors.ExportError(f'{file}: layers with only one of lora_A / lora_B: '
                             f'{_examples(unpaired)}')
  return factors, rest


def _with_saved_modules(params, rest, config, lay: layouts.Layout, file) -> dict:
  """`params` with the modules_to_save tensors `rest` read in by the layout's rules."""
  saved = set(config.get('modules_to_save') or [])
  stray = [k for k in rest if k.rsplit('.', 1)[0] not in saved]
  if stray:
    raise errors.ExportError(f'{file}: keys {_examples(stray)} are neither LoRA weights nor '
                             f'in modules_to_save {sorted(saved)}')
  rules = [r for r in lay.rules if r.sources[0] in rest]
  flat = dict(flatten(params))
  absent = [r.target for r in rules if r.target not in flat]
  if absent:
    raise errors.ExportError(f'{file} saves {_examples(absent)} (modules_to_save), which '
                             "params lack; add the head first (its family's init_head)")
  shapes = {r.target: tuple(np.shape(flat[r.target])) for r in rules}
  try:
    module_params = importers.convert(rest, rules, shapes, source=str(file),
                                      model=f'the modules_to_save of {lay.description}')
  except ValueError as e:
    raise errors.ExportError(str(e)) from None
  for k, v in flatten(module_params).items():
    flat[k] = jnp.asarray(v, flat[k].dtype)
  return unflatten(flat)


def _attach_factors(params, factors, config, mode, lay: layouts.Layout, file) -> peft.Adapters:
  """LoRA adapters of PEFT's rank and scaling on the layers of `factors`, holding them."""
  rank = int(config['r'])
  alpha = config['lora_alpha'] * (math.sqrt(rank) if config.get('use_rslora') else 1)
  family = lora.family(rank=rank, alpha=alpha, **({'mode': mode} if mode else {}))
  targets = '|'.join(re.escape(p + '/kernel') for p in sorted(factors))
  try:
    adapters = peft.attach(params, family, targets=targets)
  except ValueError as e:
    raise errors.ExportError(f'{file}: {e}') from None
  loaded = {}
  for layer in adapters.spec.layers:
    d_in, d_out = layer.kernel_shape
    a, b = factors[layer.path]['A'], factors[layer.path]['B']
    if a.shape != (rank, d_in) or b.shape != (d_out, rank):
      raise errors.ExportError(
          f"{file}: '{lay.description}' layer '{layer.path}' has kernel (in {d_in}, out "
          f'{d_out}); expected lora_A ({rank}, {d_in}) and lora_B ({d_out}, {rank}), found '
          f'{tuple(a.shape)} and {tuple(b.shape)}')
    init = adapters.params[layer.path]
    loaded[layer.path] = {'A': jnp.asarray(a, init['A'].dtype), 'B': jnp.asarray(b, init['B'].dtype)}
  return adapters.replace(params=loaded)


def save_trained_run(ckpt, out=None, *, base_model_name_or_path: str | None = None) -> dict[str, str]:
  """PEFT files of the latest checkpoint of a train.py LoRA run, under `out` (default
  <ckpt>/peft): its adapters and its trained head (modules_to_save). The base model
  recorded is `base_model_name_or_path`, or the directory the run's pretrained model
  came from."""
  from glora_jax.train import setup
  ckpt = pathlib.Path(ckpt)
  config = setup.load_config(ckpt)
  if config.method != 'lora':
    raise errors.ConfigError(f"{ckpt} trained method '{config.method}'; PEFT LoRA files need "
                             'a LoRA run (method lora)')
  run, trainable = setup.load_trained(ckpt, config)
  adapters = peft.Adapters(params=trainable['adapters'], spec=run.spec)
  if base_model_name_or_path is None:
    source = registry.checkpoint_dir(config.model)
    base_model_name_or_path = str(source) if source else None
  return save_peft_adapter(pathlib.Path(out) if out else ckpt / 'peft', run.model_data.model,
                           adapters, head=trainable['model'] or None,
                           base_model_name_or_path=base_model_name_or_path)
