"""Tests of multiple-choice log-likelihood evaluation: encoding as lm-eval-harness does,
batched scores equal to a numpy reference of each sequence alone, acc and acc_norm, bad files.

Uses the tiny Llama 3 fixture (2 layers, vocabulary of 400) and its tokenizer.json.
"""
import gc
import json
import pathlib
import weakref

import jax
import numpy as np
import pytest
import tokenizers

from glora_jax.data import multiple_choice as mc
from glora_jax.errors import DataError
from glora_jax.models import registry

FIXTURE = pathlib.Path(__file__).parent / 'fixtures' / 'hf_llama3'
BOS = 0  # <|begin_of_text|> in the fixture's vocabulary

# Rows of input length 10 and 6 only (the inputs of EXAMPLES at max_len 7: 7 and 6), so
# the unpadded reference compiles for few shapes; choices per example 3, 2, 2.
EXAMPLES = [
    {'context': 'The cat sat on the', 'choices': ['mat.', 'moon', 'sun'], 'gold': 0},
    {'query': 'Hello', 'choices': ['sofa', 'the sun'], 'label': 1},
    {'context': '', 'choices': ['a chair', 'maybe so'], 'answer': 0},
]


@pytest.fixture(scope='module')
def model_and_params():
  return registry.load(FIXTURE)


@pytest.fixture(scope='module')
def apply_alone(model_and_params):
  """The plain model on one unpadded sequence, compiled once per length for the module."""
  model, params = model_and_params
  apply = jax.jit(lambda ids: model.apply({'params': params}, ids))
  return lambda tokens: np.asarray(apply(np.array([tokens], np.int32)), np.float64)[0]


@pytest.fixture(scope='module')
def encoder():
  return mc.load_encoder(FIXTURE)


def _write(tmp_path, records, name='mc.jsonl'):
  path = tmp_path / name
  path.write_text('\n'.join(json.dumps(r) for r in records) + '\n')
  return path


def _reference_lls(apply_alone, examples, max_len):
  """Each (context, ' ' + choice) scored alone, unpadded, with numpy log-softmax of the
  model's full logits; tokens from the raw tokenizer as the harness splits them."""
  raw = tokenizers.Tokenizer.from_file(str(FIXTURE / 'tokenizer.json'))
  lls, greedy = [], []
  for example in examples:
    for choice in example.choices:
      context, continuation = example.context, ' ' + choice
      if context:
        stripped = context.rstrip()
        continuation = context[len(stripped):] + continuation
        context_ids = raw.encode(stripped).ids
        continuation_ids = raw.encode(stripped + continuation).ids[len(context_ids):]
      else:
        context_ids = [BOS]
        continuation_ids = raw.encode(continuation, add_special_tokens=False).ids
      tokens = (context_ids + continuation_ids)[-(max_len + 1):]
      logits = apply_alone(tokens[:-1])
      logp = logits - logits.max(-1, keepdims=True)
      logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
      positions = np.arange(len(tokens) - 1 - len(continuation_ids), len(tokens) - 1)
      targets = np.array(tokens)[positions + 1]
      lls.append(logp[positions, targets].sum())
      greedy.append(bool(np.all(logits[positions].argmax(-1) == targets)))
  return np.array(lls), np.array(greedy)


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #


def test_encode_pair_moves_trailing_whitespace_and_splits_the_joint_encoding(encoder):
  # 'The cat sat' is <bos> The Ġc at Ġs at: the space before 'sat' belongs to 'Ġs'.
  expected = ([BOS, 290, 285, 291], [266, 291])
  assert encoder.encode_pair('The cat ', 'sat') == expected
  assert encoder.encode_pair('The cat', ' sat') == expected
  # Without the move the context would end in a lone 'Ġ' (223) and the choice lose its space.
  assert encoder.encode('The cat ') == [BOS, 290, 285, 291, 223]
  # The continuation is the joint encoding's tail, not 'o world' encoded alone (<bos> first).
  assert encoder.encode_pair('Hell', 'o world') == ([BOS, 334], [81, 267, 278, 369])


def test_encode_pair_special_tokens_as_the_harness(encoder):
  # An empty context is the BOS token; the continuation gets no special tokens.
  assert encoder.encode_pair('', ' sat') == ([BOS], [266, 291])
  # A context that already starts with BOS text gets no second BOS.
  assert encoder.encode_pair('<|begin_of_text|>The cat', ' sat') == ([BOS, 290, 285, 291],
                                                                      [266, 291])


