"""Tests for glora_jax.train.xent: the chunked cross-entropy equals the full one and a
numpy log-softmax (sums and gradients), equals tasks.lm_loss on the model's head, and holds less."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax.train import tasks, xent

# 2 x 13 = 26 tokens: 8 does not divide it, so the last chunk is part padding.
BATCH, SEQ, D, VOCAB = 2, 13, 16, 50


def make_inputs(dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(BATCH, SEQ, D)), dtype)
  kernel = jnp.asarray(rng.normal(size=(D, VOCAB)) * 0.5, dtype)
  targets = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  weights = np.ones((BATCH, SEQ), np.float32)
  weights[0, 9:] = 0  # a padded row end
  weights[1, :2] = 0
  return hidden, kernel, targets, jnp.asarray(weights)


def numpy_reference(hidden, kernel, targets, weights):
  """The sums and d(NLL sum)/d(hidden, kernel) in float64 from a plain log-softmax."""
  h, k = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (hidden, kernel))
  t, w = np.asarray(targets), np.asarray(weights, np.float64)
  logits = h @ k
  shifted = logits - logits.max(-1, keepdims=True)
  logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, t[..., None], -1)[..., 0]
  correct = (logits.argmax(-1) == t).astype(np.float64)
  dlogits = w[..., None] * (np.exp(logp) - np.eye(k.shape[1])[t])
  return ((np.sum(nll * w), np.sum(w), np.sum(correct * w)),
          (dlogits @ k.T, np.einsum('bsd,bsv->dv', h, dlogits)))


@functools.partial(jax.jit, static_argnums=0)
def sums_and_grads(loss_fn, hidden, kernel, targets, weights):
  def nll(h, k):
    sums = loss_fn(h, k, targets, weights)
    return sums[0], sums
  (_, sums), grads = jax.value_and_grad(nll, (0, 1), has_aux=True)(hidden, kernel)
  return sums, grads


@functools.cache  # one function per chunk, so jit compiles each shape once
def chunked(chunk):
  return functools.partial(xent.chunked_xent, chunk=chunk)


def assert_close(actual, expected, rtol, atol):
  for a, e in zip(actual, expected):
    np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(e, np.float64),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize('loss_fn', [xent.full_xent, chunked(8)], ids=['full', 'chunked'])
def test_matches_numpy_log_softmax(loss_fn):
  inputs = make_inputs()
  sums, grads = sums_and_grads(loss_fn, *inputs)
  ref_sums, ref_grads = numpy_reference(*inputs)
  assert_close(sums, ref_sums, 1e-5, 1e-5)
  assert_close(grads, ref_grads, 1e-5, 1e-5)


@pytest.mark.parametrize('chunk', [1, 8, 26, 1000])
def test_chunked_equals_full_float32(chunk):
  inputs = make_inputs(seed=1)
  full_sums, full_grads = sums_and_grads(xent.full_xent, *inputs)
  sums, grads = sums_and_grads(chunked(chunk), *inputs)
  assert_close(sums, full_sums, 1e-5, 1e-5)
  assert_close(grads, full_grads, 1e-5, 1e-6)
  assert grads[0].dtype == jnp.float32 and grads[1].dtype == jnp.float32


def test_chunked_equals_full_bfloat16():
  inputs = make_inputs(jnp.bfloat16, seed=2)
  full_sums, full_grads = sums_and_grads(xent.full_xent, *inputs)
  sums, grads = sums_and_grads(chunked(8), *inputs)
  assert all(s.dtype == jnp.float32 for s in sums)
  assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
  # Logits are rounded to bf16 as the model's head rounds them, and a product of another
  # shape may round a logit the other way; the kernel's gradient is summed over 4 chunks
  # in bf16 rather than in one product.
  assert_close(sums, full_sums, 1e-3, 1e-3)
  assert_close(grads, full_grads, 2e-2, 2e-2)
  ref_sums, _ = numpy_reference(*inputs)
  assert_close(sums, ref_sums, 1e-2, 0)


def test_padding_counts_for_nothing():
  hidden, kernel, targets, weights = make_inputs(seed=3)
  pad = weights == 0
  noisy_hidden = jnp.where(pad[..., None], 1e3, hidden)  # large but finite logits
  noisy_targets = jnp.where(pad, -100, targets)  # Hugging Face's ignored label
  sums, (dh, _) = sums_and_grads(chunked(8), hidden, kernel, targets, weights)
  noisy_sums, (noisy_dh, _) = sums_and_grads(chunked(8), noisy_hidden, kernel, noisy_targets,
                                             weights)
  assert_close(noisy_sums, sums, 1e-6, 1e-6)
  assert float(sums[1]) == float(jnp.sum(weights))
  assert not np.any(np.asarray(noisy_dh)[np.asarray(pad)])


def test_float32_kernel_under_bfloat16_activations():
  """A trained head keeps float32 master weights: its gradient stays float32 through
  the loop, as the full path's."""
  hidden, kernel, targets, weights = make_inputs(seed=6)
  hidden = hidden.astype(jnp.bfloat16)
  full_sums, full_grads = sums_and_grads(xent.full_xent, hidden, kernel, targets, weights)
  sums, grads = sums_and_grads(chunked(8), hidden, kernel, targets, weights)
  assert grads[1].dtype == jnp.float32
  assert_close(sums, full_sums, 1e-3, 1e-3)
  assert_close(grads, full_grads, 2e-2, 2e-2)  # bf16 products, as test_chunked_equals_full_bfloat16


