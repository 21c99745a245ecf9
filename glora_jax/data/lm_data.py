"""Language-model data as users bring it: plain text, Alpaca instructions or chat
conversations, tokenised with the checkpoint's tokenizer, the loss on responses, packed.

Each example becomes token ids and per-token target weights (1: the loss predicts this
token). Too-long examples are cut and counted; examples left without a target are dropped
and counted, never trained on silently. Packing puts several examples in one row with
segment ids and restarted positions, so the packed loss equals the unpacked one.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np
import tokenizers

from glora_jax.data import files, text
from glora_jax.errors import DataError

FORMATS = ('text', 'alpaca', 'chat')

# Stanford Alpaca's prompts (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT); the output
# and EOS follow the prompt directly.
ALPACA_PROMPT = (
    'Below is an instruction that describes a task, paired with an input that provides further '
    'context. Write a response that appropriately completes the request.\n\n'
    '### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:')
ALPACA_PROMPT_NO_INPUT = (
    'Below is an instruction that describes a task. Write a response that appropriately '
    'completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:')


def alpaca_prompt(instruction: str, input_text: str = '') -> str:
  """Alpaca's prompt for an instruction, with its input when it has a non-empty one."""
  if input_text:
    return ALPACA_PROMPT.format(instruction=instruction, input=input_text)
  return ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)


@dataclasses.dataclass(frozen=True)
class Rendered:
  """One example as text: `spans` are the character ranges the loss is put on;
  `special` whether the tokenizer adds its own special tokens (a chat template
  writes them itself); `eos` whether the eos token follows (Alpaca's recipe)."""
  text: str
  spans: tuple[tuple[int, int], ...]
  special: bool
  eos: bool


def _string(origin: str, record: Mapping, key: str, required: bool = True) -> str:
  if key not in record:
    if not required:
      return ''
    raise DataError(f"{origin} has no field '{key}'; its fields are {sorted(record)}")
  value = record[key]
  if value is None and not required:
    return ''
  if not isinstance(value, str):
    raise DataError(f"{origin} field '{key}' is {value!r}; expected a string")
  return value


class Renderer:
  """Records of one format as `Rendered` texts: 'text' (the loss on every token of
  `text_key`), 'alpaca' (instruction, input, output) or 'chat' (messages, or ShareGPT's
  conversations, through the checkpoint's chat template; the loss on assistant turns)."""

  def __init__(self, fmt: str, tokenizer_dir: pathlib.Path, *, text_key: str = 'text',
               train_on_prompt: bool = False):
    if fmt not in FORMATS:
      raise DataError(f"data.format '{fmt}' is unknown; expected one of {list(FORMATS)}")
    self.fmt, self.text_key, self.train_on_prompt = fmt, text_key, train_on_prompt
    self.template = self.tokens = None
    if fmt == 'chat':
      from glora_jax.data import chat
      self.template = chat.require_template(tokenizer_dir)
      self.tokens = chat.special_tokens(tokenizer_dir)

  def __call__(self, origin: str, record: Mapping[str, Any]) -> Rendered:
    if self.fmt == 'text':
      body = _string(origin, record, self.text_key)
      return Rendered(body, ((0, len(body)),), special=True, eos=False)
    if self.fmt == 'alpaca':
      prompt = alpaca_prompt(_string(origin, record, 'instruction'),
                             _string(origin, record, 'input', required=False))
      output = _string(origin, record, 'output')
      start = 0 if self.train_on_prompt else len(prompt)
      return Rendered(prompt + output, ((start, len(prompt) + len(output)),), special=True,
                      eos=True)
    from glora_jax.data import chat
    try:
      messages = chat.to_messages(record)
      full, spans = chat.response_spans(self.template, messages, tokens=self.tokens)
    except ValueError as e:
      raise DataError(f'{origin}: {e}') from None
    if self.train_on_prompt:
      spans = [(0, len(full))]
    return Rendered(full, tuple(spans), special=False, eos=False)


