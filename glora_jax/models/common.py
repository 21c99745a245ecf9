"""What the models share: per-layer rematerialisation and an attention whose memory
can be bounded, both chosen by name in the model's config, and a dropout whose
random bits cost a quarter of jax.random.bernoulli's."""
from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P
from jax.extend.random import threefry2x32_p

# Per-layer remat: 'none' keeps every activation of every layer for the backward
# pass; 'full' keeps only each layer's input and recomputes the layer in the
# backward pass (one layer's activations alive at a time); 'dots' also keeps the
# outputs of the matmuls without batch dimensions (less recompute, more memory).
REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}
ATTENTION_IMPLS = ('xla', 'chunked', 'dot_product')


def check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
  if value not in allowed:
    raise ValueError(f"{name} '{value}' is unknown; allowed: {list(allowed)}")


def maybe_remat(layer_cls, policy: str, static_argnums: tuple[int, ...]):
  """`layer_cls`, rematerialised per call under `policy` (see REMAT_POLICIES).
  Module paths are unchanged, so parameters and adapters find the same layers.
  `static_argnums` counts the module itself as argument 0."""
  check_choice('remat policy', policy, REMAT_POLICIES)
  if policy == 'none':
    return layer_cls
  return nn.remat(layer_cls, policy=REMAT_POLICIES[policy], static_argnums=static_argnums)


