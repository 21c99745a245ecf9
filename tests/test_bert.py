"""Tests for glora_jax.models.bert: real MiniLM against sentence-transformers and tiny HF BertModel
and RobertaModel against transformers (fixtures by scripts/make_torch_fixtures.py), config.json
both ways, paths, fresh head, padding, dropout, bf16, sharding rules."""
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
  hf = {'model_type': 'distilbert', 'vocab_size': 10}
  with pytest.raises(ValueError, match="'model_type' is 'distilbert'; this importer supports "
                                       "'bert' or 'roberta'"):
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


# --------------------------------------------------------------------------- #
# HF BertModel and RobertaModel written by transformers (scripts/make_torch_fixtures.py
# --only encoders), against transformers' last_hidden_state
# --------------------------------------------------------------------------- #

ENCODERS = ('hf_bert', 'hf_roberta')
ENCODER_LEN = 32  # the reference rows' padded length; RoBERTa's table has 2 rows more


@pytest.fixture(scope='module')
def encoder_reference():
  return dict(np.load(FIXTURES / 'hf_encoders_reference.npz'))


def reference_of(encoder_reference, name):
  return {k.split('/', 1)[1]: v for k, v in encoder_reference.items() if k.startswith(name + '/')}


@pytest.mark.parametrize('name', ENCODERS)
def test_encoder_equals_transformers_last_hidden_state(name, encoder_reference):
  ref = reference_of(encoder_reference, name)
  config, params = bert.load_bert(FIXTURES / name)
  assert 'head' not in params
  model = bert.BertClassifier(config, 0)
  hidden = jax.jit(lambda p, ids, mask, types: model.apply(
      {'params': p}, ids, mask, token_type_ids=types))(
          params, ref['input_ids'], ref['attention_mask'], ref.get('token_type_ids'))
  if name == 'hf_bert':
    assert ref['token_type_ids'].max() == 1  # sentence pairs
  np.testing.assert_allclose(hidden, ref['last_hidden_state'], rtol=1e-5, atol=1e-5)


def test_roberta_config_holds_its_differences():
  config, _ = bert.load_bert(FIXTURES / 'hf_roberta')
  assert (config.model_type, config.pad_token_id, config.positions_from_padding) == (
      'roberta', 1, True)
  assert (config.type_vocab_size, config.layer_norm_eps, config.max_tokens) == (
      1, 1e-5, ENCODER_LEN)
  minilm_config, _ = bert.load_minilm()
  assert (minilm_config.model_type, minilm_config.positions_from_padding) == ('bert', False)


def test_roberta_refuses_more_tokens_than_its_positions():
  config, params = bert.load_bert(FIXTURES / 'hf_roberta')
  ids = jnp.full((1, ENCODER_LEN + 1), 5)
  with pytest.raises(ValueError, match=r'33 tokens; expected at most 32 '
                                       r'\(max_position_embeddings=34 less the 2 rows'):
    jax.eval_shape(lambda: bert.BertClassifier(config, 0).apply({'params': params}, ids, ids))


@pytest.mark.parametrize('name', ENCODERS)
def test_our_tokenisation_gives_transformers_ids(name, encoder_reference):
  from glora_jax.data import text
  ref = reference_of(encoder_reference, name)
  rows = len(ref['texts'])
  try:
    ours = text.tokenize([str(t) for t in ref['texts']], max_len=ENCODER_LEN,
                         tokenizer_path=FIXTURES / name / 'tokenizer.json')
  except ValueError as e:
    if 'no pad token' not in str(e):
      raise
    pytest.skip(f'glora_jax.data.text finds no pad token in {name}/tokenizer.json: {e}')
  # Pads included: RoBERTa's positions depend on where pad_token_id is.
  np.testing.assert_array_equal(ours['input_ids'], ref['input_ids'][:rows])
  np.testing.assert_array_equal(ours['attention_mask'], ref['attention_mask'][:rows])


@pytest.mark.parametrize('name', ENCODERS)
def test_to_hf_reads_back_and_matches_transformers(name):
  hf = importers.read_json(FIXTURES / name / 'config.json')
  config = bert.BertConfig.from_hf(hf)
  written = bert.to_hf(config)
  assert bert.BertConfig.from_hf(written) == config
  assert {k: v for k, v in written.items() if k in hf} == {k: hf[k] for k in written if k in hf}
  assert bert.to_hf(config, jnp.bfloat16)['torch_dtype'] == 'bfloat16'
  assert bert.BertConfig.from_hf(bert.to_hf(TINY)) == TINY


def test_to_hf_refuses_positions_its_family_does_not_compute():
  with pytest.raises(ValueError, match='expected positions_from_padding=True'):
    bert.to_hf(dataclasses.replace(TINY, model_type='roberta'))


@pytest.mark.parametrize('key, value', [('hidden_act', 'gelu_new'),
                                        ('position_embedding_type', 'relative_key'),
                                        ('is_decoder', True), ('add_cross_attention', True)])
def test_from_hf_refuses_unsupported_options(key, value):
  hf = {**importers.read_json(FIXTURES / 'hf_roberta' / 'config.json'), key: value}
  with pytest.raises(ValueError, match=re.escape(f"'{key}' is {value!r}")):
    bert.BertConfig.from_hf(hf)


def test_convert_hf_reads_task_model_checkpoints():
  """'roberta.' / 'bert.' prefixes (RobertaForMaskedLM, BertForPreTraining) and their heads."""
  config, params = bert.load_bert(FIXTURES / 'hf_roberta')
  state = importers.read_safetensors(FIXTURES / 'hf_roberta')
  masked_lm = {**{f'roberta.{k}': v for k, v in state.items()}, 'lm_head.bias': np.zeros(3)}
  jax.tree.map(np.testing.assert_array_equal, bert.convert_hf(masked_lm, config), params)
  with pytest.raises(ValueError, match="unexpected key 'classifier.weight'"):
    bert.convert_hf({**masked_lm, 'classifier.weight': np.zeros(3)}, config)
