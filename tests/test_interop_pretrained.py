"""Tests for glora_jax.interop's merged exports (HF transformers / timm layouts): the
exact inverse of each importer, proven against files real PyTorch libraries wrote."""
import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import bundled, errors, interop, peft
from glora_jax.adapters import glora
from glora_jax.models import bert, importers, llama, vit
from glora_jax.search import export
from test_export import choose, merged, tiny_llama  # the tiny LLaMA with GLoRA adapters

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def assert_same_tree(a, b):
  fa, fb = peft.flatten(a), peft.flatten(b)
  assert sorted(fa) == sorted(fb)
  for k in fa:
    assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_exported_minilm_is_the_shipped_model_safetensors(tmp_path):
  config, backbone = bert.load_minilm()
  files = interop.save_pretrained(tmp_path, bert.BertClassifier(config, 5), backbone)
  ours = importers.read_safetensors(files['model.safetensors'])
  shipped = importers.read_safetensors(bundled.minilm_dir() / 'model.safetensors')
  # What our model does not keep: HF's pooler (mean pooling replaces it) and the
  # position_ids buffer. Everything else is there, as shipped.
  not_kept = {'pooler.dense.weight', 'pooler.dense.bias', 'embeddings.position_ids'}
  assert not_kept <= set(shipped)
  assert set(ours) == set(shipped) - not_kept
  for key, value in ours.items():
    assert value.shape == shipped[key].shape and value.dtype == shipped[key].dtype, key
    np.testing.assert_array_equal(value, shipped[key], err_msg=key)
  written = json.loads((tmp_path / 'config.json').read_text())
  original = json.loads((bundled.minilm_dir() / 'config.json').read_text())
  for field in ('model_type', 'architectures', 'hidden_act', 'hidden_size', 'num_hidden_layers',
                'num_attention_heads', 'intermediate_size', 'max_position_embeddings',
                'type_vocab_size', 'vocab_size', 'layer_norm_eps', 'position_embedding_type'):
    assert written[field] == original[field], field
  assert 'glora_jax' not in written  # no head to describe


@pytest.mark.parametrize('name', ['llama_tied_bias', 'llama_untied_sharded'])
def test_llama_export_is_the_file_transformers_wrote(name):
  config, params = llama.load_llama(FIXTURES / name)
  state = interop.to_state_dict(llama.LlamaForCausalLM(config), params)
  original = importers.read_safetensors(FIXTURES / name)
  if config.tie_word_embeddings:
    original.pop('lm_head.weight', None)  # the tied copy; our model reads embed_tokens
  assert sorted(state) == sorted(original)
  for key in state:
    np.testing.assert_array_equal(state[key], original[key], err_msg=key)
    assert state[key].dtype == original[key].dtype


def test_vit_export_is_the_file_timm_wrote(tmp_path):
  config = vit.ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4,
                         mlp_dim=128, num_classes=10)
  params = vit.load_timm(FIXTURES / 'vit_timm.safetensors', config, load_head=True)
  model = vit.VisionTransformer(config)
  files = interop.save_pretrained(tmp_path, model, params)
  state = importers.read_safetensors(files['model.safetensors'])
  original = importers.read_safetensors(FIXTURES / 'vit_timm.safetensors')
  assert sorted(state) == sorted(original)
  for key in state:  # the conv kernel's inverse layout is derived, not written
    np.testing.assert_array_equal(state[key], original[key], err_msg=key)
  loaded_model, loaded = interop.load_pretrained(tmp_path)
  assert loaded_model.config == config
  assert_same_tree(loaded, params)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_import_of_export_is_bit_identical(tmp_path, dtype):
  rng = np.random.default_rng(0)
  config = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=32, max_position_embeddings=20)
  model = bert.BertClassifier(config, 3)
  shapes = importers.param_shapes(model, jnp.zeros((1, 4), jnp.int32), jnp.ones((1, 4), jnp.int32))
  params = importers.cast(importers.random_params(shapes, seed=1), dtype)
  interop.save_pretrained(tmp_path / 'bert', model, params)
  loaded_model, loaded = interop.load_pretrained(tmp_path / 'bert')
  assert loaded_model.config == config and loaded_model.num_classes == 3
  assert_same_tree(loaded, params)
  # The backbone alone is what bert.load_bert, the importer, reads back too.
  interop.save_pretrained(tmp_path / 'backbone', model, {k: v for k, v in params.items()
                                                         if k != 'head'})
  _, backbone = bert.load_bert(tmp_path / 'backbone', dtype=dtype)
  assert_same_tree(backbone, {k: v for k, v in params.items() if k != 'head'})

  lm, lm_params, _ = tiny_llama()
  lm_params = jax.tree.map(lambda x: jnp.asarray(x + rng.standard_normal(x.shape), dtype), lm_params)
  interop.save_pretrained(tmp_path / 'llama', lm, lm_params)
  _, again = llama.load_llama(tmp_path / 'llama', dtype=dtype)
  assert_same_tree(again, lm_params)


