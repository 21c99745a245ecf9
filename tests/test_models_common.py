"""models/common.py: the attention implementations agree with a numpy reference
(grouped heads, causal and padding masks, gradients), and per-layer remat changes
no output or gradient of a model run with adapters through the interception point."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import peft
from glora_jax import subnet as subnet_lib
from glora_jax.adapters import glora, lora
from glora_jax.models import bert, common, llama, vit


def numpy_attention(q, k, v, allowed):
  """Softmax attention in float64, written from the definition."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  h, kv = q.shape[2], k.shape[2]
  k, v = np.repeat(k, h // kv, axis=2), np.repeat(v, h // kv, axis=2)
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  scores = np.where(np.broadcast_to(allowed, scores.shape), scores, -np.inf)
  scores -= scores.max(-1, keepdims=True)
  probs = np.exp(scores)
  probs /= probs.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', probs, v)


def qkv_and_mask(t=16, h=4, kv=2, d=8, b=2):
  kq, kk, kv_ = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (b, t, h, d))
  k = jax.random.normal(kk, (b, t, kv, d))
  v = jax.random.normal(kv_, (b, t, kv, d))
  real = np.ones((b, t), bool)
  real[1, -5:] = False  # padding at the end of the second row
  allowed = np.tril(np.ones((t, t), bool))[None, None] & real[:, None, None, :]
  return q, k, v, jnp.asarray(allowed)


@pytest.mark.parametrize('impl', common.ATTENTION_IMPLS)
def test_attention_matches_numpy(impl):
  q, k, v, allowed = qkv_and_mask()
  out = common.attention(q, k, v, allowed, impl=impl, chunk=4)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, allowed), atol=1e-5, rtol=1e-5)


def test_chunked_attention_gradients_equal_plain():
  q, k, v, allowed = qkv_and_mask()
  loss = lambda impl: lambda q, k, v: jnp.sum(
      jnp.sin(common.attention(q, k, v, allowed, impl=impl, chunk=4)))
  plain = jax.grad(loss('xla'), argnums=(0, 1, 2))(q, k, v)
  chunked = jax.grad(loss('chunked'), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(plain, chunked):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_chunk_must_divide_the_sequence():
  q, k, v, allowed = qkv_and_mask(t=12)
  with pytest.raises(ValueError, match='12 query positions are not a multiple of the chunk 8'):
    common.attention(q, k, v, allowed, impl='chunked', chunk=8)


def test_unknown_choices_are_refused():
  with pytest.raises(ValueError, match=r"remat policy 'some' is unknown; allowed: \['none', 'full', 'dots'\]"):
    llama.LlamaConfig(remat='some')
  with pytest.raises(ValueError, match="attention 'flash' is unknown"):
    vit.ViTConfig(attention='flash')


def tiny_llama(**overrides):
  return llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, **overrides)


def perturbed(adapters, scale=0.1):
  leaves, tree = jax.tree.flatten(adapters.params)
  keys = jax.random.split(jax.random.key(3), len(leaves))
  return adapters.replace(params=jax.tree.unflatten(
      tree, [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]))


def loss_and_grads(model, params, adapters, subnet, *args, **kwargs):
  def loss(adapter_params):
    out = peft.forward(model, params, adapters.replace(params=adapter_params), subnet, *args, **kwargs)
    return jnp.sum(jnp.sin(out))
  return jax.jit(jax.value_and_grad(loss))(adapters.params)


@pytest.mark.parametrize('family, variant', [
    ('glora', dict(remat='full')), ('glora', dict(remat='dots')),
    ('glora', dict(remat='full', attention='chunked', attention_chunk=4)),
    ('glora', dict(attention='dot_product')),
    ('lora_activation', dict(remat='full', attention='chunked', attention_chunk=4))])
def test_llama_remat_and_attention_change_nothing(family, variant):
  base = tiny_llama()
  ids = jax.random.randint(jax.random.key(1), (2, 8), 0, 64)
  mask = jnp.ones((2, 8), jnp.int32).at[1, -3:].set(0)
  params = llama.LlamaForCausalLM(base).init(jax.random.key(2), ids)['params']
  fam = glora.family(ranks=(2, 4)) if family == 'glora' else lora.family(rank=2, mode='activation')
  adapters = perturbed(peft.attach(params, fam, targets=llama.DEFAULT_TARGETS))
  subnet = (subnet_lib.sample(jax.random.key(4), adapters) if family == 'glora' else None)
  want = loss_and_grads(llama.LlamaForCausalLM(base), params, adapters, subnet, ids, mask)
  got = loss_and_grads(llama.LlamaForCausalLM(dataclasses.replace(base, **variant)), params,
                       adapters, subnet, ids, mask)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got[1], want[1])


