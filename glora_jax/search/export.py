"""Merge a chosen subnet into plain parameters and write them (orbax and
safetensors), readable by the plain model with no adapter code.
"""
from __future__ import annotations

import pathlib
import re

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors import numpy as st_numpy

from glora_jax import data, peft


def merged_params(base_params: dict, trainable: dict, spec: peft.AdapterSpec | None, subnet) -> dict:
  """The model's params with the trained parts (head, or all for full fine-tuning)
  taken from `trainable` and the adapters of `subnet` folded in; each leaf keeps
  the dtype it has in `base_params`."""
  names = [re.escape(p) for p in peft.flatten(trainable['model'])]
  rest = peft.partition(base_params, names)[1] if names else base_params
  full = peft.combine(rest, trainable['model'])
  if spec is None:
    return full
  return peft.merge(full, peft.Adapters(params=trainable['adapters'], spec=spec), subnet)


def save_orbax(path, params) -> pathlib.Path:
  path = pathlib.Path(path).absolute()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=True)
  return path


def load_orbax(path) -> dict:
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(pathlib.Path(path).absolute())


def save_safetensors(path, params) -> pathlib.Path:
  """Keys are the '/'-joined parameter paths."""
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in peft.flatten(params).items()}
  st_numpy.save_file(flat, str(path))
  return pathlib.Path(path)


def load_safetensors(path) -> dict:
  return peft.unflatten(st_numpy.load_file(str(path)))


def predict(forward, params, adapters, subnet, arrays, batch_size: int = 32) -> np.ndarray:
  """Argmax predictions for every example of `arrays` (jitted once)."""
  fn = jax.jit(lambda p, a, s, b: forward(p, a, s, b, False, None).argmax(-1))
  preds = []
  for batch in data.eval_iterator(arrays, batch_size):
    keep = batch['mask'] > 0
    preds.append(np.asarray(fn(params, adapters, subnet, batch))[keep])
  return np.concatenate(preds)
