"""Multiple-choice evaluation of a causal LM by log-likelihood, as lm-eval-harness scores it:
each choice's summed log-probability given the context, then acc and acc_norm.

Follows EleutherAI/lm-evaluation-harness (read at main, 4e7e0d4, 2026-08):
- Requests (`lm_eval/api/task.py` construct_requests, multiple_choice): one
  (context, target_delimiter + choice) pair per choice; target_delimiter defaults to ' '.
- Encoding (`lm_eval/api/model.py` TemplateLM._encode_pair and loglikelihood): trailing
  whitespace of the context moves to the continuation; whole = encode(context +
  continuation), context_enc = encode(context), continuation_enc =
  whole[len(context_enc):]. An empty context is [prefix token] (BOS, else EOS) and the
  continuation is encoded without special tokens (unless it already starts with that
  token, which then serves as the context).
- Special tokens (`lm_eval/models/huggingface.py` tok_encode, add_bos_token=None by
  default since #3347): the tokenizer's own default, i.e. its post-processor (Llama 3
  prepends <|begin_of_text|>, GPT-2 adds nothing), except that a string already starting
  with the prefix token's text gets none. Before #3347 (2025-11) the harness added no
  special tokens for causal models, so its older scores of BOS models differ.
- Truncation (huggingface.py _loglikelihood_tokens): the model reads
  (context_enc + continuation_enc)[-(max_len + 1):][:-1], so the context loses tokens on
  the left and the continuation is kept whole (one longer than max_len is an error).
- Scoring: the sum of log_softmax at the continuation's tokens, and is_greedy = every
  continuation token is the arg max.
- Metrics (task.py process_results): acc = argmax(ll) == gold; acc_norm = argmax(ll /
  len(choice)) == gold with len in characters (`completion_len = [float(len(i)) for i in
  choices]`, the choice without the delimiter); the harness's byte-normalised variant is
  acc_bytes (`len(i.encode('utf-8'))`), reported beside it. REFERENCE.md's "bytes" for
  acc_norm is the harness's acc_bytes.
Rows are scored in file order rather than the harness's longest-first order; that order
changes only float rounding.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tokenizers

from glora_jax.data import files, text
from glora_jax.errors import DataError

# forward(params, input_ids, attention_mask) -> logits (batch, seq, vocab)
Forward = Callable[[Any, jax.Array, jax.Array], jax.Array]

CONTEXT_FIELDS = ('context', 'query')
GOLD_FIELDS = ('gold', 'label', 'answer')
DEFAULT_TARGET_DELIMITER = ' '  # lm-eval-harness TaskConfig.target_delimiter


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Example:
  context: str
  choices: tuple[str, ...]
  gold: int
  origin: str  # '<file>:<line>' (or '<file>:[<index>]' in a JSON array), for error messages


def _field(record: Mapping[str, Any], names: Sequence[str], origin: str):
  present = [name for name in names if name in record]
  if not present:
    raise DataError(f'{origin} has no {names[0]!r} field (fields: {sorted(record)}); expected '
                    f'one of {list(names)}')
  if len(present) > 1:
    raise DataError(f'{origin} has both {present[0]!r} and {present[1]!r}, which mean the same; '
                    'expected one of them')
  return record[present[0]]


def _example(origin: str, record: Mapping[str, Any]) -> Example:
  context = _field(record, CONTEXT_FIELDS, origin)
  if not isinstance(context, str):
    raise DataError(f'{origin}: context is a {type(context).__name__}; expected a string')
  choices = record.get('choices')
  if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
    raise DataError(f'{origin}: choices is {choices!r}; expected a list of strings')
  if len(choices) < 2:
    raise DataError(f'{origin} has {len(choices)} choice(s); expected at least 2')
  gold = _field(record, GOLD_FIELDS, origin)
  # bool is an int to Python; true/false as a gold index is a mistake, not 1/0.
  if isinstance(gold, bool) or not isinstance(gold, int):
    raise DataError(f'{origin}: gold is {gold!r}; expected the index of the right choice, an '
                    f'integer in [0, {len(choices)})')
  if not 0 <= gold < len(choices):
    raise DataError(f'{origin}: gold is {gold}, out of range for {len(choices)} choices; '
                    f'expected an integer in [0, {len(choices)})')
  return Example(context, tuple(choices), gold, origin)


def read_examples(path: str | os.PathLike) -> list[Example]:
  """Examples of a JSON-lines file (or a file that is one JSON array, or a glob of such
  files): {"context": str, "choices": [str, ...], "gold": int}; "query" may stand for
  context and "label" or "answer" for gold."""
  examples = [_example(origin, record) for origin, record in
              files.read_records(os.fspath(path), 'json')]
  if not examples:
    raise DataError(f'{path} holds no examples; expected one JSON object per line such as '
                    '{"context": "...", "choices": ["...", "..."], "gold": 0}')
  return examples


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class PairEncoder:
  """A checkpoint's tokenizer as the harness's HFLM uses it for log-likelihoods.

  prefix_token_id: the BOS token, else EOS (HFLM.prefix_token_id); None when the
  checkpoint names neither, which only an empty context needs."""
  tokenizer: tokenizers.Tokenizer
  prefix_token_id: int | None
  source: str

  @functools.cached_property
  def prefix_token(self) -> str | None:
    if self.prefix_token_id is None:
      return None
    return self.tokenizer.decode([self.prefix_token_id], skip_special_tokens=False)

  def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
    """HFLM.tok_encode: None means the tokenizer's default, which is none for a text
    that already starts with the prefix token (no doubled BOS)."""
    if add_special_tokens is None:
      add_special_tokens = not (self.prefix_token and text.startswith(self.prefix_token))
    return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context_enc, continuation_enc) as TemplateLM.loglikelihood makes them."""
    if not context:
      continuation_enc = self.encode(continuation, add_special_tokens=False)
      if self.prefix_token_id is None:
        raise DataError(f'an empty context is scored after the BOS (or EOS) token, but '
                        f'{self.source} names neither in tokenizer_config.json; expected a '
                        'bos_token or eos_token there')
      if continuation_enc and continuation_enc[0] == self.prefix_token_id:
        return continuation_enc[:1], continuation_enc[1:]
      return [self.prefix_token_id], continuation_enc
    # Whitespace belongs to the next word in BPE vocabularies (' Paris' is one token);
    # left at the context's end it would be a token of its own the model rarely saw.
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = self.encode(stripped + continuation)
    context_enc = self.encode(stripped)
    # Split the joint encoding, not two separate ones: merges across the boundary stay
    # as the model would see them in running text.
    return context_enc, whole[len(context_enc):]


