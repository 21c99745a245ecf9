"""Plain (merged) params written in their PyTorch home's layout and read back (HF
transformers or timm, as the model family's registry entry says), through each
importer's own rule table.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any, Mapping

import flax.linen as nn
import jax
import numpy as np
from safetensors import numpy as st_numpy

from glora_jax import errors
from glora_jax.interop import layouts
from glora_jax.models import importers, registry

WEIGHTS = 'model.safetensors'
CONFIG = registry.CONFIG


def _weights_dtype(params):
  leaves = [x for x in jax.tree.leaves(params) if np.issubdtype(np.asarray(x).dtype, np.floating)]
  return np.asarray(leaves[0]).dtype if leaves else np.float32


def to_state_dict(model: nn.Module, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{PyTorch key: array} of `params` (torch names, (out, in) weights): the model's
  importer rules read backwards. A leaf the layout has no place for is an ExportError,
  e.g. a bias that GLoRA gave a bias-less layer when the config's flag is off
  (`peft.merge_model` / `models.plain.plain_model` switch the family's bias flags on)."""
  lay = layouts.layout(model, _weights_dtype(params))
  try:
    return importers.invert(params, lay.rules, model=lay.description, optional=lay.optional)
  except ValueError as e:
    hint = ''
    if '/bias' in str(e) and 'has no place' in str(e):
      hint = ("\nA bias on a layer built without one comes from GLoRA's C or E: build the "
              'plain model with glora_jax.peft.merge_model (models.plain.plain_model), which '
              "switches the config's bias flags on (e.g. Llama's attention_bias / mlp_bias, "
              "ViT's qkv_bias).")
    raise errors.ExportError(f'{e}{hint}') from None


def from_state_dict(model: nn.Module, state: Mapping[str, np.ndarray], *,
                    source: str = 'checkpoint') -> dict:
  """Our params from a PyTorch state dict of `model`'s layout: the family's importer,
  the same rule table forwards."""
  return layouts.layout(model).read(state, source)


def save_pretrained(out, model: nn.Module, params: Mapping[str, Any], *,
                    copy_files_from=None) -> dict[str, str]:
  """Writes `out`/model.safetensors (torch key names and layouts, each leaf's dtype) and
  `out`/config.json in the family's home format, which its library reads back:
  transformers' `AutoModel.from_pretrained(out)` (encoders: plus our 'head' keys it
  reports as unused) or `AutoModelForCausalLM` (decoders), timm's
  `create_model('local-dir:<out>', pretrained=True)` (ViT). `copy_files_from`: a model
  directory whose tokenizer files (the family's export files) are copied along.
  Returns {file name: path}."""
  state = to_state_dict(model, params)
  lay = layouts.layout(model, _weights_dtype(params))
  config = dict(lay.config_json)
  if 'head' not in params:
    config.pop('glora_jax', None)  # a backbone alone: no head to describe
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  weights = out / WEIGHTS
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(weights),
                     metadata={'format': 'pt'})
  (out / CONFIG).write_text(json.dumps(config, indent=2) + '\n')
  files = {WEIGHTS: str(weights), CONFIG: str(out / CONFIG)}
  if copy_files_from is not None:
    for name in lay.files:
      if (pathlib.Path(copy_files_from) / name).is_file():
        shutil.copyfile(pathlib.Path(copy_files_from) / name, out / name)
        files[name] = str(out / name)
  return files


def load_pretrained(path) -> tuple[nn.Module, dict]:
  """(model, params) of a model directory: one `save_pretrained` wrote, or one the real
  library wrote (transformers' save_pretrained of any registered family: BERT, RoBERTa,
  Llama, Qwen2, Mistral; timm's for ViT), single or sharded safetensors. config.json
  picks the family and builds the model; the family's rule table reads the weights.
  A decoder's `model.apply({'params': params}, input_ids, attention_mask)` gives its
  logits; an encoder without a head its last hidden state (BERT pairs take
  `token_type_ids=`)."""
  try:
    return registry.load(path)
  except errors.ExportError:
    raise
  except ValueError as e:
    raise errors.ExportError(str(e)) from None
