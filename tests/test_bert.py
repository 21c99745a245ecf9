"""Tests for glora_jax.models.bert: real MiniLM against sentence-transformers (fixture by
scripts/make_torch_fixtures.py), paths, fresh head, padding, dropout, bf16, sharding rules."""
import dataclasses
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tokenizers import Tokenizer

from glora_jax import bundled
from glora_jax.models import bert, importers

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'

TINY = bert.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=32, max_position_embeddings=16)


IDS = jnp.array([[5, 6, 7, 0, 0, 0], [8, 9, 10, 11, 12, 13]])
MASK = (IDS > 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=0, static_argnames=('method', 'deterministic'))
def apply(model, params, ids, mask, key, *, method='__call__', deterministic=True):
  """model.apply under one shared jit cache: tests with equal shapes compile once
  (eager dispatch of a fresh model costs seconds of per-op compilation on CPU)."""
  return model.apply({'params': params}, ids, mask, method=method, deterministic=deterministic,
                     rngs={'dropout': key})


def tiny_params(num_classes=3):
  return importers.random_params(importers.param_shapes(bert.BertClassifier(TINY, num_classes),
                                                        IDS, MASK))


@pytest.fixture(scope='module')
def minilm():
  return bert.load_minilm()


@pytest.fixture(scope='module')
def reference():
  return dict(np.load(FIXTURES / 'minilm_embeddings.npz'))


def test_tokenizer_json_gives_the_stored_ids(reference):
  tok = Tokenizer.from_file(str(bundled.minilm_tokenizer_path()))
  enc = tok.encode_batch([str(s) for s in reference['sentences']])
  np.testing.assert_array_equal([e.ids for e in enc], reference['input_ids'])
  np.testing.assert_array_equal([e.attention_mask for e in enc], reference['attention_mask'])


def test_minilm_embeddings_equal_sentence_transformers(minilm, reference):
  config, params = minilm
  model = bert.BertClassifier(config, num_classes=5)
  embed = jax.jit(lambda p, ids, mask, types: model.apply(
      {'params': p}, ids, mask, types, method=bert.BertClassifier.sentence_embedding))
  ours = np.asarray(embed(params, reference['input_ids'], reference['attention_mask'],
                          reference['token_type_ids']))
  np.testing.assert_allclose(ours, reference['embeddings'], atol=1e-5, rtol=0)
  normalized = ours / np.linalg.norm(ours, axis=-1, keepdims=True)
  np.testing.assert_allclose(normalized, reference['normalized_embeddings'], atol=1e-5, rtol=0)


def test_minilm_config_and_adapted_paths(minilm):
  config, params = minilm
  assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 6, 12)
  assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.1
  flat = importers.flatten(params)
  assert 'head' not in params and 'pooler' not in str(list(flat))
  targets = [p for p in flat if re.fullmatch(bert.DEFAULT_TARGETS, p)]
  assert len(targets) == 36
  assert all(flat[p].ndim == 2 for p in targets)
  assert flat['encoder/layer_3/attention/query/kernel'].shape == (384, 384)
  assert flat['encoder/layer_3/intermediate/dense/kernel'].shape == (384, 1536)
  assert flat['encoder/layer_3/output/dense/kernel'].shape == (1536, 384)
  assert 'encoder/layer_3/attention/output/LayerNorm/scale' in flat
  assert 'embeddings/token_type_embeddings/embedding' in flat


def test_classifier_with_fresh_head():
  full = tiny_params(num_classes=3)
  backbone = {k: v for k, v in full.items() if k != 'head'}
  params = bert.add_head(backbone, TINY, 3, jax.random.key(0))
  assert params['head']['kernel'].shape == (16, 3)
  assert not re.fullmatch(bert.DEFAULT_TARGETS, 'head/kernel')
  model = bert.BertClassifier(TINY, 3)
  key = jax.random.key(0)
  logits = apply(model, params, IDS, MASK, key)
  # The backbone alone is enough for the embedding method.
  pooled = apply(model, backbone, IDS, MASK, key, method='sentence_embedding')
  np.testing.assert_allclose(logits, pooled @ params['head']['kernel'] + params['head']['bias'],
                             atol=1e-5)
  with pytest.raises(ValueError, match="already have a 'head'"):
    bert.add_head(params, TINY, 3, jax.random.key(0))


def test_masked_tokens_do_not_change_the_output():
  model, params, key = bert.BertClassifier(TINY, 3), tiny_params(), jax.random.key(0)
  np.testing.assert_allclose(apply(model, params, IDS, MASK, key),
                             apply(model, params, jnp.where(MASK, IDS, 42), MASK, key), atol=1e-5)


def test_dropout_only_when_not_deterministic():
  model, params = bert.BertClassifier(TINY, 3), tiny_params()
  evaluated = apply(model, params, IDS, MASK, jax.random.key(1))
  np.testing.assert_array_equal(evaluated, apply(model, params, IDS, MASK, jax.random.key(2)))
  train = lambda k: apply(model, params, IDS, MASK, jax.random.key(k), deterministic=False)
  assert not np.allclose(train(1), evaluated)
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  with pytest.raises(Exception, match='dropout'):
    jax.jit(lambda p: model.apply({'params': p}, IDS, MASK, deterministic=False))(params)


def test_bfloat16():
  _, params16 = bert.load_minilm(dtype=jnp.bfloat16)
  assert params16['encoder']['layer_0']['attention']['query']['kernel'].dtype == jnp.bfloat16
  params, key = tiny_params(), jax.random.key(0)
  config16 = dataclasses.replace(TINY, dtype=jnp.bfloat16)
  full = apply(bert.BertClassifier(TINY, 3), params, IDS, MASK, key)
  half = apply(bert.BertClassifier(config16, 3), importers.cast(params, jnp.bfloat16), IDS, MASK, key)
  assert half.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(half, np.float32), full, atol=0.1)


def test_config_from_hf_refuses_other_architectures():
  hf = {'model_type': 'roberta', 'vocab_size': 10}
  with pytest.raises(ValueError, match="'model_type' is 'roberta'"):
    bert.BertConfig.from_hf(hf)
  with pytest.raises(ValueError, match='missing BERT fields'):
    bert.BertConfig.from_hf({'model_type': 'bert', 'vocab_size': 10})


def test_partition_rules_cover_every_leaf(minilm):
  from jax.sharding import PartitionSpec as P
  from glora_jax.train import sharding
  _, params = minilm
  specs = importers.flatten(sharding.partition_specs(params, bert.partition_rules()))
  assert specs['encoder/layer_0/attention/query/kernel'] == P(None, 'model')
  assert specs['encoder/layer_0/intermediate/dense/kernel'] == P(None, 'model')
  assert specs['encoder/layer_0/attention/output/dense/kernel'] == P('model', None)
  assert specs['encoder/layer_0/output/dense/kernel'] == P('model', None)
  assert specs['encoder/layer_0/output/dense/bias'] == P()
  assert specs['embeddings/word_embeddings/embedding'] == P(None, 'model')
  assert specs['embeddings/LayerNorm/scale'] == P()
