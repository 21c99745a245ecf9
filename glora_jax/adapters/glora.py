"""GLoRA (Generalized LoRA, arXiv 2306.07967) as pure functions over one layer's params.

Five supports A B C D E with weight-shared options (REFERENCE.md section 1):
    W' = W0 + W0 * A + B,    b' = b0 + b0 * D + E + W0 @ C
in PyTorch notation (W0: (out, in)). Flax kernels are K = W0^T (in, out); `delta`
returns (K' - K, b' - b0) in that layout.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from glora_jax.adapters import base, structured

SUPPORTS = ('A', 'B', 'C', 'D', 'E')


@dataclasses.dataclass(frozen=True)
class GLoRA(base.AdapterFamily):
  """The GLoRA supernet search space of one layer.

  Options (index order is the subnet encoding):
    A, B: lora_<r> for each r in `ranks`, then `structured_b` names (B only),
          vector, constant, none
    C:    lora_<r> for each r, vector, none
    D, E: vector, constant, none
  With the default `ranks=(4,)` a layer has 4*4*3*3*3 = 432 choices.

  Parameter counts: lora_r on A/B costs r*(out+in), on C r*(in+1); vector costs
  `out` on A, B, D, E and `in` on C. The authors' code counts `out` for C's
  vector, which miscounts layers with in != out (fc1, fc2): we deliberately count
  `in`, the true size of C.

  `structured_b` adds full-rank structured updates (the matrices of structured.py
  that SURM uses, e.g. 'circulant') as extra options of the additive support B.

  `share_vectors=True` is the authors' weight sharing: a vector option is the
  first column of the low-rank down factor (Ad, Bd, Cd), a constant the first
  entry of that column (of D, E for those supports). `share_vectors=False` is our
  departure, off by default: the vector and constant options get parameters of
  their own (Av Bv Cv: vectors; Ac Bc Dc Ec: (1,) constants; zero at start), so
  a step that draws B's vector, whose gradient is scaled by the input's sum, no
  longer moves the first rank of B's low-rank option (issue 16, BENCHMARKS.md).
  A subnet uses, and counts, the same number of parameters either way.

  Training runs in activation mode (`activation`): the layer's own frozen matmul
  y0 = x K plus the supports' terms, so that only a low-rank A needs a full-size
  (in, out) product; the other options cost vectors and rank-r products. With
  structured B options the family runs in weight mode (K' built in the layer).
  `delta` (merging) is the same maths folded into the weights; tests prove the
  two agree.
  """

  ranks: tuple[int, ...] = (4,)
  structured_b: tuple[str, ...] = ()
  # Out of the repr that checkpoints fingerprint (setup.fingerprint), so ones saved
  # before this field still resume; the trainable shapes tell the two apart.
  share_vectors: bool = dataclasses.field(default=True, repr=False)
  name: str = 'glora'
  supports: tuple[str, ...] = SUPPORTS
  mode: str = 'weight'
  mergeable: bool = True

  def __post_init__(self):
    ranks = tuple(int(r) for r in self.ranks)
    if not ranks or any(r <= 0 for r in ranks) or len(set(ranks)) != len(ranks):
      raise ValueError(f'GLoRA ranks must be distinct positive integers, got {self.ranks}')
    object.__setattr__(self, 'ranks', tuple(sorted(ranks)))
    if self.structured_b:
      for fam in self.structured_b:
        structured.check_family_name(fam)
    object.__setattr__(self, 'structured_b', tuple(self.structured_b))
    object.__setattr__(self, 'mode', 'weight' if self.structured_b else 'activation')

  @property
  def max_rank(self) -> int:
    return self.ranks[-1]

  def options(self, support: str) -> tuple[str, ...]:
    lora = tuple(f'lora_{r}' for r in self.ranks)
    if support == 'A':
      return lora + ('vector', 'constant', 'none')
    if support == 'B':
      return lora + self.structured_b + ('vector', 'constant', 'none')
    if support == 'C':
      return lora + ('vector', 'none')
    if support in ('D', 'E'):
      return ('vector', 'constant', 'none')
    raise ValueError(f"unknown GLoRA support '{support}'; expected one of {SUPPORTS}")

  def _table(self, support: str) -> dict[str, np.ndarray]:
    """Per-option lookup arrays: lora rank (0 = no low-rank term), vector and
    constant flags, and the index of the structured family (-1 = none)."""
    rank, vec, const, struct = [], [], [], []
    for opt in self.options(support):
      rank.append(int(opt[5:]) if opt.startswith('lora_') else 0)
      vec.append(opt == 'vector')
      const.append(opt == 'constant')
      struct.append(self.structured_b.index(opt) if opt in self.structured_b else -1)
    return dict(rank=np.asarray(rank, np.int32), vec=np.asarray(vec, np.float32),
                const=np.asarray(const, np.float32), struct=np.asarray(struct, np.int32))

  def _row(self, support: str, idx):
    """The option table's entries of option `idx` (traced) of one support."""
    return {k: jnp.asarray(v)[idx] for k, v in self._table(support).items()}

  def check(self, path, kernel_shape):
    super().check(path, kernel_shape)
    d_in, d_out = kernel_shape
    if self.max_rank > min(d_in, d_out):
      raise ValueError(
          f"glora: rank {self.max_rank} is above min(in, out) = {min(d_in, d_out)} for "
          f"'{path}' (kernel {d_in}x{d_out}); use ranks <= {min(d_in, d_out)}")
    if self.structured_b:
      for fam in self.structured_b:
        structured.check_structured(fam, d_out, d_in, path)

  def option_costs(self, kernel_shape):
    d_in, d_out = kernel_shape
    costs = []
    for s in self.supports:
      row = []
      for opt in self.options(s):
        if opt.startswith('lora_'):
          r = int(opt[5:])
          row.append(r * (d_in + 1) if s == 'C' else r * (d_out + d_in))
        elif opt == 'vector':
          row.append(d_in if s == 'C' else d_out)
        elif opt == 'constant':
          row.append(1)
        elif opt == 'none':
          row.append(0)
        else:
          row.append(structured.structured_num_params(opt, d_out, d_in))
      costs.append(row)
    return costs

  def param_axes(self, kernel_shape):
    return {'Ad': ('out', None), 'Au': (None, 'in'), 'Bd': ('out', None), 'Bu': (None, 'in'),
            'Cd': ('in', None), 'Cu': (None, None), 'D': ('out',), 'E': ('out',),
            'Av': ('out',), 'Bv': ('out',), 'Cv': ('in',)}

  def init(self, key, kernel_shape, dtype=jnp.float32):
    """Supernet params; every choice starts at the pretrained layer exactly.
    Ad, Bd, Cd, D, E are zero; Au, Bu, Cu are Xavier-uniform (REFERENCE.md)."""
    d_in, d_out = kernel_shape
    r = self.max_rank
    k_a, k_b, k_c, k_s = jax.random.split(key, 4)

    def xavier(k, shape):  # torch.nn.init.xavier_uniform_ on a 2-D tensor
      bound = math.sqrt(6.0 / (shape[0] + shape[1]))
      return jax.random.uniform(k, shape, dtype, -bound, bound)

    params = {
        'Ad': jnp.zeros((d_out, r), dtype), 'Au': xavier(k_a, (r, d_in)),
        'Bd': jnp.zeros((d_out, r), dtype), 'Bu': xavier(k_b, (r, d_in)),
        'Cd': jnp.zeros((d_in, r), dtype), 'Cu': xavier(k_c, (r, 1)),
        'D': jnp.zeros((d_out,), dtype), 'E': jnp.zeros((d_out,), dtype),
    }
    if not self.share_vectors:
      params.update({'Av': jnp.zeros((d_out,), dtype), 'Bv': jnp.zeros((d_out,), dtype),
                     'Cv': jnp.zeros((d_in,), dtype)})
      params.update({f'{s}c': jnp.zeros((1,), dtype) for s in 'ABDE'})
    if self.structured_b:
      keys = jax.random.split(k_s, len(self.structured_b))
      params['B_structured'] = {
          fam: structured.init_structured(fam, k, d_out, d_in, dtype)
          for fam, k in zip(self.structured_b, keys)}
    return params

  def supports_dense(self, params, choice):
    """The five supports as dense float32 arrays in PyTorch layout:
    A, B: (out, in); C: (in, 1); D, E: (out,)."""
    p = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), dict(params))

    def low_rank(s, t):
      down, up = p[f'{s}d'], p[f'{s}u']
      mask = (jnp.arange(down.shape[1]) < t['rank']).astype(jnp.float32)
      return (down * mask) @ up + self._vector_or_constant(p, s, t)[:, None]

    t_a, t_b, t_c, t_d, t_e = (self._row(s, choice[i]) for i, s in enumerate(SUPPORTS))
    a = low_rank('A', t_a)
    b = low_rank('B', t_b)
    if self.structured_b:
      d_out, d_in = b.shape
      for k, fam in enumerate(self.structured_b):
        dense = structured.structured_dense(fam, p['B_structured'][fam], d_out, d_in)
        b = b + (t_b['struct'] == k).astype(jnp.float32) * dense
    c = low_rank('C', t_c)
    return dict(A=a, B=b, C=c, D=self._vector_or_constant(p, 'D', t_d),
                E=self._vector_or_constant(p, 'E', t_e))

  def _vector_or_constant(self, p, support, t):
    """A support's vector option or its constant option (broadcast), as the option
    table row `t` says; zero for any other option. Shared (the authors'): the first
    column of the down factor (A, B, C) or the vector itself (D, E), and its first
    entry; unshared: `<support>v` and `<support>c`."""
    if self.share_vectors:
      vec = p[support] if support in 'DE' else p[f'{support}d'][:, 0]
      const = vec[0]
    else:
      vec = p[support] if support in 'DE' else p[f'{support}v']
      const = p[f'{support}c'][0] if support != 'C' else 0.0  # C has no constant option
    return t['vec'] * vec + t['const'] * const

  def activation(self, params, choice, x, y, kernel, bias):
    """y' = x K' + b' without building K' for the backward pass unless A is low rank
    (PyTorch notation, W0 = K^T):
      W0 + W0 * A : `scaled_matmul`: one matmul forward; the (in, out) weight
                    gradient only in layers whose sampled A is low rank. A vector
                    or constant A needs sum_t g_t * (x_t K), from the frozen product.
      B x         : a rank-(r+1) product (x [Bu; 1]^T) [Bd * mask, b]^T: the
                    low-rank B, and a vector or constant B's (sum_j x_j) b.
      b'          : b0 + E + b0 * D + W0 C, a vector added to every token.
    (Joining B and b' into one rank-(r+2) product, so that the backward pass reads
    the output gradient once, was measured slower on CPU and is not done.)
    The plain layer's output `y` is not used (XLA drops its matmul). The matmuls
    run in the plain layer's compute dtype (y's), accumulating in float32, as
    nn.Dense promotes its inputs to it."""
    dtype = y.dtype
    del y
    if self.structured_b:
      raise NotImplementedError('GLoRA with structured B options runs in weight mode')
    f32 = jnp.float32
    p = jax.tree.map(lambda v: jnp.asarray(v, f32), dict(params))
    t_a, t_b, t_c, t_d, t_e = (self._row(s, choice[i]) for i, s in enumerate(SUPPORTS))
    ranks = jnp.arange(self.max_rank)
    a_mask = (ranks < t_a['rank']).astype(f32)
    a_scale = self._vector_or_constant(p, 'A', t_a)  # (out,)
    out = scaled_matmul(x.astype(dtype), kernel, p['Ad'], p['Au'], a_mask, a_scale)
    # b' = b0 + E + b0 * D + W0 C, with the frozen W0 (W0 C = C^T K).
    k = kernel.astype(f32)
    c = ((p['Cd'] * (ranks < t_c['rank']).astype(f32)) @ p['Cu'])[:, 0] + self._vector_or_constant(p, 'C', t_c)
    new_bias = self._vector_or_constant(p, 'E', t_e) + c @ k
    if bias is not None:
      b0 = bias.astype(f32)
      new_bias = new_bias + b0 + b0 * self._vector_or_constant(p, 'D', t_d)
    # B on the activations, one rank-(r+1) product for every option: a ones row
    # under Bu gives the input's sum, which a vector or constant B scales
    # (x [Bu; 1]^T [Bd * mask, b]^T). Written as a separate reduce and broadcast it
    # cost two more passes over the activations, forward and backward.
    xf = x.astype(f32)
    b_mask = (ranks < t_b['rank']).astype(f32)
    b_vec = self._vector_or_constant(p, 'B', t_b)  # (out,)
    up = jnp.concatenate([p['Bu'], jnp.ones((1, p['Bu'].shape[1]), f32)])  # (r + 1, in)
    down = jnp.concatenate([p['Bd'] * b_mask, b_vec[:, None]], axis=1)  # (out, r + 1)
    out = out + jnp.einsum('...r,or->...o', jnp.einsum('...i,ri->...r', xf, up), down)
    return (out + new_bias).astype(dtype)

  def delta(self, params, choice, kernel, bias):
    s = self.supports_dense(params, choice)
    k = kernel.astype(jnp.float32)
    d_kernel = k * s['A'].T + s['B'].T
    # W0 @ C with the *frozen* W0: the authors' LLaMA fork used the already merged
    # W here, which is wrong whenever C is active together with A or B.
    d_bias = s['E'] + s['C'][:, 0] @ k
    if bias is not None:
      d_bias = d_bias + bias.astype(jnp.float32) * s['D']
    return d_kernel, d_bias