def test_correct_is_the_weighted_argmax_count():
  hidden, kernel, _, weights = make_inputs(seed=4)
  argmax = np.asarray(jnp.argmax(hidden @ kernel, -1))
  # Every third token's target is its argmax, the rest something else.
  hit = (np.arange(BATCH * SEQ).reshape(BATCH, SEQ) % 3) == 0
  targets = jnp.asarray(np.where(hit, argmax, (argmax + 1) % VOCAB), jnp.int32)
  expected = float(np.sum(hit * np.asarray(weights)))
  for loss_fn in (xent.full_xent, chunked(8)):
    assert float(jax.jit(loss_fn)(hidden, kernel, targets, weights)[2]) == expected


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16], ids=['f32', 'bf16'])
@pytest.mark.parametrize('tied', [False, True], ids=['lm_head', 'tied'])
def test_equals_lm_loss_on_the_model_head(tied, dtype):
  """The head as LlamaForCausalLM runs it (activations in `dtype` over float32 params)
  fed to tasks.lm_loss, against xent on the shifted hidden states."""
  rng = np.random.default_rng(5)
  hidden = jnp.asarray(rng.normal(size=(BATCH, SEQ, D)), dtype)
  ids = jnp.asarray(rng.integers(0, VOCAB, (BATCH, SEQ)), jnp.int32)
  mask = jnp.asarray(np.arange(SEQ)[None] < np.array([[SEQ], [7]]), jnp.int32)
  if tied:
    head = nn.Embed(VOCAB, D, dtype=dtype)
    params = head.init(jax.random.key(0), ids)['params']
    logits_fn = lambda h: head.apply({'params': params}, h, method='attend')
    kernel = params['embedding'].T
  else:
    head = nn.Dense(VOCAB, use_bias=False, dtype=dtype)
    params = head.init(jax.random.key(0), hidden)['params']
    logits_fn = lambda h: head.apply({'params': params}, h)
    kernel = params['kernel']
  batch = {'input_ids': ids, 'attention_mask': mask}
  expected = jax.jit(lambda h: tasks.lm_loss(logits_fn(h).astype(jnp.float32), batch))(hidden)
  args = (hidden[:, :-1], kernel, ids[:, 1:], mask[:, 1:])
  # bf16: a logit of a product of another shape may round the other way.
  tol = 1e-5 if dtype == jnp.float32 else 1e-4
  assert_close(jax.jit(xent.full_xent)(*args), expected, tol, tol)
  assert_close(jax.jit(chunked(5))(*args), expected, tol, tol)


def test_refuses_mismatched_shapes_and_bad_chunks():
  hidden, kernel, targets, weights = make_inputs()
  with pytest.raises(ValueError, match='embedding.T'):
    xent.chunked_xent(hidden, kernel.T, targets, weights, chunk=8)
  with pytest.raises(ValueError, match=r'targets and weights \(batch, seq\)'):
    xent.full_xent(hidden, kernel, targets[:, 1:], weights)
  with pytest.raises(ValueError, match='chunk=0'):
    xent.chunked_xent(hidden, kernel, targets, weights, chunk=0)


def test_chunked_gradient_holds_far_less_than_full():
  """The compiled gradient's temporaries: the full path's are a few (tokens, vocab)
  float32 buffers, the chunked one's a few (chunk, vocab) ones."""
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  args = (spec((1, 1024, 64), jnp.float32), spec((64, 32768), jnp.float32),
          spec((1, 1024), jnp.int32), spec((1, 1024), jnp.float32))

  def temp_bytes(loss_fn):
    grad = jax.grad(lambda h, k, t, w: loss_fn(h, k, t, w)[0], (0, 1))
    return jax.jit(grad).lower(*args).compile().memory_analysis().temp_size_in_bytes

  full, chunk = temp_bytes(xent.full_xent), temp_bytes(chunked(128))
  assert chunk < full / 4, (chunk, full)
