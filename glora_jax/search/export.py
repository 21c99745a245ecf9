"""Merge a chosen subnet into plain parameters and write them: ours (orbax, safetensors
with model_config.json, the plain model that reads them exactly, rebuilt with no adapter
code) and the model's PyTorch layout (HF transformers or timm, glora_jax.interop).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from safetensors import numpy as st_numpy

from glora_jax import data, errors, interop, peft, quant
from glora_jax.models import registry, stacking
from glora_jax.models.plain import check_fits, expected_leaves, family_of, plain_model  # noqa: F401 (export API)

MODEL_CONFIG = 'model_config.json'
# model_config.json's record of what the export was merged from (not read back into the
# model): e.g. {'frozen_quant': 'nf4, block 64, double-quantized scales'}, the base the
# adapters trained on, dequantized into the export's float weights.
MERGED_FROM = 'merged_from'
ORBAX_DIR = 'merged_params'
SAFETENSORS = 'merged_params.safetensors'
# 'flax': the three files above; 'torch': the model's PyTorch layout in a folder named
# after its family's library, <out>/hf (transformers) or <out>/timm.
FORMATS = ('flax', 'torch')


# How a model computes, not what: outputs are the same with any value, so they are
# left out of model_config.json and a rebuilt model takes the defaults.
EXECUTION_FIELDS = registry.EXECUTION_FIELDS


def merged_params(base_params: dict, trainable: dict, spec: peft.AdapterSpec | None, subnet) -> dict:
  """The model's params with the trained parts (head, or all for full fine-tuning)
  taken from `trainable` and the adapters of `subnet` folded in; each leaf keeps
  the dtype it has in `base_params`. A quantized kernel there (glora_jax.quant)
  comes out as its dequantized float kernel, the adapters folded into that W0."""
  names = [re.escape(p) for p in peft.flatten(trainable['model'])]
  rest = peft.partition(base_params, names)[1] if names else base_params
  full = peft.combine(rest, trainable['model'])
  if spec is None:
    return quant.dequantize_tree(full)
  subnet = peft.check_subnet(spec, subnet)  # here: inside jit it is a tracer, not checked
  # One compiled program: an eager merge compiles op by op, seconds even for a tiny model.
  return jax.jit(peft.merge)(full, peft.Adapters(params=trainable['adapters'], spec=spec), subnet)


# --------------------------------------------------------------------------- #
# The plain model: described, rebuilt, checked against the params
# --------------------------------------------------------------------------- #


def describe(model: nn.Module) -> dict:
  """{'model': family, 'config': the config fields that define parameters and outputs
  (dtype as a string), and the module's other fields, e.g. num_classes}."""
  name = family_of(model).name
  config = {f.name: getattr(model.config, f.name) for f in dataclasses.fields(model.config)
            if f.name not in EXECUTION_FIELDS}
  config['dtype'] = jnp.dtype(config['dtype']).name
  extra = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
           if f.name not in ('config', 'parent', 'name')}
  return {'model': name, 'config': config, **extra}


def build_model(description: Mapping[str, Any], source: str = MODEL_CONFIG) -> nn.Module:
  """Inverse of `describe`."""
  family = registry.FAMILIES.get(description.get('model'))
  if family is None:
    raise errors.ExportError(f"{source} names model '{description.get('model')}'; known: "
                             f'{sorted(registry.FAMILIES)}')
  config = dict(description.get('config', {}))
  extra = {k: v for k, v in description.items() if k not in ('model', 'config', MERGED_FROM)}
  try:
    config['dtype'] = jnp.dtype(config.get('dtype', 'float32'))
    return family.module(family.config_cls(**config), **extra)
  except (TypeError, ValueError) as e:
    raise errors.ExportError(f'{source} does not describe a {family.module.__name__}: {e}') from None


# --------------------------------------------------------------------------- #
# Files
# --------------------------------------------------------------------------- #


def check_formats(formats) -> tuple[str, ...]:
  """`formats` (a sequence, or a comma-separated string) as a tuple of known names."""
  if isinstance(formats, str):
    formats = [f.strip() for f in formats.split(',') if f.strip()]
  unknown = [f for f in formats if f not in FORMATS]
  if unknown or not formats:
    said = f'unknown export formats {unknown}' if unknown else 'no export format given'
    raise errors.ConfigError(f'{said}; choose one or more of {list(FORMATS)} (flax: '
                             'merged_params and model_config.json; torch: the HF transformers '
                             'or timm layout)')
  return tuple(dict.fromkeys(formats))


