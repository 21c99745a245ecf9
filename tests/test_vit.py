"""Tests for glora_jax.models.vit against timm (fixtures by scripts/make_torch_fixtures.py):
timm and Google-npz importers, position-embedding resizing, paths, stochastic depth,
timm's config.json both ways."""
import dataclasses
import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from glora_jax.models import importers, vit
from glora_jax.train import sharding

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
CONFIG = vit.ViTConfig(image_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_dim=128,
                       num_classes=10)


@functools.partial(jax.jit, static_argnums=0, static_argnames='deterministic')
def apply(model, params, images, key, *, deterministic=True):
  """One jit cache for the file: equal shapes compile once."""
  return model.apply({'params': params}, images, deterministic=deterministic, rngs={'dropout': key})


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(FIXTURES / 'vit_reference.npz'))


def test_timm_importer_reproduces_timm_logits(reference):
  params = vit.load_timm(FIXTURES / 'vit_timm.safetensors', CONFIG, load_head=True)
  logits = apply(vit.VisionTransformer(CONFIG), params, reference['images32'], jax.random.key(0))
  np.testing.assert_allclose(logits, reference['timm_logits'], atol=1e-4, rtol=0)


def test_npz_importer_reproduces_timm_npz_loader(reference):
  # timm drops the checkpoint's representation layer; so must we, explicitly.
  params = vit.load_npz(FIXTURES / 'vit_google.npz', CONFIG, load_head=True,
                        ignore=[r'pre_logits/.*'])
  logits = apply(vit.VisionTransformer(CONFIG), params, reference['images32'], jax.random.key(0))
  np.testing.assert_allclose(logits, reference['npz_logits32'], atol=1e-4, rtol=0)


def test_npz_importer_resizes_position_embedding_like_timm(reference):
  config48 = dataclasses.replace(CONFIG, image_size=48)
  params = vit.load_npz(FIXTURES / 'vit_google.npz', config48, load_head=True,
                        ignore=[r'pre_logits/.*'])
  assert params['pos_embed'].shape == (1, 1 + 6 * 6, 32)
  logits = apply(vit.VisionTransformer(config48), params, reference['images48'], jax.random.key(0))
  np.testing.assert_allclose(logits, reference['npz_logits48'], atol=1e-4, rtol=0)


def test_npz_representation_layer_must_be_placed_or_ignored():
  with pytest.raises(ValueError) as err:
    vit.load_npz(FIXTURES / 'vit_google.npz', CONFIG)
  assert "unexpected key 'pre_logits/kernel' (32, 32)" in str(err.value)
  with_rep = dataclasses.replace(CONFIG, representation_size=32)
  params = vit.load_npz(FIXTURES / 'vit_google.npz', with_rep, load_head=True)
  raw = np.load(FIXTURES / 'vit_google.npz')
  np.testing.assert_array_equal(params['pre_logits']['kernel'], raw['pre_logits/kernel'])
  np.testing.assert_array_equal(params['head']['kernel'], raw['head/kernel'])


def test_fresh_head_replaces_the_checkpoint_head():
  config = dataclasses.replace(CONFIG, num_classes=7)
  backbone = vit.load_timm(FIXTURES / 'vit_timm.safetensors', config)
  assert 'head' not in backbone
  params = vit.add_head(backbone, config)
  assert params['head']['kernel'].shape == (32, 7)
  assert not np.any(params['head']['kernel'])
  with pytest.raises(ValueError) as err:  # a checkpoint head of another size
    vit.load_timm(FIXTURES / 'vit_timm.safetensors', config, load_head=True)
  assert "'head/kernel' expected (32, 7), found (32, 10)" in str(err.value)


def test_resize_pos_embed():
  pos = np.random.default_rng(0).standard_normal((1, 1 + 16, 8)).astype(np.float32)
  np.testing.assert_array_equal(vit.resize_pos_embed(pos, 4), pos)  # same size: identity
  for method in ('bilinear', 'bicubic'):
    out = vit.resize_pos_embed(pos, (6, 5), method=method)
    assert out.shape == (1, 1 + 30, 8)
    np.testing.assert_array_equal(out[:, 0], pos[:, 0])  # class token kept
  # A constant grid stays constant under interpolation.
  flat = np.ones((1, 17, 8), np.float32)
  np.testing.assert_allclose(vit.resize_pos_embed(flat, 7), np.ones((1, 50, 8)), atol=1e-6)
  with pytest.raises(ValueError, match='square grid'):
    vit.resize_pos_embed(pos[:, :15], 4)


