"""Which parameter leaves get which adapter, and adapters as pytree transforms.

`attach` finds Dense kernels by '/'-joined path regexes; `apply` / `forward` run a
model with adapted weights; `merge` folds a chosen subnet into plain parameters
with the original structure, shapes and dtypes; `partition` / `combine` split a
tree into trainable and frozen parts by path patterns; `report` counts parameters.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glora_jax.adapters.base import AdapterFamily
from glora_jax.paths import flatten, natural_key, unflatten  # noqa: F401 (part of peft's API)

Params = Mapping[str, Any]

# --------------------------------------------------------------------------- #
# Paths
# --------------------------------------------------------------------------- #


def _unwrap(params: Params) -> tuple[Params, bool]:
  """Accepts both {'params': {...}} (a Flax variables dict) and the inner dict."""
  if isinstance(params, Mapping) and set(params.keys()) == {'params'}:
    return params['params'], True
  return params, False


def _rewrap(inner: Params, wrapped: bool) -> Params:
  return {'params': inner} if wrapped else inner


def _examples(paths: Iterable[str], n: int = 6) -> str:
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
    raise ValueError(f"{what} '{pattern}' matched no parameter; paths look like {_examples(paths)}")
  return hits


# --------------------------------------------------------------------------- #
# Adapter specification and state
# --------------------------------------------------------------------------- #


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

  @property
  def searchable(self) -> bool:
    return bool((self.num_options > 1).any())

  @functools.cached_property
  def num_choices(self) -> float:
    """Size of the search space (a float: it overflows ints quickly)."""
    return float(np.prod(self.num_options.astype(np.float64)))


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
  inner, _ = _unwrap(params)
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


def _check_subnet(spec: AdapterSpec, subnet):
  if subnet is None:
    if spec.searchable:
      raise ValueError('these adapters have searchable supports: pass a subnet '
                       '(an int32 array of shape (layers, supports))')
    return jnp.zeros((len(spec.layers), spec.num_supports), jnp.int32)
  expected = (len(spec.layers), spec.num_supports)
  if tuple(jnp.shape(subnet)) != expected:
    raise ValueError(f'subnet has shape {tuple(jnp.shape(subnet))}; expected {expected} '
                     '(adapted layers, supports)')
  return subnet


# --------------------------------------------------------------------------- #
# Applying and merging
# --------------------------------------------------------------------------- #


def _grouped_deltas(spec: AdapterSpec, adapter_params, subnet, flat, modes) -> dict[int, tuple]:
  """{layer index: (d_kernel, d_bias)} for the layers whose mode is in `modes`.

  Layers with the same family, kernel shape and bias presence are stacked and
  their deltas computed by one `jax.vmap`-ed call: the compiled program holds one
  copy of the adapter maths per group instead of one per layer (36 layers of
  MiniLM form 3 groups), which keeps compile time small."""
  groups: dict[tuple, list[int]] = {}
  for i, layer in enumerate(spec.layers):
    if layer.family.mode not in modes:
      continue
    if not layer.family.mergeable:
      raise ValueError(f"'{layer.path}': the {layer.family.name} adapter is not linear "
                       'and cannot be merged into the weights')
    has_bias = f'{layer.path}/bias' in flat
    groups.setdefault((layer.family, layer.kernel_shape, has_bias), []).append(i)
  out = {}
  for (family, _, has_bias), idx in groups.items():
    paths = [spec.layers[i].path for i in idx]
    kernels = [flat[f'{p}/kernel'] for p in paths]
    biases = [flat[f'{p}/bias'] for p in paths] if has_bias else None
    if len(idx) == 1:
      out[idx[0]] = family.delta(adapter_params[paths[0]], subnet[idx[0]], kernels[0],
                                 None if biases is None else biases[0])
      continue
    stack = lambda xs: jnp.stack([jnp.asarray(x) for x in xs])
    dks, dbs = jax.vmap(family.delta)(
        jax.tree.map(lambda *xs: stack(xs), *[adapter_params[p] for p in paths]),
        jnp.asarray(subnet)[np.asarray(idx)], stack(kernels),
        None if biases is None else stack(biases))
    for j, i in enumerate(idx):
      out[i] = (dks[j], None if dbs is None else dbs[j])
  return out


def _fold(params, adapters: Adapters, subnet, *, modes, add_missing_bias, cast_back):
  """Folds the adapters of layers whose family mode is in `modes` into the
  kernels/biases. Returns (params, {path: bias delta} for bias-less layers)."""
  spec = adapters.spec
  subnet = _check_subnet(spec, subnet)
  inner, wrapped = _unwrap(params)
  flat = dict(flatten(inner))
  missing_bias = {}
  deltas = _grouped_deltas(spec, adapters.params, subnet, flat, modes)
  for i, (dk, db) in deltas.items():
    layer = spec.layers[i]
    kernel = flat[f'{layer.path}/kernel']
    bias = flat.get(f'{layer.path}/bias')
    new_k = kernel.astype(jnp.float32) + dk
    flat[f'{layer.path}/kernel'] = new_k.astype(kernel.dtype) if cast_back else new_k
    if db is None:
      continue
    if bias is not None:
      new_b = bias.astype(jnp.float32) + db
      flat[f'{layer.path}/bias'] = new_b.astype(bias.dtype) if cast_back else new_b
    elif add_missing_bias:
      flat[f'{layer.path}/bias'] = db.astype(kernel.dtype) if cast_back else db
    else:
      missing_bias[layer.path] = db
  return _rewrap(unflatten(flat), wrapped), missing_bias


def apply(params: Params, adapters: Adapters, subnet=None) -> Params:
  """Params with every weight-mode adapter folded in (float32 kernels where
  adapted, so gradients flow at full precision). Activation-mode adapters and
  bias terms of bias-less layers need `forward` (or `activation_hooks`)."""
  out, _ = _fold(params, adapters, subnet, modes=('weight',), add_missing_bias=True,
                 cast_back=False)
  return out


def merge(params: Params, adapters: Adapters, subnet=None) -> Params:
  """Folds a subnet into plain parameters: same structure, shapes and dtypes.

  A layer without bias gains one when the subnet gives it a bias term (GLoRA's
  C, E): the plain model must then be built with biases on that layer."""
  out, _ = _fold(params, adapters, subnet, modes=('weight', 'activation'),
                 add_missing_bias=True, cast_back=True)
  return out


@contextlib.contextmanager
def activation_hooks(adapters: Adapters, subnet=None, extra_bias: Mapping[str, Any] | None = None):
  """The one interception point for adapters that act on activations.

  Inside this context, a call of a Flax module whose path is an adapted layer of
  activation mode returns `family.activation(params, choice, x, y, kernel, bias)`
  instead of y; `extra_bias` adds bias deltas to bias-less layers. Models are
  untouched and never import adapters (flax.linen.intercept_methods)."""
  spec = adapters.spec
  subnet = _check_subnet(spec, subnet)
  index = {l.path: i for i, l in enumerate(spec.layers) if l.family.mode == 'activation'}
  extra_bias = dict(extra_bias or {})
  if not index and not extra_bias:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = '/'.join(context.module.path)
    if path not in index and path not in extra_bias:
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    if path in extra_bias:
      y = y + extra_bias[path].astype(y.dtype)
    if path in index:
      i = index[path]
      variables = context.module.variables['params']
      y = spec.layers[i].family.activation(adapters.params[path], subnet[i], args[0], y,
                                           variables['kernel'], variables.get('bias'))
    return y

  with nn.intercept_methods(interceptor):
    yield


def forward(model: nn.Module, params: Params, adapters: Adapters, subnet, *args,
            **kwargs):
  """`model.apply` with the adapters: weight-mode ones folded into the params,
  activation-mode ones (and biases of bias-less layers) through the hooks."""
  folded, missing = _fold(params, adapters, subnet, modes=('weight',),
                          add_missing_bias=False, cast_back=False)
  inner, _ = _unwrap(folded)
  with activation_hooks(adapters, subnet, extra_bias=missing):
    return model.apply({'params': inner}, *args, **kwargs)


# --------------------------------------------------------------------------- #
# Trainable / frozen split
# --------------------------------------------------------------------------- #


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


# --------------------------------------------------------------------------- #
# Parameter report
# --------------------------------------------------------------------------- #


def _num_params(tree) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


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
  subnet = np.asarray(_check_subnet(spec, subnet))
  rows = []
  for i, layer in enumerate(spec.layers):
    fam = layer.family
    active = int(spec.fixed_costs[i] + sum(
        spec.option_costs[i, j, subnet[i, j]] for j in range(len(fam.supports))))
    choice = ','.join(f'{s}={fam.options(s)[subnet[i, j]]}' for j, s in enumerate(fam.supports))
    rows.append((layer.path, fam.name, choice or '-', active,
                 _num_params(adapters.params[layer.path])))
  return Report(rows=rows, adapter_params=sum(r[3] for r in rows),
                stored_adapter_params=_num_params(adapters.params),
                head_params=_num_params(head) if head is not None else 0,
                backbone_params=_num_params(_unwrap(params)[0]))
