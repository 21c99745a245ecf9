"""Tests for glora_jax.models.llama against transformers' Llama, Qwen2 and Mistral (fixtures
written by scripts/make_torch_fixtures.py): HF importer, single and sharded, training loss, GQA,
bias flags, rope types, config.json both ways."""
import dataclasses
import functools
import json
import pathlib
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glora_jax.models import importers, llama, registry
from glora_jax.train import sharding, tasks

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


@functools.partial(jax.jit, static_argnums=0)
def logits_and_loss(model, params, ids, mask):
  logits = model.apply({'params': params}, ids, mask)
  total, count, _ = tasks.lm_loss(logits, {'input_ids': ids, 'attention_mask': mask})
  return logits, total / count


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(FIXTURES / 'llama_reference.npz'))


@pytest.mark.parametrize('name, directory', [('untied', 'llama_untied_sharded'),
                                             ('tied', 'llama_tied_bias')])
def test_logits_and_loss_equal_transformers(reference, name, directory):
  config, params = llama.load_llama(FIXTURES / directory)
  logits, loss = logits_and_loss(llama.LlamaForCausalLM(config), params,
                                 reference['input_ids'], reference['attention_mask'])
  np.testing.assert_allclose(logits, reference[f'{name}_logits'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(loss, reference[f'{name}_loss'], atol=1e-5, rtol=0)


def test_configs_and_paths():
  untied, params = llama.load_llama(FIXTURES / 'llama_untied_sharded')
  assert (untied.num_attention_heads, untied.kv_heads, untied.dim_per_head) == (4, 2, 8)
  assert untied.rope_theta == 500000.0 and not untied.tie_word_embeddings
  flat = importers.flatten(params)
  assert flat['layers_1/self_attn/q_proj/kernel'].shape == (32, 32)
  assert flat['layers_1/self_attn/k_proj/kernel'].shape == (32, 16)  # 2 kv heads of 8
  assert flat['lm_head/kernel'].shape == (32, 64)
  assert not any(p.endswith('/bias') for p in flat)
  targets = [p for p in flat if re.fullmatch(llama.DEFAULT_TARGETS, p)]
  assert len(targets) == 2 * 7 and all(flat[p].ndim == 2 for p in targets)

  tied, params = llama.load_llama(FIXTURES / 'llama_tied_bias')
  assert tied.tie_word_embeddings and tied.attention_bias and tied.mlp_bias
  flat = importers.flatten(params)
  assert 'lm_head/kernel' not in flat
  assert flat['layers_0/self_attn/o_proj/bias'].shape == (32,)
  assert flat['layers_0/mlp/down_proj/bias'].shape == (32,)


def test_bias_flags_add_bias_leaves():
  base = llama.LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2)
  with_bias = dataclasses.replace(base, attention_bias=True, mlp_bias=True)
  plain, biased = llama.param_shapes(base), llama.param_shapes(with_bias)
  added = sorted(set(biased) - set(plain))
  assert added == sorted(f'layers_0/{m}/bias' for m in
                         ('mlp/down_proj', 'mlp/gate_proj', 'mlp/up_proj', 'self_attn/k_proj',
                          'self_attn/o_proj', 'self_attn/q_proj', 'self_attn/v_proj'))


def test_causal_future_tokens_do_not_change_the_past(reference):
  config, params = llama.load_llama(FIXTURES / 'llama_untied_sharded')
  model = llama.LlamaForCausalLM(config)
  ids, mask = reference['input_ids'], reference['attention_mask']
  changed = ids.copy()
  changed[:, 6:] = (changed[:, 6:] + 1) % config.vocab_size
  a, _ = logits_and_loss(model, params, ids, mask)
  b, _ = logits_and_loss(model, params, changed, mask)
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-6)
  assert not np.allclose(a[:, 6:], b[:, 6:])


def test_sharded_index_naming_a_missing_tensor(tmp_path):
  shutil.copytree(FIXTURES / 'llama_untied_sharded', tmp_path / 'm')
  index_path = tmp_path / 'm' / 'model.safetensors.index.json'
  index = json.loads(index_path.read_text())
  index['weight_map']['model.layers.9.mlp.up_proj.weight'] = 'model-00001-of-00003.safetensors'
  index_path.write_text(json.dumps(index))
  with pytest.raises(ValueError, match="no shard holds: \\['model.layers.9.mlp.up_proj.weight'\\]"):
    llama.load_llama(tmp_path / 'm')


