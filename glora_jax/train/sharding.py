"""Sharding declared, not coded: a (data, model) mesh and path-regex rules.

The same code runs on 1 CPU, 8 simulated CPU devices, one GPU or a TPU slice.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from glora_jax import peft

Rules = Sequence[tuple[str, P]]


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


def spec_for(path: str, shape: tuple[int, ...], rules: Rules, mesh: Mesh) -> P:
  """The first rule whose regex fully matches `path`; dimensions that the mesh
  axis does not divide stay replicated (so small test models always work)."""
  for pattern, spec in rules:
    if re.fullmatch(pattern, path):
      fixed = []
      for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        fixed.append(axis if axis is not None and dim % size == 0 else None)
      return P(*fixed[:len(shape)])
  return P()


def tree_shardings(tree: Any, rules: Rules, mesh: Mesh) -> Any:
  """NamedShardings for a nested dict of arrays (or ShapeDtypeStructs)."""
  flat = peft.flatten(tree)
  return peft.unflatten({k: NamedSharding(mesh, spec_for(k, np.shape(v), rules, mesh))
                         for k, v in flat.items()})


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', replicated over 'model'."""
  return NamedSharding(mesh, P('data'))


def check_batch(batch_size: int, mesh: Mesh) -> None:
  data = mesh.shape['data']
  if batch_size % data:
    raise ValueError(f'batch_size={batch_size} is not divisible by the data-parallel size '
                     f'{data}; use a multiple of {data}')


def put_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Host numpy batch (this process's rows) -> global arrays sharded over 'data'."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}
