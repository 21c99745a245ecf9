"""Tests for glora_jax.models.importers and the sharding rules: file reading, strict checks
(one ValueError naming every bad key and shape), and sharding on 8 simulated devices."""
import json
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.flax
import safetensors.numpy
from jax.sharding import PartitionSpec as P

from glora_jax.models import bert, importers, llama, vit
from glora_jax.train import sharding

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
TIED = FIXTURES / 'llama_tied_bias'


def test_read_safetensors_dtypes_and_paths(tmp_path):
  arrays = {'a': jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3),
            'b': jnp.ones((4,), jnp.float16), 'c': jnp.arange(3, dtype=jnp.int32)}
  safetensors.flax.save_file(arrays, str(tmp_path / 'model.safetensors'))
  for path in (tmp_path / 'model.safetensors', tmp_path):  # the file, or its directory
    read = importers.read_safetensors(path)
    assert read['a'].dtype == ml_dtypes.bfloat16 and read['a'].shape == (2, 3)
    np.testing.assert_array_equal(read['a'].astype(np.float32), np.arange(6).reshape(2, 3))
    assert read['b'].dtype == np.float16 and read['c'].dtype == np.int32
  (tmp_path / 'empty').mkdir()
  with pytest.raises(ValueError, match='holds neither model.safetensors nor'):
    importers.read_safetensors(tmp_path / 'empty')
  with pytest.raises(ValueError, match='does not exist'):
    importers.read_safetensors(tmp_path / 'missing.safetensors')


def test_sharded_equals_single_file(tmp_path):
  single = importers.read_safetensors(FIXTURES / 'llama_untied_sharded')
  assert len({v for v in json.loads((FIXTURES / 'llama_untied_sharded' /
                                     'model.safetensors.index.json').read_text())['weight_map']
              .values()}) == 3
  safetensors.numpy.save_file(single, str(tmp_path / 'model.safetensors'))
  again = importers.read_safetensors(tmp_path)
  assert sorted(again) == sorted(single)
  for k in single:
    np.testing.assert_array_equal(again[k], single[k])


def _problems(err) -> list[str]:
  return [l.strip() for l in str(err.value).splitlines()[1:]]


def test_missing_extra_and_wrong_shape_in_one_error():
  config = llama.LlamaConfig.from_hf(json.loads((TIED / 'config.json').read_text()))
  state = importers.read_safetensors(TIED)
  del state['model.layers.1.mlp.up_proj.weight']
  state['model.layers.1.mlp.extra.weight'] = np.zeros((3, 4), np.float32)
  state['model.layers.0.self_attn.k_proj.weight'] = np.zeros((8, 32), np.float32)
  with pytest.raises(ValueError) as err:
    llama.convert_hf(state, config, source='bad.safetensors')
  message = str(err.value)
  assert message.startswith('bad.safetensors does not fit LLaMA (2 layers, hidden 32): 3 problem(s).')
  assert _problems(err) == [
      "missing key 'model.layers.1.mlp.up_proj.weight' (for 'layers_1/mlp/up_proj/kernel', "
      'expected shape (32, 64) in the model)',
      "unexpected key 'model.layers.1.mlp.extra.weight' (3, 4) (the model has no place for it)",
      "wrong shape: 'layers_0/self_attn/k_proj/kernel' expected (32, 16), found (32, 8) "
      "(from 'model.layers.0.self_attn.k_proj.weight' (8, 32))",
  ]


def test_every_problem_is_listed_not_just_the_first():
  config = llama.LlamaConfig.from_hf(json.loads((TIED / 'config.json').read_text()))
  state = importers.read_safetensors(TIED)
  for i in range(2):
    del state[f'model.layers.{i}.input_layernorm.weight']
    state[f'model.layers.{i}.mlp.gate_proj.bias'] = np.zeros((5,), np.float32)
  with pytest.raises(ValueError) as err:
    llama.convert_hf(state, config)
  assert len(_problems(err)) == 4
  assert "missing key 'model.layers.1.input_layernorm.weight'" in str(err.value)
  assert "'layers_1/mlp/gate_proj/bias' expected (64,), found (5,)" in str(err.value)


def test_other_architecture_is_named():
  state = importers.read_safetensors(TIED)
  with pytest.raises(ValueError) as err:
    bert.convert_hf(state, bert.BertConfig(num_hidden_layers=1), source='llama.safetensors')
  assert 'looks like a checkpoint of another architecture' in str(err.value)
  assert "unexpected key 'model.embed_tokens.weight' (64, 32)" in str(err.value)
  npz = importers.read_npz(FIXTURES / 'vit_google.npz')
  with pytest.raises(ValueError, match='another architecture'):
    vit.convert_timm(npz, vit.ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2,
                                        num_heads=4, mlp_dim=128, num_classes=10))


def test_config_json_of_another_architecture():
  with pytest.raises(ValueError, match="'model_type' is 'llama'; this importer supports 'bert'"):
    bert.load_bert(TIED)


