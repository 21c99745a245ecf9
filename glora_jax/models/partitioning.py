"""Parameter-path rules -> PartitionSpecs and shardings, shared by every model: the first
(regex, PartitionSpec) of a model's `partition_rules()` that fully matches a leaf path decides."""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from glora_jax.models import importers

Rules = Sequence[tuple[str, PartitionSpec]]


def spec_for(path: str, rules: Rules) -> PartitionSpec:
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      return spec
  raise ValueError(f"no partition rule matches '{path}'; rules are "
                   f"{[p for p, _ in rules]} (end them with ('.*', PartitionSpec()))")


def partition_specs(params, rules: Rules, mesh: Mesh | None = None):
  """A tree of PartitionSpecs shaped like `params` (arrays or ShapeDtypeStructs).

  With a mesh, every sharded dimension must divide by its mesh axes' size; the
  error names the leaf, its shape and the rule's spec."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  specs, problems = [], []
  for key_path, leaf in leaves:
    path = '/'.join(importers.key_name(k) for k in key_path)
    spec = spec_for(path, rules)
    shape = tuple(getattr(leaf, 'shape', ()))
    if len(spec) > len(shape):
      problems.append(f"  '{path}' has shape {shape}; spec {spec} has more dimensions")
    elif mesh is not None:
      for dim, axes in zip(shape, spec):
        if axes is None:
          continue
        size = 1
        for a in (axes if isinstance(axes, tuple) else (axes,)):
          size *= mesh.shape[a]
        if dim % size:
          problems.append(f"  '{path}' has shape {shape}; spec {spec} needs dimension {dim} to "
                          f'divide by {size} (mesh {dict(mesh.shape)})')
    specs.append(spec)
  if problems:
    raise ValueError('partition rules do not fit the parameters:\n' + '\n'.join(problems))
  return jax.tree_util.tree_unflatten(treedef, specs)


def shardings(params, rules: Rules, mesh: Mesh) -> Any:
  """NamedShardings for `params` on `mesh`: pass to jax.device_put or jit's shardings."""
  return jax.tree.map(lambda spec: NamedSharding(mesh, spec),
                      partition_specs(params, rules, mesh),
                      is_leaf=lambda x: isinstance(x, PartitionSpec))
