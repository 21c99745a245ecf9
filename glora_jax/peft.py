"""Adapters as pytree transforms, and inside the model: the library's PEFT API.

`apply` / `merge` fold a chosen subnet into the parameters (`merge`: the original
structure, shapes and dtypes); `forward` runs a model with the adapters built
inside its own Dense layers (`AdapterHooks`, the one interception point), which
also dequantizes a quantized frozen kernel (glora_jax.quant) inside its layer.
Re-exported here so that one import serves a user: `attach`, `AdapterSpec`,
`Adapters`, `check_subnet`, `report` (glora_jax.adapter_spec) and `partition`,
`combine`, `flatten`, `unflatten` (glora_jax.paths).
"""
from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glora_jax import quant
from glora_jax.adapter_spec import (  # noqa: F401 (part of peft's API)
    AdapterSpec, Adapters, LayerSpec, Report, attach, check_subnet, chosen_option_costs, report)
from glora_jax.models import plain, stacking
from glora_jax.paths import (  # noqa: F401 (part of peft's API)
    combine, examples, flatten, match_paths, natural_key, partition, rewrap, unflatten, unwrap)

Params = Mapping[str, Any]


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
  inner, wrapped = unwrap(params)
  adapters = adapters.replace(params=stacking.per_layer(adapters.params, spec.paths))
  # A scan_layers model's stacked params fold per layer and come back stacked.
  stack = stacking.infer(spec.paths, inner)
  inner = stacking.unstack(inner, stack)
  # A quantized base merges from the dequantized W0 the adapted model computes with,
  # and comes out as plain float params (each kernel in its QuantizedArray's dtype).
  flat = {k: quant.dequantize(v) if quant.is_quantized(v) else v
          for k, v in flatten(inner).items()}
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
  return rewrap(stacking.stack(unflatten(flat), stack), wrapped)


def apply(params: Params, adapters: Adapters, subnet=None) -> Params:
  """Params with every adapter folded in, float32 where adapted (a merge without
  the cast back). A bias leaf added to a bias-less layer is read only by a model
  built with a bias there; `forward` needs no such model."""
  return _fold(params, adapters, subnet, modes=('weight', 'activation'), cast_back=False)


def merge(params: Params, adapters: Adapters, subnet=None) -> Params:
  """Folds a subnet into plain parameters: same structure, shapes and dtypes.

  A layer without bias gains one when the subnet gives it a bias term (GLoRA's
  C, E): the plain model must then be built with biases on that layer, and Flax
  ignores the bias without a word when it is not. `merge_model` returns the model
  that reads the merged params; use it unless you build that model yourself.
  Quantized kernels (glora_jax.quant) come out dequantized, in their own dtype,
  adapted from the dequantized W0 the adapted model computes with."""
  return _fold(params, adapters, subnet, modes=('weight', 'activation'), cast_back=True)


def merge_model(model: nn.Module, params: Params, adapters: Adapters,
                subnet=None) -> tuple[nn.Module, Params]:
  """(plain model, merged params): `merge`, and the model of the registered family
  that reads every merged leaf (`models.plain.plain_model`: a bias GLoRA's C or E
  gave a bias-less layer switches its family's bias flag on, e.g. Llama's
  attention_bias), so `plain.apply({'params': merged}, ...)` gives the adapted
  outputs. Raises ExportError when no model of the family can hold the params."""
  inner, _ = unwrap(params)
  return plain.plain_model(model, merge(inner, adapters, subnet))


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


def _adapted_layer(module: nn.Dense, family, params, choice, x, kernel, bias, plain=None):
  """One Dense layer's output with its adapter (family None: none) built from
  `kernel`: weight mode computes with K' = K + dK, b' = b + db; activation mode
  passes the plain output (`plain()`, default `_dense` of the kernel) to the family."""
  if family is None:
    return _dense(module, x, kernel, bias)
  if family.mode == 'weight':
    dk, db = family.delta(params, choice, kernel, bias)
    new_kernel = kernel.astype(jnp.float32) + dk
    new_bias = bias if db is None else (db if bias is None else bias.astype(jnp.float32) + db)
    return _dense(module, x, new_kernel, new_bias)
  y = _dense(module, x, kernel, bias) if plain is None else plain()
  return family.activation(params, choice, x, y, kernel, bias)


