"""Sharding declared, not coded: a ('data', 'model') mesh and path-regex rules,
the one engine for frozen params, adapters, optimizer state and batches.

Rules map '/'-joined parameter paths to PartitionSpecs (first full match wins; a
path no rule matches is an error). A dimension the mesh axis does not divide is
replicated and reported. With FSDP each large frozen leaf is also split over
'data'. Adapters take their axes from the kernel they adapt (as MaxText's
get_lora_param_sharding): a LoRA factor shards its `in` or `out` dimension the way
the kernel does, so nothing large is replicated; so do a quantized kernel's codes and
scales. The same code runs on 1 CPU, 8 simulated CPU devices, a GPU or a TPU slice, in
one process or several.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glora_jax.models.stacking import Stack, depth_of, group_layers
from glora_jax.paths import flatten, unflatten
from glora_jax.quant import QuantizedArray, is_quantized

Rules = Sequence[tuple[str, P]]
# Leaves smaller than this stay replicated under FSDP: splitting a LayerNorm
# scale saves nothing and costs a collective.
FSDP_MIN_ELEMENTS = 2 ** 16


def make_mesh(data: int = -1, model: int = 1, devices=None) -> Mesh:
  """A ('data', 'model') mesh; data=-1 takes every device not used by `model`."""
  devices = list(devices if devices is not None else jax.devices())
  n = len(devices)
  if model <= 0 or n % model:
    raise ValueError(f'mesh.model={model} must be a positive divisor of the {n} devices')
  if data == -1:
    data = n // model
  if data <= 0 or data * model != n:
    raise ValueError(f'mesh data x model = {data} x {model} must equal the {n} available '
                     f'devices (use mesh.data=-1 to take the rest)')
  axis_types = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, model), ('data', 'model'), axis_types=axis_types,
                       devices=devices)


def under_mesh(mesh: Mesh, fn):
  """`fn` traced with `mesh` as the abstract mesh in context, so that a model's
  activation constraints (models.common.batch_sharded) take effect under jit; the
  caller still jits it with its own in/out shardings. Outside a mesh those
  constraints are no-ops (one device, the search's candidate-parallel fitness)."""
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


def as_rules(pairs) -> list[tuple[str, P]]:
  """Rules from a config: (regex, PartitionSpec or a tuple/list of axis names or None)."""
  out = []
  for pattern, pspec in pairs or ():
    out.append((pattern, pspec if isinstance(pspec, P) else P(*pspec)))
  return out


def _axis_size(mesh: Mesh, axes) -> int:
  return int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else (axes,))]))


def pspec_for(path: str, shape: Sequence[int], rules: Rules, mesh: Mesh | None = None, *,
             fsdp: bool = False, fsdp_min_size: int = FSDP_MIN_ELEMENTS,
             notes: list[str] | None = None, stack: Stack | None = None) -> P:
  """The PartitionSpec of one leaf: the first rule whose regex fully matches.

  Without a mesh the rule's PartitionSpec is returned as written (padded to the leaf's
  rank). With a mesh, a dimension its axes do not divide is replicated (a note
  is appended to `notes`), and `fsdp` splits the largest still-replicated
  dimension that 'data' divides, for leaves of at least `fsdp_min_size` elements.
  A leaf of stacked layers (under `stack`'s name) gets layer 0's spec from its path and
  one layer's shape, behind an unsplit layer axis: a scan step gathers one layer."""
  shape = tuple(int(d) for d in shape)
  if stack is not None and stack.inside(path) is not None:
    one = pspec_for(stack.layer(path, 0), shape[1:], rules, mesh, fsdp=fsdp,
                    fsdp_min_size=fsdp_min_size,
                    notes=notes)
    return P(None, *one)
  for pattern, pspec in rules:
    if re.fullmatch(pattern, path):
      break
  else:
    raise ValueError(f"no partition rule matches '{path}'; rules are {[p for p, _ in rules]} "
                     "(end them with ('.*', PartitionSpec()))")
  if len(pspec) > len(shape):
    raise ValueError(f"'{path}' has shape {shape}; spec {pspec} of rule '{pattern}' has more "
                     'dimensions')
  axes = list(pspec) + [None] * (len(shape) - len(pspec))
  if mesh is None:
    return pspec
  for i, (dim, ax) in enumerate(zip(shape, axes)):
    if ax is not None and dim % _axis_size(mesh, ax):
      if notes is not None:
        notes.append(f"'{path}' dimension {i} ({dim}) does not divide by mesh axis {ax} "
                     f'({_axis_size(mesh, ax)}): replicated')
      axes[i] = None
  used = {a for ax in axes if ax is not None for a in (ax if isinstance(ax, tuple) else (ax,))}
  data = mesh.shape.get('data', 1)
  if fsdp and data > 1 and 'data' not in used and int(np.prod(shape)) >= fsdp_min_size:
    free = [i for i, ax in enumerate(axes) if ax is None and shape[i] % data == 0]
    if free:
      axes[max(free, key=lambda i: shape[i])] = 'data'
  # As long as the rule wrote it, or up to the last sharded dimension (P() != P(None)).
  used_len = max([len(pspec)] + [i + 1 for i, ax in enumerate(axes) if ax is not None])
  return P(*axes[:used_len])


