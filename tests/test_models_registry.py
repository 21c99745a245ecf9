"""Tests for glora_jax.models.registry through the public loaders: every family read from
the directory its real library wrote (fixtures by scripts/make_torch_fixtures.py) gives
that library's outputs; exports read back to the same model; lookups name what exists;
a merge into a bias-less model comes with the model that reads it."""
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import family_parity
from benchmarks.family_parity import FAMILY_OF, FIXTURES, reference
from glora_jax import errors, interop, peft
from glora_jax.adapters import glora
from glora_jax.models import importers, plain, registry


@functools.partial(jax.jit, static_argnums=0)
def apply(model, params, args, kwargs):
  return model.apply({'params': params}, *args, **kwargs)


@pytest.mark.parametrize('directory', sorted(FAMILY_OF))
def test_load_pretrained_gives_the_real_librarys_outputs(directory):
  model, _ = interop.load_pretrained(FIXTURES / directory)
  assert registry.of_model(model).name == FAMILY_OF[directory]
  out, expected = family_parity.outputs(directory)
  # Relative to the outputs' scale: float32 sums in another order.
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize('directory', ('hf_llama3', 'hf_qwen2', 'hf_roberta', 'vit_timm_export'))
def test_an_export_of_a_loaded_checkpoint_is_that_checkpoint(directory, tmp_path):
  model, params = interop.load_pretrained(FIXTURES / directory)
  files = interop.save_pretrained(tmp_path, model, params, copy_files_from=FIXTURES / directory)
  original = importers.read_safetensors(FIXTURES / directory)
  written = importers.read_safetensors(files['model.safetensors'])
  dropped = set(original) - set(written)  # what our model does not keep
  assert all(k.startswith(('pooler.', 'lm_head.')) for k in dropped), dropped
  for key, value in written.items():
    np.testing.assert_array_equal(value, original[key], err_msg=key)
  again, params_again = interop.load_pretrained(tmp_path)
  assert again.config == model.config
  chex.assert_trees_all_equal(params_again, params)
  if registry.of_model(model).library == 'hf':
    assert (tmp_path / 'tokenizer.json').read_bytes() == (FIXTURES / directory /
                                                          'tokenizer.json').read_bytes()


def test_families_are_found_by_name_file_and_module():
  assert sorted(registry.FAMILIES) == ['bert', 'llama', 'mistral', 'qwen2', 'roberta', 'vit']
  with pytest.raises(ValueError, match=r"unknown model family 'gpt2'; known: \['bert', 'llama'"):
    registry.get('gpt2')
  with pytest.raises(ValueError, match=r"model_type 'gpt2' is not a known model family; known: "
                                       r"HF model_type \['bert', 'llama', 'mistral', 'qwen2', 'roberta'\]"):
    registry.of_config_json({'model_type': 'gpt2'}, 'x/config.json')
  with pytest.raises(errors.ExportError, match='config.json does not exist'):
    interop.load_pretrained(FIXTURES / 'nothing_here')
  for name in ('hf_qwen2', 'hf_mistral', 'hf_roberta'):
    config_json = json.loads((FIXTURES / name / 'config.json').read_text())
    assert registry.of_config_json(config_json).name == config_json['model_type']
  with pytest.raises(ValueError, match='belongs to no model family'):
    registry.of_model(glora.family())


def test_keep_layers_keeps_the_first_blocks_of_any_family():
  model, params = interop.load_pretrained(FIXTURES / 'hf_qwen2')
  short, short_params = registry.keep_layers(registry.of_model(model), model, params, 1)
  assert short.config.num_hidden_layers == 1
  assert sorted(short_params) == sorted(p for p in params if p != 'layers_1')
  with pytest.raises(ValueError, match='model.keep_layers=3: the checkpoint has 2 layers'):
    registry.keep_layers(registry.of_model(model), model, params, 3)


def _glora_with_bias_supports(params, targets, key):
  """GLoRA adapters on `targets` with random values and a subnet whose C and E are on
  in every layer (the supports that give a layer a bias)."""
  adapters = peft.attach(params, glora.family(ranks=(2,)), targets=targets)
  rng = np.random.default_rng(key)
  adapters = adapters.replace(params=jax.tree.map(
      lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), adapters.params))
  names = adapters.spec.support_names[0]
  subnet = np.zeros(adapters.spec.num_options.shape, np.int32)
  for support, option in (('C', 'lora_2'), ('E', 'vector'), ('A', 'lora_2')):
    subnet[:, names.index(support)] = adapters.spec.layers[0].family.options(support).index(option)
  return adapters, subnet


@pytest.mark.parametrize('directory, written_as', [('hf_llama3', 'llama'), ('hf_qwen2', 'llama')])
def test_merge_model_reads_the_biases_a_merge_gives(directory, written_as, tmp_path):
  """C and E give bias-less layers a bias: merge_model returns the model that reads it
  (Llama: attention_bias / mlp_bias switched on; Qwen2, whose layout has no o_proj or
  MLP bias, becomes a Llama), which exports and reloads to the adapted logits."""
  model, params = interop.load_pretrained(FIXTURES / directory)
  args, _, _ = reference(directory)
  adapters, subnet = _glora_with_bias_supports(params, registry.of_model(model).default_targets, 0)
  adapted = np.asarray(jax.jit(lambda p, a: peft.forward(model, p, a, subnet, *args))(params, adapters))
  merged_model, merged = peft.merge_model(model, params, adapters, subnet)
  assert merged_model.config.model_type == written_as
  assert merged_model.config.attention_bias and merged_model.config.mlp_bias
  out = np.asarray(apply(merged_model, merged, args, {}))
  np.testing.assert_allclose(out, adapted, rtol=1e-4, atol=1e-4)
  # Non-vacuous: the original model would ignore the merged biases without a word.
  ignored = np.asarray(apply(model, peft.merge(params, adapters, subnet), args, {}))
  assert np.abs(ignored - adapted).max() > 1e-3
  interop.save_pretrained(tmp_path, merged_model, merged)
  assert json.loads((tmp_path / 'config.json').read_text())['architectures'] == ['LlamaForCausalLM']
  reloaded, reloaded_params = interop.load_pretrained(tmp_path)
  np.testing.assert_allclose(np.asarray(apply(reloaded, reloaded_params, args, {})), out,
                             rtol=1e-6, atol=1e-6)


def test_a_qwen2_merge_that_only_touches_qkv_stays_qwen2():
  model, params = interop.load_pretrained(FIXTURES / 'hf_qwen2')
  adapters, subnet = _glora_with_bias_supports(params, r'layers_\d+/self_attn/(q|k|v)_proj/kernel', 1)
  merged_model, _ = peft.merge_model(model, params, adapters, subnet)
  assert merged_model.config == model.config  # q, k, v already have biases


def test_merge_model_refuses_a_model_of_no_family():
  model, params = interop.load_pretrained(FIXTURES / 'hf_bert')
  adapters, subnet = _glora_with_bias_supports(params, r'.*/query/kernel', 2)
  with pytest.raises(errors.ExportError, match='cannot be exported'):
    plain.plain_model(glora.family(), params)
  merged_model, merged = peft.merge_model(model, params, adapters, subnet)
  assert merged_model.config == model.config  # BERT's layers all have biases