def load_encoder(tokenizer_dir: str | os.PathLike) -> PairEncoder:
  """The PairEncoder of a checkpoint directory's tokenizer.json (or that file's path)."""
  path = pathlib.Path(tokenizer_dir)
  if path.is_dir():
    path = path / 'tokenizer.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist; expected the tokenizer.json of a causal '
                            'LM checkpoint directory')
  tokenizer = text.raw_tokenizer(path)  # the harness encodes one whole text at a time
  prefix_id = None
  for name in ('bos_token', 'eos_token'):
    token = text.config_token(path, name)
    if token is not None and tokenizer.token_to_id(token) is not None:
      prefix_id = tokenizer.token_to_id(token)
      break
  return PairEncoder(tokenizer, prefix_id, os.fspath(path))


def truncate(context_enc: Sequence[int], continuation_enc: Sequence[int],
             max_len: int) -> list[int]:
  """The at most max_len + 1 tokens whose first max_len the model reads (the last one
  only as a target): the context loses tokens on the left, the continuation none."""
  if len(continuation_enc) > max_len:
    raise DataError(f'a continuation of {len(continuation_enc)} tokens is longer than max_len '
                    f'{max_len}; expected at most max_len tokens to score')
  return (list(context_enc) + list(continuation_enc))[-(max_len + 1):]


def encode_choices(examples: Sequence[Example], encoder: PairEncoder, *, max_len: int,
                   target_delimiter: str = DEFAULT_TARGET_DELIMITER) -> list[tuple[list[int], int]]:
  """One (tokens, continuation length) per (example, choice), in order: `truncate`'s tokens
  of context and target_delimiter + choice."""
  rows = []
  for example in examples:
    for index, choice in enumerate(example.choices):
      context_enc, continuation_enc = encoder.encode_pair(example.context,
                                                          target_delimiter + choice)
      if not context_enc or not continuation_enc:
        part = 'context' if not context_enc else f'choice {index}'
        raise DataError(f'{example.origin}: the {part} encodes to no tokens; expected a text '
                        'the tokenizer turns into at least one token')
      try:
        rows.append((truncate(context_enc, continuation_enc, max_len), len(continuation_enc)))
      except DataError as e:
        raise DataError(f'{example.origin}, choice {index}: {e}') from None
  return rows


