"""Plain (merged) params written in their PyTorch home's layout and read back: HF
transformers for BERT and LLaMA, timm for ViT, through each importer's own rule table.
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
from glora_jax.models import importers

WEIGHTS = 'model.safetensors'
CONFIG = 'config.json'
# Files of a HF model directory that are not weights or config and that a tokenizer reads.
TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
                   'vocab.txt', 'tokenizer.model')


def _weights_dtype(params):
  leaves = [x for x in jax.tree.leaves(params) if np.issubdtype(np.asarray(x).dtype, np.floating)]
  return np.asarray(leaves[0]).dtype if leaves else np.float32


def to_state_dict(model: nn.Module, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """{PyTorch key: array} of `params` (torch names, (out, in) weights): the model's
  importer rules read backwards. A leaf the layout has no place for is an ExportError,
  e.g. a bias that GLoRA gave a bias-less LLaMA layer when the config's flag is off
  (`search.export.plain_model` switches attention_bias / mlp_bias on)."""
  lay = layouts.layout(model, _weights_dtype(params))
  try:
    return importers.invert(params, lay.rules, model=lay.description, optional=lay.optional)
  except ValueError as e:
    hint = ''
    if '/bias' in str(e) and 'has no place' in str(e):
      hint = ("\nA bias on a layer built without one comes from GLoRA's C or E: build the "
              'plain model with glora_jax.search.export.plain_model, which switches the '
              "config's bias flag on (LLaMA attention_bias / mlp_bias, ViT qkv_bias).")
    raise errors.ExportError(f'{e}{hint}') from None


def from_state_dict(model: nn.Module, state: Mapping[str, np.ndarray], *,
                    source: str = 'checkpoint') -> dict:
  """Our params from a PyTorch state dict of `model`'s layout: the model's importer
  (bert.convert_hf, llama.convert_hf, vit.convert_timm), the same rule table forwards."""
  return layouts.layout(model).read(state, source)


def save_pretrained(out, model: nn.Module, params: Mapping[str, Any], *,
                    copy_files_from=None) -> dict[str, str]:
  """Writes `out`/model.safetensors (torch key names and layouts, each leaf's dtype) and
  `out`/config.json, which HF's `AutoModel.from_pretrained(out)` (BERT: a BertModel,
  plus our 'head' keys it reports as unused) or `AutoModelForCausalLM` (LLaMA) read, or
  timm's `create_model(**config['model_args'])` with `load_state_dict` (ViT).
  `copy_files_from`: a model directory whose tokenizer files are copied along.
  Returns {file name: path}."""
  state = to_state_dict(model, params)
  lay = layouts.layout(model, _weights_dtype(params))
  config = dict(lay.config_json)
  if 'head' not in params and 'glora_jax' in config and lay.library == 'hf':
    del config['glora_jax']  # a backbone alone: no head to describe
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  weights = out / WEIGHTS
  st_numpy.save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(weights),
                     metadata={'format': 'pt'})
  (out / CONFIG).write_text(json.dumps(config, indent=2) + '\n')
  files = {WEIGHTS: str(weights), CONFIG: str(out / CONFIG)}
  if copy_files_from is not None:
    for name in TOKENIZER_FILES:
      if (pathlib.Path(copy_files_from) / name).is_file():
        shutil.copyfile(pathlib.Path(copy_files_from) / name, out / name)
        files[name] = str(out / name)
  return files


def load_pretrained(path) -> tuple[nn.Module, dict]:
  """(model, params) of a directory `save_pretrained` wrote (or any HF BERT / LLaMA
  directory in the same layout): config.json read back, then the same rule table."""
  path = pathlib.Path(path)
  if not (path / CONFIG).is_file():
    raise errors.ExportError(f'{path / CONFIG} does not exist; expected a directory written '
                             'by glora_jax.interop.save_pretrained')
  model = layouts.model_from_config(json.loads((path / CONFIG).read_text()),
                                    source=str(path / CONFIG))
  return model, from_state_dict(model, importers.read_safetensors(path / WEIGHTS),
                                source=str(path))
