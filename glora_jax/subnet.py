"""Subnets as data: one int32 array (layers x supports) of option indices.

Sampling, parameter counting and the readable-JSON round trip. Everything on
arrays is jittable and vmappable; a new subnet never causes a recompile.
"""
from __future__ import annotations

import json
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from glora_jax.adapter_spec import AdapterSpec, Adapters, chosen_option_costs


def _spec(x) -> AdapterSpec:
  return x.spec if isinstance(x, Adapters) else x


def sample(key, adapters: Adapters | AdapterSpec) -> jax.Array:
  """Each layer's supports drawn independently and uniformly from their options."""
  return sample_table(key, _spec(adapters).num_options)


def sample_table(key, num_options, batch: tuple[int, ...] = ()) -> jax.Array:
  """`sample` from the (layers, supports) option-count table itself, `batch` subnets at
  once, for callers that pass the table as a traced argument."""
  num_options = jnp.asarray(num_options)
  return jax.random.randint(key, tuple(batch) + num_options.shape, 0, num_options,
                            dtype=jnp.int32)


def count_params(adapters: Adapters | AdapterSpec, subnet) -> jax.Array:
  """Active adapter parameters of a subnet (head excluded). Jittable, vmappable:
  a gather into the spec's (layers, supports, options) cost table."""
  spec = _spec(adapters)
  return count_params_table(spec.option_costs, int(spec.fixed_costs.sum()), subnet)


def count_params_table(option_costs, fixed_cost, subnet) -> jax.Array:
  """`count_params` from the (layers, supports, options) cost table itself, for
  callers that pass the table as a traced argument."""
  return jnp.sum(chosen_option_costs(option_costs, subnet), axis=(-1, -2)) + fixed_cost


def cheapest_and_largest(num_options, option_costs) -> tuple[jax.Array, jax.Array]:
  """The subnets choosing, per support, the option with the fewest and the one with the
  most parameters (first on ties); the padding past a support's `num_options` never
  counts. Jittable: the tables may be traced."""
  costs = jnp.asarray(option_costs)
  valid = jnp.arange(costs.shape[-1]) < jnp.asarray(num_options)[..., None]
  cheapest = jnp.argmin(jnp.where(valid, costs, jnp.iinfo(costs.dtype).max), axis=-1)
  most = jnp.argmax(jnp.where(valid, costs, -1), axis=-1)
  return cheapest.astype(jnp.int32), most.astype(jnp.int32)


def largest(adapters: Adapters | AdapterSpec) -> np.ndarray:
  """The subnet choosing, per support, the option with the most parameters."""
  spec = _spec(adapters)
  return np.asarray(cheapest_and_largest(spec.num_options, spec.option_costs)[1])


# --------------------------------------------------------------------------- #
# Supernet sampling rules (train/steps.py, config.supernet): pure functions of a
# key and a counter, so a resumed run draws what the uninterrupted one drew.
# --------------------------------------------------------------------------- #


def option_order(num_options, option_costs) -> np.ndarray:
  """(layers, supports, max options) int32: each support's option indices from the
  most to the fewest parameters (first on ties); padding past `num_options` last."""
  costs = np.asarray(option_costs).astype(np.float64)
  valid = np.arange(costs.shape[-1]) < np.asarray(num_options)[..., None]
  return np.argsort(np.where(valid, -costs, np.inf), axis=-1, kind='stable').astype(np.int32)


