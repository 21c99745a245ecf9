"""structured: FFT products and dense matrices against numpy loops written here from
the definitions, gradients against autodiff, and GLoRA's structured option names."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax.adapters import structured
from glora_jax.adapters.structured import Structure

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
dense = jax.jit(Structure.dense, static_argnums=0)
dense_and_matvec = jax.jit(lambda st, p, x: (st.dense(p), st.matvec(p, x)), static_argnums=0)


def assert_close(got, want, rtol):
  """Elementwise, with the tolerance relative to the largest entry (FFT errors spread)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


# --------------------------------------------------------------------------- #
# Products against the definitions
# --------------------------------------------------------------------------- #

STRUCTURES = (
    [Structure('circulant', n, n) for n in (7, 8, 64, 384, 1000)]
    + [Structure('toeplitz', n, n) for n in (7, 8, 64, 384, 1000)]
    + [Structure('symmetric_toeplitz', n, n) for n in (7, 64)]
    + [Structure('ldr', n, n, 3) for n in (7, 64)]
    + [Structure('block_circulant', 12, 12, 12), Structure('block_circulant', 63, 63, 7)]
    # rectangular: truncated square kinds, natural Toeplitz, divisible block / Kronecker
    + [Structure('circulant', 6, 9), Structure('circulant', 9, 6),
       Structure('toeplitz', 5, 12), Structure('toeplitz', 12, 5),
       Structure('symmetric_toeplitz', 5, 7), Structure('ldr', 9, 6, 2),
       Structure('block_circulant', 12, 8, 4), Structure('block_circulant', 9, 15, 3),
       Structure('kronecker', 8, 12, 4), Structure('kronecker', 15, 9, 3)])


@pytest.mark.parametrize('st', STRUCTURES, ids=lambda s: f'{s.kind}-{s.d_out}x{s.d_in}-{s.rank_or_block}')
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
  st = Structure('kronecker', 12, 8, 4)
  p = random_params(st)
  x = normal((5, 8), 100)
  kron = jnp.kron(p['B'], p['A'])
  np.testing.assert_allclose(st.dense(p), kron, rtol=1e-6)
  np.testing.assert_allclose(st.matvec(p, x), x @ kron.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('n', [5, 8, 64])
def test_skew_circulant_against_its_definition(n):
  # With g = e_0 the circulant factor is the identity, so the LDR matrix is Z-1(h).
  st = Structure('ldr', n, n, 1)
  h = normal((1, n), n)
  g = np.zeros((1, n), np.float32)
  g[0, 0] = 1.0
  got = np.asarray(dense(st, {'g': g, 'h': h}))
  want = np_skew_circulant(h[0])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert np.all(np.sign(np.triu(got, 1)) == -np.sign(np.triu(np_circulant(h[0], n, n), 1)))
  eta = structured._skew_eta(n).astype(np.complex128)
  assert abs(eta[1] ** n + 1) < 1e-6


# Differentiable dense builders written here, independent of structured's (LDR and symmetric
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
                for k in range(st.rank_or_block))
    return total[:st.d_out, :st.d_in]
  if st.kind == 'kronecker':
    return jnp.kron(p['B'], p['A'])
  b = st.rank_or_block
  return jnp.block([[p['c'][bp, bq][(np.arange(b)[:, None] - np.arange(b)) % b]
                     for bq in range(st.d_in // b)] for bp in range(st.d_out // b)])


@pytest.mark.parametrize('st', [
    Structure('circulant', 9, 9), Structure('circulant', 6, 10),
    Structure('toeplitz', 7, 4), Structure('symmetric_toeplitz', 6, 6),
    Structure('ldr', 7, 7, 2), Structure('ldr', 5, 8, 2),
    Structure('block_circulant', 6, 9, 3), Structure('kronecker', 6, 4, 2)],
    ids=lambda s: f'{s.kind}-{s.d_out}x{s.d_in}')
def test_fft_gradients_match_autodiff_through_dense(st):
  p = random_params(st)
  x, w = normal((4, st.d_in), 100), normal((4, st.d_out), 101)
  fft_loss = lambda p, x: jnp.sum(w * jnp.tanh(st.matvec(p, x)))
  dense_loss = lambda p, x: jnp.sum(w * jnp.tanh(x @ jnp_dense(st, p).T))
  both = lambda p, x: (jax.grad(fft_loss, (0, 1))(p, x), jax.grad(dense_loss, (0, 1))(p, x))
  got, want = jax.jit(both)(p, x)
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  jax.tree.map(lambda g, v: assert_close(g, v, 2e-5), got, want)  # atol per leaf: see assert_close


def test_dense_and_fft_products_agree_and_auto_picks_by_size():
  small = Structure('circulant', 8, 8)
  big = Structure('circulant', 1024, 1024)
  assert small.prefers_dense() and not big.prefers_dense()
  # LDR's FFT work grows with the displacement rank, so its crossover does too.
  assert not Structure('ldr', 768, 768, 1).prefers_dense()
  assert Structure('ldr', 768, 768, 4).prefers_dense()
  assert Structure('block_circulant', 768, 768, 4).prefers_dense()
  assert not Structure('kronecker', 8, 8, 2).prefers_dense()
  for st in (small, big):
    p = random_params(st)
    x = normal((2, st.d_in), 100)
    assert_close(st.product(p, x, 'dense'), st.product(p, x, 'fft'), 2e-5)


# --------------------------------------------------------------------------- #
# GLoRA's structured B option names
# --------------------------------------------------------------------------- #

structured_dense = jax.jit(structured.structured_dense, static_argnums=(0, 2, 3))


@pytest.mark.parametrize('name', ['circulant', 'toeplitz', 'symmetric_toeplitz',
                                  'block_circulant', 'block_circulant_8', 'kronecker_4', 'ldr_2'])
def test_structured_options_start_at_zero_and_count_their_params(name):
  for d_out, d_in in ((16, 16), (48, 16), (16, 48)):
    structured.check_structured(name, d_out, d_in, 'fc1')
    p = structured.init_structured(name, jax.random.key(0), d_out, d_in)
    assert (structured.structured_num_params(name, d_out, d_in)
            == sum(np.size(v) for v in p.values()))
    m = structured_dense(name, p, d_out, d_in)
    chex.assert_shape(m, (d_out, d_in))
    chex.assert_type(m, jnp.float32)
    assert not np.any(m)
    st = structured.structure_for(name, d_out, d_in)
    q = random_params(st)
    assert_close(structured_dense(name, q, d_out, d_in), np_dense(st, q), 1e-5)
