"""Where each of our models lives in PyTorch, read from the model-family registry: the
rule table its importer reads (read backwards to export) and its config.json both ways.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from glora_jax import errors
from glora_jax.models import importers, registry


@dataclasses.dataclass(frozen=True)
class Layout:
  """One model in its PyTorch home. `rules`: the importer's table (checkpoint key <->
  our path, transform), which `read` (the importer itself) reads forwards and
  `importers.invert` backwards; `optional`: our paths that may be absent (a head not
  yet added); `config_json`: the config.json written beside the weights; `files`: the
  other files of the source directory an export carries (tokenizer)."""
  library: str  # 'hf' (transformers) or 'timm'
  description: str
  rules: tuple[importers.Rule, ...]
  optional: tuple[str, ...]
  config_json: dict
  read: Callable[[Mapping[str, np.ndarray], str], dict]  # (state dict, source) -> params
  files: tuple[str, ...]


def layout(model: nn.Module, dtype=jnp.float32) -> Layout:
  """The layout of a built module of any registered family; `dtype` is the weights'
  dtype, written to config.json."""
  try:
    family = registry.of_model(model)
    config_json = family.write_config(model, dtype)
  except ValueError as e:
    raise errors.ExportError(f'{type(model).__name__} has no PyTorch layout: {e}') from None
  return Layout(family.library, f'{family.library} {family.describe(model)}',
                tuple(family.rules(model)), family.optional, config_json,
                lambda state, source: family.read(model, state, source), family.export_files)