def test_truncation_keeps_the_continuation(encoder):
  context = ' '.join(['the cat sat on the mat'] * 6)
  example = mc.Example(context, ('dog', 'moon'), 0, 'test:1')
  rows = mc.encode_choices([example], encoder, max_len=8)
  for (tokens, num_scored), choice in zip(rows, example.choices):
    context_enc, continuation_enc = encoder.encode_pair(context, ' ' + choice)
    assert len(tokens) == 9  # max_len inputs, the last one also a target
    assert tokens == (context_enc + continuation_enc)[-9:]
    assert tokens[-num_scored:] == continuation_enc
  with pytest.raises(DataError, match=r'test:1, choice 0: a continuation of \d+ tokens is longer '
                     'than max_len 1'):
    mc.encode_choices([example], encoder, max_len=1)


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize('max_len', [64, 7])  # 7 truncates the longer rows' contexts
def test_batched_lls_equal_each_sequence_scored_alone(tmp_path, model_and_params, apply_alone,
                                                     encoder, max_len):
  model, params = model_and_params
  examples = mc.read_examples(_write(tmp_path, EXAMPLES))
  batches = mc.build_batches(examples, encoder, batch_size=3, max_len=max_len)
  # 7 rows: the last batch is one real row and two empty ones.
  assert batches.input_ids.shape == (3, 3, min(max_len, 10))
  np.testing.assert_array_equal(batches.row_mask[-1], [True, False, False])
  traces = []
  plain = mc.model_forward(model)
  forward = lambda params, ids, mask: traces.append(ids.shape) or plain(params, ids, mask)
  lls, greedy = mc.loglikelihoods(forward, params, batches)
  expected_lls, expected_greedy = _reference_lls(apply_alone, examples, max_len)
  np.testing.assert_allclose(lls, expected_lls, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(greedy, expected_greedy)
  # One compilation for every batch, the padded last one included, and for a second call.
  mc.loglikelihoods(forward, params, batches)
  assert traces == [batches.input_ids.shape[1:]]


def test_forward_given_by_the_caller_with_params_as_any_pytree(tmp_path, model_and_params, encoder):
  model, params = model_and_params
  examples = mc.read_examples(_write(tmp_path, EXAMPLES))
  batches = mc.build_batches(examples, encoder, batch_size=3, max_len=64)
  plain, _ = mc.loglikelihoods(mc.model_forward(model), params, batches)
  # params as (base, scale): what changes between calls travels as an argument and
  # compiles once.
  traces = []

  def forward(p, ids, mask):
    traces.append(ids.shape)
    return model.apply({'params': p[0]}, ids, mask) * p[1]

  scaled, _ = mc.loglikelihoods(forward, (params, 1.0), batches)
  np.testing.assert_allclose(scaled, plain, rtol=1e-6)
  sharper, _ = mc.loglikelihoods(forward, (params, 3.0), batches)
  assert not np.allclose(sharper, plain)
  assert len(traces) == 1


def test_is_greedy_and_lls_of_a_bigram_table(encoder):
  # A forward whose next-token logits are a row of a table: the table makes ' sat' the
  # arg max after 'The cat', so only that choice is greedy.
  example = mc.Example('The cat', ('sat', 'mat'), 0, 'test:1')
  batches = mc.build_batches([example], encoder, batch_size=2, max_len=16)
  context_enc, continuation_enc = encoder.encode_pair('The cat', ' sat')
  table = np.random.default_rng(0).normal(size=(400, 400)).astype(np.float32)
  path = context_enc[-1:] + continuation_enc
  for previous, following in zip(path[:-1], path[1:]):
    table[previous, following] = 10.0
  forward = lambda table, ids, mask: table[ids]
  lls, greedy = mc.loglikelihoods(forward, table, batches)
  np.testing.assert_array_equal(greedy, [True, False])
  # The compilation cache lets go of a forward (and what it closes over) with its caller.
  forward_alive = weakref.ref(forward)
  del forward
  gc.collect()
  assert forward_alive() is None
  table = table.astype(np.float64)
  logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
  for row, choice in enumerate(example.choices):
    context_enc, continuation_enc = encoder.encode_pair('The cat', ' ' + choice)
    tokens = context_enc[-1:] + continuation_enc
    np.testing.assert_allclose(lls[row], sum(logp[a, b] for a, b in zip(tokens[:-1], tokens[1:])),
                               rtol=1e-5)


def test_evaluate_file_against_the_reference(tmp_path, model_and_params, apply_alone):
  model, params = model_and_params
  path = _write(tmp_path, EXAMPLES)
  scores = mc.evaluate_file(path, model, params, FIXTURE, batch_size=3, max_len=64)
  examples = mc.read_examples(path)
  lls = mc.by_example(_reference_lls(apply_alone, examples, 64)[0],
                      [len(e.choices) for e in examples])
  gold = [e.gold for e in examples]
  expected = mc.accuracy(lls, mc.choice_lengths(examples), gold)
  assert scores['n'] == 3
  assert scores['acc'] == expected['acc'] and scores['acc_norm'] == expected['acc_norm']
  assert scores['acc_bytes'] == mc.accuracy(lls, mc.choice_lengths(examples, 'bytes'),
                                            gold)['acc_norm']


def test_evaluate_file_refuses_a_model_without_next_token_logits(tmp_path):
  bert, params = registry.load(FIXTURE.parent / 'hf_bert')
  with pytest.raises(ValueError, match='needs a causal LM'):
    mc.evaluate_file(_write(tmp_path, EXAMPLES), bert, params, FIXTURE, batch_size=2, max_len=16)


# --------------------------------------------------------------------------- #
# Metrics
# --------------------------------------------------------------------------- #


def test_acc_and_acc_norm_differ_when_the_longer_choice_is_likelier_per_character():
  # The short choice has the higher total log-likelihood (acc picks it); the long one the
  # higher per character (acc_norm picks it). With negative log-likelihoods the reverse
  # (longer choice likelier in total, less per character) cannot happen.
  lls = [[-6.0, -12.0]]
  gold = [1]
  lengths = [[2.0, 20.0]]  # -3 per character against -0.6
  assert mc.accuracy(lls, lengths, gold) == {'acc': 0.0, 'acc_norm': 1.0}


def test_acc_norm_counts_characters_and_acc_bytes_counts_utf8_bytes():
  examples = [mc.Example('Pick:', ('ééé', 'abcd'), 0, 'test:1')]
  assert mc.choice_lengths(examples, 'chars') == [[3.0, 4.0]]
  assert mc.choice_lengths(examples, 'bytes') == [[6.0, 4.0]]
  lls = [[-3.0, -3.5]]  # per character -1 vs -0.875; per byte -0.5 vs -0.875
  assert mc.accuracy(lls, mc.choice_lengths(examples, 'chars'), [0])['acc_norm'] == 0.0
  assert mc.accuracy(lls, mc.choice_lengths(examples, 'bytes'), [0])['acc_norm'] == 1.0


def test_accuracy_over_examples_with_different_numbers_of_choices():
  lls = [[-1.0, -2.0], [-3.0, -1.0, -2.0]]
  lengths = [[1.0, 1.0], [1.0, 1.0, 1.0]]
  assert mc.accuracy(lls, lengths, [0, 2]) == {'acc': 0.5, 'acc_norm': 0.5}
  with pytest.raises(ValueError, match='example 1 has 3 log-likelihoods and 2 choice lengths'):
    mc.accuracy(lls, [[1.0, 1.0], [1.0, 1.0]], [0, 2])


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


def test_reads_json_lines_and_json_arrays_with_aliases(tmp_path):
  lines = mc.read_examples(_write(tmp_path, EXAMPLES))
  array_path = tmp_path / 'mc.json'
  array_path.write_text(json.dumps(EXAMPLES, indent=1))
  assert [(e.context, e.choices, e.gold) for e in mc.read_examples(array_path)] == [
      (e.context, e.choices, e.gold) for e in lines]
  assert lines[1] == mc.Example('Hello', ('sofa', 'the sun'), 1, f'{tmp_path / "mc.jsonl"}:2')
  assert lines[2].context == '' and lines[2].gold == 0


@pytest.mark.parametrize('record, message', [
    ({'context': 'a', 'choices': ['x', 'y'], 'gold': 2}, r'gold is 2, out of range for 2 choices'),
    ({'context': 'a', 'choices': ['x', 'y'], 'gold': -1}, r'gold is -1, out of range'),
    ({'context': 'a', 'choices': ['x', 'y'], 'gold': True}, r'gold is True; expected the index'),
    ({'context': 'a', 'choices': ['x', 'y'], 'gold': '0'}, r"gold is '0'; expected the index"),
    ({'context': 'a', 'choices': ['x'], 'gold': 0}, r'has 1 choice\(s\); expected at least 2'),
    ({'context': 'a', 'choices': 'xy', 'gold': 0}, r"choices is 'xy'; expected a list of strings"),
    ({'choices': ['x', 'y'], 'gold': 0}, r"has no 'context' field .*expected one of \['context', "
                                         r"'query'\]"),
    ({'context': 'a', 'choices': ['x', 'y']}, r"has no 'gold' field"),
    ({'context': 'a', 'choices': ['x', 'y'], 'gold': 0, 'label': 1},
     r"has both 'gold' and 'label'"),
])
def test_bad_records_name_the_file_line_and_field(tmp_path, record, message):
  good = {'context': 'c', 'choices': ['x', 'y'], 'gold': 0}
  path = _write(tmp_path, [good, record])
  with pytest.raises(DataError, match=f'{path}:2.*{message}'):
    mc.read_examples(path)


def test_empty_and_malformed_files(tmp_path):
  empty = tmp_path / 'empty.jsonl'
  empty.write_text('\n\n')
  with pytest.raises(DataError, match=f'{empty} holds no examples'):
    mc.read_examples(empty)
  broken = tmp_path / 'broken.jsonl'
  broken.write_text('{"context": "a", "choices": ["x", "y"], "gold": 0}\n{"context": \n')
  with pytest.raises(DataError, match=f'{broken}:2 is not valid JSON'):
    mc.read_examples(broken)
  with pytest.raises(DataError, match='no file matches'):
    mc.read_examples(tmp_path / 'missing.jsonl')
