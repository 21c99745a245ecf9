"""peft: attach / apply / merge / partition as pytree transforms."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import peft
from glora_jax import subnet as subnet_lib
from glora_jax.adapters import glora, lora


class MLP(nn.Module):
  fc2_bias: bool = False  # a merged GLoRA layer without bias gains one

  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(48, name='fc1')(x))
    x = nn.Dense(16, name='fc2', use_bias=self.fc2_bias)(x)
    return nn.Dense(3, name='head')(x)


class Block(nn.Module):
  """One pre-norm Transformer block, written independently of glora_jax.models."""
  dim: int = 32
  heads: int = 4

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm(name='norm1')(x)
    b, t, d = h.shape
    q, k, v = (nn.Dense(d, name=n)(h).reshape(b, t, self.heads, d // self.heads)
               for n in ('query', 'key', 'value'))
    att = jax.nn.softmax(jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d // self.heads), -1)
    o = jnp.einsum('bhqk,bkhd->bqhd', att, v).reshape(b, t, d)
    x = x + nn.Dense(d, name='out')(o)
    h = nn.LayerNorm(name='norm2')(x)
    return x + nn.Dense(d, name='fc2')(nn.gelu(nn.Dense(4 * d, name='fc1')(h)))


def perturbed(adapters, seed=0, scale=0.1):
  """Adapters with all leaves random, so every support contributes."""
  leaves, tree = jax.tree.flatten(adapters.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
  return adapters.replace(params=jax.tree.unflatten(tree, new))


def mlp_setup(family=None):
  model = MLP()
  x = jax.random.normal(jax.random.key(0), (4, 16))
  params = model.init(jax.random.key(1), x)['params']
  adapters = peft.attach(params, family or glora.family(ranks=(2, 4)), targets=r'fc\d/kernel')
  return model, params, x, adapters


def test_attach_finds_targets_in_natural_order_and_records_bias():
  _, params, _, adapters = mlp_setup()
  assert adapters.spec.paths == ('fc1', 'fc2')
  assert [l.has_bias for l in adapters.spec.layers] == [True, False]
  assert [l.kernel_shape for l in adapters.spec.layers] == [(16, 48), (48, 16)]
  assert adapters.spec.num_options.shape == (2, 5)


def test_init_equals_base_model_for_sampled_subnets():
  model, params, x, adapters = mlp_setup()
  base = model.apply({'params': params}, x)
  for i in range(10):
    subnet = subnet_lib.sample(jax.random.key(i), adapters)
    out = peft.forward(model, params, adapters, subnet, x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(base))


@pytest.mark.parametrize('which', ['mlp', 'block'])
def test_merged_equals_adapted_for_random_subnets(which):
  if which == 'mlp':
    model, params, x, adapters = mlp_setup()
    plain = MLP(fc2_bias=True)
  else:
    model = Block()
    x = jax.random.normal(jax.random.key(0), (2, 5, 32))
    params = model.init(jax.random.key(1), x)['params']
    adapters = peft.attach(params, glora.family(ranks=(2, 4)),
                           targets=r'(query|key|value|out|fc1|fc2)/kernel')
    assert len(adapters.spec.layers) == 6
    plain = model
  adapters = perturbed(adapters)
  fwd = jax.jit(lambda a, s: peft.forward(model, params, a, s, x))
  for i in range(20):
    subnet = subnet_lib.sample(jax.random.key(100 + i), adapters)
    merged = peft.merge(params, adapters, subnet)
    flat, flat_merged = peft.flatten(params), peft.flatten(merged)
    chex.assert_trees_all_equal_shapes_and_dtypes({k: flat_merged[k] for k in flat}, flat)
    np.testing.assert_allclose(plain.apply({'params': merged}, x), fwd(adapters, subnet),
                               rtol=1e-5, atol=1e-5)


def test_c_with_a_active_merges_with_frozen_w0():
  """b' uses W0 @ C, not W' @ C (the authors' LLaMA fork bug)."""
  model, params, x, adapters = mlp_setup()
  adapters = perturbed(adapters, scale=0.5)
  fam = adapters.spec.layers[0].family
  row = {'A': 'lora_4', 'B': 'vector', 'C': 'lora_4', 'D': 'none', 'E': 'none'}
  subnet = subnet_lib.from_dict(adapters, {'fc1': row, 'fc2': row})
  merged = peft.merge(params, adapters, subnet)
  p = adapters.params['fc1']
  a = np.asarray(p['Ad'] @ p['Au'])
  c = np.asarray(p['Cd'] @ p['Cu'])[:, 0]
  w0 = np.asarray(params['fc1']['kernel']).T
  b_vec = np.asarray(p['Bd'][:, :1])
  np.testing.assert_allclose(np.asarray(merged['fc1']['kernel']).T, w0 + w0 * a + b_vec, rtol=1e-5, atol=1e-5)
  right = np.asarray(params['fc1']['bias']) + w0 @ c
  wrong = np.asarray(params['fc1']['bias']) + (w0 + w0 * a + b_vec) @ c
  np.testing.assert_allclose(np.asarray(merged['fc1']['bias']), right, rtol=1e-5, atol=1e-5)
  assert np.abs(right - wrong).max() > 1e-2
  # fc2 had no bias: merging gives it one, and the plain model with biases agrees.
  assert 'bias' in merged['fc2'] and 'bias' not in params['fc2']
  assert fam.name == 'glora'


def test_merge_keeps_bf16_dtypes():
  model, params, x, adapters = mlp_setup()
  params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
  merged = peft.merge(params16, perturbed(adapters), subnet_lib.sample(jax.random.key(0), adapters))
  chex.assert_type(jax.tree.leaves(merged), jnp.bfloat16)


def test_lora_weight_and_activation_modes_agree_and_merge():
  model, params, x, _ = mlp_setup()
  outs = []
  for mode in ('weight', 'activation'):
    adapters = perturbed(peft.attach(params, lora.family(rank=4, alpha=8, mode=mode),
                                     targets=r'fc\d/kernel'))
    outs.append(peft.forward(model, params, adapters, None, x))
    merged = peft.merge(params, adapters)
    np.testing.assert_allclose(model.apply({'params': merged}, x), outs[-1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)


def test_gradients_reach_adapter_leaves_only():
  model, params, x, adapters = mlp_setup()
  subnet = subnet_lib.from_dict(adapters, {p: {'A': 'lora_4', 'B': 'lora_4', 'C': 'vector', 'D': 'vector',
                                               'E': 'vector'} for p in ('fc1', 'fc2')})

  def loss(frozen, adapter_params):
    a = adapters.replace(params=adapter_params)
    return jnp.sum(peft.forward(model, frozen, a, subnet, x) ** 2)

  g_frozen, g_adapters = jax.grad(loss, argnums=(0, 1))(params, adapters.params)
  # The optimizer only ever sees adapter gradients; the frozen tree is a separate
  # argument, so asking only for argnums=1 computes nothing for it.
  chex.assert_trees_all_equal_shapes_and_dtypes(g_adapters, adapters.params)
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_adapters))
  only = jax.grad(loss, argnums=1)(params, adapters.params)
  chex.assert_trees_all_equal_shapes_and_dtypes(only, adapters.params)
  del g_frozen
  trainable, frozen = peft.partition(params, [r'head/.*'])
  assert set(trainable) == {'head'} and 'head' not in frozen
  assert peft.combine(trainable, frozen).keys() == params.keys()


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_pattern_matching_nothing_lists_paths():
  _, params, _, _ = mlp_setup()
  with pytest.raises(ValueError, match=r"'.*qery/kernel' matched no parameter; paths look like 'fc1/bias'"):
    peft.attach(params, glora.family(), targets=r'.*qery/kernel')


