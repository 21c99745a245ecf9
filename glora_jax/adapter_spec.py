"""Which Dense kernels get which adapter, and what each choice costs.

`attach` finds kernels by '/'-joined path regexes and creates their adapter
params; `AdapterSpec` is the static description of every adapted layer (hashable,
so static under jit) whose tables drive subnet sampling and parameter counts;
`check_subnet` checks a subnet where it enters; `report` counts parameters per
layer, as PEFT's print_trainable_parameters. `glora_jax.peft` re-exports all of it.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from glora_jax.adapters.base import AdapterFamily
from glora_jax.models.stacking import per_layer
from glora_jax.paths import flatten, match_paths, natural_key, unwrap
from glora_jax.quant import is_quantized

Params = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  path: str  # module path, e.g. 'encoder/layer_0/attention/query'
  family: AdapterFamily
  kernel_shape: tuple[int, int]
  has_bias: bool


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
  """Static description of every adapted layer, in natural path order. Hashable,
  so it can be static in jit; its numpy tables drive subnet sampling and costs."""

  layers: tuple[LayerSpec, ...]

  @property
  def paths(self) -> tuple[str, ...]:
    return tuple(l.path for l in self.layers)

  @functools.cached_property
  def num_supports(self) -> int:
    return max([1] + [len(l.family.supports) for l in self.layers])

  @functools.cached_property
  def support_names(self) -> tuple[tuple[str, ...], ...]:
    return tuple(l.family.supports for l in self.layers)

  @functools.cached_property
  def num_options(self) -> np.ndarray:
    """(layers, supports) int32: option count per support; 1 where unused."""
    out = np.ones((len(self.layers), self.num_supports), np.int32)
    for i, l in enumerate(self.layers):
      for j, s in enumerate(l.family.supports):
        out[i, j] = len(l.family.options(s))
    return out

  @functools.cached_property
  def option_costs(self) -> np.ndarray:
    """(layers, supports, max options) int64 parameter count of each option."""
    max_opts = int(self.num_options.max())
    out = np.zeros((len(self.layers), self.num_supports, max_opts), np.int64)
    for i, l in enumerate(self.layers):
      for j, row in enumerate(l.family.option_costs(l.kernel_shape)):
        out[i, j, :len(row)] = row
    return out

  @functools.cached_property
  def fixed_costs(self) -> np.ndarray:
    return np.asarray([l.family.fixed_cost(l.kernel_shape) for l in self.layers], np.int64)

  def layer_params(self, subnet) -> np.ndarray:
    """(layers,) int64 active adapter parameters of each layer under a concrete subnet
    (head excluded): its fixed cost plus the costs of the options it chooses."""
    chosen = np.asarray(chosen_option_costs(self.option_costs, subnet), np.int64)
    return self.fixed_costs + chosen.sum(-1)

  @property
  def searchable(self) -> bool:
    return bool((self.num_options > 1).any())

  @functools.cached_property
  def num_choices(self) -> float:
    """Size of the search space (a float: it overflows ints quickly)."""
    return float(np.prod(self.num_options.astype(np.float64)))


def chosen_option_costs(option_costs, subnet) -> jax.Array:
  """(..., layers, supports) parameters of the option each support of a subnet (or a
  batch of them) chooses: a gather into the (layers, supports, options) cost table.
  Jittable and vmappable; `AdapterSpec.layer_params` and `subnet.count_params` sum it."""
  subnet = jnp.asarray(subnet)
  costs = jnp.broadcast_to(jnp.asarray(option_costs), subnet.shape + np.shape(option_costs)[-1:])
  return jnp.take_along_axis(costs, subnet[..., None], axis=-1)[..., 0]


@flax.struct.dataclass
class Adapters:
  """Adapter parameters ({layer path: {leaf: array}}) with their static spec."""

  params: dict
  spec: AdapterSpec = flax.struct.field(pytree_node=False)


def attach(params: Params, family: AdapterFamily | None = None, targets: str | None = None,
           exclude: str | None = None, key=0,
           rules: Sequence[tuple[str, AdapterFamily]] | None = None) -> Adapters:
  """Creates adapters for the Dense kernels whose paths match.

  Either `family` with a `targets` regex (full match on leaf paths such as
  'encoder/layer_0/attention/query/kernel'), or `rules`: (regex, family) pairs,
  the first matching rule wins (GLoRA on some layers, SURM on others). `exclude`
  drops matching leaves. Every pattern must match at least one leaf.
  """
  inner, _ = unwrap(params)
  flat = flatten(inner)
  if rules is None:
    if family is None or targets is None:
      raise ValueError('attach needs `family` and `targets`, or `rules`')
    rules = [(targets, family)]
  excluded = set(match_paths(flat, exclude, 'exclude pattern')) if exclude else set()
  assigned: dict[str, AdapterFamily] = {}
  for pattern, fam in rules:
    if not isinstance(fam, AdapterFamily):
      raise ValueError(f"rule '{pattern}': expected an adapter family, got {type(fam).__name__}")
    for path in match_paths(flat, pattern, 'target pattern'):
      if path in excluded or path in assigned:
        continue
      if not path.endswith('/kernel'):
        raise ValueError(
            f"target pattern '{pattern}' matched '{path}', which is not a Dense kernel; "
            "targets must match leaves named '.../kernel'")
      assigned[path] = fam
  if not assigned:
    raise ValueError('every matched kernel was excluded; nothing to adapt')

  if isinstance(key, int):
    key = jax.random.key(key)
  layers, adapter_params = [], {}
  for i, kpath in enumerate(sorted(assigned, key=natural_key)):
    fam = assigned[kpath]
    mpath = kpath[:-len('/kernel')]
    shape = tuple(int(d) for d in np.shape(flat[kpath]))
    fam.check(mpath, shape)
    layers.append(LayerSpec(mpath, fam, shape, f'{mpath}/bias' in flat))
    adapter_params[mpath] = fam.init(jax.random.fold_in(key, i), shape)
  return Adapters(params=adapter_params, spec=AdapterSpec(tuple(layers)))


def check_subnet(spec: AdapterSpec, subnet):
  """The subnet as an int32 array of shape (layers, supports), checked where it
  enters: a concrete subnet (from JSON, from a user) must choose an existing
  option of every support, and 0 in the padding columns of families with fewer
  supports. Traced subnets (inside jit) are not checked: they come from
  `subnet.sample` or the search operators, which stay in range by construction.
  None is allowed for adapters without choices (LoRA, SURM)."""
  if subnet is None:
    if spec.searchable:
      raise ValueError('these adapters have searchable supports: pass a subnet '
                       '(an int32 array of shape (layers, supports))')
    return jnp.zeros((len(spec.layers), spec.num_supports), jnp.int32)
  expected = (len(spec.layers), spec.num_supports)
  if tuple(jnp.shape(subnet)) != expected:
    raise ValueError(f'subnet has shape {tuple(jnp.shape(subnet))}; expected {expected} '
                     '(adapted layers, supports)')
  if isinstance(subnet, jax.core.Tracer):
    return subnet
  values = np.asarray(subnet)
  if not np.issubdtype(values.dtype, np.integer):
    raise ValueError(f'subnet has dtype {values.dtype}; expected integers (option indices)')
  bad = np.argwhere((values < 0) | (values >= spec.num_options))
  if len(bad):
    i, j = (int(v) for v in bad[0])
    layer = spec.layers[i]
    if j >= len(layer.family.supports):
      raise ValueError(f"subnet[{i}, {j}] = {values[i, j]}: layer '{layer.path}' "
                       f'({layer.family.name}) has {len(layer.family.supports)} supports, so '
                       'this padding entry must be 0')
    support = layer.family.supports[j]
    n = int(spec.num_options[i, j])
    raise ValueError(f"subnet[{i}, {j}] = {values[i, j]}: layer '{layer.path}' support "
                     f"'{support}' has {n} options; allowed 0..{n - 1} "
                     f'({", ".join(layer.family.options(support))})')
  return jnp.asarray(values, jnp.int32)


def _num_params(tree) -> int:
  """Values stored, a quantized kernel counted as its kernel's (not its codes')."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized)))


