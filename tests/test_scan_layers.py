"""Layers under scan (model.scan_layers, models/stacking.py): the scanned model of each
family computes what the unrolled one does, plain and with GLoRA (a random subnet), LoRA
and SURM built inside its layers, gradients included; merging from stacked params equals
merging per layer; the KV cache and the sharding rules follow the stack."""
import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glora_jax import peft, quant, subnet as subnet_lib
from glora_jax.adapters import glora, lora, surm
from glora_jax.models import llama, registry, stacking, vit
from glora_jax.train import sharding

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def perturbed(adapters, seed=0, scale=0.1):
  """Adapters with all leaves random, so every support contributes."""
  leaves, tree = jax.tree.flatten(adapters.params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [scale * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]
  return adapters.replace(params=jax.tree.unflatten(tree, new))


def _vit():
  config = vit.ViTConfig(image_size=16, patch_size=8, embed_dim=16, depth=3, num_heads=2,
                         mlp_dim=32, num_classes=3)
  model = vit.VisionTransformer(config)
  return model, registry.init_params(model, 0)


def _models():
  """(name, unrolled model, its params, inputs)"""
  out = []
  model, params = registry.load(FIXTURES / 'hf_qwen2')  # q, k, v biases; GQA
  ids = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 0, 0]])
  out.append(('qwen2', model, params, (ids, np.array([[1] * 6, [1, 1, 1, 1, 0, 0]]))))
  model, params = registry.load(FIXTURES / 'hf_bert')
  out.append(('bert', model, params, (ids, np.array([[1] * 6, [1, 1, 1, 1, 0, 0]]))))
  model, params = _vit()
  images = np.asarray(jax.random.normal(jax.random.key(1), (2, 16, 16, 3)))
  out.append(('vit', model, params, (images,)))
  return out


MODELS = _models()


def scanned(model):
  return model.clone(config=dataclasses.replace(model.config, scan_layers=True))


@pytest.mark.parametrize('name, model, params, inputs', MODELS, ids=[m[0] for m in MODELS])
def test_scanned_model_equals_unrolled(name, model, params, inputs):
  scan = scanned(model)
  st = registry.stack_of(scan)
  stacked = stacking.stack(params, st)
  assert stacking.is_stacked(stacked, st) and not stacking.is_stacked(params, st)
  init = jax.eval_shape(lambda: scan.init(jax.random.key(0), *inputs)['params'])
  assert jax.tree.map(lambda x: x.shape, init) == jax.tree.map(jnp.shape, stacked)
  jax.tree.map(np.testing.assert_array_equal, stacking.unstack(stacked, st), params)
  want = jax.jit(model.apply)({'params': params}, *inputs)
  got = jax.jit(scan.apply)({'params': stacked}, *inputs)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


# GLoRA on every family; LoRA and SURM (activation mode) on one each.
CASES = [(m, 'glora', glora.family(ranks=(2, 4))) for m in MODELS] + [
    (MODELS[0], 'lora', lora.family(rank=2, alpha=4)), (MODELS[2], 'surm', surm.family())]


@pytest.mark.parametrize('case, adapter', [(m, a) for m, _, a in CASES],
                         ids=[f'{m[0]}-{n}' for m, n, _ in CASES])
def test_adapted_scanned_model_equals_unrolled(case, adapter):
  """Outputs and adapter gradients under a random subnet, and the merge from stacked
  params (restacked, equal to the per-layer merge) gives the adapted outputs."""
  name, model, params, inputs = case
  family = registry.of_model(model)
  adapters = perturbed(peft.attach(params, adapter, targets=family.default_targets))
  subnet = subnet_lib.sample(jax.random.key(3), adapters)
  scan = scanned(model)
  stacked = stacking.stack(params, registry.stack_of(scan))

  def loss(ad_params, m, p):
    out = peft.forward(m, p, adapters.replace(params=ad_params), subnet, *inputs)
    return jnp.sum(jnp.sin(out)), out

  grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
  (g_want, want), (g_got, got) = grad(adapters.params, model, params), grad(adapters.params,
                                                                            scan, stacked)
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
  # float32 sums in another order: tolerance relative to the gradients' scale
  scale = max(1.0, max(float(np.abs(g).max()) for g in jax.tree.leaves(g_want)))
  close = lambda a, b: np.testing.assert_allclose(a, b, atol=2e-6 * scale, rtol=1e-4)
  jax.tree.map(close, g_got, g_want)
  # Adapters held stacked, as a scan_layers run trains them: the same outputs and merge.
  held = adapters.replace(params=stacking.stack_by_path(adapters.params, adapters.spec.paths,
                                                        registry.stack_of(scan)))
  assert set(held.params) != set(adapters.params)
  jax.tree.map(np.testing.assert_array_equal,
               stacking.per_layer(held.params, adapters.spec.paths), adapters.params)
  np.testing.assert_array_equal(jax.jit(lambda a: peft.forward(scan, stacked, a, subnet, *inputs))(
      held), jax.jit(lambda a: peft.forward(scan, stacked, a, subnet, *inputs))(adapters))
  merged = peft.merge(stacked, held, subnet)
  assert stacking.is_stacked(merged, registry.stack_of(scan))
  per_layer = peft.merge(params, adapters, subnet)
  jax.tree.map(np.testing.assert_array_equal,
               stacking.unstack(merged, registry.stack_of(scan)), per_layer)
  plain, plain_params = peft.merge_model(scan, stacked, adapters, subnet)
  np.testing.assert_allclose(jax.jit(plain.apply)({'params': plain_params}, *inputs), want,
                             atol=5e-5, rtol=1e-4)


