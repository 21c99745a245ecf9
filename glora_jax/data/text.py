"""Tokenisation for the text tasks: a checkpoint's tokenizer.json (by default the bundled
MiniLM's) through `tokenizers`, fixed-length int32 arrays.

Truncates to max_len (special tokens included, so a long text still ends in [SEP]) and pads right.
"""
from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Sequence

import numpy as np
import tokenizers

from glora_jax import bundled

DEFAULT_MAX_LEN = 128  # The accuracy protocol's length.
FIELDS = ('input_ids', 'attention_mask', 'token_type_ids')


def config_token(path: str | os.PathLike, name: str) -> str | None:
  """A special token ('eos_token', 'pad_token', ...) as transformers reads it from beside
  tokenizer.json `path`: tokenizer_config.json, else special_tokens_map.json (each a
  string or an AddedToken dict with its 'content'); None if neither names it."""
  for file in ('tokenizer_config.json', 'special_tokens_map.json'):
    config_path = pathlib.Path(path).with_name(file)
    if config_path.is_file():
      value = json.loads(config_path.read_text()).get(name)
      value = value.get('content') if isinstance(value, dict) else value
      if value:
        return value
  return None


def _pad_token(tokenizer: tokenizers.Tokenizer, path: str) -> str:
  """The pad token: the file's own padding settings, else tokenizer_config.json's
  pad_token (transformers writes it beside tokenizer.json), else BERT's '[PAD]', else
  the eos token (decoders without a pad token, as Llama 3: padded positions are
  masked out by attention_mask, so any id serves)."""
  if tokenizer.padding:
    return tokenizer.padding['pad_token']
  for candidate in (config_token(path, 'pad_token'), '[PAD]', config_token(path, 'eos_token')):
    if candidate and tokenizer.token_to_id(candidate) is not None:
      return candidate
  raise ValueError(f'tokenizer {path} names no pad token: no padding settings, no pad_token or '
                   "eos_token in tokenizer_config.json beside it, and no '[PAD]' in its vocabulary")


def pad_token_id(tokenizer: tokenizers.Tokenizer, path: str) -> int:
  """The id rows are padded with (see _pad_token)."""
  return tokenizer.token_to_id(_pad_token(tokenizer, path))


@functools.lru_cache(maxsize=8)
def _load_tokenizer(path: str, max_len: int) -> tokenizers.Tokenizer:
  tokenizer = tokenizers.Tokenizer.from_file(path)
  pad_token = _pad_token(tokenizer, path)
  pad_type_id = (tokenizer.padding or {}).get('pad_type_id', 0)
  tokenizer.enable_truncation(max_length=max_len)
  tokenizer.enable_padding(length=max_len, pad_id=tokenizer.token_to_id(pad_token),
                           pad_token=pad_token, pad_type_id=pad_type_id)
  return tokenizer


def raw_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
  """A tokenizer.json without the padding and truncation it may carry for batch training:
  each text encoded whole (callers that cut, pad or left-pad do it themselves)."""
  tokenizer = tokenizers.Tokenizer.from_file(os.fspath(path))
  tokenizer.no_padding()
  tokenizer.no_truncation()
  return tokenizer


def load_tokenizer(path: str | os.PathLike | None = None, max_len: int = DEFAULT_MAX_LEN) -> tokenizers.Tokenizer:
  """A tokenizer that truncates and pads to max_len; path defaults to the bundled MiniLM tokenizer.json."""
  if max_len < 2:
    raise ValueError(f'max_len is {max_len}; expected at least 2 (room for [CLS] and [SEP])')
  path = bundled.minilm_tokenizer_path() if path is None else pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'tokenizer file {path} does not exist; expected a tokenizers tokenizer.json')
  return _load_tokenizer(os.fspath(path), max_len)


def tokenize(texts: Sequence[str], tokenizer_path: str | os.PathLike | None = None,
             max_len: int = DEFAULT_MAX_LEN, pairs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
  """Texts to {'input_ids', 'attention_mask', 'token_type_ids'}, each (len(texts), max_len) int32.

  pairs: a second segment per text (sentence-pair tasks), joined as the tokenizer's own
  post-processor template says (BERT: [CLS] a [SEP] b [SEP], token types 0 then 1;
  RoBERTa: <s> a </s></s> b </s>); the longer segment is truncated first."""
  tokenizer = load_tokenizer(tokenizer_path, max_len)
  if pairs is None:
    encodings = tokenizer.encode_batch([str(t) for t in texts])
  else:
    if len(pairs) != len(texts):
      raise ValueError(f'{len(pairs)} second segments for {len(texts)} texts; expected one each')
    encodings = tokenizer.encode_batch([(str(a), str(b)) for a, b in zip(texts, pairs)])
  shape = (len(encodings), max_len)
  return {
      'input_ids': np.array([e.ids for e in encodings], dtype=np.int32).reshape(shape),
      'attention_mask': np.array([e.attention_mask for e in encodings], dtype=np.int32).reshape(shape),
      'token_type_ids': np.array([e.type_ids for e in encodings], dtype=np.int32).reshape(shape),
  }
