"""surm: FFT products against dense matrices built here from the definitions, merge
against forward through peft, GLoRA's structured B options, and bad input."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import peft
from glora_jax.adapters import glora, surm

# --------------------------------------------------------------------------- #
# Dense matrices from the definitions (numpy loops, PyTorch layout (out, in))
# --------------------------------------------------------------------------- #


def np_circulant(c, d_out, d_in):
  n = len(c)
  m = np.zeros((d_out, d_in))
  for i in range(d_out):
    m[i] = [c[(i - j) % n] for j in range(d_in)]
  return m


def np_toeplitz(t, d_out, d_in):
  m = np.zeros((d_out, d_in))
  for i in range(d_out):
    m[i] = [t[i - j + d_in - 1] for j in range(d_in)]
  return m


def np_symmetric_toeplitz(v):
  n = len(v)
  return np.array([[v[abs(i - j)] for j in range(n)] for i in range(n)])


def np_skew_circulant(h):
  """Z-1(h): the circulant of first column h with the wrap-around entries negated."""
  n = len(h)
  m = np.zeros((n, n))
  for i in range(n):
    for j in range(n):
      m[i, j] = h[i - j] if i >= j else -h[i - j + n]
  return m


def np_ldr(g, h, d_out, d_in):
  n = g.shape[1]
  total = sum(np_circulant(g[i], n, n) @ np_skew_circulant(h[i]) for i in range(len(g)))
  return total[:d_out, :d_in]


def np_block_circulant(c):
  p, q, b = c.shape
  m = np.zeros((p * b, q * b))
  for bp in range(p):
    for bq in range(q):
      m[bp * b:(bp + 1) * b, bq * b:(bq + 1) * b] = np_circulant(c[bp, bq], b, b)
  return m


def np_dense(st, p):
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  if st.kind == 'circulant':
    return np_circulant(p['c'], st.d_out, st.d_in)
  if st.kind == 'toeplitz':
    return np_toeplitz(p['t'], st.d_out, st.d_in)
  if st.kind == 'symmetric_toeplitz':
    return (np_symmetric_toeplitz(p['b']) @ np_symmetric_toeplitz(p['a']))[:st.d_out, :st.d_in]
  if st.kind == 'block_circulant':
    return np_block_circulant(p['c'])
  if st.kind == 'kronecker':
    return np.kron(p['B'], p['A'])
  return np_ldr(p['g'], p['h'], st.d_out, st.d_in)


def normal(shape, seed=0):
  # numpy, not jax.random: each new shape costs jax.random a compile (~0.3 s on CPU).
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def random_params(st, seed=0):
  return {k: normal(s, seed + i) for i, (k, s) in enumerate(st.shapes().items())}


# Jitted once per structure: each eager op would compile on its own (slow on CPU).
dense = jax.jit(surm.Structure.dense, static_argnums=0)
dense_and_matvec = jax.jit(lambda st, p, x: (st.dense(p), st.matvec(p, x)), static_argnums=0)


def assert_close(got, want, rtol):
  """Elementwise, with the tolerance relative to the largest entry (FFT errors spread)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# --------------------------------------------------------------------------- #
# Products against the definitions
# --------------------------------------------------------------------------- #

STRUCTURES = (
    [surm.Structure('circulant', n, n) for n in (7, 8, 64, 384, 1000)]
    + [surm.Structure('toeplitz', n, n) for n in (7, 8, 64, 384, 1000)]
    + [surm.Structure('symmetric_toeplitz', n, n) for n in (7, 64)]
    + [surm.Structure('ldr', n, n, 3) for n in (7, 64)]
    + [surm.Structure('block_circulant', 12, 12, 12), surm.Structure('block_circulant', 63, 63, 7)]
    # rectangular: truncated square kinds, natural Toeplitz, divisible block / Kronecker
    + [surm.Structure('circulant', 6, 9), surm.Structure('circulant', 9, 6),
       surm.Structure('toeplitz', 5, 12), surm.Structure('toeplitz', 12, 5),
       surm.Structure('symmetric_toeplitz', 5, 7), surm.Structure('ldr', 9, 6, 2),
       surm.Structure('block_circulant', 12, 8, 4), surm.Structure('block_circulant', 9, 15, 3),
       surm.Structure('kronecker', 8, 12, 4), surm.Structure('kronecker', 15, 9, 3)])


@pytest.mark.parametrize('st', STRUCTURES, ids=lambda s: f'{s.kind}-{s.d_out}x{s.d_in}-{s.arg}')
def test_fft_product_and_dense_match_the_definition(st):
  p = random_params(st)
  x = normal((3, 2, st.d_in), 100)
  want = np_dense(st, p)
  assert want.shape == (st.d_out, st.d_in)
  got_dense, got_product = dense_and_matvec(st, p, x)
  assert_close(got_dense, want, 1e-5)
  assert_close(got_product, np.asarray(x, np.float64) @ want.T, 2e-5)
  assert st.num_params() == sum(np.size(v) for v in p.values())


