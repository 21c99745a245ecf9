"""Language-model data: Alpaca's prompt and response mask against hand tokenisation,
truncation and dropping counted, packing, the text format and the record readers."""
import json
import pathlib

import numpy as np
import pytest

from glora_jax.data import lm_data
from glora_jax.errors import DataError

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
TOKENIZER = FIXTURES / 'hf_llama3' / 'tokenizer.json'
RECORDS = [('a.json:1', {'instruction': 'Name a sport.', 'input': '', 'output': 'Football is a sport.'}),
           ('a.json:2', {'instruction': 'Say hello', 'input': 'to the BBC', 'output': 'Hello BBC!'}),
           ('a.json:3', {'instruction': 'Count', 'output': 'One two three.'})]


def _tok():
  return lm_data.raw_tokenizer(TOKENIZER)


def test_alpaca_prompts_are_stanford_alpacas():
  assert lm_data.alpaca_prompt('Do X.') == (
      'Below is an instruction that describes a task. Write a response that appropriately '
      'completes the request.\n\n### Instruction:\nDo X.\n\n### Response:')
  assert lm_data.alpaca_prompt('Do X.', 'on Y') == (
      'Below is an instruction that describes a task, paired with an input that provides further '
      'context. Write a response that appropriately completes the request.\n\n### Instruction:\n'
      'Do X.\n\n### Input:\non Y\n\n### Response:')


def test_alpaca_targets_are_the_output_and_eos_as_tokenised_by_hand():
  tok = _tok()
  eos = lm_data.eos_id(tok, TOKENIZER)
  assert tok.id_to_token(eos) == '<|end_of_text|>'
  renderer = lm_data.Renderer('alpaca', TOKENIZER.parent)
  for origin, record in RECORDS:
    ids, weights = lm_data.tokenize(renderer(origin, record), tok, eos)
    prompt = lm_data.alpaca_prompt(record['instruction'], record.get('input', ''))
    # By hand: bos + prompt as the tokenizer encodes it, the output alone, then eos.
    by_hand_prompt = tok.encode(prompt).ids  # with bos
    by_hand_output = tok.encode(record['output'], add_special_tokens=False).ids
    assert ids.tolist() == by_hand_prompt + by_hand_output + [eos]
    assert weights.tolist() == [0.0] * len(by_hand_prompt) + [1.0] * (len(by_hand_output) + 1)


def test_train_on_prompt_and_text_format_weigh_every_token_but_the_first():
  tok = _tok()
  eos = lm_data.eos_id(tok, TOKENIZER)
  ids, weights = lm_data.tokenize(
      lm_data.Renderer('alpaca', TOKENIZER.parent, train_on_prompt=True)(*RECORDS[0]), tok, eos)
  assert weights[0] == 0 and weights[1:].all()
  ids, weights = lm_data.tokenize(
      lm_data.Renderer('text', TOKENIZER.parent)('t', {'text': 'Hello world!'}), tok, None)
  assert ids.tolist() == tok.encode('Hello world!').ids
  assert weights[0] == 0 and weights[1:].all()


def test_truncation_and_dropped_examples_are_counted():
  tok = _tok()
  eos = lm_data.eos_id(tok, TOKENIZER)
  renderer = lm_data.Renderer('alpaca', TOKENIZER.parent)
  lengths = [len(lm_data.tokenize(renderer(*r), tok, eos)[0]) for r in RECORDS]
  prompt_only = len(tok.encode(lm_data.alpaca_prompt('Say hello', 'to the BBC')).ids)
  # Cut the second record inside its prompt (dropped: no response token left) and the
  # first inside its response (kept, cut); the third fits.
  max_len = max(lengths[2], lengths[0] - 2)
  assert prompt_only >= max_len > lengths[0] - 3 and lengths[1] > max_len
  out = lm_data.tokenize_records(RECORDS, renderer, tok, eos, max_len)
  assert (out.truncated, out.dropped, out.total, len(out.examples)) == (2, 1, 3, 2)
  assert all(len(x) <= max_len and w.any() for x, w in out.examples)
  with pytest.raises(DataError, match='none of the 3 examples keeps a token to train on'):
    lm_data.build_rows(RECORDS, renderer, TOKENIZER, 8, packing=False)