def test_config_refuses_unsupported_options():
  hf = json.loads((FIXTURES / 'llama_tied_bias' / 'config.json').read_text())
  with pytest.raises(ValueError, match="'model_type' is 'gemma'; supported: \\['llama', 'qwen2', "
                                       "'mistral'\\]"):
    llama.LlamaConfig.from_hf({**hf, 'model_type': 'gemma'})
  with pytest.raises(ValueError, match="rope type 'yarn' is not supported; supported: "
                                       "\\['default', 'linear', 'llama3'\\]"):
    llama.LlamaConfig.from_hf({**hf, 'rope_parameters': {'rope_type': 'yarn', 'factor': 4.0}})
  with pytest.raises(ValueError, match="'hidden_act' is 'gelu'"):
    llama.LlamaConfig.from_hf({**hf, 'hidden_act': 'gelu'})
  with pytest.raises(ValueError, match="'partial_rotary_factor' is 0.5"):
    llama.LlamaConfig.from_hf({**hf, 'partial_rotary_factor': 0.5})
  with pytest.raises(ValueError, match="rope type 'llama3' needs 'low_freq_factor'"):
    llama.LlamaConfig.from_hf({**hf, 'rope_parameters': {'rope_type': 'llama3', 'factor': 8.0}})
  old_style = {k: v for k, v in hf.items() if k != 'rope_parameters'}
  assert llama.LlamaConfig.from_hf({**old_style, 'rope_theta': 123.0}).rope_theta == 123.0


# --------------------------------------------------------------------------- #
# Llama 3 / 3.2, Qwen2, Mistral: directories written by transformers' save_pretrained
# --------------------------------------------------------------------------- #

DECODERS = ('hf_llama3', 'hf_llama32', 'hf_llama_linear', 'hf_qwen2', 'hf_mistral')


@pytest.fixture(scope='module')
def decoders_reference():
  return dict(np.load(FIXTURES / 'hf_decoders_reference.npz'))


@pytest.mark.parametrize('name', DECODERS)
def test_decoder_families_equal_transformers(decoders_reference, name):
  ref = {k.split('/', 1)[1]: v for k, v in decoders_reference.items() if k.startswith(f'{name}/')}
  config, params = llama.load_llama(FIXTURES / name)
  np.testing.assert_allclose(llama.rope_inv_freq(config), ref['inv_freq'], rtol=1e-6, atol=0)
  logits = jax.jit(llama.LlamaForCausalLM(config).apply)({'params': params}, ref['input_ids'],
                                                         ref['attention_mask'])
  # float32 rounding, scaled to the logits (|logit| up to ~8): in float64, with transformers'
  # float32 norm, rotary and softmax lifted on both sides, the two agree to 5e-14.
  np.testing.assert_allclose(logits, ref['logits'], rtol=1e-5,
                             atol=1e-5 * np.abs(ref['logits']).max())


def test_decoder_family_configs():
  configs = {name: llama.load_llama(FIXTURES / name)[0] for name in DECODERS}
  l3, l32, linear, qwen2, mistral = (configs[n] for n in DECODERS)
  assert (l3.model_type, l3.rope_type, l3.rope_factor, l3.kv_heads) == ('llama', 'llama3', 8.0, 2)
  assert l3.rope_original_max_position_embeddings == 1024 and not l3.tie_word_embeddings
  assert l32.tie_word_embeddings and l32.head_dim == 16 and l32.rope_factor == 32.0
  assert (linear.rope_type, linear.rope_factor) == ('linear', 2.0)
  assert qwen2.model_type == 'qwen2' and qwen2.qkv_bias and qwen2.tie_word_embeddings
  assert not (qwen2.attention_bias or qwen2.mlp_bias) and qwen2.sliding_window is None
  assert (mistral.model_type, mistral.sliding_window) == ('mistral', 128)
  flat = importers.flatten(llama.load_llama(FIXTURES / 'hf_qwen2')[1])
  assert sorted(p for p in flat if p.startswith('layers_0/') and p.endswith('/bias')) == [
      f'layers_0/self_attn/{n}_proj/bias' for n in 'kqv']