def _leaf_specs(tree: Any, rules: Rules, mesh: Mesh | None, **kwargs) -> dict[str, P]:
  """{path: PartitionSpec} of each leaf; a quantized kernel's of its kernel shape (with
  the layer axis in front when it is stacked: its shape is one layer's)."""
  stack = kwargs.get('stack')

  def shape(path, leaf):
    if is_quantized(leaf) and stack is not None and stack.inside(path) is not None:
      return (depth_of(leaf),) + tuple(leaf.shape)
    return np.shape(leaf)
  return {k: pspec_for(k, shape(k, v), rules, mesh, **kwargs) for k, v in flatten(tree).items()}


def quantized_specs(path: str, q: QuantizedArray, kernel_spec: P, mesh: Mesh | None = None,
                    notes: list[str] | None = None) -> QuantizedArray:
  """The specs of a quantized kernel's children (a QuantizedArray of PartitionSpecs):
  codes and block scales keep the kernel's dimensions (the last one packed or divided
  by the block), so each takes the kernel's axis where it divides; the second-level
  scales of double quantization (small, over the flattened scales) are replicated."""
  axes = tuple(kernel_spec) + (None,) * (len(q.shape) - len(kernel_spec))

  def like_kernel(child):
    shape = np.shape(child)
    out = list(axes)
    for i, ax in enumerate(out):
      if ax is not None and mesh is not None and shape[i] % _axis_size(mesh, ax):
        if notes is not None:
          notes.append(f"quantized '{path}' dimension {i} ({shape[i]}) of its codes or scales "
                       f'does not divide by mesh axis {ax} ({_axis_size(mesh, ax)}): replicated')
        out[i] = None
    return P(*out)
  return q.map_children(like_kernel, scales=lambda _: P())


def _expand(flat_specs: dict[str, P], tree: Any, mesh: Mesh | None, notes) -> Any:
  leaves = flatten(tree)
  return unflatten({k: quantized_specs(k, leaves[k], spec, mesh, notes)
                    if is_quantized(leaves[k]) else spec for k, spec in flat_specs.items()})


def partition_specs(tree: Any, rules: Rules, mesh: Mesh | None = None, **kwargs) -> Any:
  """PartitionSpecs shaped like `tree` (a nested dict of arrays or ShapeDtypeStructs;
  a quantized kernel gets a QuantizedArray of specs, `quantized_specs`); keyword
  arguments as `pspec_for`."""
  return _expand(_leaf_specs(tree, rules, mesh, **kwargs), tree, mesh, kwargs.get('notes'))


def tree_shardings(tree: Any, rules: Rules, mesh: Mesh, **kwargs) -> Any:
  """NamedShardings for a nested dict of arrays (or ShapeDtypeStructs)."""
  return named(mesh, partition_specs(tree, rules, mesh, **kwargs))


