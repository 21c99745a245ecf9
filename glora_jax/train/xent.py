"""Causal-LM cross-entropy from the final hidden states and the head's kernel, in token
chunks, so a 128k vocabulary never holds more than one chunk's logits (forward or backward).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def head_logits(hidden, kernel):
  """Float32 logits as the model's head computes them (nn.Dense / nn.Embed.attend
  with dtype = the activation dtype): both operands in hidden's dtype, the product
  in that dtype, then float32, so the loss here equals the model's to rounding."""
  kernel = kernel.astype(hidden.dtype)
  return jax.lax.dot_general(hidden, kernel, (((hidden.ndim - 1,), (0,)), ((), ()))
                             ).astype(jnp.float32)


def _token_sums(logits, targets, weights):
  """(sum of weighted NLL, sum of weighted correct argmax) of float32 logits (..., vocab):
  the one definition both paths sum."""
  target_logit = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  # A target of weight 0 may be anything (Hugging Face's -100): its gathered logit is
  # NaN then, and NaN * 0 would still poison the sum.
  nll = jnp.where(weights != 0, jax.nn.logsumexp(logits, -1) - target_logit, 0.0)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return jnp.sum(nll * weights), jnp.sum(correct * weights)


def _check(hidden, kernel, targets, weights):
  if hidden.ndim != 3 or targets.shape != hidden.shape[:2] or weights.shape != targets.shape:
    raise ValueError(f'hidden {hidden.shape}, targets {targets.shape}, weights {weights.shape}: '
                     'expected hidden (batch, seq, d) and targets and weights (batch, seq)')
  if kernel.ndim != 2 or kernel.shape[0] != hidden.shape[-1]:
    raise ValueError(f'kernel {kernel.shape} does not fit hidden {hidden.shape}: expected '
                     f'({hidden.shape[-1]}, vocab); a tied head passes embedding.T')


def full_xent(hidden, kernel, targets, weights):
  """(sum of weighted NLL, sum of weights, sum of weighted correct) from every token's
  logits at once: hidden (batch, seq, d) in the activation dtype, kernel (d, vocab),
  targets (batch, seq) int, weights (batch, seq); the caller shifts targets."""
  _check(hidden, kernel, targets, weights)
  weights = weights.astype(jnp.float32)
  nll, correct = _token_sums(head_logits(hidden, kernel), targets, weights)
  return nll, jnp.sum(weights), correct


def chunked_xent(hidden, kernel, targets, weights, *, chunk: int):
  """full_xent's sums, `chunk` tokens' logits at a time. Tokens are flattened
  (batch * seq) and padded to a multiple of `chunk` with weight 0. Each chunk's sums
  are one jax.checkpoint-ed step of a loop: its residuals are the chunk's hidden
  states, targets and weights, so the backward recomputes the (chunk, vocab) logits
  rather than the loop stacking them, which would be the full logits again.

  With the kernel differentiated too (a trained head), the loop adds each chunk's
  kernel-sized gradient into an accumulator in the kernel's dtype: where the compiler
  does not add in place (XLA CPU), that is one more kernel-sized buffer, so the loop
  saves memory there only when all tokens' logits outweigh the kernel."""
  _check(hidden, kernel, targets, weights)
  if chunk < 1:
    raise ValueError(f'chunk={chunk}: expected a positive number of tokens')
  weights = weights.astype(jnp.float32)
  tokens = hidden.shape[0] * hidden.shape[1]
  chunk = min(chunk, tokens)  # one chunk, not one chunk of mostly padding
  pad = -tokens % chunk
  flat = lambda x: jnp.pad(x.reshape((tokens,) + x.shape[2:]),
                           [(0, pad)] + [(0, 0)] * (x.ndim - 2))
  chunks = lambda x: x.reshape((-1, chunk) + x.shape[1:])
  xs = (chunks(flat(hidden)), chunks(flat(targets)), chunks(flat(weights)))

  # Inside a loop the forward and the backward are separate loop bodies that XLA cannot
  # merge, so the CSE barrier of prevent_cse buys nothing here.
  @functools.partial(jax.checkpoint, prevent_cse=False)
  def chunk_sums(x):
    h, t, w = x
    # The kernel is cast inside the loop so its gradient accumulates in its own dtype
    # (float32 master weights stay float32), as full_xent's does.
    return _token_sums(head_logits(h, kernel), t, w)

  nll, correct = jax.lax.map(chunk_sums, xs)
  return jnp.sum(nll), jnp.sum(weights), jnp.sum(correct)