def test_to_hf_round_trip():
  configs = [llama.load_llama(FIXTURES / name)[0] for name in DECODERS]
  small = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                num_attention_heads=2)
  configs += [llama.LlamaConfig(**small),
              llama.LlamaConfig(**small, attention_bias=True, mlp_bias=True, head_dim=8),
              llama.LlamaConfig(**small, model_type='qwen2', qkv_bias=True, sliding_window=64),
              llama.LlamaConfig(**small, model_type='mistral', num_key_value_heads=1,
                                rope_type='linear', rope_factor=4.0)]
  for config in configs:
    assert llama.LlamaConfig.from_hf(llama.to_hf(config)) == config, config
  written = llama.to_hf(configs[-2])
  assert written['architectures'] == ['Qwen2ForCausalLM'] and written['use_sliding_window']
  assert written['dtype'] == written['torch_dtype'] == 'float32'


def test_from_hf_reads_transformers_4_configs_and_family_defaults():
  hf = json.loads((FIXTURES / 'hf_llama3' / 'config.json').read_text())
  rope = dict(hf.pop('rope_parameters'))
  old_style = {**hf, 'rope_theta': rope.pop('rope_theta'), 'rope_scaling': rope}
  assert llama.LlamaConfig.from_hf(old_style) == llama.load_llama(FIXTURES / 'hf_llama3')[0]
  qwen2 = json.loads((FIXTURES / 'hf_qwen2' / 'config.json').read_text())
  del qwen2['layer_types']
  windowed = {**qwen2, 'use_sliding_window': True, 'sliding_window': 16}
  # Qwen2 slides only from layer max_window_layers on: at 2 of 2 layers, no layer does.
  assert llama.LlamaConfig.from_hf({**windowed, 'max_window_layers': 2}).sliding_window is None
  assert llama.LlamaConfig.from_hf({**windowed, 'max_window_layers': 1}).sliding_window == 16
  mistral = json.loads((FIXTURES / 'hf_mistral' / 'config.json').read_text())
  del mistral['sliding_window']  # MistralConfig's default, 4096, applies
  assert llama.LlamaConfig.from_hf(mistral).sliding_window == 4096


def test_sequences_longer_than_the_window_are_refused():
  config, params = llama.load_llama(FIXTURES / 'hf_mistral')
  apply = lambda seq: jax.eval_shape(lambda: llama.LlamaForCausalLM(config).apply(
      {'params': params}, jnp.zeros((1, seq), jnp.int32)))
  assert apply(128).shape == (1, 128, config.vocab_size)  # as long as the window: equal
  with pytest.raises(ValueError, match='a sequence of 129 tokens is longer than sliding_window '
                                       '128: this model attends to the whole causal context'):
    apply(129)


def test_to_hf_refuses_what_the_family_cannot_hold():
  small = dict(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
               num_attention_heads=2)
  with pytest.raises(ValueError, match="model_type 'qwen2' has biases on exactly q, k, v; this "
                                       "config has biases on q, k, v, the MLP: write it as "
                                       "'llama'"):
    llama.to_hf(llama.LlamaConfig(**small, model_type='qwen2', qkv_bias=True, mlp_bias=True))
  with pytest.raises(ValueError, match="'mistral' has biases on exactly nothing; this config has "
                                       "biases on q, k, v, o_proj: write it as 'llama'"):
    llama.to_hf(llama.LlamaConfig(**small, model_type='mistral', attention_bias=True))
  with pytest.raises(ValueError, match="biases on q, k, v: write it as 'qwen2'"):
    llama.to_hf(llama.LlamaConfig(**small, model_type='mistral', qkv_bias=True))
  with pytest.raises(ValueError, match="model_type 'llama' has no sliding window"):
    llama.to_hf(llama.LlamaConfig(**small, sliding_window=8))


def test_config_refuses_rope_fields_its_type_does_not_read():
  with pytest.raises(ValueError, match="rope type 'default' does not read \\['rope_factor'\\]"):
    llama.LlamaConfig(rope_factor=8.0)
  with pytest.raises(ValueError, match="rope type 'yarn' is unknown"):
    llama.LlamaConfig(rope_type='yarn')
  with pytest.raises(ValueError, match="model_type 'gemma' is unknown"):
    llama.LlamaConfig(model_type='gemma')