def _quantized_layer(module: nn.Dense, family, params, choice, x, kernel, bias):
  """`_adapted_layer` on the dequantized kernel, under jax.checkpoint: the backward
  pass dequantizes again instead of keeping the float kernel as a residual, so only
  the layer being run holds its float kernel, in training as in inference."""
  def layer(kernel, bias, params, choice, x):
    return _adapted_layer(module, family, params, choice, x, quant.dequantize(kernel), bias)
  return jax.checkpoint(layer)(kernel, bias, params, choice, x)


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
  A Dense layer whose kernel is a glora_jax.quant.QuantizedArray, adapted or not,
  computes from its dequantized kernel, dequantized inside its own call (and again
  in the backward pass); adapters (`delta`, `activation`: GLoRA's W0 * A and W0 @ C)
  receive that float kernel. `adapters` None: only quantized kernels are handled.
  Models are untouched and never import adapters (flax.linen.intercept_methods).

  Layers under nn.scan (a scan_layers model; `stack`, models/stacking.Stack) run as
  one module, 'layers/self_attn/q_proj' for every 'layers_{i}/self_attn/q_proj': the
  per-layer adapter params (or adapter params already held stacked under that path,
  `stacking.stack_by_path`: a scan_layers run trains them so) and subnet rows are
  stacked into the 'adapter' variable
  collection (`collections()`, passed to model.apply beside the params), which the
  scan slices per layer like the kernels, so each block reads its own layer's adapter
  and choice. Every block must then carry the same adapter on that module.
  On a normal exit every adapted layer must have been called: a layer whose
  runtime path differs from its parameter path (a shared module, a scan the hooks
  were not told of) would otherwise be silently left unadapted."""

  def __init__(self, adapters: Adapters | None, subnet=None, check_all_called: bool = True,
               stack: stacking.Stack | None = None):
    self.spec = None if adapters is None else adapters.spec
    self.params = None if adapters is None else adapters.params
    if adapters is not None and stack is None:  # adapters stacked for a scan, model unrolled
      self.params = stacking.per_layer(self.params, self.spec.paths)
    self.subnet = None if adapters is None else check_subnet(self.spec, subnet)
    self.index = {} if adapters is None else {l.path: i for i, l in enumerate(self.spec.layers)}
    # stacked module path -> the spec indices of its layers 0..depth-1
    self.stacked: dict[str, list[int]] = {}
    if adapters is not None and stack is not None:
      for stacked, layer_paths in stacking.group_layers(self.spec.paths, stack).items():
        idx = [self.index[p] for p in layer_paths]
        kinds = {(self.spec.layers[i].family, self.spec.layers[i].kernel_shape) for i in idx}
        if len(kinds) > 1:
          raise ValueError(f"'{stacked}' carries different adapters or kernel shapes across "
                           f'layers ({len(kinds)} kinds); under scan_layers every block runs '
                           'one program: give each block the same adapter there')
        self.stacked[stacked] = idx
    self.check_all_called = check_all_called and adapters is not None
    self.called: set[str] = set()
    self._context = None

  def collections(self) -> dict:
    """{'adapter': ...} for model.apply's variables when layers are stacked (else {}):
    under each stacked module's path, its layers' adapter params stacked ('params')
    and their subnet rows ('choice', (depth, supports) int32)."""
    if not self.stacked:
      return {}
    flat = {}
    for stacked, idx in self.stacked.items():
      if stacked in self.params:  # held stacked (a scan_layers run's train state)
        params = self.params[stacked]
      else:
        layers = [self.params[self.spec.layers[i].path] for i in idx]
        params = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
      for leaf, value in flatten({'params': params}).items():
        flat[f'{stacked}/{leaf}'] = value
      flat[f'{stacked}/choice'] = jnp.asarray(self.subnet)[np.asarray(idx)]
    return {'adapter': unflatten(flat)}

  def _intercept(self, next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    module = context.module
    path = '/'.join(module.path)
    i = self.index.get(path)
    if i is None and path in self.stacked:
      return self._intercept_stacked(next_fun, args, kwargs, context, path)
    own = module.variables.get('params', {})
    quantized = [k for k, v in own.items() if quant.is_quantized(v)]
    if i is None and not quantized:
      return next_fun(*args, **kwargs)
    if not isinstance(module, nn.Dense):
      what = 'adapted layer' if i is not None else f'quantized {quantized} of layer'
      raise TypeError(f"{what} '{path}' is a {type(module).__name__}; adapters and quantized "
                      'kernels are intercepted in flax.linen.Dense layers only')
    kernel, bias = own['kernel'], own.get('bias')
    family = None if i is None else self.spec.layers[i].family
    params = None if i is None else self.params[path]
    choice = None if i is None else self.subnet[i]
    x = args[0]
    if i is not None:
      self.called.add(path)
    if quantized:
      return _quantized_layer(module, family, params, choice, x, kernel, bias)
    return _adapted_layer(module, family, params, choice, x, kernel, bias,
                          plain=lambda: next_fun(*args, **kwargs))

  def _intercept_stacked(self, next_fun, args, kwargs, context, path):
    """One block's call of a stacked adapted layer: its slice of the 'adapter'
    collection holds this layer's adapter params and subnet row."""
    module = context.module
    if not isinstance(module, nn.Dense):
      raise TypeError(f"adapted layer '{path}' is a {type(module).__name__}; adapters are "
                      'intercepted in flax.linen.Dense layers only')
    mine = module.variables.get('adapter')
    if mine is None:
      raise ValueError(f"stacked layer '{path}' got no 'adapter' collection: run the model "
                       'with {"params": ..., **hooks.collections()} (peft.forward does)')
    idx = self.stacked[path]
    self.called.update(self.spec.layers[i].path for i in idx)
    own = module.variables['params']
    family = self.spec.layers[idx[0]].family
    kernel, bias, x = own['kernel'], own.get('bias'), args[0]
    if quant.is_quantized(kernel):
      return _quantized_layer(module, family, mine['params'], mine['choice'], x, kernel, bias)
    return _adapted_layer(module, family, mine['params'], mine['choice'], x, kernel, bias,
                          plain=lambda: next_fun(*args, **kwargs))

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
            f"{examples(missed, 3)}; their runtime module path differs from their parameter "
            'path (nn.scan, a shared module) or the method run does not use them')
    return False


def adapter_hooks(adapters: Adapters | None, subnet=None, check_all_called: bool = True,
                  stack: stacking.Stack | None = None) -> AdapterHooks:
  """`with adapter_hooks(adapters, subnet) as h: model.apply({'params': p,
  **h.collections()}, ...)` runs the model with the adapters (see AdapterHooks)."""
  return AdapterHooks(adapters, subnet, check_all_called, stack)


def forward(model: nn.Module, params: Params, adapters: Adapters | None, subnet, *args,
            **kwargs):
  """`model.apply` with the adapters, each built inside its own layer's call
  (AdapterHooks): the frozen params are passed as they are (bf16 stays bf16,
  a quantized kernel is dequantized in its layer). adapters None: the plain model,
  through the hooks only where the params hold quantized kernels. Params of a
  scan_layers model (stacked layers) take the per-layer adapters as they are."""
  inner, _ = unwrap(params)
  if adapters is None and not quant.has_quantized(inner):
    return model.apply({'params': inner}, *args, **kwargs)
  stack = None if adapters is None else stacking.infer(adapters.spec.paths, inner)
  with adapter_hooks(adapters, subnet, stack=stack) as hooks:
    return model.apply({'params': inner, **hooks.collections()}, *args, **kwargs)