# --------------------------------------------------------------------------- #
# W0 + W0 * A on the activations, with the weight gradient only where A needs it
# --------------------------------------------------------------------------- #


def _scaled_kernel(kernel, ad, au, mask, scale, dtype):
  """K * (1 + A^T) for A = (ad * mask) au + scale (broadcast over inputs), in dtype."""
  k = kernel.astype(jnp.float32)
  a_t = ((ad * mask) @ au).T + scale[None, :]
  return (k + k * a_t).astype(dtype)


def _matmul(x, k):
  return jnp.einsum('...i,io->...o', x, k, preferred_element_type=jnp.float32)


@jax.custom_vjp
def scaled_matmul(x, kernel, ad, au, mask, scale):
  """x (K * (1 + A^T)) with A = (ad * mask) au + scale[:, None] in PyTorch's (out, in)
  layout: GLoRA's W0 + W0 * A on the activations. ad (out, r), au (r, in), mask
  (r,) of 0/1 (a prefix of ones: the sampled rank), scale (out,) (A's vector or
  constant option). The matmul runs in x's dtype, accumulating and returning float32.

  Forward: one matmul. Backward: the input gradient (one matmul), and only when A
  is low rank (mask[0] == 1) the (in, out) weight gradient x^T g that ad and au
  need (a lax.cond). Otherwise scale's gradient is sum_t g_t * (x_t K), and
  x_t K = out_t / (1 + scale) from the saved output (x K itself is recomputed in
  the rare case that some |1 + scale| < 1e-2, where the division would lose
  precision). So a supernet step pays the full weight gradient only in the layers
  that sampled a low-rank A (a quarter of them in the default space). The
  kernel's own gradient is exact but costs a second weight gradient; XLA drops it
  when the kernel is not differentiated (always, under GLoRA). Tested against
  jax.grad of the merged layer for every option."""
  return _matmul(x, _scaled_kernel(kernel, ad, au, mask, scale, x.dtype))


