"""Tests for glora_jax.search.export: merged params into a bias-less LLaMA, the plain
model described by model_config.json, and exports that refuse to be silently wrong."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors import numpy as st_numpy

from glora_jax import errors, peft
from glora_jax import subnet as subnet_lib
from glora_jax.adapters import glora
from glora_jax.models import llama
from glora_jax.search import export

IDS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 8)), jnp.int32)
MASK = jnp.asarray([[1] * 8, [1] * 5 + [0] * 3])


def tiny_llama(targets=llama.DEFAULT_TARGETS):
  """A 2-layer LLaMA (no biases anywhere) and GLoRA adapters with every leaf
  random, so each chosen support changes the outputs."""
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)
  model = llama.LlamaForCausalLM(config)
  params = jax.jit(model.init)(jax.random.key(0), IDS)['params']
  adapters = peft.attach(params, glora.family(ranks=(2,)), targets=targets)
  rng = np.random.default_rng(1)
  adapters = adapters.replace(params=jax.tree.map(
      lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), adapters.params))
  return model, params, adapters


def choose(spec, bias_in=(), c='none', e='vector'):
  """A and B low rank everywhere; C and E (the supports that make a bias) only in
  the layers whose path contains one of `bias_in`."""
  choices = {}
  for path in spec.paths:
    biased = any(s in path for s in bias_in)
    choices[path] = {'A': 'lora_2', 'B': 'lora_2', 'C': c if biased else 'none', 'D': 'vector',
                     'E': e if biased else 'none'}
  return subnet_lib.from_dict(spec, choices)


def logits(model, params):
  return jax.jit(model.apply)({'params': params}, IDS, MASK)


@functools.partial(jax.jit, static_argnums=0)
def adapted_logits(model, params, adapters, subnet):
  return peft.forward(model, params, adapters, subnet, IDS, MASK)


def merged(params, adapters, subnet):
  # jitted: an eager merge compiles op by op, several times slower on this tiny model
  return jax.jit(export.merged_params, static_argnums=2)(
      params, {'model': {}, 'adapters': adapters.params}, adapters.spec, subnet)


def test_biases_gained_in_attention_give_a_model_with_attention_bias(tmp_path):
  model, params, adapters = tiny_llama()
  subnet = choose(adapters.spec, bias_in=('layers_1/self_attn/v_proj',), c='vector')
  adapted = adapted_logits(model, params, adapters, subnet)
  params_merged = merged(params, adapters, subnet)
  # The bug this guards against: the bias-less model reads the merged kernels and
  # ignores the bias the merge added, without a word.
  assert not np.allclose(logits(model, params_merged), adapted, atol=1e-2)

  plain, plain_params = export.plain_model(model, params_merged)
  assert plain.config.attention_bias and not plain.config.mlp_bias
  flat = peft.flatten(plain_params)
  assert not any('mlp' in p and p.endswith('/bias') for p in flat)  # zero biases dropped
  np.testing.assert_array_equal(flat['layers_0/self_attn/q_proj/bias'], 0.0)  # filled
  assert np.abs(flat['layers_1/self_attn/v_proj/bias']).max() > 1e-3  # gained
  np.testing.assert_allclose(logits(plain, plain_params), adapted,
                             atol=1e-5, rtol=0)

  files = export.save_merged(tmp_path, plain, plain_params)
  described = json.loads((tmp_path / 'model_config.json').read_text())
  assert described['model'] == 'llama' and described['config']['attention_bias'] is True
  assert described['config']['dtype'] == 'float32'
  assert 'remat' not in described['config']  # how it computes, not what: not recorded
  assert sorted(files) == ['hf', 'merged_params', 'merged_params.safetensors', 'model_config.json']
  # The same params in transformers' layout, read back by the LLaMA importer.
  hf_config, hf_params = llama.load_llama(files['hf'])
  assert hf_config.attention_bias and not hf_config.mlp_bias
  np.testing.assert_allclose(logits(llama.LlamaForCausalLM(hf_config), hf_params), adapted,
                             atol=1e-5, rtol=0)
  loaded, loaded_params = export.load_merged(tmp_path)
  assert loaded.config == llama.LlamaConfig(**{**described['config'], 'dtype': jnp.float32})
  np.testing.assert_allclose(logits(loaded, loaded_params), adapted,
                             atol=1e-5, rtol=0)


def test_a_subnet_without_c_and_e_keeps_the_bias_less_model():
  model, params, adapters = tiny_llama()
  subnet = choose(adapters.spec)
  plain, plain_params = export.plain_model(model, merged(params, adapters, subnet))
  assert plain.config == model.config
  assert not any(p.endswith('/bias') for p in peft.flatten(plain_params))
  np.testing.assert_allclose(logits(plain, plain_params),
                             adapted_logits(model, params, adapters, subnet),
                             atol=1e-5, rtol=0)


def test_a_bias_the_plain_model_cannot_hold_is_refused(tmp_path):
  model, params, adapters = tiny_llama(targets=llama.DEFAULT_TARGETS + '|lm_head/kernel')
  params_merged = merged(params, adapters, choose(adapters.spec, bias_in=('lm_head',)))
  with pytest.raises(errors.ExportError, match=r"'lm_head/bias'.*GLoRA's C or E"):
    export.plain_model(model, params_merged)
  # save_merged checks too: nothing is written for a model that would ignore a leaf.
  with pytest.raises(errors.ExportError, match=r"not in the model: \['layers_0/mlp/down_proj/bias'"):
    export.save_merged(tmp_path, model, params_merged)
  assert not list(tmp_path.iterdir())


def test_load_merged_names_an_extra_or_missing_leaf(tmp_path):
  model, params, adapters = tiny_llama()
  export.save_merged(tmp_path, *export.plain_model(model, merged(params, adapters,
                                                                 choose(adapters.spec))))
  path = tmp_path / 'merged_params.safetensors'
  flat = st_numpy.load_file(str(path))
  st_numpy.save_file({**flat, 'layers_0/mlp/up_proj/bias': np.zeros(64, np.float32)}, str(path))
  with pytest.raises(errors.ExportError, match=r"not in the model: \['layers_0/mlp/up_proj/bias'\]"):
    export.load_merged(tmp_path)
  del flat['norm/scale']
  st_numpy.save_file(flat, str(path))
  with pytest.raises(errors.ExportError, match=r"missing: \['norm/scale'\]"):
    export.load_merged(tmp_path)
  (tmp_path / 'model_config.json').write_text(json.dumps({'model': 'gpt2', 'config': {}}))
  with pytest.raises(errors.ExportError, match="model 'gpt2'; known: .*'llama'"):
    export.load_merged(tmp_path)


def test_export_formats_choose_what_is_written(tmp_path):
  model, params, adapters = tiny_llama()
  plain, plain_params = export.plain_model(model, merged(params, adapters, choose(adapters.spec)))
  files = export.save_merged(tmp_path / 'torch', plain, plain_params, formats='torch')
  assert list(files) == ['hf']
  assert sorted(p.name for p in (tmp_path / 'torch').iterdir()) == ['hf']
  assert sorted(p.name for p in (tmp_path / 'torch' / 'hf').iterdir()) == ['config.json',
                                                                         'model.safetensors']
  files = export.save_merged(tmp_path / 'flax', plain, plain_params, formats=['flax'])
  assert 'hf' not in files and not (tmp_path / 'flax' / 'hf').exists()
  with pytest.raises(errors.ConfigError, match=r"unknown export formats \['onnx'\]; choose one or "
                     r"more of \['flax', 'torch'\]"):
    export.save_merged(tmp_path / 'bad', plain, plain_params, formats='flax,onnx')
  assert not (tmp_path / 'bad').exists()


def test_merge_from_an_nf4_base_equals_the_adapted_model(tmp_path):
  """GLoRA with a random subnet over the hf_bert fixture's NF4 (double-quantized)
  kernels: the merged float model's outputs equal the adapted quantized model's."""
  import pathlib
  from glora_jax import quant
  from glora_jax.models import bert, registry
  model, params = registry.load(pathlib.Path(__file__).parent / 'fixtures' / 'hf_bert')
  flat = peft.flatten(params)
  for path in peft.match_paths(flat, bert.DEFAULT_TARGETS):
    flat[path] = quant.quantize(flat[path], 'nf4', 16, double=True)
  base = peft.unflatten(flat)
  adapters = peft.attach(params, glora.family(ranks=(2,)), targets=bert.DEFAULT_TARGETS)
  rng = np.random.default_rng(4)
  adapters = adapters.replace(params=jax.tree.map(
      lambda x: jnp.asarray(0.1 * rng.standard_normal(x.shape), x.dtype), adapters.params))
  subnet = subnet_lib.sample(jax.random.key(5), adapters.spec)
  trainable = {'model': {}, 'adapters': adapters.params}
  merged = export.merged_params(base, trainable, adapters.spec, subnet)
  assert not quant.has_quantized(merged)
  plain, plain_params = export.plain_model(model, merged)
  ids = jnp.asarray(rng.integers(1, 200, (2, 12)), jnp.int32)
  mask = jnp.asarray([[1] * 12, [1] * 7 + [0] * 5], jnp.int32)
  adapted = jax.jit(lambda p, a: peft.forward(model, p, a, subnet, ids, mask))(base, adapters)
  np.testing.assert_allclose(plain.apply({'params': plain_params}, ids, mask), adapted,
                             rtol=1e-5, atol=1e-5)
  # The float base merges otherwise: the NF4 W0 is what was merged.
  float_merged = export.merged_params(params, trainable, adapters.spec, subnet)
  assert not np.allclose(float_merged['encoder']['layer_0']['attention']['query']['kernel'],
                         merged['encoder']['layer_0']['attention']['query']['kernel'], atol=1e-4)
  # The export says what it was merged from, and loads back as the plain model.
  export.save_merged(tmp_path, plain, plain_params, ('flax',),
                     merged_from={'frozen_quant': 'nf4, block 16, double-quantized scales'})
  description = json.loads((tmp_path / 'model_config.json').read_text())
  assert description['merged_from'] == {'frozen_quant': 'nf4, block 16, double-quantized scales'}
  loaded_model, loaded = export.load_merged(tmp_path)
  np.testing.assert_array_equal(loaded_model.apply({'params': loaded}, ids, mask),
                                plain.apply({'params': plain_params}, ids, mask))