raw_tokenizer = text.raw_tokenizer  # we cut and count ourselves


def eos_id(tokenizer: tokenizers.Tokenizer, path: str | pathlib.Path) -> int:
  """The eos token's id, from tokenizer_config.json beside tokenizer.json."""
  token = text.config_token(path, 'eos_token')
  token_id = tokenizer.token_to_id(token) if token else None
  if token_id is None:
    raise DataError(f'tokenizer {path} names no eos token in tokenizer_config.json beside it; '
                    "Alpaca data ends each response with it ('eos_token')")
  return token_id


def tokenize(rendered: Rendered, tokenizer: tokenizers.Tokenizer,
             eos: int | None) -> tuple[np.ndarray, np.ndarray]:
  """(ids, weights) int32 / float32: weight 1 on a token that starts inside one of the
  rendered spans (a token straddling a span's start belongs to the prompt), and on the
  appended eos; never on the first token, which nothing in the example predicts (so a
  packed row's first token of an example is not predicted from the example before)."""
  enc = tokenizer.encode(rendered.text, add_special_tokens=rendered.special)
  ids = np.asarray(enc.ids, np.int32)
  offsets = np.asarray(enc.offsets, np.int64).reshape(-1, 2)
  starts, ends = offsets[:, 0], offsets[:, 1]
  weights = np.zeros(len(ids), np.float32)
  for lo, hi in rendered.spans:
    # Tokens the post-processor adds (bos) are zero-width: in no span.
    weights[(starts >= lo) & (starts < hi) & (ends > starts)] = 1
  if rendered.eos:
    ids = np.append(ids, np.int32(eos))
    weights = np.append(weights, np.float32(1))
  if len(weights):
    weights[0] = 0
  return ids, weights


@dataclasses.dataclass
class Tokenized:
  """A split's examples and what happened to them on the way."""
  examples: list[tuple[np.ndarray, np.ndarray]]
  truncated: int  # cut to max_len
  dropped: int  # without a single target token (after the cut), not trained on
  total: int  # records read

  def report(self) -> dict:
    return {'examples': len(self.examples), 'records': self.total, 'truncated': self.truncated,
            'dropped_without_targets': self.dropped}


def tokenize_records(records: Sequence[tuple[str, Mapping]], renderer: Renderer,
                     tokenizer: tokenizers.Tokenizer, eos: int | None, max_len: int) -> Tokenized:
  """Every record rendered, tokenised and cut to max_len (the start kept)."""
  examples, truncated, dropped = [], 0, 0
  for origin, record in records:
    ids, weights = tokenize(renderer(origin, record), tokenizer, eos)
    if len(ids) > max_len:
      ids, weights, truncated = ids[:max_len], weights[:max_len], truncated + 1
    if not weights.any():
      dropped += 1
      continue
    examples.append((ids, weights))
  return Tokenized(examples, truncated, dropped, len(records))


def pad_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]], max_len: int,
             pad_id: int) -> dict[str, np.ndarray]:
  """One example per row, right-padded: input_ids, attention_mask, loss_weights."""
  n = len(examples)
  ids = np.full((n, max_len), pad_id, np.int32)
  mask = np.zeros((n, max_len), np.int32)
  weights = np.zeros((n, max_len), np.float32)
  for row, (x, w) in enumerate(examples):
    ids[row, :len(x)], mask[row, :len(x)], weights[row, :len(x)] = x, 1, w
  return {'input_ids': ids, 'attention_mask': mask, 'loss_weights': weights}