def test_target_that_is_not_a_kernel():
  _, params, _, _ = mlp_setup()
  with pytest.raises(ValueError, match="matched 'fc1/bias', which is not a Dense kernel"):
    peft.attach(params, glora.family(), targets=r'fc1/.*')


def test_kernel_that_is_not_2d():
  params = {'conv': {'kernel': jnp.zeros((3, 3, 4, 8))}}
  with pytest.raises(ValueError, match=r"'conv/kernel' has shape \(3, 3, 4, 8\); expected a 2-D"):
    peft.attach(params, glora.family(), targets=r'conv/kernel')


def test_rank_above_layer_width():
  _, params, _, _ = mlp_setup()
  with pytest.raises(ValueError, match=r"rank 32 is above min\(in, out\) = 16 for 'fc1'"):
    peft.attach(params, glora.family(ranks=(32,)), targets=r'fc1/kernel')


def test_subnet_of_wrong_shape():
  model, params, x, adapters = mlp_setup()
  with pytest.raises(ValueError, match=r'expected \(2, 5\)'):
    peft.forward(model, params, adapters, jnp.zeros((3, 5), jnp.int32), x)


@pytest.mark.parametrize('value, message', [
    (9, r"subnet\[1, 1\] = 9: layer 'fc2' support 'B' has 5 options; allowed 0..4 \(lora_2, lora_4, vector, constant, none\)"),
    (-1, r"subnet\[1, 1\] = -1: layer 'fc2' support 'B' has 5 options; allowed 0..4")])
