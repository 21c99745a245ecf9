"""train/sharding.py: rules fail on an unmatched path, replicate (and report) what a
mesh axis does not divide, FSDP over 'data', adapters sharded like their kernels,
optimizer moments like their params, and a sharded step that equals the unsharded one."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from glora_jax import peft
from glora_jax.adapters import glora, lora
from glora_jax.models import llama
from glora_jax.train import sharding, steps

MESH_AXES = ('data', 'model')


def mesh(data, model):
  return sharding.make_mesh(data, model, jax.devices()[:data * model])


def tiny_llama_params():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
  model = llama.LlamaForCausalLM(config)
  return model, model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params']


def test_unmatched_path_is_an_error_and_rules_come_from_config():
  params = {'a': {'kernel': jnp.zeros((8, 4))}}
  with pytest.raises(ValueError, match="no partition rule matches 'a/kernel'"):
    sharding.partition_specs(params, [(r'b/.*', P())])
  rules = sharding.as_rules([(r'a/kernel', ('model', None)), ('.*', ())])
  assert rules[0] == ('a/kernel', P('model', None))
  assert sharding.partition_specs(params, rules, mesh(1, 2)) == {'a': {'kernel': P('model', None)}}


def test_fsdp_splits_the_largest_free_dimension_of_large_leaves():
  params = {'big': {'kernel': jax.ShapeDtypeStruct((256, 1024), jnp.float32)},
            'small': {'scale': jax.ShapeDtypeStruct((1024,), jnp.float32)},
            'odd': {'kernel': jax.ShapeDtypeStruct((257, 255), jnp.float32)}}
  rules = [(r'big/kernel', P(None, 'model')), (r'.*', P())]
  specs = sharding.partition_specs(params, rules, mesh(4, 2), fsdp=True)
  assert specs['big']['kernel'] == P('data', 'model')  # dim 1 is taken by 'model'
  assert specs['small']['scale'] == P()  # below FSDP_MIN_ELEMENTS
  assert specs['odd']['kernel'] == P()  # nothing divides by 4
  specs = sharding.partition_specs(params, [(r'.*', P())], mesh(8, 1), fsdp=True)
  assert specs['big']['kernel'] == P(None, 'data')  # the larger dimension


@pytest.mark.parametrize('family, expected', [
    (glora.family(ranks=(4,)), {'Ad': P('model', None), 'Au': P(None, 'data'), 'Cd': P('data', None),
                               'Cu': P(None, None), 'D': P('model'), 'E': P('model')}),
    (lora.family(rank=4), {'A': P(None, 'data'), 'B': P('model', None)})])
def test_adapters_take_their_kernels_axes(family, expected):
  _, params = tiny_llama_params()
  m = mesh(2, 4)
  kernel_specs = peft.flatten(sharding.partition_specs(params, llama.partition_rules(), m, fsdp=True,
                                                           fsdp_min_size=1))
  assert kernel_specs['layers_0/self_attn/q_proj/kernel'] == P('data', 'model')
  adapters = peft.attach(params, family, targets=llama.DEFAULT_TARGETS)
  specs = sharding.adapter_specs(adapters.spec, kernel_specs, m)
  q = specs['layers_0/self_attn/q_proj']
  for leaf, spec in expected.items():
    assert q[leaf] == spec, leaf
  # o_proj's kernel is split on its input ('model') and FSDP's 'data' on its output.
  assert kernel_specs['layers_0/self_attn/o_proj/kernel'] == P('model', 'data')
  # Every adapter leaf gets a spec of its own rank.
  for path, layer in specs.items():
    leaves = peft.flatten(adapters.params[path])
    assert {k: len(v) for k, v in peft.flatten(layer).items()} == {
        k: np.ndim(v) for k, v in leaves.items()}


def test_optimizer_moments_follow_their_params():
  params = {'w': jnp.zeros((8, 4)), 'b': jnp.zeros((4,))}
  specs = {'w': P('data', None), 'b': P(None)}
  optimizer = steps.make_optimizer(1e-3, 0.01, clip_norm=1.0)
  opt_specs = sharding.optimizer_state_specs(optimizer, jax.eval_shape(optimizer.init, params), specs)
  adam = opt_specs[1][0]  # chain(clip, adamw): adamw = chain(scale_by_adam, ...)
  assert adam.mu == specs and adam.nu == specs and adam.count == P()


def test_sharded_train_step_equals_unsharded():
  """GLoRA on a tiny LLaMA: frozen FSDP + tensor sharded, adapters and Adam
  moments sharded like their kernels, on 2 x 4 devices, against one device."""
  model, params = tiny_llama_params()
  adapters = peft.attach(params, glora.family(ranks=(2,)), targets=llama.DEFAULT_TARGETS)

  def forward(p, a, s, batch, train, rng):
    return peft.forward(model, p, a, s, batch['input_ids'], batch['attention_mask'])

  from glora_jax.train import tasks
  task = steps.ForwardLoss(forward, tasks.lm_loss)
  # SGD with momentum: a param-shaped optimizer state, and updates proportional
  # to the gradients (Adam's normalisation would amplify rounding noise).
  optimizer = optax.sgd(0.1, momentum=0.9)
  trainable = {'model': {}, 'adapters': adapters.params}
  subnet0 = np.zeros(adapters.spec.num_options.shape, np.int32)
  step = steps.make_train_step(task, adapters.spec, optimizer, supernet=True)
  ids = jax.random.randint(jax.random.key(1), (8, 8), 0, 64)
  batch = {'input_ids': ids, 'attention_mask': jnp.ones_like(ids), 'mask': jnp.ones((8,))}

  def run(m):
    rules = llama.partition_rules()
    frozen_specs = sharding.partition_specs(params, rules, m, fsdp=True, fsdp_min_size=1)
    state = steps.init_state(trainable, optimizer, 0, subnet0)
    t_specs = {'model': {}, 'adapters': sharding.adapter_specs(adapters.spec,
                                                                peft.flatten(frozen_specs), m)}
    s_specs = {'step': P(), 'key': P(), 'subnet': P(), 'trainable': t_specs,
               'opt_state': sharding.optimizer_state_specs(optimizer, state['opt_state'], t_specs)}
    s_sh, f_sh = sharding.named(m, s_specs), sharding.named(m, frozen_specs)
    jitted = jax.jit(step, in_shardings=(s_sh, f_sh, sharding.batch_sharding(m)),
                     out_shardings=(s_sh, sharding.replicated(m), sharding.replicated(m)))
    state, frozen = jax.device_put(state, s_sh), jax.device_put(params, f_sh)
    for _ in range(3):
      state, metrics, _ = jitted(state, frozen, jax.device_put(batch, sharding.batch_sharding(m)))
    au = state['trainable']['adapters']['layers_0/self_attn/q_proj']['Au']
    trace = state['opt_state'][0].trace['adapters']['layers_0/self_attn/q_proj']['Au']
    assert trace.sharding.spec == au.sharding.spec
    return jax.device_get(state['trainable']), float(metrics['loss']), au.sharding.spec

  one, loss_one, _ = run(mesh(1, 1))
  many, loss_many, au_spec = run(mesh(2, 4))
  assert au_spec == P(None, 'data')
  np.testing.assert_allclose(loss_many, loss_one, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), many, one)


def test_quantized_kernels_are_sharded_like_their_kernels_and_run_sharded():
  """An NF4 (double-quantized) tiny LLaMA on 2 x 4 devices: codes and block scales take
  the kernel's axes where they divide, second-level scales are replicated, and the
  sharded forward equals the unsharded one."""
  from glora_jax import quant
  model, params = tiny_llama_params()
  flat = peft.flatten(params)
  for path in peft.match_paths(flat, llama.DEFAULT_TARGETS):
    flat[path] = quant.quantize(flat[path], 'nf4', 16, double=True)
  q = peft.unflatten(flat)
  m, notes = mesh(2, 4), []
  frozen_specs = sharding.partition_specs(q, llama.partition_rules(), m, fsdp=True,
                                          fsdp_min_size=1, notes=notes)
  kernel = peft.flatten(sharding.partition_specs(params, llama.partition_rules(), m, fsdp=True,
                                                 fsdp_min_size=1))
  qs = peft.flatten(frozen_specs)['layers_0/mlp/up_proj/kernel']  # (32, 64): P('data', 'model')
  assert kernel['layers_0/mlp/up_proj/kernel'] == P('data', 'model')
  assert (qs.codes, qs.absmax) == (P('data', 'model'), P('data', 'model'))  # (32, 32), (32, 4)
  assert (qs.absmax_scales, qs.absmax_offset) == (P(), P())
  assert any("quantized 'layers_0/self_attn/k_proj/kernel' dimension 1" in n for n in notes)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
  shardings = sharding.named(m, frozen_specs)
  placed = jax.device_put(q, shardings)
  assert placed['layers_0']['mlp']['up_proj']['kernel'].codes.sharding.spec == P('data', 'model')
  fwd = lambda p: peft.forward(model, p, None, None, ids)
  sharded = jax.jit(fwd, in_shardings=(shardings,))(placed)
  np.testing.assert_allclose(sharded, jax.jit(fwd)(q), rtol=1e-5, atol=1e-5)