def test_merged_glora_export_gives_the_adapted_logits(tmp_path):
  model, params, adapters = tiny_llama()
  subnet = choose(adapters.spec, bias_in=('layers_1/self_attn/v_proj', 'layers_0/mlp/up_proj'),
                  c='vector')
  ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (2, 8)), jnp.int32)
  adapted = peft.forward(model, params, adapters, subnet, ids)
  plain, plain_params = export.plain_model(model, merged(params, adapters, subnet))
  assert plain.config.attention_bias and plain.config.mlp_bias
  # A bias GLoRA gave a bias-less layer: the bias-less config cannot hold it.
  with pytest.raises(errors.ExportError, match=r"'layers_0/mlp/down_proj/bias'.*no place"):
    interop.save_pretrained(tmp_path / 'refused', model, plain_params)
  assert not (tmp_path / 'refused').exists()
  interop.save_pretrained(tmp_path, plain, plain_params)
  written = json.loads((tmp_path / 'config.json').read_text())
  assert written['attention_bias'] is True and written['mlp_bias'] is True
  loaded_config, loaded = llama.load_llama(tmp_path)
  logits = llama.LlamaForCausalLM(loaded_config).apply({'params': loaded}, ids)
  np.testing.assert_allclose(logits, adapted, atol=1e-5, rtol=0)


def test_merged_minilm_export_gives_the_adapted_logits(tmp_path):
  config, backbone = bert.load_minilm()
  config = dataclasses.replace(config, num_hidden_layers=2)
  backbone = dict(backbone, encoder={f'layer_{i}': backbone['encoder'][f'layer_{i}'] for i in range(2)})
  model = bert.BertClassifier(config, 4)
  params = bert.add_head(backbone, config, 4, jax.random.key(0))
  adapters = peft.attach(params, glora.family(ranks=(2,)), targets=bert.DEFAULT_TARGETS)
  rng = np.random.default_rng(3)
  adapters = adapters.replace(params=jax.tree.map(
      lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), adapters.params))
  subnet = choose(adapters.spec, bias_in=('query', 'output'), c='vector')
  ids = jnp.asarray(rng.integers(1000, 5000, (2, 10)), jnp.int32)
  mask = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4], jnp.int32)
  adapted = jax.jit(lambda p, a: peft.forward(model, p, a, subnet, ids, mask))(params, adapters)
  plain, plain_params = export.plain_model(model, merged(params, adapters, subnet))
  interop.save_pretrained(tmp_path, plain, plain_params, copy_files_from=bundled.minilm_dir())
  assert (tmp_path / 'tokenizer.json').is_file()
  loaded_model, loaded = interop.load_pretrained(tmp_path)
  logits = loaded_model.apply({'params': loaded}, ids, mask)
  assert np.abs(np.asarray(adapted) - np.asarray(model.apply({'params': params}, ids, mask))).max() > 1e-3
  np.testing.assert_allclose(logits, adapted, atol=1e-5, rtol=0)


def test_unknown_model_and_rule_that_is_not_a_rearrangement():
  with pytest.raises(errors.ExportError, match='has no PyTorch layout: .*belongs to no model family'):
    interop.to_state_dict(jax.numpy, {})  # not a model
  rule = importers.Rule('x', ('x.weight',), lambda w: w * 2)
  with pytest.raises(ValueError, match="transform of 'x' .* not a rearrangement"):
    importers.invert({'x': np.ones((2, 3), np.float32)}, [rule], model='m')
