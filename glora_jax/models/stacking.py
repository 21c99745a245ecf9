"""Layers stack: a family's repeated blocks as one stacked tree for `nn.scan`, and back.

A model built with `scan_layers` runs its blocks under one `nn.scan` (one block's
program whatever the depth, each FSDP gather redone inside the loop): its params hold
'layers/self_attn/q_proj/kernel' of shape (depth, in, out) where the unrolled model
holds depth leaves 'layers_{i}/self_attn/q_proj/kernel'. Files, importers, adapters,
subnets and exports keep the per-layer layout (the family's own): `stack` and
`unstack` convert at the boundary. A `Stack` is read off the family's `layer_path`
regex ('layers_(\\d+)/.*': per-layer prefix 'layers_', stacked name 'layers').

Pure pytree transforms over nested dicts whose leaves are arrays, numpy arrays,
jax.ShapeDtypeStructs or glora_jax.quant.QuantizedArrays (each child stacked; the
QuantizedArray keeps its one layer's shape, so a slice of the stack is one layer's).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from glora_jax.paths import flatten, unflatten
from glora_jax.quant import is_quantized


@dataclasses.dataclass(frozen=True)
class Stack:
  """`depth` blocks named '{prefix}{i}' (e.g. 'layers_3', 'encoder/layer_3') stacked
  under `name` ('layers', 'encoder/layer')."""
  prefix: str
  depth: int

  @classmethod
  def from_layer_path(cls, layer_path: str, depth: int) -> 'Stack':
    """From a family's layer_path regex, whose group 1 is the block index and whose
    text before it is the block's name, e.g. r'encoder/layer_(\\d+)/.*'."""
    head = layer_path.split(r'(\d+)')[0]
    if not head or re.escape(head) != head:
      raise ValueError(f"layer_path '{layer_path}' does not start with a plain block name "
                       r"followed by '(\d+)'")
    return cls(head, int(depth))

  @property
  def name(self) -> str:
    """The stacked block's path: the prefix without its trailing '_'."""
    return self.prefix[:-1] if self.prefix.endswith('_') else self.prefix

  def split(self, path: str) -> tuple[int, str] | None:
    """'layers_3/mlp/up_proj/kernel' -> (3, 'mlp/up_proj/kernel'); None for a path
    outside the blocks."""
    m = re.fullmatch(re.escape(self.prefix) + r'(\d+)/(.*)', path)
    return None if m is None else (int(m.group(1)), m.group(2))

  def inside(self, path: str) -> str | None:
    """'layers/mlp/up_proj/kernel' -> 'mlp/up_proj/kernel' (a stacked path's part
    below the block), or None."""
    return path[len(self.name) + 1:] if path.startswith(self.name + '/') else None

  def layer(self, stacked_path: str, i: int) -> str:
    """Layer i's path of a stacked path: ('layers/x', 3) -> 'layers_3/x'."""
    rest = self.inside(stacked_path)
    if rest is None:
      raise ValueError(f"'{stacked_path}' is not under the stacked blocks '{self.name}'")
    return f'{self.prefix}{i}/{rest}'


def _stack_leaves(leaves: list):
  if isinstance(leaves[0], jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct((len(leaves),) + tuple(leaves[0].shape), leaves[0].dtype)
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)  # stays on the host: an importer's tree is not put on a device
  return jnp.stack([jnp.asarray(x) for x in leaves])


def _stack(leaves: list):
  """One stacked leaf from depth per-layer leaves (a QuantizedArray child by child)."""
  if is_quantized(leaves[0]):
    return jax.tree.map(lambda *xs: _stack_leaves(list(xs)), *leaves)
  return _stack_leaves(leaves)


def _slice(leaf, i: int):
  if isinstance(leaf, jax.ShapeDtypeStruct):
    return jax.ShapeDtypeStruct(tuple(leaf.shape[1:]), leaf.dtype)
  if is_quantized(leaf):
    return jax.tree.map(lambda x: _slice(x, i), leaf)
  return leaf[i]


def depth_of(leaf) -> int:
  """The leading (layer) dimension of a stacked leaf."""
  first = jax.tree.leaves(leaf)[0] if is_quantized(leaf) else leaf
  return int(first.shape[0])


def stack(params: Mapping[str, Any], st: Stack | None) -> dict:
  """Per-layer params -> stacked (None: unchanged). Every block 0..depth-1 must hold
  the same leaves with the same shapes; leaves outside the blocks are kept."""
  if st is None:
    return dict(params)
  flat = flatten(params)
  out, groups = {}, {}
  for path, leaf in flat.items():
    parts = st.split(path)
    if parts is None:
      out[path] = leaf
    else:
      groups.setdefault(parts[1], {})[parts[0]] = leaf
  for rest, by_layer in groups.items():
    if sorted(by_layer) != list(range(st.depth)):
      missing = sorted(set(range(st.depth)) - set(by_layer))
      raise ValueError(f"cannot stack '{st.prefix}{{i}}/{rest}': layers {missing or sorted(by_layer)} "
                       f'{"lack it" if missing else "are not 0.." + str(st.depth - 1)}; every '
                       f'one of the {st.depth} blocks must hold it to run them under scan')
    leaves = [by_layer[i] for i in range(st.depth)]
    shapes = {tuple(np.shape(x)) if not is_quantized(x) else tuple(x.shape) for x in leaves}
    if len(shapes) > 1:
      raise ValueError(f"cannot stack '{st.prefix}{{i}}/{rest}': its shapes differ across "
                       f'layers ({sorted(shapes)})')
    out[f'{st.name}/{rest}'] = _stack(leaves)
  return unflatten(out)