@dataclasses.dataclass
class Report:
  rows: list[tuple[str, str, str, int, int]]  # path, family, choice, active, stored
  adapter_params: int  # active under the subnet (head excluded)
  stored_adapter_params: int  # all supernet parameters
  head_params: int
  backbone_params: int

  @property
  def trainable_params(self) -> int:
    return self.adapter_params + self.head_params

  @property
  def total_params(self) -> int:
    return self.backbone_params + self.trainable_params

  @property
  def percent(self) -> float:
    return 100.0 * self.trainable_params / max(self.total_params, 1)

  def summary(self) -> str:
    return (f'trainable params: {self.trainable_params:,} (adapters {self.adapter_params:,} + '
            f'head {self.head_params:,}) || all params: {self.total_params:,} || '
            f'trainable%: {self.percent:.4f}')

  def __str__(self) -> str:
    width = max([len(r[0]) for r in self.rows] + [5])
    lines = [f"{'layer':<{width}}  {'family':<6}  {'choice':<40}  {'active':>9}  {'stored':>9}"]
    for path, fam, choice, active, stored in self.rows:
      lines.append(f'{path:<{width}}  {fam:<6}  {choice:<40}  {active:>9,}  {stored:>9,}')
    lines.append(self.summary())
    return '\n'.join(lines)


def report(params: Params, adapters: Adapters, subnet=None, head: Params | None = None) -> Report:
  """Per-layer and total parameter counts, like PEFT's print_trainable_parameters.

  `params` is the frozen backbone (the head excluded), `head` the trainable head."""
  spec = adapters.spec
  subnet = np.asarray(check_subnet(spec, subnet))
  active = spec.layer_params(subnet)
  stored = per_layer(adapters.params, spec.paths)  # as trained, perhaps stacked (scan_layers)
  rows = []
  for i, layer in enumerate(spec.layers):
    fam = layer.family
    choice = ','.join(f'{s}={fam.options(s)[subnet[i, j]]}' for j, s in enumerate(fam.supports))
    rows.append((layer.path, fam.name, choice or '-', int(active[i]),
                 _num_params(stored[layer.path])))
  return Report(rows=rows, adapter_params=sum(r[3] for r in rows),
                stored_adapter_params=_num_params(adapters.params),
                head_params=_num_params(head) if head is not None else 0,
                backbone_params=_num_params(unwrap(params)[0]))