def test_kronecker_is_jnp_kron_and_vec_trick():
  st = surm.Structure('kronecker', 12, 8, 4)
  p = random_params(st)
  x = normal((5, 8), 100)
  kron = jnp.kron(p['B'], p['A'])
  np.testing.assert_allclose(st.dense(p), kron, rtol=1e-6)
  np.testing.assert_allclose(st.matvec(p, x), x @ kron.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n', [5, 8, 64])
def test_skew_circulant_against_its_definition(n):
  # With g = e_0 the circulant factor is the identity, so the LDR matrix is Z-1(h).
  st = surm.Structure('ldr', n, n, 1)
  h = normal((1, n), n)
  g = np.zeros((1, n), np.float32)
  g[0, 0] = 1.0
  got = np.asarray(dense(st, {'g': g, 'h': h}))
  want = np_skew_circulant(h[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.sign(np.triu(got, 1)) == -np.sign(np.triu(np_circulant(h[0], n, n), 1)))
  eta = surm._skew_eta(n).astype(np.complex128)
  assert abs(eta[1] ** n + 1) < 1e-6


# Differentiable dense builders written here, independent of surm's (LDR and symmetric
# Toeplitz there are built by applying the FFT operator to the identity).
def jnp_dense(st, p):
  rows, cols = np.arange(st.d_out)[:, None], np.arange(st.d_in)[None, :]
  n = st.size
  ii, jj = np.arange(n)[:, None], np.arange(n)[None, :]
  if st.kind == 'circulant':
    return p['c'][(rows - cols) % n]
  if st.kind == 'toeplitz':
    return p['t'][rows - cols + st.d_in - 1]
  if st.kind == 'symmetric_toeplitz':
    sym = lambda v: v[np.abs(ii - jj)]
    return (sym(p['b']) @ sym(p['a']))[:st.d_out, :st.d_in]
  if st.kind == 'ldr':
    sign = np.where(ii >= jj, 1.0, -1.0)
    total = sum(p['g'][k][(ii - jj) % n] @ (sign * p['h'][k][(ii - jj) % n])
                for k in range(st.arg))
    return total[:st.d_out, :st.d_in]
  if st.kind == 'kronecker':
    return jnp.kron(p['B'], p['A'])
  b = st.arg
  return jnp.block([[p['c'][bp, bq][(np.arange(b)[:, None] - np.arange(b)) % b]
                     for bq in range(st.d_in // b)] for bp in range(st.d_out // b)])


@pytest.mark.parametrize('st', [
    surm.Structure('circulant', 9, 9), surm.Structure('circulant', 6, 10),
    surm.Structure('toeplitz', 7, 4), surm.Structure('symmetric_toeplitz', 6, 6),
    surm.Structure('ldr', 7, 7, 2), surm.Structure('ldr', 5, 8, 2),
    surm.Structure('block_circulant', 6, 9, 3), surm.Structure('kronecker', 6, 4, 2)],
    ids=lambda s: f'{s.kind}-{s.d_out}x{s.d_in}')
def test_fft_gradients_match_autodiff_through_dense(st):
  p = random_params(st)
  x, w = normal((4, st.d_in), 100), normal((4, st.d_out), 101)
  fft_loss = lambda p, x: jnp.sum(w * jnp.tanh(st.matvec(p, x)))
  dense_loss = lambda p, x: jnp.sum(w * jnp.tanh(x @ jnp_dense(st, p).T))
  both = lambda p, x: (jax.grad(fft_loss, (0, 1))(p, x), jax.grad(dense_loss, (0, 1))(p, x))
  got, want = jax.jit(both)(p, x)
  for g, v in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(g, v, 2e-5)


def test_dense_and_fft_products_agree_and_auto_picks_by_size():
  small = surm.Structure('circulant', 8, 8)
  big = surm.Structure('circulant', 1024, 1024)
  assert small.prefers_dense() and not big.prefers_dense()
  # LDR's FFT work grows with the displacement rank, so its crossover does too.
  assert not surm.Structure('ldr', 768, 768, 1).prefers_dense()
  assert surm.Structure('ldr', 768, 768, 4).prefers_dense()
  assert surm.Structure('block_circulant', 768, 768, 4).prefers_dense()
  assert not surm.Structure('kronecker', 8, 8, 2).prefers_dense()
  for st in (small, big):
    p = random_params(st)
    x = normal((2, st.d_in), 100)
    assert_close(st.product(p, x, 'dense'), st.product(p, x, 'fft'), 2e-5)


def test_bf16_inputs_are_computed_in_float32_and_returned_in_bf16():
  st = surm.Structure('circulant', 15, 15)
  p = random_params(st)
  x = jnp.asarray(normal((4, 15), 100), jnp.bfloat16)
  fam = surm.space('circulant')
  y = jnp.zeros((4, 15), jnp.bfloat16)
  out = fam.activation({'a': p['c'], 'b': jnp.ones(15)}, None, x, y,
                       jnp.zeros((15, 15), jnp.bfloat16), None)
  assert out.dtype == jnp.bfloat16
  want = np.asarray(x, np.float64) @ np_circulant(np.asarray(p['c']), 15, 15).T
  err = np.linalg.norm(np.asarray(out, np.float64) - want) / np.linalg.norm(want)
  assert err < 1e-2


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
  rules = [(f'{layer}/kernel', surm.space(kind, **kind_kw, **kw))
           for layer, (kind, kind_kw) in GROUPS[hidden][group].items()]
  return peft.attach(params, rules=rules)


forward = jax.jit(peft.forward, static_argnums=0)
merge = jax.jit(peft.merge)
apply = jax.jit(lambda model, variables, x: model.apply(variables, x), static_argnums=0)
structured_dense = jax.jit(surm.structured_dense, static_argnums=(0, 2, 3))


@pytest.mark.parametrize('hidden,group', CASES)
def test_lora_form_merged_equals_unmerged(hidden, group):
  model, params, x, _ = mlp_setup(surm.space(), hidden)
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
  model, params, x, _ = mlp_setup(surm.space())
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
  model, params, x, _ = mlp_setup(surm.space())
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
  fam = surm.space('circulant', form='adapter')
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
    fam = surm.space(kind, form=form)
    _, params, _, adapters = mlp_setup(fam, targets=r'fc1/kernel')
    assert adapters.spec.fixed_costs[0] == want, kind
    if form == 'lora':
      assert sum(np.size(v) for v in adapters.params['fc1'].values()) == want


def test_kronecker_scale_is_scale_over_rank():
  fam = surm.space('kronecker', rank=4, scale=2.0)
  p = fam.init(jax.random.key(0), (16, 8))
  p['B'] = jnp.ones_like(p['B'])
  dk, db = fam.delta(p, None, jnp.zeros((16, 8)), None)
  assert db is None and dk.shape == (16, 8)
  np.testing.assert_allclose(dk, 0.5 * np.kron(np.asarray(p['B']), np.asarray(p['A'])).T, rtol=1e-6)


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
  fam = glora.space(ranks=(4,), structured_b=('circulant',))
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


@pytest.mark.parametrize('name', ['circulant', 'toeplitz', 'symmetric_toeplitz',
                                  'block_circulant', 'block_circulant_8', 'kronecker_4', 'ldr_2'])
def test_structured_options_start_at_zero_and_count_their_params(name):
  for d_out, d_in in ((16, 16), (48, 16), (16, 48)):
    surm.check_structured(name, d_out, d_in, 'fc1')
    p = surm.init_structured(name, jax.random.key(0), d_out, d_in)
    assert surm.structured_num_params(name, d_out, d_in) == sum(np.size(v) for v in p.values())
    m = structured_dense(name, p, d_out, d_in)
    assert m.shape == (d_out, d_in) and m.dtype == jnp.float32
    assert not np.any(m)
    st = surm.structure_for(name, d_out, d_in)
    q = random_params(st)
    assert_close(structured_dense(name, q, d_out, d_in), np_dense(st, q), 1e-5)


def test_glora_structured_options_merge_equals_forward():
  fam = glora.space(ranks=(2,), structured_b=('toeplitz', 'kronecker_4', 'ldr_2'))
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
  _, params, _, _ = mlp_setup(surm.space())
  with pytest.raises(ValueError, match=r"kronecker with rank 5 cannot fit 'fc1' \(kernel 16x48.*"
                     r'rank 5 must divide both in and out.*families that fit: circulant'):
    peft.attach(params, surm.space('kronecker', rank=5), targets=r'fc1/kernel')
  with pytest.raises(ValueError, match=r"block_circulant with block 32 cannot fit 'fc1'.*"
                     r'gcd\(in, out\) = 16.*block in \{1, 2, 4, 8, 16\}'):
    peft.attach(params, surm.space('block_circulant', block=32), targets=r'fc1/kernel')
  with pytest.raises(ValueError, match=r"structured B option 'kronecker_5' cannot fit 'fc1'"):
    peft.attach(params, glora.space(structured_b=('kronecker_5',)), targets=r'fc1/kernel')


def test_unknown_names_and_bad_settings():
  with pytest.raises(ValueError, match=r"unknown kind 'circ'; expected one of \('circulant'"):
    surm.space('circ')
  with pytest.raises(ValueError, match=r"unknown structured family 'circulent'; allowed: "
                     r'circulant, toeplitz'):
    glora.space(structured_b=('circulent',))
  with pytest.raises(ValueError, match=r"unknown structured family 'ldr_0'"):
    surm.check_family_name('ldr_0')
  with pytest.raises(ValueError, match=r"form='adapter'.*needs mode='activation'"):
    surm.space(form='adapter', mode='weight')
  with pytest.raises(ValueError, match=r'scale 0 disables the update'):
    surm.space(scale=0.0)
  with pytest.raises(ValueError,
                     match=r"rank applies to \('kronecker', 'ldr'\), not to kind 'circulant'"):
    surm.space('circulant', rank=2)
  with pytest.raises(ValueError, match=r"unknown product 'slow'"):
    surm.space(product='slow')
  with pytest.raises(ValueError, match=r"init_std applies to .*not to kind 'toeplitz'"):
    surm.space('toeplitz', init_std=0.1)
