"""Which parameter leaves get which adapter, and adapters as pytree transforms.

`attach` finds Dense kernels by '/'-joined path regexes; `apply` / `forward` run a
model with adapted weights; `merge` folds a chosen subnet into plain parameters
with the original structure, shapes and dtypes; `partition` / `combine` split a
tree into trainable and frozen parts by path patterns; `report` counts parameters.
"""
from __future__ import annotations

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


def _fold(params, adapters: Adapters, subnet, *, modes, cast_back):
  """Folds the adapters of layers whose family mode is in `modes` into the
  kernels/biases; a bias-less layer that gets a bias term gains a bias leaf."""
  spec = adapters.spec
  subnet = check_subnet(spec, subnet)
  inner, wrapped = _unwrap(params)
  flat = dict(flatten(inner))
  deltas = _grouped_deltas(spec, adapters.params, subnet, flat, modes)
  for i, (dk, db) in deltas.items():
    layer = spec.layers[i]
    kernel = flat[f'{layer.path}/kernel']
    bias = flat.get(f'{layer.path}/bias')
    new_k = kernel.astype(jnp.float32) + dk
    flat[f'{layer.path}/kernel'] = new_k.astype(kernel.dtype) if cast_back else new_k
    if db is None:
      continue
    new_b = db if bias is None else bias.astype(jnp.float32) + db
    dtype = kernel.dtype if bias is None else bias.dtype
    flat[f'{layer.path}/bias'] = new_b.astype(dtype) if cast_back else new_b
  return _rewrap(unflatten(flat), wrapped)


def apply(params: Params, adapters: Adapters, subnet=None) -> Params:
  """Params with every adapter folded in, float32 where adapted (a merge without
  the cast back). A bias leaf added to a bias-less layer is read only by a model
  built with a bias there; `forward` needs no such model."""
  return _fold(params, adapters, subnet, modes=('weight', 'activation'), cast_back=False)


def merge(params: Params, adapters: Adapters, subnet=None) -> Params:
  """Folds a subnet into plain parameters: same structure, shapes and dtypes.

  A layer without bias gains one when the subnet gives it a bias term (GLoRA's
  C, E): the plain model must then be built with biases on that layer."""
  return _fold(params, adapters, subnet, modes=('weight', 'activation'), cast_back=True)


def _dense(module: nn.Dense, x, kernel, bias):
  """What `nn.Dense.__call__` computes, with the given kernel and bias (the
  module's own dtype promotion, precision and dot_general)."""
  x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
  if module.dot_general_cls is not None:
    dot_general = module.dot_general_cls()
  else:
    dot_general = module.dot_general or jax.lax.dot_general
  y = dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=module.precision)
  if bias is not None:
    y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
  return y


class AdapterHooks:
  """The one interception point: adapters enter the model inside its own layers.

  Used as a context manager around `model.apply`. A call of an adapted Dense
  layer (matched by its module path) is replaced:
    - weight mode: the layer computes with K' = K + dK and b' = b + db built
      right there, so only the layer being run holds its adapted kernel (and,
      under a rematerialised layer, nothing of it is kept for the backward pass);
      a bias-less layer gets the bias term GLoRA's C and E give it;
    - activation mode: `family.activation(params, choice, x, y, kernel, bias)`
      with y the plain layer's output (LoRA's low-rank path, SURM's FFT product).
  Models are untouched and never import adapters (flax.linen.intercept_methods).
  On a normal exit every adapted layer must have been called: a layer whose
  runtime path differs from its parameter path (e.g. under nn.scan) would
  otherwise be silently left unadapted."""

  def __init__(self, adapters: Adapters, subnet=None, check_all_called: bool = True):
    self.spec = adapters.spec
    self.params = adapters.params
    self.subnet = check_subnet(self.spec, subnet)
    self.index = {l.path: i for i, l in enumerate(self.spec.layers)}
    self.check_all_called = check_all_called
    self.called: set[str] = set()
    self._context = None

  def _intercept(self, next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = '/'.join(context.module.path)
    i = self.index.get(path)
    if i is None:
      return next_fun(*args, **kwargs)
    module = context.module
    if not isinstance(module, nn.Dense):
      raise TypeError(f"adapted layer '{path}' is a {type(module).__name__}; adapters "
                      'intercept flax.linen.Dense layers only')
    self.called.add(path)
    family = self.spec.layers[i].family
    variables = module.variables['params']
    kernel, bias = variables['kernel'], variables.get('bias')
    x = args[0]
    if family.mode == 'weight':
      dk, db = family.delta(self.params[path], self.subnet[i], kernel, bias)
      new_kernel = kernel.astype(jnp.float32) + dk
      new_bias = bias if db is None else (
          db if bias is None else bias.astype(jnp.float32) + db)
      return _dense(module, x, new_kernel, new_bias)
    y = next_fun(*args, **kwargs)
    return family.activation(self.params[path], self.subnet[i], x, y, kernel, bias)

  def __enter__(self):
    self.called = set()
    self._context = nn.intercept_methods(self._intercept)
    self._context.__enter__()
    return self

  def __exit__(self, *exc):
    self._context.__exit__(*exc)
    if exc[0] is None and self.check_all_called:
      missed = [p for p in self.spec.paths if p not in self.called]
      if missed:
        raise ValueError(
            f'{len(missed)} adapted layers were never called by the model, e.g. '
            f"{_examples(missed, 3)}; their runtime module path differs from their parameter "
            'path (nn.scan, a shared module) or the method run does not use them')
    return False


def adapter_hooks(adapters: Adapters, subnet=None, check_all_called: bool = True) -> AdapterHooks:
  """`with adapter_hooks(adapters, subnet): model.apply(...)` runs the model with
  the adapters (see AdapterHooks)."""
  return AdapterHooks(adapters, subnet, check_all_called)


def forward(model: nn.Module, params: Params, adapters: Adapters, subnet, *args,
            **kwargs):
  """`model.apply` with the adapters, each built inside its own layer's call
  (AdapterHooks): the frozen params are passed as they are (bf16 stays bf16)."""
  inner, _ = _unwrap(params)
  with adapter_hooks(adapters, subnet):
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
  subnet = np.asarray(check_subnet(spec, subnet))
  active = spec.layer_params(subnet)
  rows = []
  for i, layer in enumerate(spec.layers):
    fam = layer.family
    choice = ','.join(f'{s}={fam.options(s)[subnet[i, j]]}' for j, s in enumerate(fam.supports))
    rows.append((layer.path, fam.name, choice or '-', int(active[i]),
                 _num_params(adapters.params[layer.path])))
  return Report(rows=rows, adapter_params=sum(r[3] for r in rows),
                stored_adapter_params=_num_params(adapters.params),
                head_params=_num_params(head) if head is not None else 0,
                backbone_params=_num_params(_unwrap(params)[0]))