def save_merged(out, model: nn.Module, params, formats=FORMATS, *,
                copy_files_from=None, merged_from: Mapping[str, Any] | None = None
                ) -> dict[str, str]:
  """Writes the params under `out` in `formats`, after `check_fits`: no export is ever
  one its model would read wrongly. 'flax': orbax, safetensors and model_config.json;
  'torch': `interop.save_pretrained` into <out>/hf or <out>/timm (with the tokenizer
  files of `copy_files_from`, if given). Returns {file or folder name: path}. A
  scan_layers model's stacked params are written per layer, with the unrolled model:
  exports keep the family's own layout. `merged_from` (JSON-able) is recorded in
  model_config.json under 'merged_from'."""
  formats = check_formats(formats)
  params = stacking.unstack(params, registry.stack_of(model))
  model = registry.unrolled(model)
  check_fits(model, params)
  out = pathlib.Path(out)
  files = {}
  if 'torch' in formats:  # first: it refuses params its layout cannot hold before writing
    torch_dir = out / family_of(model).library
    interop.save_pretrained(torch_dir, model, params, copy_files_from=copy_files_from)
    files[torch_dir.name] = str(torch_dir)
  if 'flax' in formats:
    out.mkdir(parents=True, exist_ok=True)
    config = out / MODEL_CONFIG
    description = describe(model)
    if merged_from:
      description[MERGED_FROM] = dict(merged_from)
    config.write_text(json.dumps(description, indent=1) + '\n')
    files.update({ORBAX_DIR: str(save_orbax(out / ORBAX_DIR, params)),
                  SAFETENSORS: str(save_safetensors(out / SAFETENSORS, params)),
                  MODEL_CONFIG: str(config)})
  return files


def load_merged(out) -> tuple[nn.Module, dict]:
  """(plain model, params) of an export: the model model_config.json describes and
  the safetensors params, checked to fit it exactly."""
  out = pathlib.Path(out)
  config = out / MODEL_CONFIG
  if not config.is_file():
    raise errors.ExportError(f'{config} does not exist; {out} is not a directory written by '
                             'search.py (or export.save_merged)')
  model = build_model(json.loads(config.read_text()), source=str(config))
  params = load_safetensors(out / SAFETENSORS)
  check_fits(model, params)
  return model, params


def save_orbax(path, params) -> pathlib.Path:
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
  return path


def load_orbax(path) -> dict:
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(pathlib.Path(path).absolute())


def save_safetensors(path, params) -> pathlib.Path:
  """Keys are the '/'-joined parameter paths."""
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in peft.flatten(params).items()}
  st_numpy.save_file(flat, str(path))
  return pathlib.Path(path)


def load_safetensors(path) -> dict:
  return peft.unflatten(st_numpy.load_file(str(path)))


# --------------------------------------------------------------------------- #
# Measuring on a split
# --------------------------------------------------------------------------- #


def evaluate(forward, loss, predictions, params, adapters, subnet, arrays,
             batch_size: int = 32, *, mesh=None, param_specs=None,
             adapter_specs=None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(sums of the task's (loss, count, correct) over `arrays`, float64; the
  predictions at every position `predictions` weighs, flattened in order; the labels
  of the same rows where the batches have them (None for a causal LM)). Jitted once;
  the same code for a classifier, a regressor and a causal LM.

  With `mesh`, placed as training places them: params by `param_specs`, adapter params
  by `adapter_specs` (PartitionSpec trees), batches split over 'data' and the step traced
  under the mesh (its blocks' activation constraints), so the export's check runs at the
  scale the run trained at (setup.param_specs gives a run's specs)."""
  def step(p, a, s, batch):
    out = forward(p, a, s, batch, False, None)
    preds, weights = predictions(out, batch)
    return jnp.stack(loss(out, batch)), preds, weights

  put = lambda batch: batch
  if mesh is None:
    step = jax.jit(step)
  else:
    from glora_jax.train import sharding  # the training side's placement, one engine
    params = jax.device_put(params, sharding.named(mesh, param_specs))
    if adapters is not None:
      adapters = adapters.replace(params=jax.device_put(
          adapters.params, sharding.named(mesh, adapter_specs)))
    step = jax.jit(sharding.under_mesh(mesh, step), out_shardings=sharding.replicated(mesh))
    put = lambda batch: sharding.put_batch(batch, mesh)
  totals, preds, targets = np.zeros(3), [], []
  for batch in data.eval_iterator(arrays, batch_size):
    sums, p, w = jax.device_get(step(params, adapters, subnet, put(batch)))
    totals += np.asarray(sums, np.float64)
    real = np.asarray(w) > 0
    preds.append(np.asarray(p)[real])
    if 'label' in batch and real.ndim == 1:
      targets.append(np.asarray(batch['label'])[real])
  return totals, np.concatenate(preds), np.concatenate(targets) if targets else None
