"""Tests for glora_jax.models.llama against transformers' LlamaForCausalLM (fixtures written
by scripts/make_torch_fixtures.py): HF importer, single and sharded, training loss, GQA, bias flags."""
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

from glora_jax.models import importers, llama
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
  with pytest.raises(ValueError, match="'model_type' is 'mistral'"):
    llama.LlamaConfig.from_hf({**hf, 'model_type': 'mistral'})
  with pytest.raises(ValueError, match="rope type 'llama3' is not supported"):
    llama.LlamaConfig.from_hf({**hf, 'rope_parameters': {'rope_type': 'llama3', 'rope_theta': 1.0}})
  old_style = {k: v for k, v in hf.items() if k != 'rope_parameters'}
  assert llama.LlamaConfig.from_hf({**old_style, 'rope_theta': 123.0}).rope_theta == 123.0


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
  assert specs['layers_0/input_layernorm/scale'] == P()
