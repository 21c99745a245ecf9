"""The plain model that reads a set of params exactly: a merge gives bias-less layers the
biases GLoRA's C and E gained, and Flax ignores a leaf its module does not read without
a word, so the model must be built to hold them (its family's bias flags) or refused.
"""
from __future__ import annotations

import dataclasses
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glora_jax import errors
from glora_jax.models import registry, stacking
from glora_jax.paths import flatten, natural_key, unflatten


def family_of(model: nn.Module) -> registry.Family:
  """registry.of_model, as an ExportError: a module of no family cannot be exported."""
  try:
    return registry.of_model(model)
  except ValueError as e:
    raise errors.ExportError(f'{type(model).__name__} cannot be exported: {e}') from None


def expected_leaves(model: nn.Module) -> dict[str, jax.ShapeDtypeStruct]:
  """{path: shape and dtype} of every parameter `model` reads (by jax.eval_shape)."""
  inputs = family_of(model).example_inputs(model.config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *inputs))
  return flatten(shapes['params'])


def _short(model: nn.Module) -> str:
  flags = ', '.join(f'{f}={getattr(model.config, f)}' for f in family_of(model).bias_flags)
  return f"{type(model).__name__}{f' ({flags})' if flags else ''}"


def check_fits(model: nn.Module, params, expected=None) -> None:
  """Raises ExportError unless `params` holds exactly the leaves, with the shapes,
  that `model` reads: Flax ignores an extra leaf without a word. `expected`: the
  model's `expected_leaves`, when the caller has them already."""
  expected = expected_leaves(model) if expected is None else expected
  flat = flatten(params)
  extra = sorted(set(flat) - set(expected), key=natural_key)
  missing = sorted(set(expected) - set(flat), key=natural_key)
  shapes = [f"'{p}' {tuple(np.shape(flat[p]))} (expected {tuple(expected[p].shape)})"
            for p in sorted(set(flat) & set(expected), key=natural_key)
            if tuple(np.shape(flat[p])) != tuple(expected[p].shape)]
  listed = lambda paths: f'{paths[:6]}' + (f' ({len(paths)} in all)' if len(paths) > 6 else '')
  problems = []
  if extra:
    problems.append(f'not in the model: {listed(extra)}')
    if any(p.endswith('/bias') for p in extra):
      problems.append("a merged bias on a layer built without one comes from GLoRA's C or E; "
                      'leave that layer out of the adapter targets or choose C and E none there')
  if missing:
    problems.append(f'missing: {listed(missing)}')
  if shapes:
    problems.append(f"wrong shape: {', '.join(shapes[:6])}")
  if problems:
    raise errors.ExportError(f'params do not fit the plain {_short(model)}: ' + '; '.join(problems))


def plain_model(model: nn.Module, params) -> tuple[nn.Module, dict]:
  """(the plain model that reads `params` exactly, its params), checked by `check_fits`.

  A merge gives a bias-less layer a bias (GLoRA's C, E). A bias that is zero
  everywhere (C and E none in that layer) is dropped: the layer stays as it was.
  Otherwise the family's config flag of its group is switched on (Llama's
  attention_bias or mlp_bias, ViT's qkv_bias) and the group's other layers get explicit
  zero biases; a family with no flag for that layer (Qwen2's o_proj and MLP, any of
  Mistral's) becomes the family of its bias_fallback (Llama: the same module, whose
  layout holds them). A bias no family can hold is refused (`check_fits`). A
  scan_layers model's stacked params give a scan_layers model and stacked params."""
  stack = registry.stack_of(model)
  if stack is not None:  # the bias flags read per-layer paths
    model, params = _plain_model(registry.unrolled(model), stacking.unstack(params, stack))
    model = model.clone(config=dataclasses.replace(model.config, scan_layers=True))
    return model, stacking.stack(params, registry.stack_of(model))
  return _plain_model(model, params)


def _plain_model(model: nn.Module, params) -> tuple[nn.Module, dict]:
  flat = dict(flatten(params))
  expected = expected_leaves(model)
  for path in [p for p in flat if p.endswith('/bias') and p not in expected]:
    if not np.any(np.asarray(jax.device_get(flat[path]))):
      del flat[path]
  while True:
    family = family_of(model)
    switched = {}
    for field, pattern in family.bias_flags.items():
      if getattr(model.config, field):
        continue
      layers = [p[:-len('/kernel')] for p in flat
                if p.endswith('/kernel') and re.fullmatch(pattern, p[:-len('/kernel')])]
      if not any(f'{layer}/bias' in flat for layer in layers):
        continue
      switched[field] = True
      for layer in layers:
        kernel = flat[f'{layer}/kernel']
        flat.setdefault(f'{layer}/bias', jnp.zeros(kernel.shape[-1:], kernel.dtype))
    if switched:
      model = model.clone(config=dataclasses.replace(model.config, **switched))
      expected = expected_leaves(model)
    if set(flat) <= set(expected) or family.bias_fallback is None:
      break
    model = model.clone(config=family.bias_fallback(model.config))
    expected = expected_leaves(model)
  params = unflatten(flat)
  check_fits(model, params, expected)
  return model, params
