"""surm: the family's bf16 product, merge against forward through peft, GLoRA's
structured B options on a model, and bad input (the matrices: test_structured.py)."""
import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import peft
from glora_jax.adapters import glora, structured, surm
from test_structured import normal, np_circulant, random_params


class AgainstNumpyTest(chex.TestCase):
  """The family's pure functions, compiled and run op by op: jit must not change the answer."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_bf16_inputs_are_computed_in_float32_and_returned_in_bf16(self):
    st = structured.Structure('circulant', 15, 15)
    p = random_params(st)
    x = jnp.asarray(normal((4, 15), 100), jnp.bfloat16)
    fam = surm.family('circulant')
    y = jnp.zeros((4, 15), jnp.bfloat16)
    out = self.variant(fam.activation)({'a': p['c'], 'b': jnp.ones(15)}, None, x, y,
                                       jnp.zeros((15, 15), jnp.bfloat16), None)
    assert out.dtype == jnp.bfloat16
    want = np.asarray(x, np.float64) @ np_circulant(np.asarray(p['c']), 15, 15).T
    err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
    assert err < 1e-2

  @chex.variants(with_jit=True, without_jit=True)
  def test_kronecker_scale_is_scale_over_rank(self):
    fam = surm.family('kronecker', rank=4, scale=2.0)
    p = self.variant(fam.init, static_argnums=1)(jax.random.key(0), (16, 8))
    p['B'] = jnp.ones_like(p['B'])
    dk, db = self.variant(fam.delta)(p, None, jnp.zeros((16, 8)), None)
    assert db is None
    chex.assert_shape(dk, (16, 8))
    want = 0.5 * np.kron(np.asarray(p['B']), np.asarray(p['A'])).T
    np.testing.assert_allclose(dk, want, rtol=1e-6)


# --------------------------------------------------------------------------- #
# Through peft on a small Flax model
# --------------------------------------------------------------------------- #


class MLP(nn.Module):
  hidden: int = 48

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(self.hidden, name='fc1')(x))
    x = nn.Dense(16, name='fc2', use_bias=False)(x)
    x = nn.gelu(nn.Dense(16, name='fc3')(x))
    return nn.Dense(3, name='head')(x)


@functools.lru_cache(maxsize=None)
def mlp(hidden):
  model = MLP(hidden)
  x = normal((4, 16), 7)
  params = jax.jit(model.init)(jax.random.key(1), x)['params']
  return model, params, x


def mlp_setup(family, hidden=48, targets=r'fc\d/kernel'):
  model, params, x = mlp(hidden)
  return model, params, x, peft.attach(params, family, targets=targets)


def perturbed(adapters, seed=0, scale=0.3):
  leaves, tree = jax.tree.flatten(adapters.params)
  new = [scale * normal(l.shape, seed + i) for i, l in enumerate(leaves)]
  return adapters.replace(params=jax.tree.unflatten(tree, new))


# Kinds spread over the three adapted layers (fc1 16->hidden, fc2 hidden->16, fc3
# 16->16) with `peft.attach(rules=...)`, so one model compile checks three kinds.
GROUPS = {
    48: [dict(fc1=('circulant', {}), fc2=('toeplitz', {}), fc3=('ldr', {'rank': 2})),
         dict(fc1=('symmetric_toeplitz', {}), fc2=('block_circulant', {}),
              fc3=('kronecker', {'rank': 4})),
         dict(fc1=('block_circulant', {'block': 4}), fc2=('kronecker', {'rank': 2}),
              fc3=('circulant', {}))],
    45: [dict(fc1=('circulant', {}), fc2=('ldr', {'rank': 2}), fc3=('toeplitz', {})),
         dict(fc1=('toeplitz', {}), fc2=('symmetric_toeplitz', {}),
              fc3=('block_circulant', {'block': 8})),
         dict(fc1=('block_circulant', {}), fc2=('circulant', {}), fc3=('kronecker', {'rank': 4}))],
}
CASES = [(h, g) for h in GROUPS for g in range(len(GROUPS[h]))]


def attach_group(params, hidden, group, **kw):
  rules = [(f'{layer}/kernel', surm.family(kind, **kind_kw, **kw))
           for layer, (kind, kind_kw) in GROUPS[hidden][group].items()]
  return peft.attach(params, rules=rules)


forward = jax.jit(peft.forward, static_argnums=0)
merge = jax.jit(peft.merge)
apply = jax.jit(lambda model, variables, x: model.apply(variables, x), static_argnums=0)


@pytest.mark.parametrize('hidden,group', CASES)
def test_lora_form_merged_equals_unmerged(hidden, group):
  model, params, x, _ = mlp_setup(surm.family(), hidden)
  adapters = perturbed(attach_group(params, hidden, group, scale=0.7))
  out = forward(model, params, adapters, None, x)
  merged = merge(params, adapters, None)
  for layer in GROUPS[hidden][group]:
    assert not np.allclose(merged[layer]['kernel'], params[layer]['kernel'], atol=1e-3)
  want = apply(model, {'params': merged}, x)
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  # Weight mode folds the same delta; the dense product gives the same outputs.
  for kw in (dict(mode='weight'), dict(product='dense')) if hidden == 48 else ():
    layers = tuple(dataclasses.replace(l, family=dataclasses.replace(l.family, **kw))
                   for l in adapters.spec.layers)
    other = adapters.replace(spec=peft.AdapterSpec(layers))
    np.testing.assert_allclose(forward(model, params, other, None, x), want,
                               rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_lora_form_under_jit_with_bf16_model():
  model, params, x, _ = mlp_setup(surm.family())
  adapters = perturbed(attach_group(params, 48, 0, scale=0.7))
  want = np.asarray(forward(model, params, adapters, None, x), np.float64)
  to16 = lambda t: jax.tree.map(lambda a: a.astype(jnp.bfloat16), t)
  got = forward(model, to16(params), adapters.replace(params=to16(adapters.params)), None,
                x.astype(jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  err = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
  assert err < 1e-2


@pytest.mark.parametrize('form', ['lora', 'adapter'])
@pytest.mark.parametrize('group', range(2))  # groups 0 and 1 hold all six kinds
def test_zero_init_equals_base_model_and_still_trains(form, group):
  model, params, x, _ = mlp_setup(surm.family())
  adapters = attach_group(params, 48, group, form=form)
  base = apply(model, {'params': params}, x)  # both jitted: jit and eager differ in the last bit
  np.testing.assert_array_equal(forward(model, params, adapters, None, x), base)
  # The zero factor gets a gradient at init (no zero trainable scale to block it).
  loss = lambda a: jnp.sum(peft.forward(model, params, a, None, x) ** 2)
  grads = jax.jit(jax.grad(loss))(adapters)
  for path, g in grads.params.items():
    init = adapters.params[path]
    zero = [k for k in g if k != 'bias' and not np.any(init[k])]
    assert zero, f'{path}: no zero-initialised factor'
    assert all(np.any(g[k]) for k in zero), f'{path}: zero factor {zero} gets no gradient'


def test_adapter_form_is_h_plus_gelu_mh_plus_bias_and_does_not_merge():
  fam = surm.family('circulant', form='adapter')
  model, params, x, adapters = mlp_setup(fam, targets=r'fc2/kernel')
  assert not fam.mergeable and fam.mode == 'activation'
  assert adapters.spec.fixed_costs[0] == 2 * 16 + 16
  adapters = perturbed(adapters)
  out = forward(model, params, adapters, None, x)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  ad = jax.tree.map(lambda a: np.asarray(a, np.float64), adapters.params['fc2'])
  gelu = lambda v, exact=False: np.asarray(jax.nn.gelu(v, approximate=not exact), np.float64)
  h = gelu(np.asarray(x, np.float64) @ p['fc1']['kernel'] + p['fc1']['bias'])
  y = h @ p['fc2']['kernel']
  m = np_circulant(ad['a'] * ad['b'], 16, 16)
  y = y + gelu(y @ m.T, exact=True) + ad['bias']  # the model's GELU is tanh, the adapter's erf
  h = gelu(y @ p['fc3']['kernel'] + p['fc3']['bias'])
  want = h @ p['head']['kernel'] + p['head']['bias']
  np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)

  with pytest.raises(ValueError, match=r"'fc2': the surm adapter is not linear"):
    peft.merge(params, adapters)
  with pytest.raises(ValueError, match=r"nonlinear and has no weight delta; use form='lora'"):
    fam.delta(adapters.params['fc2'], None, params['fc2']['kernel'], None)


def test_costs_count_trainable_parameters():
  cases = {('circulant', 'lora'): 2 * 48, ('circulant', 'adapter'): 2 * 48 + 48,
           ('toeplitz', 'lora'): 16 + 48 - 1, ('block_circulant', 'lora'): 16 * 48 // 16,
           ('kronecker', 'lora'): 16 + 48, ('ldr', 'lora'): 2 * 48}
  for (kind, form), want in cases.items():
    fam = surm.family(kind, form=form)
    _, params, _, adapters = mlp_setup(fam, targets=r'fc1/kernel')
    assert adapters.spec.fixed_costs[0] == want, kind
    if form == 'lora':
      assert sum(np.size(v) for v in adapters.params['fc1'].values()) == want


# --------------------------------------------------------------------------- #
# Structured options of GLoRA's B
# --------------------------------------------------------------------------- #


def glora_subnet(adapters, choices):
  """{layer path: {support: option}} -> the int subnet array (others 'none')."""
  spec = adapters.spec
  rows = []
  for layer in spec.layers:
    fam, pick = layer.family, choices.get(layer.path, {})
    rows.append([fam.options(s).index(pick.get(s, 'none')) for s in fam.supports])
  return jnp.asarray(rows, jnp.int32)


def test_glora_structured_circulant_b_is_w0_plus_c():
  fam = glora.family(ranks=(4,), structured_b=('circulant',))
  assert 'circulant' in fam.options('B')
  model, params, x, adapters = mlp_setup(fam, targets=r'fc[13]/kernel')
  # Zero-initialised: every layer starts at the base model even with circulant chosen.
  subnet = glora_subnet(adapters, {'fc1': {'B': 'circulant'}, 'fc3': {'B': 'circulant'}})
  for path in ('fc1', 'fc3'):
    assert not np.any(adapters.params[path]['B_structured']['circulant']['c'])
  np.testing.assert_array_equal(forward(model, params, adapters, subnet, x),
                                apply(model, {'params': params}, x))

  adapters = perturbed(adapters)
  merged = merge(params, adapters, subnet)
  for path, (d_out, d_in) in {'fc1': (48, 16), 'fc3': (16, 16)}.items():
    c = np.asarray(adapters.params[path]['B_structured']['circulant']['c'], np.float64)
    assert c.shape == (max(d_out, d_in),)
    want = np.asarray(params[path]['kernel'], np.float64) + np_circulant(c, d_out, d_in).T
    np.testing.assert_allclose(merged[path]['kernel'], want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(merged[path]['bias'], params[path]['bias'], atol=0)

  b = fam.supports.index('B')
  opt = fam.options('B').index('circulant')
  assert adapters.spec.option_costs[1, b, opt] == 16  # square fc3: n parameters
  assert adapters.spec.option_costs[0, b, opt] == 48  # fc1: truncated circulant of size 48
  want = apply(model, {'params': merged}, x)
  np.testing.assert_allclose(forward(model, params, adapters, subnet, x), want,
                             rtol=1e-5, atol=1e-6)


def test_glora_structured_options_merge_equals_forward():
  fam = glora.family(ranks=(2,), structured_b=('toeplitz', 'kronecker_4', 'ldr_2'))
  # fc1 and fc3 have biases, so the C terms merge into this MLP as built.
  model, params, x, adapters = mlp_setup(fam, targets=r'fc[13]/kernel')
  adapters = perturbed(adapters, scale=0.1)
  for name in fam.structured_b:
    subnet = glora_subnet(adapters, {p: {'B': name, 'A': 'lora_2', 'C': 'vector'}
                                     for p in adapters.spec.paths})
    want = apply(model, {'params': merge(params, adapters, subnet)}, x)
    np.testing.assert_allclose(forward(model, params, adapters, subnet, x), want,
                               rtol=1e-5, atol=1e-5 * np.abs(want).max())


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_family_that_cannot_fit_names_layer_and_what_fits():
  _, params, _, _ = mlp_setup(surm.family())
  with pytest.raises(ValueError, match=r"kronecker with rank 5 cannot fit 'fc1' \(kernel 16x48.*"
                     r'rank 5 must divide both in and out.*families that fit: circulant'):
    peft.attach(params, surm.family('kronecker', rank=5), targets=r'fc1/kernel')
  with pytest.raises(ValueError, match=r"block_circulant with block 32 cannot fit 'fc1'.*"
                     r'gcd\(in, out\) = 16.*block in \{1, 2, 4, 8, 16\}'):
    peft.attach(params, surm.family('block_circulant', block=32), targets=r'fc1/kernel')
  with pytest.raises(ValueError, match=r"structured B option 'kronecker_5' cannot fit 'fc1'"):
    peft.attach(params, glora.family(structured_b=('kronecker_5',)), targets=r'fc1/kernel')


def test_unknown_names_and_bad_settings():
  with pytest.raises(ValueError, match=r"unknown kind 'circ'; expected one of \('circulant'"):
    surm.family('circ')
  with pytest.raises(ValueError, match=r"unknown structured family 'circulent'; allowed: "
                     r'circulant, toeplitz'):
    glora.family(structured_b=('circulent',))
  with pytest.raises(ValueError, match=r"unknown structured family 'ldr_0'"):
    structured.check_family_name('ldr_0')
  with pytest.raises(ValueError, match=r"form='adapter'.*needs mode='activation'"):
    surm.family(form='adapter', mode='weight')
  with pytest.raises(ValueError, match=r'scale 0 disables the update'):
    surm.family(scale=0.0)
  with pytest.raises(ValueError,
                     match=r"rank applies to \('kronecker', 'ldr'\), not to kind 'circulant'"):
    surm.family('circulant', rank=2)
  with pytest.raises(ValueError, match=r"unknown product 'slow'"):
    surm.family(product='slow')
  with pytest.raises(ValueError, match=r"init_std applies to .*not to kind 'toeplitz'"):
    surm.family('toeplitz', init_std=0.1)