def test_out_of_range_subnet_is_refused_where_it_enters(value, message):
  model, params, x, adapters = mlp_setup()
  subnet = np.zeros((2, 5), np.int32)
  subnet[1, 1] = value
  for use in (lambda: peft.forward(model, params, adapters, subnet, x),
              lambda: peft.merge(params, adapters, subnet),
              lambda: peft.report(params, adapters, subnet)):
    with pytest.raises(ValueError, match=message):
      use()
  # Inside jit the subnet is traced and not checked (in-range by construction).
  jax.jit(lambda s: peft.forward(model, params, adapters, s, x))(jnp.zeros((2, 5), jnp.int32))


def test_padding_column_of_a_family_without_that_support_must_be_zero():
  model, params, x, _ = mlp_setup()
  adapters = peft.attach(params, rules=[(r'fc1/kernel', glora.family(ranks=(2,))),
                                        (r'fc2/kernel', lora.family(rank=2))])
  subnet = np.zeros((2, 5), np.int32)
  subnet[1, 0] = 1
  with pytest.raises(ValueError, match=r"layer 'fc2' \(lora\) has 0 supports, so this padding entry must be 0"):
    peft.merge(params, adapters, subnet)


def test_a_layer_the_model_never_calls_is_an_error():
  """A layer whose runtime path differs from its parameter path (nn.scan, a
  shared module) or that the method run skips would keep its adapters silently
  unused: the hooks count the layers they saw and forward refuses a miss."""

  class TwoHeads(nn.Module):
    def setup(self):
      self.body = nn.Dense(8)
      self.head = nn.Dense(3)

    def features(self, x):
      return self.body(x)

    def __call__(self, x):
      return self.head(self.body(x))

  model = TwoHeads()
  x = jnp.ones((2, 8))
  params = model.init(jax.random.key(0), x)['params']
  adapters = peft.attach(params, lora.family(rank=2), targets=r'(body|head)/kernel')
  assert peft.forward(model, params, adapters, None, x).shape == (2, 3)
  with pytest.raises(ValueError, match=r"1 adapted layers were never called by the model, e\.g\. 'head'"):
    peft.forward(model, params, adapters, None, x, method=TwoHeads.features)


def quantized(params, kind='nf4', block=16, pattern=r'fc\d/kernel'):
  """params with the kernels `pattern` matches quantized (glora_jax.quant)."""
  import re
  from glora_jax import quant
  flat = {k: quant.quantize(v, kind, block) if re.fullmatch(pattern, k) else v
          for k, v in peft.flatten(params).items()}
  return peft.unflatten(flat)