def named(mesh: Mesh, specs: Any) -> Any:
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def adapter_specs(adapter_spec, kernel_specs: dict[str, P], mesh: Mesh,
                  notes: list[str] | None = None) -> dict:
  """PartitionSpecs of adapter params ({layer path: {leaf: ...}}): each leaf
  dimension that the family names 'in' or 'out' (`family.param_axes`) takes the
  axis of that dimension of the layer's kernel PartitionSpec, where it divides."""
  out = {}
  for layer in adapter_spec.layers:
    k_in, k_out = tuple(kernel_specs[f'{layer.path}/kernel']) + (None,) * (
        2 - len(kernel_specs[f'{layer.path}/kernel']))
    named_axes = layer.family.param_axes(layer.kernel_shape)
    shapes = layer.family.param_shapes(layer.kernel_shape)
    specs = {}
    for leaf, struct in flatten(shapes).items():
      shape = tuple(struct.shape)
      dims = named_axes.get(leaf, (None,) * len(shape))
      axes = [{'in': k_in, 'out': k_out}.get(d) for d in dims]
      for i, ax in enumerate(axes):
        if ax is not None and shape[i] % _axis_size(mesh, ax):
          if notes is not None:
            notes.append(f"adapter '{layer.path}/{leaf}' dimension {i} ({shape[i]}) does not "
                         f'divide by mesh axis {ax}: replicated')
          axes[i] = None
      specs[leaf] = P(*axes)
    out[layer.path] = unflatten(specs)
  return out


def param_specs(frozen, model_trainable, adapter_spec, rules: Rules, mesh: Mesh, *,
                fsdp: bool = False, notes: list[str] | None = None,
                stack: Stack | None = None) -> tuple[dict, dict]:
  """(frozen specs, trainable specs {'model', 'adapters'}) of a run: the frozen
  backbone and the trained model params by the rules (FSDP over 'data' if asked),
  each adapter like the kernel it adapts (`adapter_spec`: a peft.AdapterSpec or None;
  adapters stay per layer when the model's layers are stacked under `stack`)."""
  frozen_flat = _leaf_specs(frozen, rules, mesh, fsdp=fsdp, notes=notes, stack=stack)
  frozen_specs = _expand(frozen_flat, frozen, mesh, notes)
  model_specs = partition_specs(model_trainable, rules, mesh, fsdp=fsdp, notes=notes, stack=stack)
  adapters = {}
  if adapter_spec is not None:  # a quantized kernel's adapters follow its kernel's spec
    kernels = {**flatten(model_specs), **frozen_flat}
    if stack is not None:  # each layer's kernel spec: the stacked one without its layer axis
      kernels.update({stack.layer(k, i): P(*tuple(s)[1:]) for k, s in list(kernels.items())
                      if stack.inside(k) is not None for i in range(stack.depth)})
    adapters = adapter_specs(adapter_spec, kernels, mesh, notes=notes)
    if stack is not None:  # a scan_layers run holds its blocks' adapters stacked too
      adapters = stack_by_path(adapters, adapter_spec.paths, stack)
  return frozen_specs, {'model': model_specs, 'adapters': adapters}


def stack_by_path(specs: dict, layer_paths, stack: Stack) -> dict:
  """Per-layer adapter specs -> the specs of adapters stacked by
  `stacking.stack_by_path`: layer 0's spec behind an unsplit layer axis."""
  out = dict(specs)
  for stacked, layers in group_layers([p for p in layer_paths if p in specs], stack).items():
    out[stacked] = jax.tree.map(lambda p: P(None, *p), specs[layers[0]],
                                is_leaf=lambda x: isinstance(x, P))
    for p in layers:
      del out[p]
  return out


def train_state_specs(state, optimizer: optax.GradientTransformation, trainable_specs) -> dict:
  """Specs of the train state dict: trainable params as given, optimizer state
  following them, everything else (step, key, subnet) replicated."""
  specs = {k: P() for k in state}
  specs.update(trainable=trainable_specs,
               opt_state=optimizer_state_specs(optimizer, state['opt_state'], trainable_specs))
  return specs


def optimizer_state_specs(optimizer: optax.GradientTransformation, abstract_opt_state,
                          param_specs) -> Any:
  """Specs of an optax state: its parameter-shaped parts (Adam's moments) follow
  the params' specs; counts and other scalars are replicated."""
  return optax.tree_map_params(optimizer, lambda _, pspec: pspec, abstract_opt_state, param_specs,
                               transform_non_params=lambda _: P(),
                               is_leaf=lambda x: isinstance(x, P))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', replicated over 'model'."""
  return NamedSharding(mesh, P('data'))


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host numpy batch (this process's rows) -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