def test_vit_b_has_48_adapted_2d_layers_and_timm_paths():
  config = vit.preset('B/16', num_classes=100)
  assert (config.embed_dim, config.depth, config.num_heads, config.patch_size) == (768, 12, 12, 16)
  shapes = vit.param_shapes(config)
  targets = [p for p in shapes if re.fullmatch(vit.DEFAULT_TARGETS, p)]
  assert len(targets) == 48 and all(len(shapes[p]) == 2 for p in targets)
  assert shapes['blocks_0/attn/qkv/kernel'] == (768, 2304)
  assert shapes['blocks_11/mlp/fc1/kernel'] == (768, 3072)
  assert shapes['patch_embed/proj/kernel'] == (16, 16, 3, 768)
  assert shapes['pos_embed'] == (1, 197, 768) and shapes['cls_token'] == (1, 1, 768)
  for path in ('blocks_0/norm1/scale', 'blocks_0/norm2/bias', 'norm/scale', 'head/kernel'):
    assert path in shapes
  assert [vit.preset(n).embed_dim for n in ('Ti', 'S', 'L')] == [192, 384, 1024]
  with pytest.raises(ValueError, match="unknown ViT size 'X'"):
    vit.preset('X/16')


def test_drop_path_is_stochastic_depth():
  config = dataclasses.replace(CONFIG, drop_path_rate=0.5)
  model = vit.VisionTransformer(config)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32, 32, 3)), jnp.float32)
  params = importers.random_params(vit.param_shapes(config), scale=0.3)
  evaluated = apply(model, params, images, jax.random.key(1))
  train = lambda k: apply(model, params, images, jax.random.key(k), deterministic=False)
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), evaluated) and not np.allclose(train(1), train(2))
  # Rates grow linearly over depth, the first block is never dropped.
  assert vit.drop_path_rates(config) == [0.0, 0.5]
  assert vit.drop_path_rates(dataclasses.replace(config, depth=5)) == [0.0, 0.125, 0.25, 0.375, 0.5]


def test_wrong_image_shape_is_named():
  model = vit.VisionTransformer(CONFIG)
  params = importers.random_params(vit.param_shapes(CONFIG))
  with pytest.raises(ValueError, match=r'expected \(batch, 32, 32, 3\) \(NHWC\)'):
    model.apply({'params': params}, jnp.zeros((1, 3, 32, 32)))


def test_partition_rules():
  abstract = importers.unflatten({p: jax.ShapeDtypeStruct(s, jnp.float32)
                                  for p, s in vit.param_shapes(vit.preset('B/16')).items()})
  specs = importers.flatten(sharding.partition_specs(abstract, vit.partition_rules()))
  assert specs['blocks_0/attn/qkv/kernel'] == P(None, 'model')
  assert specs['blocks_0/mlp/fc1/kernel'] == P(None, 'model')
  assert specs['blocks_0/attn/proj/kernel'] == P('model', None)
  assert specs['blocks_0/mlp/fc2/kernel'] == P('model', None)
  assert specs['head/kernel'] == P() and specs['pos_embed'] == P()


def test_npz_problems_in_one_error():
  w = importers.read_npz(FIXTURES / 'vit_google.npz')
  w['Transformer/encoderblock_1/MultiHeadDotProductAttention_1/key/kernel'] = np.zeros((32, 4, 4))
  w['Transformer/posembed_input/pos_embedding'] = np.zeros((1, 15, 32))
  with pytest.raises(ValueError) as err:
    vit.convert_npz(w, CONFIG, ignore=['pre_logits/.*'])
  message = str(err.value)
  assert '2 problem(s)' in message
  assert "'blocks_1/attn/qkv/kernel' expected (32, 96), found (32, 80)" in message
  assert "'Transformer/posembed_input/pos_embedding' (1, 15, 32) cannot become 'pos_embed'" in message


# ViTConfig fields that change how the model runs, not what it computes at eval.
EXECUTION_DEFAULTS = dict(drop_path_rate=0.0, dropout_rate=0.0, attention_dropout_rate=0.0,
                          dtype=jnp.float32, remat='none', attention='xla')


