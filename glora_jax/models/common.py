"""What the models share for scale: per-layer rematerialisation and an attention
whose memory can be bounded, both chosen by name in the model's config."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def _scores_softmax_values(q, k, v, allowed):
  """Softmax(q k^T / sqrt(d)) v with float32 scores; q (b, t, h, d), k and v
  (b, s, h, d), `allowed` boolean, broadcastable to (b, h, t, s) (or None)."""
  scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / np.sqrt(q.shape[-1])
  if allowed is not None:
    scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', probs, v)


def attention(q, k, v, allowed=None, *, impl: str = 'xla', chunk: int = 512):
  """Multi-head attention without dropout on the weights.

  q (b, t, h, d); k, v (b, s, kv, d) with kv dividing h (grouped-query heads:
  query head i reads kv head i // (h // kv), as HF's repeat_kv); `allowed` a
  boolean mask broadcastable to (b, 1, t, s), or None. Implementations:
    'xla': the plain einsum; keeps the (b, h, t, s) score matrix.
    'chunked': queries in blocks of `chunk`, each block rematerialised, so the
      backward pass holds one block's scores at a time (any backend).
    'dot_product': jax.nn.dot_product_attention, which picks cuDNN's fused
      (flash) kernel on GPU where it applies, else XLA.
  All give the same outputs up to float rounding (tested)."""
  check_choice('attention', impl, ATTENTION_IMPLS)
  h, kv = q.shape[2], k.shape[2]
  if impl == 'dot_product':
    mask = None if allowed is None else jnp.broadcast_to(
        allowed, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask).astype(v.dtype)
  if kv != h:
    k, v = jnp.repeat(k, h // kv, axis=2), jnp.repeat(v, h // kv, axis=2)
  t = q.shape[1]
  if impl == 'xla' or t <= chunk:
    return _scores_softmax_values(q, k, v, allowed)
  if t % chunk:
    raise ValueError(f'chunked attention: {t} query positions are not a multiple of the '
                     f'chunk {chunk}')
  n = t // chunk
  q_blocks = jnp.moveaxis(q.reshape(q.shape[0], n, chunk, *q.shape[2:]), 1, 0)
  if allowed is None:
    mask_blocks = jnp.ones((n, 1, 1, chunk, 1), bool)
  else:
    allowed = jnp.broadcast_to(allowed, allowed.shape[:2] + (t, allowed.shape[-1]))
    mask_blocks = jnp.moveaxis(allowed.reshape(*allowed.shape[:2], n, chunk, -1), 2, 0)

  @jax.checkpoint
  def block(args):
    q_block, mask_block = args
    return _scores_softmax_values(q_block, k, v, mask_block)

  out = jax.lax.map(block, (q_blocks, mask_blocks))  # (n, b, chunk, h, d)
  return jnp.moveaxis(out, 0, 1).reshape(q.shape[:3] + (v.shape[-1],))