def test_cast_keeps_integer_leaves():
  tree = importers.cast({'w': np.ones(2, np.float32), 'i': np.arange(2)}, jnp.bfloat16)
  assert tree['w'].dtype == jnp.bfloat16 and jnp.issubdtype(tree['i'].dtype, jnp.integer)


def test_add_missing_biases():
  shapes = {'a/kernel': (2, 3), 'a/bias': (3,), 'b/kernel': (3, 1), 'b/bias': (1,)}
  params = {'a': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}, 'b': {'kernel': jnp.ones((3, 1))}}
  filled = importers.add_missing(params, shapes)
  np.testing.assert_array_equal(filled['b']['bias'], np.zeros(1))
  np.testing.assert_array_equal(filled['a']['bias'], np.ones(3))
  with pytest.raises(ValueError, match=r"params lack \['c/kernel'\]"):
    importers.add_missing(params, {**shapes, 'c/kernel': (1, 1)})


def test_partition_spec_errors():
  params = {'a': {'kernel': jax.ShapeDtypeStruct((6, 4), jnp.float32)}}
  with pytest.raises(ValueError, match="no partition rule matches 'a/kernel'"):
    sharding.partition_specs(params, [(r'b/.*', P())])
  with pytest.raises(ValueError, match='has more dimensions'):
    sharding.partition_specs(params, [(r'.*', P(None, None, 'model'))])
  mesh = jax.make_mesh((1,), ('model',))
  assert sharding.partition_specs(params, [(r'.*', P('model'))], mesh) == {'a': {'kernel': P('model')}}


def test_bert_runs_sharded_on_8_devices():
  # tests/conftest.py gives 8 simulated CPU devices.
  assert jax.device_count() >= 8, 'needs 8 devices (XLA_FLAGS from tests/conftest.py)'
  config = bert.BertConfig(vocab_size=32, hidden_size=12, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=24, max_position_embeddings=8)
  model = bert.BertClassifier(config, 4)
  ids = jnp.arange(16).reshape(4, 4) % 32
  mask = jnp.ones_like(ids)
  params = importers.random_params(importers.param_shapes(model, ids, mask))
  auto = (jax.sharding.AxisType.Auto,) * 2  # classic sharding propagation (STYLE.md)
  mesh = jax.make_mesh((2, 4), ('data', 'model'), axis_types=auto, devices=jax.devices()[:8])
  shardings = sharding.tree_shardings(params, bert.partition_rules(), mesh)
  sharded = jax.device_put(params, shardings)
  kernel = sharded['encoder']['layer_0']['attention']['query']['kernel']
  assert kernel.sharding.shard_shape(kernel.shape) == (12, 3)
  data = jax.sharding.NamedSharding(mesh, P('data'))
  forward = lambda p, i, m: model.apply({'params': p}, i, m)
  run = jax.jit(forward, in_shardings=(shardings, data, data))
  np.testing.assert_allclose(run(sharded, ids, mask), jax.jit(forward)(params, ids, mask), atol=1e-5)
  wide = jax.make_mesh((1, 8), ('data', 'model'), axis_types=auto, devices=jax.devices()[:8])
  # A dimension the mesh does not divide is replicated, and said so.
  notes = []
  specs = sharding.partition_specs(params, bert.partition_rules(), wide, notes=notes)
  assert specs['encoder']['layer_0']['attention']['query']['kernel'] == P(None, None)
  assert ("'encoder/layer_0/attention/query/kernel' dimension 1 (12) does not divide by mesh axis "
          'model (8): replicated') in notes


def test_invert_reads_the_rules_backwards_and_lists_every_problem():
  rules = [importers.Rule('a/kernel', ('a.weight',), importers.transpose),
           importers.Rule('a/bias', ('a.bias',)),
           importers.Rule('conv/kernel', ('conv.weight',), lambda x: x.transpose(2, 3, 1, 0))]
  rng = np.random.default_rng(0)
  state = {'a.weight': rng.standard_normal((3, 2)).astype(np.float32),
           'a.bias': np.arange(3, dtype=np.int32),
           'conv.weight': rng.standard_normal((5, 3, 2, 2)).astype(ml_dtypes.bfloat16)}
  shapes = {'a/kernel': (2, 3), 'a/bias': (3,), 'conv/kernel': (2, 2, 3, 5)}
  params = importers.convert(state, rules, shapes, source='s', model='m')
  back = importers.invert(params, rules, model='m')
  assert sorted(back) == sorted(state)
  for k in state:
    assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
    np.testing.assert_array_equal(back[k], state[k])
  del params['a']['bias']
  params['b'] = {'bias': np.zeros(2, np.float32)}
  with pytest.raises(ValueError) as err:
    importers.invert(params, rules, model='m')
  assert _problems(err) == ["missing leaf 'a/bias' (for 'a.bias')",
                            "leaf 'b/bias' (2,) has no place in the checkpoint"]
  qkv = importers.Rule('qkv', ('q', 'k'), lambda q, k: np.concatenate([q, k], -1))
  with pytest.raises(ValueError, match=r"'qkv' is built from 2 checkpoint keys"):
    importers.invert({'qkv': np.zeros((2, 4))}, [qkv], model='m')
