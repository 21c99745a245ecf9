"""Parameter paths: '/'-joined names of nested-dict leaves, the one way every part
of glora_jax (targeting, freezing, sharding, checkpoints, importers) names a leaf.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax


def key_name(k) -> str:
  """The name of one jax key-path entry (dict key, attribute or index)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x} (leaves in tree order)."""
  return {'/'.join(key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten` for nested dicts."""
  tree: dict[str, Any] = {}
  for path, leaf in flat.items():
    node = tree
    *parents, last = path.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[last] = leaf
  return tree


def natural_key(path: str):
  """Sort key that puts layer_2 before layer_10."""
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', path)]