def _scaled_matmul_fwd(x, kernel, ad, au, mask, scale):
  out = scaled_matmul(x, kernel, ad, au, mask, scale)
  return out, (x, kernel, ad, au, mask, scale, out)


def _scaled_matmul_bwd(res, g):
  x, kernel, ad, au, mask, scale, out = res
  f32 = jnp.float32
  x2, g2, out2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]), out.reshape(-1, out.shape[-1])
  scaled = _scaled_kernel(kernel, ad, au, mask, scale, x.dtype)
  dx = jnp.einsum('to,io->ti', g2.astype(x.dtype), scaled, preferred_element_type=f32)
  weight_grad = lambda: jnp.einsum('ti,to->io', x2, g2.astype(x.dtype), preferred_element_type=f32)

  def low_rank():
    h = weight_grad() * kernel.astype(f32)  # d(A^T), (in, out)
    return (h.T @ au.T) * mask, (ad * mask).T @ h.T, jnp.sum(h, axis=0)

  def scale_only():
    one_plus = 1.0 + scale
    frozen_out = jax.lax.cond(jnp.any(jnp.abs(one_plus) < 1e-2),
                              lambda: _matmul(x2, kernel.astype(x.dtype)),
                              lambda: out2 / one_plus)
    return jnp.zeros_like(ad), jnp.zeros_like(au), jnp.sum(g2 * frozen_out, axis=0)

  d_ad, d_au, d_scale = jax.lax.cond(mask[0] > 0, low_rank, scale_only)
  # Exact, and dead code (removed by XLA) whenever the kernel is not differentiated.
  d_kernel = (weight_grad() * (1.0 + ((ad * mask) @ au).T + scale[None, :])).astype(kernel.dtype)
  return (dx.astype(x.dtype).reshape(x.shape), d_kernel, d_ad.astype(ad.dtype),
          d_au.astype(au.dtype), jnp.zeros_like(mask), d_scale.astype(scale.dtype))


scaled_matmul.defvjp(_scaled_matmul_fwd, _scaled_matmul_bwd)


def family(ranks: Sequence[int] = (4,), structured_b: Sequence[str] = (),
           share_vectors: bool = True) -> GLoRA:
  """The GLoRA family with the given LoRA ranks (default: the authors' 432 choices);
  `share_vectors=False` gives vector and constant options their own parameters."""
  return GLoRA(ranks=tuple(ranks), structured_b=tuple(structured_b), share_vectors=bool(share_vectors))