def unstack(params: Mapping[str, Any], st: Stack | None) -> dict:
  """Stacked params -> per-layer (None: unchanged); the inverse of `stack`."""
  if st is None:
    return dict(params)
  out = {}
  for path, leaf in flatten(params).items():
    if st.inside(path) is None:
      out[path] = leaf
      continue
    for i in range(depth_of(leaf)):
      out[st.layer(path, i)] = _slice(leaf, i)
  return unflatten(out)


def is_stacked(params: Mapping[str, Any], st: Stack | None) -> bool:
  """Whether `params` hold `st`'s blocks stacked (False for st None)."""
  return st is not None and any(st.inside(p) is not None for p in flatten(params))


def group_layers(paths: Iterable[str], st: Stack) -> dict[str, list[str]]:
  """{stacked path: [layer 0's path, ..., layer depth-1's]} of the per-layer `paths`
  inside the blocks (e.g. an adapter spec's layer paths); a stacked path some layers
  lack is refused, naming them."""
  groups: dict[str, dict[int, str]] = {}
  for path in paths:
    parts = st.split(path + '/')  # a module path has no leaf name after it
    if parts is not None:
      groups.setdefault(f'{st.name}/{parts[1]}'.rstrip('/'), {})[parts[0]] = path
  out = {}
  for stacked, by_layer in groups.items():
    missing = sorted(set(range(st.depth)) - set(by_layer))
    if missing:
      raise ValueError(
          f"'{stacked}' is adapted in layers {sorted(by_layer)} but not in {missing}: under "
          'scan_layers every block runs one program, so each adapted layer must be adapted in '
          'every block (or set model.scan_layers=False)')
    out[stacked] = [by_layer[i] for i in range(st.depth)]
  return out


def infer(layer_paths: Iterable[str], params: Mapping[str, Any]) -> Stack | None:
  """The Stack under which `params` hold the per-layer modules `layer_paths` (an
  adapter spec's paths, e.g. 'layers_3/self_attn/q_proj'), or None when they are held
  per layer: read off the params, so a pytree transform needs no model."""
  flat = flatten(params)
  for path in layer_paths:
    parts = _layer_of(path)
    if f'{path}/kernel' in flat or parts is None:
      continue
    stacked = flat.get(f'{parts[0]}/kernel')
    if stacked is not None:
      return Stack(parts[2], depth_of(stacked))
  return None


def _layer_of(path: str) -> tuple[str, int, str] | None:
  """'layers_3/mlp/up_proj' -> ('layers/mlp/up_proj', 3, 'layers_'): its stacked path,
  block index and block prefix; None outside numbered blocks."""
  m = re.fullmatch(r'(.*?)_(\d+)/(.*)', path)
  return None if m is None else (f'{m.group(1)}/{m.group(3)}', int(m.group(2)), f'{m.group(1)}_')


def stack_by_path(tree: Mapping[str, Any], layer_paths: Iterable[str], st: Stack | None) -> dict:
  """{per-layer module path: subtree} (e.g. adapter params) -> the subtrees of `st`'s
  blocks stacked under their stacked module path ('layers/self_attn/q_proj'), the
  others as they are (None: unchanged). `per_layer` inverts it."""
  out = dict(tree)
  if st is None:
    return out
  for stacked, layers in group_layers([p for p in layer_paths if p in tree], st).items():
    out[stacked] = jax.tree.map(lambda *xs: _stack_leaves(list(xs)), *[out.pop(p) for p in layers])
  return out


def per_layer(tree: Mapping[str, Any], layer_paths: Iterable[str]) -> dict:
  """The inverse of `stack_by_path`: each stacked entry split into its layers' entries
  (named by `layer_paths`); a tree keyed per layer comes back as it is."""
  wanted = list(layer_paths)
  if set(tree) <= set(wanted):
    return dict(tree)
  layers: dict[str, list[tuple[int, str]]] = {}
  for path in wanted:
    parts = _layer_of(path)
    if parts is not None:
      layers.setdefault(parts[0], []).append((parts[1], path))
  out = {}
  for key, value in tree.items():
    if key not in layers or key in wanted:
      out[key] = value
      continue
    for i, path in sorted(layers[key]):
      out[path] = jax.tree.map(lambda x: _slice(x, i), value)
  return out