def test_timm_loader_reads_our_export_and_so_do_we():
  # timm.create_model('local-dir:vit_timm_export', pretrained=True) gave timm_logits
  # (scripts/make_torch_fixtures.py --only vit_export); a 7-class head shows if dropped.
  ref = np.load(FIXTURES / 'vit_timm_export_reference.npz')
  export = FIXTURES / 'vit_timm_export'
  config_json = json.loads((export / 'config.json').read_text())
  config = vit.from_timm(config_json, source=str(export / 'config.json'))
  assert config == dataclasses.replace(CONFIG, num_classes=7)
  assert config_json == vit.to_timm(config), 'to_timm changed: rerun the fixture script'
  params = vit.convert_timm(importers.read_safetensors(export), config, load_head=True,
                            source=str(export))
  logits = apply(vit.VisionTransformer(config), params, ref['images'], jax.random.key(0))
  tolerance = 1e-5 * np.abs(ref['timm_logits']).max()
  np.testing.assert_allclose(logits, ref['timm_logits'], rtol=0, atol=tolerance)
  assert ref['max_abs_diff'] <= tolerance  # ours when the fixture was written


@pytest.mark.parametrize('config', [
    CONFIG,
    vit.preset('B/16', num_classes=0, qkv_bias=False, in_channels=1, image_size=384),
    vit.preset('L/14', drop_path_rate=0.1, dropout_rate=0.1, dtype=jnp.bfloat16, remat='full',
               attention='dot_product'),
])
def test_timm_config_round_trip(config):
  assert vit.from_timm(vit.to_timm(config)) == dataclasses.replace(config, **EXECUTION_DEFAULTS)


def test_timm_config_names_the_nearest_registered_architecture():
  assert vit.to_timm(vit.preset('B/16'))['architecture'] == 'vit_base_patch16_224'
  assert vit.to_timm(vit.preset('S/16', image_size=384))['architecture'] == 'vit_small_patch16_384'
  assert vit.to_timm(vit.preset('L/14'))['architecture'] == 'vit_large_patch14_224'
  assert vit.to_timm(CONFIG)['architecture'] == 'vit_base_patch8_224'  # patch 8, any size
  assert vit.to_timm(dataclasses.replace(CONFIG, patch_size=4))['architecture'] == \
      'vit_base_patch16_224'  # no registered patch 4: a name only, model_args decide
  assert vit.to_timm(CONFIG, jnp.bfloat16)['glora_jax'] == {'dtype': 'bfloat16'}


def test_timm_config_reads_older_exports_and_timm_hub_configs():
  older = {'architecture': 'vit_base_patch16_224', 'num_classes': 10, 'num_features': 32,
           'global_pool': 'token',
           'model_args': {'img_size': 32, 'patch_size': 8, 'in_chans': 3, 'embed_dim': 32,
                          'depth': 2, 'num_heads': 4, 'mlp_ratio': 4.0, 'qkv_bias': True,
                          'num_classes': 10},
           'glora_jax': {'layer_norm_eps': 1e-6, 'dtype': 'float32'}}
  assert vit.from_timm(older) == CONFIG
  # timm's own hub config of a plain ViT: shapes from the name, image size from input_size.
  hub = {'architecture': 'vit_base_patch16_384', 'num_classes': 1000, 'num_features': 768,
         'global_pool': 'token', 'pretrained_cfg': {'input_size': [3, 384, 384],
                                                    'num_classes': 1000, 'classifier': 'head'}}
  assert vit.from_timm(hub) == vit.preset('B/16', image_size=384)


def test_timm_config_refuses_what_we_cannot_build():
  with pytest.raises(ValueError) as err:
    vit.to_timm(dataclasses.replace(CONFIG, representation_size=32, layer_norm_eps=1e-5))
  assert "representation_size 32: timm's VisionTransformer has no pre_logits" in str(err.value)
  assert 'layer_norm_eps 1e-05' in str(err.value)
  good = vit.to_timm(CONFIG)
  args = {**good['model_args'], 'global_pool': 'avg', 'class_token': False,
          'representation_size': 32, 'reg_tokens': 4, 'mystery': 1}
  with pytest.raises(ValueError) as err:
    vit.from_timm({**good, 'model_args': args, 'num_classes': 1000}, source='x/config.json')
  message = str(err.value)
  assert message.startswith('x/config.json describes a ViT we cannot build')
  for part in ("global_pool='avg': our ViT needs 'token'", 'class_token=False: our ViT needs True',
               'representation_size=32: our ViT needs None or 0 (a pre_logits layer',
               'reg_tokens=4', "'mystery' is not a VisionTransformer argument",
               'num_classes 1000 but model_args num_classes 10: timm would drop the head'):
    assert part in message
  with pytest.raises(ValueError, match="architecture 'vit_base_patch16_clip_224' is not a plain"):
    vit.from_timm({**good, 'architecture': 'vit_base_patch16_clip_224'})
  with pytest.raises(ValueError, match='not divisible by num_heads'):
    vit.from_timm({**good, 'model_args': {**good['model_args'], 'num_heads': 5}})