def test_quantized_stacked_kernels_equal_per_layer():
  """An NF4 frozen base stacked child by child: the scanned model dequantizes each
  layer's slice inside its block, as the unrolled model does."""
  name, model, params, inputs = MODELS[0]
  q = {k: quant.quantize(v, 'nf4', 8) if k.endswith('proj/kernel') and 'layers_' in k else v
       for k, v in peft.flatten(params).items()}
  q = peft.unflatten(q)
  adapters = perturbed(peft.attach(params, lora.family(rank=2, alpha=4),
                                   targets=registry.of_model(model).default_targets))
  want = peft.forward(model, q, adapters, None, *inputs)
  scan = scanned(model)
  got = peft.forward(scan, stacking.stack(q, registry.stack_of(scan)), adapters, None, *inputs)
  np.testing.assert_allclose(got, want, atol=3e-5, rtol=1e-5)
  # Sharded like the stacked float kernel: codes and scales behind an unsplit layer axis.
  st = registry.stack_of(scan)
  specs = sharding.partition_specs(stacking.stack(q, st), llama.partition_rules(), None, stack=st)
  assert specs['layers']['mlp']['down_proj']['kernel'].codes == P(None, 'model', None)


def test_cached_steps_under_scan_equal_the_full_forward():
  name, model, params, inputs = MODELS[0]
  scan = scanned(model)
  stacked = stacking.stack(params, registry.stack_of(scan))
  ids, mask = inputs
  cache = llama.init_cache(scan.config, 2, 6)
  assert cache['layers']['k'].shape[0] == scan.config.num_hidden_layers
  full = model.apply({'params': params}, ids[:1])
  logits, cache = scan.apply({'params': stacked}, ids[:1, :4], None, cache=llama.init_cache(
      scan.config, 1, 6))
  np.testing.assert_allclose(logits, full[:, :4], atol=2e-5, rtol=0)
  for t in (4, 5):
    logits, cache = scan.apply({'params': stacked}, ids[:1, t:t + 1], None, cache=cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=2e-5, rtol=0)


def test_layers_adapted_unalike_are_refused():
  name, model, params, inputs = MODELS[0]
  adapters = peft.attach(params, glora.family(), targets=r'layers_0/self_attn/q_proj/kernel')
  scan = scanned(model)
  with pytest.raises(ValueError, match=r"'layers/self_attn/q_proj' is adapted in layers \[0\] "
                                       r'but not in \[1\]'):
    peft.forward(scan, stacking.stack(params, registry.stack_of(scan)), adapters,
                 np.zeros(adapters.spec.num_options.shape, np.int32), *inputs)


def test_stacked_leaves_shard_like_each_layer():
  """The rules see each layer's path and shape; the layer axis is never split (FSDP
  included), so each scan step gathers one layer's slice."""
  rules = llama.partition_rules()
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ('data', 'model'))
  st = stacking.Stack('layers_', 4)
  tree = {'layers': {'mlp': {'up_proj': {'kernel': jax.ShapeDtypeStruct((4, 512, 1024),
                                                                       jnp.float32)}}},
          'lm_head': {'kernel': jax.ShapeDtypeStruct((512, 1024), jnp.float32)}}
  specs = sharding.partition_specs(tree, rules, None, stack=st)
  assert specs['layers']['mlp']['up_proj']['kernel'] == P(None, None, 'model')
  assert specs['lm_head']['kernel'] == P(None, ('model', 'data'))
  assert sharding.pspec_for('layers/mlp/up_proj/kernel', (4, 512, 1024), rules, mesh,
                            stack=st) == P(None, None, 'model')
