"""SURM structured updates (circulant, Toeplitz, Kronecker, LDR) as an adapter family.

A structured M serves as a LoRA replacement (y = x W0^T + s M x, mergeable) or as an
adapter after a projection (h + GELU(M h) + bias); the matrices live in structured.py.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from glora_jax.adapters import base, structured

FORMS = ('lora', 'adapter')
PRODUCTS = ('auto', 'fft', 'dense')

_DEFAULT_RANK = {'kronecker': 4, 'ldr': 1}
_RANDOM_FACTOR_KINDS = ('circulant', 'symmetric_toeplitz', 'ldr')

# The SURM circulant family stores c = a * b with b = 0 and a ~ N(0, sigma). The
# authors' code ran with sigma = 1 (torch's normal_ default) while its comment says
# 0.02. We keep 1: under Adam b moves by about lr per step, so c moves by |a| * lr;
# sigma = 1 makes that the optimizer's learning rate, as for a directly trained
# vector, whereas 0.02 would slow the circulant 50-fold at the start.
CIRCULANT_STD = 1.0


@dataclasses.dataclass(frozen=True)
class SURM(base.AdapterFamily):
  """One structured matrix M per adapted layer (REFERENCE.md section 2).

  form='lora':    y = x W0^T + b0 + s * M x, M of shape (out, in). Mergeable: `delta`
                  is s * M^T in Flax layout. mode='activation' (default) multiplies by
                  FFTs during training; mode='weight' folds M densely into the kernel.
  form='adapter': y' = y + GELU(M y) + bias on the layer's output y (M: (out, out));
                  meant for the attention-output and FFN-output projections. Nonlinear,
                  so activation mode only and not mergeable.

  Both start at the pretrained model: M = 0 (one zero factor) and bias = 0.
  `scale` is the fixed s of the LoRA form; Kronecker uses scale / rank, the authors'
  alpha / r with alpha = scale. The scale is fixed rather than trainable: the authors'
  trainable scale starts at 0 beside a zero factor, so neither ever gets a gradient.

  Parameters per kind (`rank`: Kronecker r or LDR displacement rank k; `block`:
  block-circulant block size, default gcd(in, out)): see `structured.Structure`. The
  circulant kind stores c = a * b with b = 0 and a ~ N(0, init_std), default
  `CIRCULANT_STD` = 1 (the authors' code; their comment's 0.02 is available as
  init_std=0.02); it therefore counts 2 * size parameters. block_circulant with block = n is the
  single-vector circulant (n parameters, zero-initialised), as in C3A.

  product: 'fft' (structured product), 'dense' (materialise M each call and matmul),
  'auto' (dense below the measured crossover size, `structured.DENSE_BELOW`).
  """

  kind: str = 'circulant'
  form: str = 'lora'
  scale: float = 1.0
  rank: int | None = None
  block: int | None = None
  product: str = 'auto'
  init_std: float | None = None
  name: str = 'surm'
  supports: tuple[str, ...] = ()
  mode: str = 'activation'
  mergeable: bool = dataclasses.field(default=True, init=False)

  def __post_init__(self):
    if self.kind not in structured.KINDS:
      raise ValueError(f"surm: unknown kind '{self.kind}'; expected one of {structured.KINDS}")
    if self.form not in FORMS:
      raise ValueError(f"surm: unknown form '{self.form}'; expected one of {FORMS}")
    if self.product not in PRODUCTS:
      raise ValueError(f"surm: unknown product '{self.product}'; expected one of {PRODUCTS}")
    if self.mode not in ('weight', 'activation'):
      raise ValueError(f"surm: mode must be 'weight' or 'activation', got '{self.mode}'")
    if self.form == 'adapter' and self.mode != 'activation':
      raise ValueError("surm: form='adapter' (y + GELU(M y) + bias) is nonlinear and "
                       "needs mode='activation'")
    if self.rank is not None:
      if self.kind not in structured.RANKED_KINDS:
        raise ValueError(
            f"surm: rank applies to {structured.RANKED_KINDS}, not to kind '{self.kind}'")
      if int(self.rank) <= 0:
        raise ValueError(f'surm: rank must be a positive integer, got {self.rank}')
    if self.block is not None:
      if self.kind != 'block_circulant':
        raise ValueError(f"surm: block applies to block_circulant, not to kind '{self.kind}'")
      if int(self.block) <= 0:
        raise ValueError(f'surm: block must be a positive integer, got {self.block}')
    if self.init_std is not None and self.kind not in _RANDOM_FACTOR_KINDS:
      raise ValueError(f'surm: init_std applies to {_RANDOM_FACTOR_KINDS} (the random '
                       f"factor), not to kind '{self.kind}', which starts at zero")
    if self.form == 'lora' and self.scale == 0:
      # A zero scale makes the update and every adapter gradient vanish.
      raise ValueError('surm: scale 0 disables the update and its gradients; use a nonzero scale')
    object.__setattr__(self, 'mergeable', self.form == 'lora')

  @property
  def multiplier(self) -> float:
    """The fixed s in y = x W0^T + s M x."""
    if self.kind == 'kronecker':
      return float(self.scale) / float(self.structure_rank)
    return float(self.scale)

  @property
  def structure_rank(self) -> int:
    return int(self.rank) if self.rank is not None else _DEFAULT_RANK.get(self.kind, 0)

  def structure(self, kernel_shape) -> structured.Structure:
    """The structured M of a layer with Flax kernel shape (in, out)."""
    d_in, d_out = (int(d) for d in kernel_shape)
    if self.form == 'adapter':
      d_in = d_out
    if self.kind == 'block_circulant':
      rank_or_block = int(self.block) if self.block is not None else math.gcd(d_in, d_out)
    else:
      rank_or_block = self.structure_rank
    return structured.Structure(self.kind, d_out, d_in, rank_or_block)

  def options(self, support):
    raise ValueError(f"surm has no searchable supports (asked for '{support}')")

  def check(self, path, kernel_shape):
    super().check(path, kernel_shape)
    st = self.structure(kernel_shape)
    reason = st.fit_error()
    if reason:
      raise ValueError(
          f"surm: {st.describe()} cannot fit '{path}' (kernel {kernel_shape[0]}x"
          f'{kernel_shape[1]}, M of shape ({st.d_out}, {st.d_in})): {reason}; '
          f'families that fit: {structured.families_that_fit(st.d_out, st.d_in)}')

  def fixed_cost(self, kernel_shape):
    st = self.structure(kernel_shape)
    count = 2 * st.size if self.kind == 'circulant' else st.num_params()
    return count + (st.d_out if self.form == 'adapter' else 0)

  def init(self, key, kernel_shape, dtype=jnp.float32):
    st = self.structure(kernel_shape)
    if self.kind == 'circulant':
      # c = a * b with b = 0; see CIRCULANT_STD for the choice of sigma.
      std = CIRCULANT_STD if self.init_std is None else float(self.init_std)
      params = {'a': std * jax.random.normal(key, (st.size,), dtype),
                'b': jnp.zeros((st.size,), dtype)}
    else:
      params = st.init(key, dtype, self.init_std)
    if self.form == 'adapter':
      params['bias'] = jnp.zeros((st.d_out,), dtype)
    return params

  def structure_params(self, params) -> dict:
    """The parameters of its `structured.Structure` (the circulant's c = a * b; the
    adapter's bias left out)."""
    if self.kind == 'circulant':
      return {'c': jnp.asarray(params['a'], jnp.float32) * jnp.asarray(params['b'], jnp.float32)}
    return {k: v for k, v in params.items() if k != 'bias'}

  def delta(self, params, choice, kernel, bias):
    del choice, bias
    if self.form == 'adapter':
      raise ValueError(
          "surm form='adapter' computes y + GELU(M y) + bias, which is nonlinear and has no "
          "weight delta; use form='lora' for an update that merges into the kernel")
    st = self.structure(kernel.shape)
    return self.multiplier * st.dense(self.structure_params(params)).T, None

  def activation(self, params, choice, x, y, kernel, bias):
    del choice, bias
    st = self.structure(kernel.shape)
    p = self.structure_params(params)
    # jnp.fft refuses bf16: work in float32 and return the layer's dtype.
    if self.form == 'lora':
      update = self.multiplier * st.product(p, x, self.product)
      return y + update.astype(y.dtype)
    h = st.product(p, y, self.product)
    # Exact (erf) GELU, as torch.nn.GELU in the authors' adapter.
    update = jax.nn.gelu(h, approximate=False) + jnp.asarray(params['bias'], jnp.float32)
    return y + update.astype(y.dtype)


def family(kind: str = 'circulant', form: str = 'lora', scale: float = 1.0,
          rank: int | None = None, block: int | None = None, product: str = 'auto',
          init_std: float | None = None, mode: str = 'activation') -> SURM:
  """A SURM family, e.g. `family('ldr', rank=2)` or `family('circulant', form='adapter')`."""
  return SURM(kind=kind, form=form, scale=scale, rank=rank, block=block, product=product,
              init_std=init_std, mode=mode)