def pack_rows(examples: Sequence[tuple[np.ndarray, np.ndarray]], max_len: int,
              pad_id: int) -> dict[str, np.ndarray]:
  """Examples in order, as many per row as fit (a new row when the next does not):
  input_ids, segment_ids (1, 2, ... per example in its row; 0 padding), position_ids
  (restarting at 0 for every example) and loss_weights."""
  rows, row, used = [], [], 0
  for example in examples:
    if row and used + len(example[0]) > max_len:
      rows.append(row)
      row, used = [], 0
    row.append(example)
    used += len(example[0])
  if row:
    rows.append(row)
  n = len(rows)
  out = {'input_ids': np.full((n, max_len), pad_id, np.int32),
         'segment_ids': np.zeros((n, max_len), np.int32),
         'position_ids': np.zeros((n, max_len), np.int32),
         'loss_weights': np.zeros((n, max_len), np.float32)}
  for r, members in enumerate(rows):
    at = 0
    for segment, (x, w) in enumerate(members, start=1):
      span = slice(at, at + len(x))
      out['input_ids'][r, span], out['segment_ids'][r, span] = x, segment
      out['position_ids'][r, span], out['loss_weights'][r, span] = np.arange(len(x)), w
      at += len(x)
  return out


def token_counts(rows: Mapping[str, np.ndarray]) -> dict:
  """Real tokens and all token slots (real + padding) of a split's rows."""
  real = rows['segment_ids'] if 'segment_ids' in rows else rows['attention_mask']
  real_tokens, slots = int((real > 0).sum()), int(real.size)
  return {'rows': int(real.shape[0]), 'real_tokens': real_tokens, 'token_slots': slots,
          'real_fraction': round(real_tokens / max(slots, 1), 4)}


def build_rows(records: Sequence[tuple[str, Mapping]], renderer: Renderer, tokenizer_path,
               max_len: int, *, packing: bool) -> tuple[dict[str, np.ndarray], dict]:
  """A split's rows (packed or one example per row) and its report: records read,
  truncated, dropped, rows, real tokens / token slots."""
  tokenizer = raw_tokenizer(tokenizer_path)
  eos = eos_id(tokenizer, tokenizer_path) if renderer.fmt == 'alpaca' else None
  tokenized = tokenize_records(records, renderer, tokenizer, eos, max_len)
  if not tokenized.examples:
    raise DataError(f'none of the {tokenized.total} examples keeps a token to train on '
                    f'({tokenized.dropped} without a response token within data.max_len={max_len}); '
                    'expected responses (or raise data.max_len)')
  pad = text.pad_token_id(tokenizer, str(tokenizer_path))
  rows = (pack_rows if packing else pad_rows)(tokenized.examples, max_len, pad)
  return rows, {**tokenized.report(), **token_counts(rows)}


def read_split(path: str, name: str) -> list[tuple[str, dict]]:
  """The records of a split's files (data.name 'json' or 'csv')."""
  records = files.read_records(path, name)
  if not records:
    raise DataError(f"'{path}' holds no examples; expected at least one")
  return records


def carve(records: list, fraction: float, seed: int) -> tuple[list, list]:
  """(train, eval): a seeded random `fraction` of the records (at least one) as eval,
  both in their original order."""
  if not 0.0 < fraction < 1.0:
    raise DataError(f'data.val_fraction is {fraction}; expected a share in (0, 1)')
  if len(records) < 2:
    raise DataError(f'data.val_fraction={fraction} needs at least 2 train records; '
                    f'there are {len(records)}')
  n_eval = min(len(records) - 1, max(1, round(fraction * len(records))))
  picked = np.zeros(len(records), bool)
  picked[np.random.default_rng(seed).permutation(len(records))[:n_eval]] = True
  return ([r for r, p in zip(records, picked) if not p], [r for r, p in zip(records, picked) if p])


def describe(report: Mapping[str, Any]) -> str:
  """One line of a split's report, for the log."""
  return (f"{report['examples']} examples of {report['records']} records "
          f"({report['truncated']} cut to max_len, {report['dropped_without_targets']} dropped "
          f"without a target token) in {report['rows']} rows; real tokens "
          f"{report['real_tokens']:,} of {report['token_slots']:,} slots "
          f"({100 * report['real_fraction']:.1f}%)")