def batch_sharded(x):
  """`x` with its leading (batch) dimension constrained over the mesh's 'data' axis, when
  traced under a mesh that has one (train.sharding.under_mesh: the training step, the
  training evaluator, the export's check and benchmarks/scale.py); `x` itself otherwise
  (no mesh, as the search's candidate-parallel fitness and generation trace; one device;
  a batch 'data' does not divide). The other dimensions are left to XLA.

  Why: with FSDP a frozen kernel is split over 'data' too, and XLA's propagation may then
  keep the kernel split and gather the activations of the global batch instead (the
  memory of eight devices' activations on each). Pinned at each block's input and
  output, a block's matmuls gather one layer's kernel, as FSDP means (MaxText pins its
  activations by logical axis rules the same way)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or 'data' not in mesh.axis_names or x.ndim == 0:
    return x
  if mesh.shape['data'] == 1 or x.shape[0] % mesh.shape['data']:
    return x
  return lax.with_sharding_constraint(x, P('data', *(P.UNCONSTRAINED,) * (x.ndim - 1)))


def scanned(layer_cls, policy: str, static_argnums: tuple[int, ...], in_axes: tuple,
            length: int):
  """`layer_cls` run `length` times under one nn.scan (stacked params: every variable
  collection gets a leading layer axis, so a collection an interception point passes in,
  e.g. peft's stacked adapters, is sliced per layer too), each call rematerialised under
  `policy`. The layer is called as (carry, *xs) and returns (carry, y); `in_axes` says
  per xs whether it is scanned (0) or broadcast (nn.broadcast: a Python bool stays one,
  static under remat). Dropout keys differ per layer, not as the unrolled loop's."""
  return nn.scan(maybe_remat(layer_cls, policy, static_argnums), variable_axes={True: 0},
                 split_rngs={'params': True, 'dropout': True}, in_axes=in_axes, length=length)


# --------------------------------------------------------------------------- #
# Dropout
# --------------------------------------------------------------------------- #

_MASK_BITS = 16  # one keep decision per 16 random bits: 4 per threefry hash


def keep_mask(key, rate: float, shape: Sequence[int]):
  """Boolean keep mask, each entry True with probability 1 - round(rate * 2^16) / 2^16.

  jax.random.bernoulli spends one threefry2x32 hash (64 bits) per entry and keeps 32
  of them. Here each hash of the entry-block's global index yields 64 bits, cut into
  four 16-bit words, one per entry: a quarter of the hashes, measured 0.31x the time
  of bernoulli on MiniLM's 19 dropout masks (benchmarks/speed.py). The counters are
  global indices over `shape` (as jax_threefry_partitionable does), so the mask does
  not depend on how the array is sharded: 1 and 8 devices draw the same bits, and no
  device computes another's part. The rate is quantised to 1/65536 (0.1 -> 0.100006).
  Keys of another PRNG implementation fall back to jax.random.bernoulli."""
  shape = tuple(shape)
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if 'threefry' not in str(jax.random.key_impl(key)) or not shape:
    return jax.random.bernoulli(key, 1.0 - rate, shape)
  per_word = 64 // _MASK_BITS
  words = -(-shape[-1] // per_word)
  block = shape[:-1] + (words,)
  if math.prod(block) >= 2**32:
    raise ValueError(f'dropout mask {shape} is too large for 32-bit counters')
  counter = lax.broadcasted_iota(jnp.uint32, block, len(block) - 1)
  stride = words
  for axis in range(len(block) - 2, -1, -1):
    counter = counter + lax.broadcasted_iota(jnp.uint32, block, axis) * jnp.uint32(stride)
    stride *= block[axis]
  k1, k2 = jax.random.key_data(key)
  hi, lo = threefry2x32_p.bind(k1, k2, jnp.zeros_like(counter), counter)
  bits = lax.bitcast_convert_type(jnp.stack([hi, lo], axis=-1), jnp.uint16)
  bits = bits.reshape(shape[:-1] + (words * per_word,))[..., :shape[-1]]
  return bits >= jnp.uint16(round(rate * 2**_MASK_BITS))


def dropout(x, rate: float, key):
  """Inverted dropout with keep_mask: kept entries scaled by 1 / (1 - rate), as Flax's."""
  if rate == 0.0:
    return x
  if rate >= 1.0:
    return jnp.zeros_like(x)
  return jnp.where(keep_mask(key, rate, x.shape), x / (1.0 - rate), jnp.zeros_like(x))


class Dropout(nn.Module):
  """nn.Dropout's interface (rate, deterministic, the 'dropout' rng) on `dropout`."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout(x, self.rate, self.make_rng('dropout'))


# --------------------------------------------------------------------------- #
# Attention
# --------------------------------------------------------------------------- #


def _scores_softmax_values(q, k, v, allowed, dropout_rate=0.0, dropout_key=None):
  """Softmax(q k^T / sqrt(d)) v with float32 scores; q (b, h, t, d), k and v
  (b, h, s, d), heads ahead of tokens (XLA's CPU dot is 3x faster on this layout
  than on (b, t, h, d)); `allowed` boolean, broadcastable to (b, h, t, s) (or None)."""
  scores = jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
  if allowed is not None:
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  if dropout_key is not None:
    probs = dropout(probs, dropout_rate, dropout_key)
  return jnp.einsum('bhqk,bhkd->bhqd', probs, v)


def attention(q, k, v, allowed=None, *, impl: str = 'xla', chunk: int = 512,
              dropout_rate: float = 0.0, dropout_key=None):
  """Multi-head attention, with dropout on the attention weights if `dropout_key` is given.

  q (b, t, h, d); k, v (b, s, kv, d) with kv dividing h (grouped-query heads:
  query head i reads kv head i // (h // kv), as HF's repeat_kv); `allowed` a
  boolean mask broadcastable to (b, 1, t, s), or None; returns (b, t, h, d).
  Implementations:
    'xla': the plain einsum; keeps the (b, h, t, s) score matrix.
    'chunked': queries in blocks of `chunk`, each block rematerialised, so the
      backward pass holds one block's scores at a time (any backend).
    'dot_product': jax.nn.dot_product_attention, which picks cuDNN's fused
      (flash) kernel on GPU where it applies, else XLA.
  All give the same outputs up to float rounding (tested); only 'xla' has dropout."""
  check_choice('attention', impl, ATTENTION_IMPLS)
  if dropout_key is not None and dropout_rate and impl != 'xla':
    raise ValueError(f"attention '{impl}' has no dropout; use 'xla' or dropout rate 0")
  h, kv = q.shape[2], k.shape[2]
  if impl == 'dot_product':
    mask = None if allowed is None else jnp.broadcast_to(
        allowed, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask).astype(v.dtype)
  # Heads ahead of tokens, once per call: the score and value einsums are then
  # plain batched matmuls (measured 0.85x the forward time of MiniLM on CPU).
  q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  if kv != h:
    k, v = jnp.repeat(k, h // kv, axis=1), jnp.repeat(v, h // kv, axis=1)
  t = q.shape[2]
  if impl == 'xla' or t <= chunk:
    return jnp.swapaxes(_scores_softmax_values(q, k, v, allowed, dropout_rate, dropout_key), 1, 2)
  if t % chunk:
    raise ValueError(f'chunked attention: {t} query positions are not a multiple of the '
                     f'chunk {chunk}')
  n = t // chunk
  q_blocks = jnp.moveaxis(q.reshape(*q.shape[:2], n, chunk, q.shape[-1]), 2, 0)
  if allowed is None:
    mask_blocks = jnp.ones((n, 1, 1, chunk, 1), bool)
  else:
    allowed = jnp.broadcast_to(allowed, allowed.shape[:2] + (t, allowed.shape[-1]))
    mask_blocks = jnp.moveaxis(allowed.reshape(*allowed.shape[:2], n, chunk, -1), 2, 0)

  @jax.checkpoint
  def block(args):
    q_block, mask_block = args
    return _scores_softmax_values(q_block, k, v, mask_block)

  out = jax.lax.map(block, (q_blocks, mask_blocks))  # (n, b, h, chunk, d)
  out = jnp.moveaxis(out, 0, 2).reshape(*q.shape[:2], t, v.shape[-1])
  return jnp.swapaxes(out, 1, 2)