def test_packing_keeps_every_example_whole_in_order():
  rng = np.random.default_rng(0)
  examples = [(rng.integers(5, 100, n).astype(np.int32), rng.random(n).round().astype(np.float32))
              for n in (5, 7, 3, 9, 2, 10)]
  packed = lm_data.pack_rows(examples, 12, pad_id=0)
  assert packed['input_ids'].shape == (3, 12)  # [5, 7] [3, 9] [2, 10]: in order, each row full
  got = []
  for r in range(3):
    seg, pos = packed['segment_ids'][r], packed['position_ids'][r]
    for s in range(1, seg.max() + 1):
      at = seg == s
      assert pos[at].tolist() == list(range(at.sum()))
      got.append((packed['input_ids'][r][at], packed['loss_weights'][r][at]))
    assert not packed['loss_weights'][r][seg == 0].any()
  assert len(got) == len(examples)
  for (x, w), (gx, gw) in zip(examples, got):
    np.testing.assert_array_equal(x, gx)
    np.testing.assert_array_equal(w, gw)
  counts = lm_data.token_counts(packed)
  assert counts['real_tokens'] == sum(len(x) for x, _ in examples) and counts['token_slots'] == 36
  rows = lm_data.pad_rows(examples, 12, pad_id=0)
  assert lm_data.token_counts(rows)['token_slots'] == 72


def test_bad_records_name_file_line_and_field():
  renderer = lm_data.Renderer('alpaca', TOKENIZER.parent)
  with pytest.raises(DataError, match="a.json:4 has no field 'output'"):
    renderer('a.json:4', {'instruction': 'x'})
  with pytest.raises(DataError, match="a.json:5 field 'instruction' is 3; expected a string"):
    renderer('a.json:5', {'instruction': 3, 'output': 'y'})
  with pytest.raises(DataError, match="data.format 'sharegpt' is unknown"):
    lm_data.Renderer('sharegpt', TOKENIZER.parent)
  with pytest.raises(DataError, match='has no chat template'):
    lm_data.Renderer('chat', FIXTURES / 'hf_llama_linear')


def test_carve_is_seeded_and_keeps_order(tmp_path):
  records = [(f'f:{i}', {'text': str(i)}) for i in range(20)]
  train, val = lm_data.carve(records, 0.25, seed=3)
  assert len(val) == 5 and len(train) == 15
  assert sorted(train + val) == sorted(records) and train == sorted(train, key=lambda r: int(r[0][2:]))
  assert lm_data.carve(records, 0.25, seed=3) == (train, val)
  assert lm_data.carve(records, 0.25, seed=4)[1] != val
  path = tmp_path / 'd.jsonl'
  path.write_text('\n'.join(json.dumps(r) for _, r in records))
  assert [r for _, r in lm_data.read_split(str(path), 'json')] == [r for _, r in records]


def test_chat_targets_are_the_assistant_turns_through_the_template():
  directory = FIXTURES / 'hf_qwen2'
  tok = lm_data.raw_tokenizer(directory / 'tokenizer.json')
  renderer = lm_data.Renderer('chat', directory)
  record = {'conversations': [{'from': 'system', 'value': 'Be brief.'},
                              {'from': 'human', 'value': 'Who won the league?'},
                              {'from': 'gpt', 'value': 'Chelsea did.'},
                              {'from': 'human', 'value': 'And the cup?'},
                              {'from': 'gpt', 'value': 'Arsenal won it.'}]}
  ids, weights = lm_data.tokenize(renderer('c.json:1', record), tok, None)
  text = tok.decode(ids.tolist(), skip_special_tokens=False)
  assert text.startswith('<|im_start|>system\nBe brief.<|im_end|>')
  # The weighted tokens, run by run, are each reply and the end of its turn.
  runs, current = [], []
  for token, w in zip(ids.tolist(), weights):
    if w:
      current.append(token)
    elif current:
      runs.append(current)
      current = []
  runs.append(current) if current else None
  assert [tok.decode(r, skip_special_tokens=False) for r in runs] == [
      'Chelsea did.<|im_end|>\n', 'Arsenal won it.<|im_end|>\n']
