"""Structured matrices (circulant, Toeplitz, Kronecker, LDR, block-circulant) and their
FFT products; SURM's M and GLoRA's structured B options are both built from them.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('circulant', 'toeplitz', 'symmetric_toeplitz', 'block_circulant', 'kronecker', 'ldr')
# Kinds whose `Structure.rank_or_block` is a rank (Kronecker r, LDR displacement rank k).
RANKED_KINDS = ('kronecker', 'ldr')

# Standard deviation of the nonzero factor where a kind has one, as in the authors'
# code (the zero factor makes M = 0 at start). Kronecker's A is Kaiming-uniform instead.
_DEFAULT_STD = {'symmetric_toeplitz': 0.02, 'ldr': 0.02}

# product='auto' multiplies by the materialised dense matrix below these sizes and by
# FFTs from them on (`Structure.prefers_dense`): n = max(in, out) for circulant,
# Toeplitz and symmetric Toeplitz; n below 'ldr' times the displacement rank k (its
# FFT work grows with k, the dense matmul's does not); for block-circulant a block b
# below 'block_circulant' (or n below the circulant's entry). They are the crossovers
# measured with benchmarks/surm_products.py (forward + backward on x of shape
# (32, 128, n), float32, XLA:CPU, 2 shared cores; table in BENCHMARKS.md): circulant
# dense/fft time 0.9-1.2 at n = 128, >= 1.07 from 256; Toeplitz and symmetric
# Toeplitz (FFTs of length ~2n, two of them for the latter) cross between 384 and
# 768; LDR between 384-768 (k = 1), 768-1024 (k = 2), 1024-2048 (k = 4);
# block-circulant at n = 768 between b = 4 and 16. On an accelerator the dense
# matmul is relatively faster: re-measure there before trusting these.
DENSE_BELOW = {'circulant': 256, 'toeplitz': 768, 'symmetric_toeplitz': 768, 'ldr': 512,
               'block_circulant': 16}


def _fft_len(m: int) -> int:
  """Smallest 2^a 3^b 5^c >= m: an FFT length every backend handles fast, with at
  most 25% padding instead of the up to 100% of the next power of two."""
  best = 1 << max(0, (m - 1).bit_length())
  p5 = 1
  while p5 < best:
    p3 = p5
    while p3 < best:
      p2 = p3
      while p2 < m:
        p2 *= 2
      best = min(best, p2)
      p3 *= 3
    p5 *= 5
  return best


def _pad_to(x, n):
  extra = n - x.shape[-1]
  if extra == 0:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def _toeplitz_product(t, x, d_out):
  """T x for the Toeplitz T[i, j] = t[i - j + d_in - 1] of shape (d_out, d_in), x of
  shape (..., d_in): T sits in the top-left corner of a circulant of length
  L >= d_in + d_out - 1 whose first column is t[d_in - 1:], zeros, t[:d_in - 1]."""
  d_in = x.shape[-1]
  length = _fft_len(d_in + d_out - 1)
  gap = jnp.zeros((length - (d_in + d_out - 1),), t.dtype)
  column = jnp.concatenate([t[d_in - 1:], gap, t[:d_in - 1]])
  y = jnp.fft.irfft(jnp.fft.rfft(x, n=length) * jnp.fft.rfft(column, n=length), n=length)
  return y[..., :d_out]


def _symmetric_to_toeplitz(v):
  """S(v)[i, j] = v[|i - j|] as the Toeplitz vector t[i - j + n - 1]."""
  return jnp.concatenate([v[:0:-1], v])


def _skew_eta(n: int) -> np.ndarray:
  # eta_j = exp(i pi j / n) computed directly, so eta^n = -1 to rounding; the
  # authors' root finder returns a root with |eta^n + 1| of about 0.75.
  return np.exp(1j * np.pi * np.arange(n) / n).astype(np.complex64)


# --------------------------------------------------------------------------- #
# One structured matrix, PyTorch layout (d_out, d_in)
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Structure:
  """A structured matrix M of shape (d_out, d_in) acting as y = M x on the last axis.

  kind and parameters (all float32 inside; `size` = max(d_out, d_in)):
    circulant          c (size,): C[i, j] = c[(i - j) mod size]; first column c
    toeplitz           t (d_out + d_in - 1,): T[i, j] = t[i - j + d_in - 1]
    symmetric_toeplitz a, b (size,): S(b) S(a) with S(v)[i, j] = v[|i - j|]
    block_circulant    c (d_out/b, d_in/b, b): block (p, q) is C(c[p, q]); b = rank_or_block
    kronecker          A (r, d_in/r), B (d_out/r, r): kron(B, A); r = rank_or_block
    ldr                g, h (k, size): sum_i Z1(g_i) Z-1(h_i); k = rank_or_block; Z1
                       circulant, Z-1 skew-circulant (entries above the diagonal negated)
  circulant, symmetric_toeplitz and ldr are square; on a rectangular layer they keep
  the top-left (d_out, d_in) corner of the size x size matrix ("truncated"). Toeplitz
  is rectangular by nature; block-circulant and Kronecker need divisibility.
  """

  kind: str
  d_out: int
  d_in: int
  rank_or_block: int = 0  # block size b (block_circulant) or rank r, k (kronecker, ldr)

  @property
  def size(self) -> int:
    return max(self.d_out, self.d_in)

  def prefers_dense(self) -> bool:
    """Whether product='auto' uses the dense matmul (see `DENSE_BELOW`)."""
    if self.kind == 'kronecker':  # two small matmuls always beat the dense one
      return False
    if self.kind == 'block_circulant':
      return self.rank_or_block < DENSE_BELOW['block_circulant'] or self.size < DENSE_BELOW['circulant']
    if self.kind == 'ldr':
      return self.size < DENSE_BELOW['ldr'] * self.rank_or_block
    return self.size < DENSE_BELOW[self.kind]

  def describe(self) -> str:
    if self.kind == 'block_circulant':
      return f'block_circulant with block {self.rank_or_block}'
    if self.kind in RANKED_KINDS:
      return f'{self.kind} with rank {self.rank_or_block}'
    return self.kind

  def fit_error(self) -> str | None:
    """Why this structure cannot have shape (d_out, d_in), or None."""
    g = math.gcd(self.d_out, self.d_in)
    if self.kind == 'block_circulant' and (self.rank_or_block <= 0 or g % self.rank_or_block):
      return f'block {self.rank_or_block} must divide gcd(in, out) = {g}'
    if self.kind == 'kronecker' and (self.rank_or_block <= 0 or g % self.rank_or_block):
      return f'rank {self.rank_or_block} must divide both in and out (gcd {g})'
    if self.kind == 'ldr' and self.rank_or_block <= 0:
      return f'displacement rank {self.rank_or_block} must be positive'
    return None

  def shapes(self) -> dict[str, tuple[int, ...]]:
    n, o, i, a = self.size, self.d_out, self.d_in, self.rank_or_block
    return {
        'circulant': lambda: {'c': (n,)},
        'toeplitz': lambda: {'t': (o + i - 1,)},
        'symmetric_toeplitz': lambda: {'a': (n,), 'b': (n,)},
        'block_circulant': lambda: {'c': (o // a, i // a, a)},
        'kronecker': lambda: {'A': (a, i // a), 'B': (o // a, a)},
        'ldr': lambda: {'g': (a, n), 'h': (a, n)},
    }[self.kind]()

  def num_params(self) -> int:
    return int(sum(math.prod(s) for s in self.shapes().values()))

  def init(self, key, dtype=jnp.float32, std: float | None = None) -> dict:
    """M = 0 at start: single-vector kinds are zero, two-factor kinds have one zero
    factor and one random (so the zero one receives gradient)."""
    shapes = self.shapes()
    if self.kind == 'kronecker':
      # kaiming_uniform_(a=sqrt(5)) on A, as the authors and PEFT's LoRA.
      bound = 1.0 / math.sqrt(shapes['A'][1])
      return {'A': jax.random.uniform(key, shapes['A'], dtype, -bound, bound),
              'B': jnp.zeros(shapes['B'], dtype)}
    std = _DEFAULT_STD.get(self.kind) if std is None else std
    if self.kind == 'symmetric_toeplitz':
      return {'a': std * jax.random.normal(key, shapes['a'], dtype),
              'b': jnp.zeros(shapes['b'], dtype)}
    if self.kind == 'ldr':
      return {'g': jnp.zeros(shapes['g'], dtype),
              'h': std * jax.random.normal(key, shapes['h'], dtype)}
    return {k: jnp.zeros(s, dtype) for k, s in shapes.items()}

  # --- products -------------------------------------------------------------
  def matvec(self, params, x):
    """M x along the last axis of x (..., d_in) -> (..., d_out), float32, FFT-based
    (Kronecker: two small matmuls). `irfft` always gets n: odd n otherwise loses one."""
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    x = jnp.asarray(x, jnp.float32)
    n, kind = self.size, self.kind
    if kind == 'circulant':
      y = jnp.fft.irfft(jnp.fft.rfft(x, n=n) * jnp.fft.rfft(p['c'], n=n), n=n)
      return y[..., :self.d_out]
    if kind == 'toeplitz':
      return _toeplitz_product(p['t'], x, self.d_out)
    if kind == 'symmetric_toeplitz':
      z = _toeplitz_product(_symmetric_to_toeplitz(p['a']), _pad_to(x, n), n)
      return _toeplitz_product(_symmetric_to_toeplitz(p['b']), z, n)[..., :self.d_out]
    if kind == 'block_circulant':
      b = self.rank_or_block
      xb = x.reshape(x.shape[:-1] + (self.d_in // b, b))
      xf, cf = jnp.fft.rfft(xb, n=b), jnp.fft.rfft(p['c'], n=b)
      if cf.shape[0] * cf.shape[1] <= 16:
        # Few blocks: a broadcast product beats XLA's complex dot with a size-1 contraction.
        yf = jnp.sum(xf[..., None, :, :] * cf, axis=-2)
      else:
        yf = jnp.einsum('...qf,pqf->...pf', xf, cf)
      return jnp.fft.irfft(yf, n=b).reshape(x.shape[:-1] + (self.d_out,))
    if kind == 'kronecker':
      # (B kron A) x = vec(B X A^T) with X = x.reshape(r, d_in / r), row-major vec.
      xr = x.reshape(x.shape[:-1] + (self.rank_or_block, self.d_in // self.rank_or_block))
      y = jnp.einsum('or,...rk,sk->...os', p['B'], xr, p['A'])
      return y.reshape(x.shape[:-1] + (self.d_out,))
    if kind == 'ldr':
      # Z-1(h) x = conj(eta) * ifft(fft(eta * h) * fft(eta * x)); x is transformed
      # once, and the k circulant factors are summed in the frequency domain.
      eta = _skew_eta(n)
      u = jnp.fft.fft(_pad_to(x, n) * eta, n=n)
      skew = jnp.real(jnp.fft.ifft(jnp.fft.fft(p['h'] * eta, n=n) * u[..., None, :], n=n)
                      * np.conj(eta))
      yf = jnp.sum(jnp.fft.rfft(skew, n=n) * jnp.fft.rfft(p['g'], n=n), axis=-2)
      return jnp.fft.irfft(yf, n=n)[..., :self.d_out]
    raise ValueError(f"unknown structure kind '{kind}'; expected one of {KINDS}")

  def dense(self, params):
    """M as a dense (d_out, d_in) float32 array (for merging and the dense product)."""
    p = {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}
    rows, cols = np.arange(self.d_out)[:, None], np.arange(self.d_in)[None, :]
    kind = self.kind
    if kind == 'circulant':
      return p['c'][(rows - cols) % self.size]
    if kind == 'toeplitz':
      return p['t'][rows - cols + self.d_in - 1]
    if kind == 'block_circulant':
      b = self.rank_or_block
      i, j = np.arange(b)[:, None], np.arange(b)[None, :]
      blocks = p['c'][:, :, (i - j) % b]  # (d_out/b, d_in/b, b, b)
      return blocks.transpose(0, 2, 1, 3).reshape(self.d_out, self.d_in)
    if kind == 'kronecker':
      return jnp.kron(p['B'], p['A'])
    # symmetric_toeplitz and ldr: apply the operator to the identity, O(n^2 log n)
    # instead of products of dense n x n matrices. Rows of the result are M e_j.
    return self.matvec(p, jnp.eye(self.d_in, dtype=jnp.float32)).T

  def product(self, params, x, how: str = 'auto'):
    """M x through the FFT (`matvec`) or the materialised matrix, float32."""
    if how == 'auto':
      how = 'dense' if self.prefers_dense() else 'fft'
    if how == 'dense':
      return jnp.einsum('...i,oi->...o', jnp.asarray(x, jnp.float32), self.dense(params))
    return self.matvec(params, x)


def families_that_fit(d_out: int, d_in: int) -> str:
  """The families that can take shape (d_out, d_in), for error messages."""
  g = math.gcd(d_out, d_in)
  square = '' if d_out == d_in else ' (truncated from the square of size max(in, out))'
  divisors = ', '.join(str(d) for d in _divisors(g))
  return (f'circulant{square}, toeplitz, symmetric_toeplitz{square}, ldr{square}, '
          f'block_circulant with block in {{{divisors}}}, kronecker with rank in {{{divisors}}}')


# --------------------------------------------------------------------------- #
# Structured options of GLoRA's additive support B (PyTorch layout (out, in))
# --------------------------------------------------------------------------- #

_NAME = re.compile(r'(circulant|toeplitz|symmetric_toeplitz|block_circulant)'
                   r'|block_circulant_(\d+)|kronecker_(\d+)|ldr_(\d+)')
NAMES = ('circulant', 'toeplitz', 'symmetric_toeplitz', 'block_circulant',
         'block_circulant_<b>', 'kronecker_<r>', 'ldr_<k>')


def check_family_name(name: str) -> None:
  """Raises ValueError unless `name` is a structured option name (see NAMES)."""
  m = _NAME.fullmatch(name) if isinstance(name, str) else None
  if m is None or any(g is not None and int(g) <= 0 for g in m.groups()[1:]):
    raise ValueError(f'unknown structured family {name!r}; allowed: {", ".join(NAMES)} '
                     '(<b>, <r>, <k> positive integers)')


@functools.lru_cache(maxsize=None)
def structure_for(name: str, d_out: int, d_in: int) -> Structure:
  """The Structure an option name stands for on an (out, in) weight. 'circulant' on a
  rectangular weight is the truncated circulant; 'block_circulant' without a size
  uses gcd(in, out)."""
  check_family_name(name)
  whole, block, kron, ldr = _NAME.fullmatch(name).groups()
  if whole == 'block_circulant':
    return Structure('block_circulant', d_out, d_in, math.gcd(d_out, d_in))
  if whole:
    return Structure(whole, d_out, d_in)
  if block:
    return Structure('block_circulant', d_out, d_in, int(block))
  if kron:
    return Structure('kronecker', d_out, d_in, int(kron))
  return Structure('ldr', d_out, d_in, int(ldr))


def check_structured(name: str, d_out: int, d_in: int, path: str) -> None:
  st = structure_for(name, int(d_out), int(d_in))
  reason = st.fit_error()
  if reason:
    raise ValueError(
        f"glora: structured B option '{name}' cannot fit '{path}' (B of shape ({d_out}, "
        f'{d_in})): {reason}; options that fit: '
        f'{families_that_fit(int(d_out), int(d_in))}')


def structured_num_params(name: str, d_out: int, d_in: int) -> int:
  return structure_for(name, int(d_out), int(d_in)).num_params()


def init_structured(name: str, key, d_out: int, d_in: int, dtype=jnp.float32) -> dict:
  """Zero B at start: single-vector kinds are zero, two-factor kinds one zero factor."""
  return structure_for(name, int(d_out), int(d_in)).init(key, dtype)


def structured_dense(name: str, params, d_out: int, d_in: int):
  """The (d_out, d_in) float32 matrix of a structured option."""
  return structure_for(name, int(d_out), int(d_in)).dense(params)
