"""Parameter paths: '/'-joined names of nested-dict leaves, the one way every part
of glora_jax (targeting, freezing, sharding, checkpoints, importers) names a leaf;
matching them by regex, and splitting a tree in two by them (trainable / frozen).
"""
from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, Sequence

import jax

from glora_jax.quant import is_quantized

Params = Mapping[str, Any]


def key_name(k) -> str:
  """The name of one jax key-path entry (dict key, attribute or index)."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def path_name(key_path) -> str:
  """The '/'-joined name of a jax key path (as tree_map_with_path passes it)."""
  return '/'.join(key_name(k) for k in key_path)


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x} (leaves in tree order). A quantized kernel
  (glora_jax.quant.QuantizedArray) is one leaf at its kernel's path, not its codes."""
  return {path_name(path): leaf for path, leaf
          in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_quantized)[0]}


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


def unwrap(params: Params) -> tuple[Params, bool]:
  """Accepts both {'params': {...}} (a Flax variables dict) and the inner dict."""
  if isinstance(params, Mapping) and set(params.keys()) == {'params'}:
    return params['params'], True
  return params, False


def rewrap(inner: Params, wrapped: bool) -> Params:
  return {'params': inner} if wrapped else inner


def examples(paths: Iterable[str], n: int = 6) -> str:
  paths = sorted(paths, key=natural_key)
  shown = ', '.join(f"'{p}'" for p in paths[:n])
  return shown + (f', ... ({len(paths)} in all)' if len(paths) > n else '')


def match_paths(paths: Iterable[str], pattern: str, what: str = 'pattern') -> list[str]:
  """Paths that fully match `pattern`; a pattern that matches nothing is an error."""
  paths = list(paths)
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"{what} '{pattern}' is not a valid regular expression: {e}") from None
  hits = [p for p in paths if regex.fullmatch(p)]
  if not hits:
    raise ValueError(f"{what} '{pattern}' matched no parameter; paths look like {examples(paths)}")
  return hits


def partition(tree: Params, patterns: Sequence[str] | str) -> tuple[dict, dict]:
  """Splits a nested dict into (leaves matching any pattern, the rest), both
  nested dicts over the same paths. Each pattern must match something."""
  if isinstance(patterns, str):
    patterns = [patterns]
  flat = flatten(tree)
  hit = set()
  for p in patterns:
    hit.update(match_paths(flat, p, 'trainable pattern'))
  chosen = {k: v for k, v in flat.items() if k in hit}
  rest = {k: v for k, v in flat.items() if k not in hit}
  return unflatten(chosen), unflatten(rest)


def combine(*trees: Params) -> dict:
  """Inverse of `partition`: merges nested dicts with disjoint leaf paths."""
  flat: dict[str, Any] = {}
  for t in trees:
    for k, v in flatten(t).items():
      if k in flat:
        raise ValueError(f"leaf '{k}' appears in more than one tree")
      flat[k] = v
  return unflatten(flat)
