"""Tests of tokenisation: the same ids as `tokenizers` itself, truncation and padding to max_len.

Uses the bundled MiniLM tokenizer.json; skipped only where that package is not installed.
"""
import numpy as np
import pytest
import tokenizers

from glora_jax import bundled, errors
from glora_jax.data import text

SENTENCE = 'The quick brown fox jumps over the lazy dog.'


@pytest.fixture(scope='module')
def tokenizer_path():
  try:
    return bundled.minilm_tokenizer_path()
  except errors.MissingAssetError as e:
    pytest.skip(str(e))


def test_matches_tokenizers_with_truncation_and_padding_rules(tokenizer_path):
  raw = tokenizers.Tokenizer.from_file(str(tokenizer_path))
  raw.no_truncation()
  raw.no_padding()
  long_text = ' '.join(['economy'] * 50 + ['unbelievably'] * 60)
  texts = [SENTENCE, long_text, '', 'Café naïve — 99%!']
  max_len = 32
  out = text.tokenize(texts, tokenizer_path, max_len=max_len)
  for row, content in enumerate(texts):
    full = raw.encode(content)
    ids = full.ids
    if len(ids) > max_len:  # Truncation keeps [CLS] + the first tokens and ends with [SEP].
      ids = ids[:max_len - 1] + [102]
    real = len(ids)
    np.testing.assert_array_equal(out['input_ids'][row], ids + [0] * (max_len - real))
    np.testing.assert_array_equal(out['attention_mask'][row], [1] * real + [0] * (max_len - real))
    np.testing.assert_array_equal(out['token_type_ids'][row], np.zeros(max_len))
  for key in text.FIELDS:
    assert out[key].shape == (len(texts), max_len) and out[key].dtype == np.int32


def test_known_sentence_is_wrapped_in_cls_and_sep(tokenizer_path):
  out = text.tokenize([SENTENCE], tokenizer_path, max_len=128)
  length = int(out['attention_mask'][0].sum())
  ids = out['input_ids'][0]
  assert ids[0] == 101 and ids[length - 1] == 102 and (ids[length:] == 0).all()
  assert length == 12  # [CLS] the quick brown fox jumps over the lazy dog . [SEP]


def test_truncated_text_fills_max_len_and_ends_with_sep(tokenizer_path):
  out = text.tokenize(['word ' * 500], tokenizer_path, max_len=128)
  assert out['attention_mask'].sum() == 128 and out['input_ids'][0, -1] == 102


def test_bad_arguments_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='tokenizer.json'):
    text.tokenize(['x'], tmp_path / 'missing.json')
  with pytest.raises(ValueError, match='max_len'):
    text.load_tokenizer(None, max_len=1)