def test_partition_rules():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
  abstract = importers.unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32)
                                  for p, s in llama.param_shapes(config).items()})
  specs = importers.flatten(sharding.partition_specs(abstract, llama.partition_rules()))
  for name in ('q_proj', 'k_proj', 'v_proj'):
    assert specs[f'layers_0/self_attn/{name}/kernel'] == P(None, 'model')
  assert specs['layers_0/mlp/gate_proj/kernel'] == specs['layers_0/mlp/up_proj/kernel'] == P(None, 'model')
  assert specs['layers_0/self_attn/o_proj/kernel'] == P('model', None)
  assert specs['layers_0/mlp/down_proj/kernel'] == P('model', None)
  assert specs['embed_tokens/embedding'] == P(None, 'model')
  assert specs['lm_head/kernel'] == P(None, ('model', 'data'))  # vocab-parallel head
  assert specs['layers_0/input_layernorm/scale'] == P()


# --------------------------------------------------------------------------- #
# Packed rows (segment_ids) and the KV cache
# --------------------------------------------------------------------------- #


def test_packed_rows_equal_each_example_alone():
  model, params = registry.load(FIXTURES / 'hf_llama3')
  apply = jax.jit(model.apply)
  a, b = np.arange(3, 8), np.arange(20, 24)  # 5 and 4 tokens, then 2 of padding
  ids = np.concatenate([a, b, [2, 2]])[None]
  segment_ids = np.array([[1] * 5 + [2] * 4 + [0] * 2])
  position_ids = np.array([[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 0]])
  args, kwargs = registry.get('llama').inputs({'input_ids': ids, 'segment_ids': segment_ids,
                                               'position_ids': position_ids,
                                               'attention_mask': segment_ids > 0})
  assert len(args) == 1 and set(kwargs) == {'segment_ids', 'position_ids'}
  packed = apply({'params': params}, *args, **kwargs)
  for example, where in ((a, slice(0, 5)), (b, slice(5, 9))):
    alone = apply({'params': params}, example[None])[0]
    np.testing.assert_allclose(packed[0, where], alone, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match='segment_ids and attention_mask were both given'):
    model.apply({'params': params}, ids, segment_ids > 0, segment_ids=segment_ids)


@pytest.mark.parametrize('options', [{}, {'remat': 'full', 'attention': 'chunked',
                                          'attention_chunk': 2}, {'attention': 'dot_product'}])
def test_cached_steps_equal_the_full_forward(options):
  """A left-padded prompt written into the cache in one call, then one token per call:
  each step's logits are the full forward's at that position, under every execution option."""
  model, params = registry.load(FIXTURES / 'hf_qwen2')
  model = model.clone(config=dataclasses.replace(model.config, **options))
  ids = np.array([[0, 0, 7, 8, 9, 10, 11, 12], [5, 6, 7, 8, 9, 10, 11, 12]])
  mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  full = jax.jit(model.apply)({'params': params}, ids, mask, positions)
  step = jax.jit(lambda p, ids, mask, cache: model.apply({'params': p}, ids, mask, cache=cache))
  cache = llama.init_cache(model.config, 2, 8)
  logits, cache = step(params, ids[:, :4], mask[:, :4], cache)  # prefill: positions from the mask
  np.testing.assert_allclose(logits[mask[:, :4] == 1], full[:, :4][mask[:, :4] == 1],
                             atol=1e-5, rtol=0)
  for t in range(4, 8):
    logits, cache = step(params, ids[:, t:t + 1], None, cache)
    np.testing.assert_allclose(logits[:, 0], full[:, t], atol=1e-5, rtol=0)
  assert int(cache['index']) == 8 and cache['mask'].sum() == mask.sum()


def test_a_cache_longer_than_the_window_is_refused():
  config = llama.load_llama(FIXTURES / 'hf_mistral')[0]
  assert llama.init_cache(config, 1, 128)['layers'][0]['k'].shape == (1, 128, 2, 8)
  with pytest.raises(ValueError, match='a cache of 129 tokens is longer than sliding_window 128'):
    llama.init_cache(config, 1, 129)