@pytest.mark.parametrize('kind', ['nf4', 'int8'])
def test_quantized_kernels_compute_as_their_dequantized_floats(kind):
  from glora_jax import quant
  model, params, x, adapters = mlp_setup()
  q = quantized(params, kind)
  deq = quant.dequantize_tree(q)
  assert not np.allclose(deq['fc1']['kernel'], params['fc1']['kernel'], atol=1e-4)
  adapters = perturbed(adapters)
  fwd = jax.jit(lambda p, a, s: peft.forward(model, p, a, s, x))
  for seed in range(3):
    s = subnet_lib.sample(jax.random.key(seed), adapters.spec)
    np.testing.assert_allclose(fwd(q, adapters, s), fwd(deq, adapters, s), rtol=1e-6, atol=1e-6)
  # No adapters: a plain forward of a quantized tree goes through the same hook.
  plain = jax.jit(lambda p: peft.forward(model, p, None, None, x))
  np.testing.assert_allclose(plain(q), model.apply({'params': deq}, x), rtol=1e-6, atol=1e-6)
  lora_adapters = perturbed(peft.attach(params, lora.family(rank=2), targets=r'fc1/kernel'))
  np.testing.assert_allclose(fwd(q, lora_adapters, None), fwd(deq, lora_adapters, None),
                             rtol=1e-6, atol=1e-6)


def test_quantized_layer_gradients_equal_the_float_layers():
  from glora_jax import quant
  model, params, x, adapters = mlp_setup()
  q = quantized(params, 'nf4')
  deq = quant.dequantize_tree(q)
  adapters = perturbed(adapters)
  s = subnet_lib.largest(adapters.spec)
  loss = lambda p, a: jnp.sum(peft.forward(model, p, a, s, x) ** 2)
  g_q = jax.jit(jax.grad(loss, argnums=1))(q, adapters)
  g_f = jax.jit(jax.grad(loss, argnums=1))(deq, adapters)
  chex.assert_trees_all_close(g_q.params, g_f.params, rtol=1e-5, atol=1e-6)
  assert any(float(jnp.abs(l).max()) > 0 for l in jax.tree.leaves(g_q.params))


def test_the_backward_pass_keeps_codes_not_float_kernels(capsys):
  """Only the layer being run holds its float kernel: the residuals saved for the
  backward pass hold the quantized codes, and no float (16, 48) or (48, 16) kernel."""
  from jax import ad_checkpoint
  model, params, x, adapters = mlp_setup()
  s = subnet_lib.largest(adapters.spec)
  for tree, codes in ((quantized(params, 'nf4'), True), (params, False)):
    capsys.readouterr()
    ad_checkpoint.print_saved_residuals(
        lambda a: jnp.sum(peft.forward(model, tree, a, s, x) ** 2), adapters)
    saved = capsys.readouterr().out
    assert ('u8[16,24]' in saved and 'u8[48,8]' in saved) == codes
    assert ('f32[16,48]' in saved or 'f32[48,16]' in saved) == (not codes), saved


def test_merge_from_a_quantized_base_equals_the_adapted_model():
  from glora_jax import quant
  model, params, x, adapters = mlp_setup()
  q = quantized(params, 'nf4')
  adapters = perturbed(adapters)
  s = subnet_lib.sample(jax.random.key(3), adapters.spec)
  merged = peft.merge(q, adapters, s)
  assert not quant.has_quantized(merged)
  assert merged['fc1']['kernel'].dtype == jnp.float32
  chex.assert_trees_all_close(merged, peft.merge(quant.dequantize_tree(q), adapters, s))
  merged_model = MLP(fc2_bias=True)
  np.testing.assert_allclose(merged_model.apply({'params': merged}, x),
                             peft.forward(model, q, adapters, s, x), rtol=1e-5, atol=1e-5)


def test_a_quantized_leaf_outside_a_dense_layer_is_an_error():
  model = Block()
  x = jnp.ones((1, 4, 32))
  params = model.init(jax.random.key(0), x)['params']
  q = quantized(params, 'int8', 16, pattern='norm1/scale')
  with pytest.raises(TypeError, match=r"quantized \['scale'\] of layer 'norm1' is a LayerNorm"):
    peft.forward(model, q, None, None, x)