def allowed_options(num_options, step, widen_steps: int) -> jax.Array:
  """(layers, supports) how many of each support's options, the most expensive
  first (`option_order`), progressive shrinking (OFA) allows at `step`: 1 (the
  largest subnet only) at step 0, widening in equal stages to every option at
  `widen_steps`: min(n, 1 + step * (n - 1) // widen_steps). widen_steps 0: all."""
  num_options = jnp.asarray(num_options, jnp.int32)
  if not widen_steps:
    return num_options
  step = jnp.asarray(step, jnp.int32)
  return jnp.minimum(num_options, 1 + step * (num_options - 1) // widen_steps)


def sample_allowed(key, order, allowed, batch: tuple[int, ...] = ()) -> jax.Array:
  """Subnets drawing each support uniformly from its first `allowed` options of
  `order`."""
  ranks = jax.random.randint(key, tuple(batch) + allowed.shape, 0, allowed, dtype=jnp.int32)
  return jnp.take_along_axis(jnp.broadcast_to(jnp.asarray(order), ranks.shape + order.shape[-1:]),
                             ranks[..., None], axis=-1)[..., 0]


def fair_sample(key, draw, order, allowed) -> jax.Array:
  """Draw number `draw` (a traced int) of fair sampling (FairNAS): a support with m
  allowed options takes, at draw g, position g % m of a random permutation of its
  options that is fixed for the cycle g // m, so each option is drawn exactly once
  in every m consecutive draws (a cycle). Permutations are independent across
  layers, supports and cycles, and a function of (key, draw) only."""
  order = jnp.asarray(order)
  allowed = jnp.asarray(allowed, jnp.int32)
  width = order.shape[-1]
  draw = jnp.asarray(draw, jnp.int32)
  entry = jnp.arange(allowed.size, dtype=jnp.int32).reshape(allowed.shape)

  def rank(e, m):
    k = jax.random.fold_in(jax.random.fold_in(key, e), draw // m)
    u = jnp.where(jnp.arange(width) < m, jax.random.uniform(k, (width,)), 2.0)
    return jnp.argsort(u)[draw % m]

  ranks = jax.vmap(rank)(entry.ravel(), allowed.ravel()).reshape(allowed.shape)
  return jnp.take_along_axis(order, ranks[..., None], axis=-1)[..., 0].astype(jnp.int32)


def to_dict(adapters: Adapters | AdapterSpec, subnet) -> dict[str, dict[str, str]]:
  """{'encoder/layer_0/attention/query': {'A': 'lora_4', 'B': 'none', ...}, ...}.
  Layers of families without choices (LoRA, SURM) map to {}."""
  spec = _spec(adapters)
  subnet = np.asarray(subnet)
  if subnet.shape != spec.num_options.shape:
    raise ValueError(f'subnet has shape {subnet.shape}; expected {spec.num_options.shape}')
  out = {}
  for i, layer in enumerate(spec.layers):
    fam = layer.family
    out[layer.path] = {s: fam.options(s)[int(subnet[i, j])] for j, s in enumerate(fam.supports)}
  return out


def from_dict(adapters: Adapters | AdapterSpec, choices: Mapping[str, Mapping[str, str]]) -> np.ndarray:
  """Inverse of `to_dict`; every adapted layer and support must be named."""
  spec = _spec(adapters)
  subnet = np.zeros(spec.num_options.shape, np.int32)
  unknown = sorted(set(choices) - set(spec.paths))
  if unknown:
    raise ValueError(f'subnet names layers that are not adapted: {unknown[:5]}; '
                     f'adapted layers look like {list(spec.paths[:3])}')
  for i, layer in enumerate(spec.layers):
    fam = layer.family
    row = choices.get(layer.path)
    if row is None:
      raise ValueError(f"subnet has no entry for adapted layer '{layer.path}'")
    extra = sorted(set(row) - set(fam.supports))
    if extra:
      raise ValueError(f"'{layer.path}': unknown supports {extra}; {fam.name} has {list(fam.supports)}")
    for j, s in enumerate(fam.supports):
      if s not in row:
        raise ValueError(f"'{layer.path}': no option given for support '{s}'")
      options = fam.options(s)
      if row[s] not in options:
        raise ValueError(f"'{layer.path}': unknown option '{row[s]}' for support '{s}'; "
                         f'allowed: {list(options)}')
      subnet[i, j] = options.index(row[s])
  return subnet


def dumps(adapters: Adapters | AdapterSpec, subnet) -> str:
  return json.dumps(to_dict(adapters, subnet), indent=1)


def loads(adapters: Adapters | AdapterSpec, text: str) -> np.ndarray:
  """`dumps`' inverse; text that is not a JSON object of layers is a ValueError."""
  try:
    choices = json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'not valid JSON ({e})') from None
  if not isinstance(choices, dict) or not all(isinstance(v, dict) for v in choices.values()):
    raise ValueError('not a JSON object of {layer path: {support: option}}')
  return from_dict(adapters, choices)