def test_vit_and_bert_remat_change_nothing():
  cfg = vit.ViTConfig(image_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, mlp_dim=32,
                      num_classes=3, drop_path_rate=0.2)
  images = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  params = vit.VisionTransformer(cfg).init(jax.random.key(1), images)['params']
  adapters = perturbed(peft.attach(params, glora.family(ranks=(2,)), targets=vit.DEFAULT_TARGETS))
  subnet = subnet_lib.sample(jax.random.key(2), adapters)
  rngs = {'dropout': jax.random.key(5)}  # drop-path draws must be the same under remat
  want = loss_and_grads(vit.VisionTransformer(cfg), params, adapters, subnet, images,
                        deterministic=False, rngs=rngs)
  got = loss_and_grads(vit.VisionTransformer(dataclasses.replace(cfg, remat='full')), params,
                       adapters, subnet, images, deterministic=False, rngs=rngs)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got[1], want[1])

  bcfg = bert.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, vocab_size=50)
  ids = jax.random.randint(jax.random.key(0), (2, 6), 0, 50)
  model = bert.BertClassifier(bcfg, 3)
  params = model.init(jax.random.key(1), ids, jnp.ones_like(ids))['params']
  adapters = perturbed(peft.attach(params, glora.family(ranks=(2,)), targets=bert.DEFAULT_TARGETS))
  subnet = subnet_lib.sample(jax.random.key(2), adapters)
  want = loss_and_grads(model, params, adapters, subnet, ids, jnp.ones_like(ids),
                        deterministic=False, rngs=rngs)
  got = loss_and_grads(bert.BertClassifier(dataclasses.replace(bcfg, remat='full'), 3), params,
                       adapters, subnet, ids, jnp.ones_like(ids), deterministic=False, rngs=rngs)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got[1], want[1])


# --------------------------------------------------------------------------- #
# Dropout: the mask against a numpy Threefry-2x32, its rate, and its sharding
# --------------------------------------------------------------------------- #

def numpy_threefry2x32(key, x0, x1):
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011), as Random123 defines it."""
  rot = [13, 15, 26, 6, 17, 29, 16, 24]
  k0, k1 = np.uint32(key[0]), np.uint32(key[1])
  ks = [k0, k1, np.uint32(k0 ^ k1 ^ np.uint32(0x1BD11BDA))]
  x = [x0.astype(np.uint32) + ks[0], x1.astype(np.uint32) + ks[1]]
  for block in range(5):
    for r in rot[(block % 2) * 4:(block % 2) * 4 + 4]:
      x[0] = x[0] + x[1]
      x[1] = ((x[1] << np.uint32(r)) | (x[1] >> np.uint32(32 - r))) ^ x[0]
    x = [x[0] + ks[(block + 1) % 3], x[1] + ks[(block + 2) % 3] + np.uint32(block + 1)]
  return x


def numpy_keep_mask(key_data, rate, shape):
  """keep_mask from its docstring: entry i of the last axis reads 16-bit word i % 4
  (little-endian: the low half of the first output first) of the hash of block
  (row, i // 4), with the blocks numbered row-major."""
  words = -(-shape[-1] // 4)
  counter = np.arange(int(np.prod(shape[:-1])) * words, dtype=np.uint32)
  with np.errstate(over='ignore'):
    hi, lo = numpy_threefry2x32(key_data, np.zeros_like(counter), counter)
  bits = np.stack([hi, lo], -1).view(np.uint16).reshape(shape[:-1] + (4 * words,))[..., :shape[-1]]
  return bits >= np.uint16(round(rate * 65536))


@pytest.mark.parametrize('shape', [(3, 5, 8), (2, 7), (11,)])
def test_keep_mask_matches_numpy_threefry(shape):
  key = jax.random.key(42)
  got = np.asarray(jax.jit(lambda k: common.keep_mask(k, 0.3, shape))(key))
  np.testing.assert_array_equal(got, numpy_keep_mask(np.asarray(jax.random.key_data(key)), 0.3, shape))


def test_keep_mask_rate_and_independence_of_the_four_words():
  n = 1 << 20
  mask = np.asarray(common.keep_mask(jax.random.key(0), 0.1, (256, n // 256)))
  # Each of the four 16-bit words of a hash keeps at the same rate (5 sigma bounds).
  for j in range(4):
    rate = 1 - mask[:, j::4].mean()
    assert abs(rate - 6554 / 65536) < 5 * np.sqrt(0.09 / (n / 4)), (j, rate)
  # Neighbours (same hash) are uncorrelated: P(both dropped) ~ rate^2.
  both = ((~mask[:, 0::4]) & (~mask[:, 1::4])).mean()
  assert abs(both - 0.1**2) < 5 * np.sqrt(0.01 / (n / 4))


def test_dropout_scales_kept_entries_and_draws_the_same_mask_on_a_mesh():
  x = jax.random.normal(jax.random.key(1), (8, 16, 24))
  key = jax.random.key(7)
  single = common.dropout(x, 0.25, key)
  mask = np.asarray(common.keep_mask(key, 0.25, x.shape))
  np.testing.assert_allclose(single, np.where(mask, np.asarray(x) / 0.75, 0.0), rtol=1e-6)
  mesh = jax.make_mesh((8,), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  fn = jax.jit(lambda x, k: common.dropout(x, 0.25, k), out_shardings=sharding)
  sharded = fn(jax.device_put(x, sharding), key)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(single))
  # Each device hashes only its own rows' counters: (1, 16, 6) words, never (8, 16, 6).
  hlo = fn.lower(jax.device_put(x, sharding), key).compile().as_text()
  assert 'u32[1,16,6]' in hlo and 'u32[8,16,6' not in hlo


def test_dropout_module_is_identity_when_deterministic_and_rate_one_zeros():
  x = jnp.arange(12.0).reshape(3, 4)
  module = common.Dropout(0.5)
  np.testing.assert_array_equal(module.apply({}, x, True), x)
  np.testing.assert_array_equal(common.dropout(x, 1.0, jax.random.key(0)), np.zeros((3, 4)))
  y = module.apply({}, x, False, rngs={'dropout': jax.random.key(0)})
  assert set(np.unique(np.asarray(y) / np.where(x == 0, 1, np.asarray(x)))) <= {0.0, 2.0}