# --------------------------------------------------------------------------- #
# Fixed-shape batches
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Batches:
  """Every (example, choice) row, right-padded to seq_len and grouped batch_size at a
  time; each array is (num_batches, batch_size, ...), so one compiled function scores
  them all. target_mask marks the continuation's targets; row_mask the real rows (the
  last batch is filled with empty rows). num_choices splits the rows back by example."""
  input_ids: np.ndarray  # int32 (num_batches, batch_size, seq_len)
  attention_mask: np.ndarray  # int32, 1 on real tokens
  targets: np.ndarray  # int32, the next token at each position
  target_mask: np.ndarray  # bool, True at the continuation's targets
  row_mask: np.ndarray  # bool (num_batches, batch_size)
  num_choices: np.ndarray  # int (examples,)

  def __len__(self) -> int:
    return self.input_ids.shape[0]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    for b in range(len(self)):
      yield {name: getattr(self, name)[b] for name in
             ('input_ids', 'attention_mask', 'targets', 'target_mask', 'row_mask')}

  @property
  def num_rows(self) -> int:
    return int(self.num_choices.sum())


def pack(rows: Sequence[tuple[Sequence[int], int]], num_choices: Sequence[int], *,
         batch_size: int, seq_len: int | None = None) -> Batches:
  """Batches of `encode_choices` rows; seq_len defaults to the longest row's input, so a
  file's batches share one shape however often it is scored."""
  if batch_size < 1:
    raise ValueError(f'batch_size is {batch_size}; expected at least 1')
  longest = max(len(tokens) - 1 for tokens, _ in rows)
  seq_len = longest if seq_len is None else seq_len
  if seq_len < longest:
    raise ValueError(f'seq_len {seq_len} is shorter than the longest row ({longest} tokens); '
                     'expected at least that (rows are truncated by max_len, not seq_len)')
  num_batches = -(-len(rows) // batch_size)
  arrays = _fill(rows, num_batches * batch_size, seq_len)
  row_mask = np.arange(num_batches * batch_size) < len(rows)
  split = lambda a: a.reshape((num_batches, batch_size) + a.shape[1:])
  return Batches(*(split(arrays[k]) for k in ROW_FIELDS), split(row_mask),
                 np.asarray(num_choices, np.int64))


ROW_FIELDS = ('input_ids', 'attention_mask', 'targets', 'target_mask')


def _fill(rows: Sequence[tuple[Sequence[int], int] | None], num_rows: int,
          seq_len: int) -> dict[str, np.ndarray]:
  """ROW_FIELDS arrays (num_rows, seq_len) of `encode_choices` rows, right-padded; a
  None row (and every row past the given ones) stays empty."""
  shape = (num_rows, seq_len)
  out = {'input_ids': np.zeros(shape, np.int32),  # Padding reads id 0: masked, any id serves.
         'attention_mask': np.zeros(shape, np.int32), 'targets': np.zeros(shape, np.int32),
         'target_mask': np.zeros(shape, bool)}
  for r, row in enumerate(rows):
    if row is None:
      continue
    tokens, num_scored = row
    n = len(tokens) - 1
    out['input_ids'][r, :n] = tokens[:-1]
    out['targets'][r, :n] = tokens[1:]
    out['attention_mask'][r, :n] = 1
    out['target_mask'][r, n - num_scored:n] = True
  return out


def by_example_arrays(examples: Sequence[Example], encoder: PairEncoder, *, max_len: int,
                      target_delimiter: str = DEFAULT_TARGET_DELIMITER) -> dict[str, np.ndarray]:
  """One row per example, each holding all its choices, for an evaluator that batches
  examples (the search's fitness): ROW_FIELDS (examples, most choices, seq), 'choice_mask'
  (examples, most choices; False on the slots of an example with fewer choices),
  'choice_chars' (acc_norm's lengths) and 'label' (the gold index)."""
  rows = iter(encode_choices(examples, encoder, max_len=max_len,
                             target_delimiter=target_delimiter))
  width = max(len(e.choices) for e in examples)
  slots = [next(rows) if c < len(e.choices) else None for e in examples for c in range(width)]
  seq_len = max(len(row[0]) - 1 for row in slots if row is not None)
  arrays = {k: v.reshape(len(examples), width, seq_len)
            for k, v in _fill(slots, len(slots), seq_len).items()}
  lengths = choice_lengths(examples, 'chars')
  arrays['choice_mask'] = np.array([[c < len(e.choices) for c in range(width)] for e in examples])
  arrays['choice_chars'] = np.array([row + [1.0] * (width - len(row)) for row in lengths],
                                    np.float32)
  arrays['label'] = np.array([e.gold for e in examples], np.int32)
  return arrays


def build_batches(examples: Sequence[Example], encoder: PairEncoder, *, batch_size: int,
                  max_len: int, target_delimiter: str = DEFAULT_TARGET_DELIMITER,
                  seq_len: int | None = None) -> Batches:
  """`encode_choices` then `pack`."""
  rows = encode_choices(examples, encoder, max_len=max_len, target_delimiter=target_delimiter)
  return pack(rows, [len(e.choices) for e in examples], batch_size=batch_size, seq_len=seq_len)


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #


def continuation_loglikelihoods(logits, targets, scored) -> tuple[jax.Array, jax.Array]:
  """(summed log-probability of the `scored` targets of each row, whether each scored
  target is the arg max): logits (..., seq, vocab), targets and scored (..., seq)."""
  logits = logits.astype(jnp.float32)
  # log_softmax at one index: no (batch, seq, vocab) log-probability array is built.
  target_logits = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  token_ll = target_logits - jax.nn.logsumexp(logits, -1)
  # where, not multiply: a padded position's -inf times 0 would be NaN.
  ll = jnp.sum(jnp.where(scored, token_ll, 0.0), -1)
  greedy = jnp.all(jnp.where(scored, jnp.argmax(logits, -1) == targets, True), -1)
  return ll, greedy


def score_batch(forward: Forward, params,
                batch: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """(summed log-likelihood of each row's continuation, whether each continuation token
  is the arg max); pure and jittable. Empty rows give (0, False)."""
  input_ids = batch['input_ids']
  logits = forward(params, input_ids, batch['attention_mask'])
  if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
    raise ValueError(f'forward returned logits of shape {logits.shape}; expected (batch, seq, '
                     f'vocab) with (batch, seq) = {input_ids.shape}, the input_ids shape')
  ll, greedy = continuation_loglikelihoods(logits, batch['targets'], batch['target_mask'])
  real = batch['row_mask']
  return jnp.where(real, ll, 0.0), greedy & real


# forward -> its jitted score_batch, kept while the forward lives (a forward that closes
# over adapters must not be held here after its caller drops it).
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def score_fn(forward: Forward) -> Callable[[Any, Mapping[str, jax.Array]],
                                           tuple[jax.Array, jax.Array]]:
  """jit(score_batch) for one forward, shared by every call with the same forward: each
  batch shape compiles once, however many batches and calls.

  Values a forward closes over are constants of the compiled function; pass what changes
  between calls (adapters, a subnet array) inside params, e.g. params=(base, adapters,
  subnet) unpacked by the forward, so a new subnet does not recompile."""
  try:
    compiled = _COMPILED.get(forward)
    if compiled is None:
      # The cached function refers to forward weakly: a strong reference from a value
      # would keep its own weak key alive for ever.
      alive = weakref.ref(forward)
      compiled = jax.jit(lambda params, batch: score_batch(alive(), params, batch))
      _COMPILED[forward] = compiled
  except TypeError:  # a forward that cannot be a weak key: compiled for this scorer only
    compiled = jax.jit(functools.partial(score_batch, forward))
  return functools.partial(_score_with, compiled, forward)


def _score_with(compiled, forward, params, batch):
  del forward  # carried so that the weakly cached compilation outlives no scorer using it
  return compiled(params, batch)


def loglikelihoods(forward: Forward, params, batches: Batches) -> tuple[np.ndarray, np.ndarray]:
  """(ll, is_greedy) of every real row, in row order (example by example, choice by choice)."""
  score = score_fn(forward)
  outputs = [score(params, batch) for batch in batches]  # dispatched without waiting
  lls = np.concatenate([np.asarray(ll, np.float64) for ll, _ in outputs])
  greedy = np.concatenate([np.asarray(g) for _, g in outputs])
  return lls[:batches.num_rows], greedy[:batches.num_rows]


def by_example(values: Sequence, num_choices: Sequence[int]) -> list[np.ndarray]:
  """Per-row values split into one array per example."""
  return np.split(np.asarray(values), np.cumsum(num_choices)[:-1])


def choice_lengths(examples: Sequence[Example], unit: str = 'chars') -> list[list[float]]:
  """Each choice's length as the harness normalises by: 'chars' (acc_norm) or UTF-8
  'bytes' (acc_bytes); the choice without the target delimiter."""
  if unit not in ('chars', 'bytes'):
    raise ValueError(f"unit '{unit}' is not known; expected 'chars' or 'bytes'")
  size = len if unit == 'chars' else (lambda c: len(c.encode('utf-8')))
  return [[float(size(c)) for c in e.choices] for e in examples]


def accuracy(lls: Sequence[Sequence[float]], choice_lengths: Sequence[Sequence[float]],
             gold: Sequence[int]) -> dict[str, float]:
  """acc: the highest log-likelihood is gold's; acc_norm: the highest log-likelihood per
  unit of length is. lls and choice_lengths hold one sequence per example (ties go to
  the first choice, as np.argmax)."""
  if not len(lls) == len(choice_lengths) == len(gold):
    raise ValueError(f'{len(lls)} examples of log-likelihoods, {len(choice_lengths)} of choice '
                     f'lengths and {len(gold)} gold indices; expected one of each per example')
  if not len(gold):
    raise ValueError('no examples to score; expected at least one')
  acc, acc_norm = [], []
  for index, (ll, length, g) in enumerate(zip(lls, choice_lengths, gold)):
    ll, length = np.asarray(ll, np.float64), np.asarray(length, np.float64)
    if ll.shape != length.shape:
      raise ValueError(f'example {index} has {ll.size} log-likelihoods and {length.size} choice '
                       'lengths; expected one of each per choice')
    acc.append(np.argmax(ll) == g)
    with np.errstate(divide='ignore', invalid='ignore'):  # an empty choice, as the harness
      acc_norm.append(np.argmax(ll / length) == g)
  return {'acc': float(np.mean(acc)), 'acc_norm': float(np.mean(acc_norm))}


# --------------------------------------------------------------------------- #
# One call
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=8)
def model_forward(model) -> Forward:
  """The plain decoder's forward, made once per model so that repeated evaluations reuse
  one compilation (an adapted model passes its own forward to evaluate_file)."""
  from glora_jax.models import registry
  family = registry.of_model(model)
  if family.task != 'causal_lm':
    raise ValueError(f'the model is a {family.name} ({family.task}); multiple-choice scoring '
                     'needs a causal LM (next-token logits)')
  return lambda params, input_ids, attention_mask: model.apply(
      {'params': params}, input_ids, attention_mask)


def evaluate_file(path: str | os.PathLike, model, params, tokenizer_dir: str | os.PathLike, *,
                  batch_size: int, max_len: int, forward: Forward | None = None,
                  target_delimiter: str = DEFAULT_TARGET_DELIMITER) -> dict[str, float]:
  """{'acc', 'acc_norm', 'acc_bytes', 'n'} of a multiple-choice file, as lm-eval-harness
  scores it. forward (default: the plain model) takes params as given, so an adapted
  model is scored by a forward that applies its adapters and subnet."""
  forward = model_forward(model) if forward is None else forward
  examples = read_examples(path)
  batches = build_batches(examples, load_encoder(tokenizer_dir), batch_size=batch_size,
                          max_len=max_len, target_delimiter=target_delimiter)
  lls, _ = loglikelihoods(forward, params, batches)
  lls = by_example(lls, batches.num_choices)
  gold = [e.gold for e in examples]
  scores = accuracy(lls, choice_lengths(examples, 'chars'), gold)
  scores['acc_bytes'] = accuracy(lls, choice_lengths(examples, 'bytes'), gold)['acc_norm']
  scores['n'] = len(examples)
  return scores
