"""Tests for glora_jax.generate and generate.py: cached decoding equals the full forward
(left padding, adapters), transformers' generate, sampling filters, one compile, the CLI."""
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import cli, errors, peft
from glora_jax import generate as gen
from glora_jax import subnet as subnet_lib
from glora_jax.adapters import glora, lora
from glora_jax.models import registry

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / 'tests' / 'fixtures'
REFERENCE = FIXTURES / 'hf_generate_reference.npz'
# Two prompts of different lengths, left-padded with the fixture's pad id (2).
PROMPT_IDS = np.array([[2, 2, 2, 0, 17, 90, 41], [0, 5, 250, 31, 8, 77, 12]])
PROMPT_MASK = (PROMPT_IDS != 2).astype(np.int32)
ADAPTED = r'layers_\d+/self_attn/v_proj/kernel'


@pytest.fixture(scope='module')
def llama3():
  return registry.load(FIXTURES / 'hf_llama3')


def random_adapters(params, kind: str):
  """Adapters with all leaves random (so each support counts), and a random subnet of
  them (None for LoRA, which has no choices)."""
  family = glora.family(ranks=(2, 4)) if kind == 'glora' else lora.family(rank=2)
  # Each layer's v_proj: what it computes is written into the cache and read at every
  # later step; more targets would only add compile time.
  adapters = peft.attach(params, family, targets=ADAPTED, key=1)
  leaves, tree = jax.tree.flatten(adapters.params)
  keys = jax.random.split(jax.random.key(2), len(leaves))
  adapters = adapters.replace(params=jax.tree.unflatten(
      tree, [0.1 * jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)]))
  return adapters, subnet_lib.sample(jax.random.key(3), adapters) if kind == 'glora' else None


@jax.jit
def _positions(mask):
  return jnp.maximum(jnp.cumsum(mask, -1) - 1, 0)


def full_forward(model, params, adapters, subnet, ids, mask):
  """Logits of one forward over whole left-padded rows, positions from the mask."""
  if adapters is None:
    return jax.jit(model.apply)({'params': params}, ids, mask, _positions(mask))
  return jax.jit(lambda p, a, s, *args: peft.forward(model, p, a, s, *args))(
      params, adapters, subnet, ids, mask, _positions(mask))


# --------------------------------------------------------------------------- #
# Cached decoding
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize('directory, kind', [('hf_qwen2', 'plain'), ('hf_llama3', 'glora'),
                                             ('hf_llama3', 'lora')])
def test_cached_decoding_equals_the_full_forward(directory, kind):
  """Every decode step's logits are those of a full forward over the prompt and the
  tokens generated so far, for left-padded prompts of different lengths."""
  model, params = registry.load(FIXTURES / directory)
  adapters, subnet = random_adapters(params, kind) if kind != 'plain' else (None, None)
  n = 4
  out = gen.generate(model, params, PROMPT_IDS, PROMPT_MASK, max_new_tokens=n, pad_id=2,
                     adapters=adapters, subnet=subnet, return_logits=True)
  assert out.ids.shape == (2, n) and out.lengths.tolist() == [n, n]  # no eos: every step ran
  ids = np.concatenate([PROMPT_IDS, np.asarray(out.ids)], 1)
  mask = np.concatenate([PROMPT_MASK, np.ones((2, n), np.int32)], 1)
  full = full_forward(model, params, adapters, subnet, ids, mask)
  start = PROMPT_IDS.shape[1] - 1  # the logits at the prompt's last token choose new token 0
  np.testing.assert_allclose(out.logits, full[:, start:start + n], atol=1e-5, rtol=0)
  np.testing.assert_array_equal(out.ids, np.argmax(full[:, start:start + n], -1))


def test_rows_stop_at_eos_and_hold_the_pad_id(llama3):
  model, params = llama3
  free = gen.generate(model, params, PROMPT_IDS, PROMPT_MASK, max_new_tokens=6)
  eos = int(free.ids[0, 2])  # row 0's third token, made an eos
  out = gen.generate(model, params, PROMPT_IDS, PROMPT_MASK, max_new_tokens=6, eos_ids=(eos, 399),
                     pad_id=2)
  first = {r: next((i for i, t in enumerate(np.asarray(free.ids[r])) if t == eos), None)
           for r in (0, 1)}
  for r in (0, 1):
    stop = 6 if first[r] is None else first[r] + 1
    assert int(out.lengths[r]) == stop
    np.testing.assert_array_equal(out.ids[r, :stop], free.ids[r, :stop])
    assert (np.asarray(out.ids[r, stop:]) == 2).all()


def test_bad_prompts_are_refused(llama3):
  model, params = llama3
  with pytest.raises(ValueError, match=r'prompt row 0 is not left-padded \(its mask is '
                                       r'\[1, 1, 0\]\)'):
    gen.generate(model, params, [[5, 6, 2]], [[1, 1, 0]], max_new_tokens=2)
  with pytest.raises(ValueError, match=r'max_new_tokens 2047 after a prompt of 3 tokens needs '
                                       r'2050 positions; the model has 2048 '
                                       r'\(max_position_embeddings\): expected '
                                       r'max_new_tokens <= 2045'):
    gen.generate(model, params, [[5, 6, 7]], max_new_tokens=2047)
  bert = registry.load(FIXTURES / 'hf_bert')
  with pytest.raises(ValueError, match="model family 'bert' \\(text_classification\\) cannot "
                                       "generate: it has no KV cache; expected a decoder family"):
    gen.generate(*bert, [[5, 6]], max_new_tokens=2)


# --------------------------------------------------------------------------- #
# transformers' generate (tests/fixtures/hf_generate_reference.npz)
# --------------------------------------------------------------------------- #


@pytest.mark.skipif(not REFERENCE.is_file(), reason=f'{REFERENCE.name} not recorded yet')
@pytest.mark.parametrize('directory', ['hf_llama3', 'hf_llama32', 'hf_qwen2'])
def test_greedy_generation_equals_transformers(directory):
  """Greedy ids and per-step logits of transformers' generate on left-padded prompts
  (a row stopping at eos, with a forced eos id), and a prompt alone; our tokenizer
  encodes the prompts as transformers' did."""
  reference = np.load(REFERENCE)
  ref = {k.split('/', 1)[1]: v for k, v in reference.items() if k.startswith(f'{directory}/')}
  model, params = registry.load(FIXTURES / directory)
  pad = int(ref['pad_id'])
  n = ref['new_ids'].shape[1]
  run = lambda ids, mask, eos: gen.generate(model, params, ids, mask, max_new_tokens=n,
                                            eos_ids=[int(eos)], pad_id=pad, return_logits=True)
  out = run(ref['prompt_ids'], ref['prompt_mask'], ref['eos_id'])
  np.testing.assert_array_equal(out.ids, ref['new_ids'])
  ran = int(np.max(out.lengths))  # transformers stops when every row has finished
  # Greedy choices are apart by at least ref['margin'] (~1e-2), far above this tolerance.
  np.testing.assert_allclose(out.logits[:, :ran], ref['logits'][:, :ran], atol=1e-4, rtol=0)
  single = run(ref['single_prompt_ids'], None, ref['eos_id'])
  np.testing.assert_array_equal(single.ids, ref['single_new_ids'])
  forced = run(ref['prompt_ids'], ref['prompt_mask'], ref['forced_eos_id'])
  np.testing.assert_array_equal(forced.ids, ref['forced_new_ids'])
  encode = gen.TextGenerator(model, params, FIXTURES / directory / 'tokenizer.json').encode
  for prompt, ids, mask in zip(reference['prompts'], ref['prompt_ids'], ref['prompt_mask']):
    assert encode(str(prompt)) == ids[mask == 1].tolist()


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #


def transformers_top_k_top_p(logits, top_k, top_p):
  """TopKLogitsWarper then TopPLogitsWarper, as transformers writes them, in numpy."""
  scores = logits.copy()
  if top_k > 0:
    kth = np.sort(scores, -1)[..., -top_k][..., None]
    scores = np.where(scores < kth, -np.inf, scores)
  if top_p < 1.0:
    order = np.argsort(scores, -1, kind='stable')  # ascending
    ranked = np.take_along_axis(scores, order, -1)
    probs = np.exp(ranked - ranked.max(-1, keepdims=True))
    cumulative = np.cumsum(probs / probs.sum(-1, keepdims=True), -1)
    remove = cumulative <= 1 - top_p
    remove[..., -1] = False  # min_tokens_to_keep = 1
    removed = np.zeros_like(remove)
    np.put_along_axis(removed, order, remove, -1)
    scores = np.where(removed, -np.inf, scores)
  return scores


@pytest.mark.parametrize('top_k, top_p', [(0, 0.9), (0, 0.5), (0, 0.0), (5, 1.0), (12, 0.7),
                                          (0, 1.0)])
def test_top_k_top_p_filter_equals_transformers(top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(top_k), (4, 50)) * 3, np.float32)
  ours = jax.jit(gen.filter_logits)(logits, top_k, top_p)
  expected = transformers_top_k_top_p(logits, top_k, top_p)
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(expected))
  np.testing.assert_array_equal(np.where(np.isfinite(ours), ours, 0),
                                np.where(np.isfinite(expected), logits, 0))


def test_sampling_is_seeded_and_top_k_1_is_greedy(llama3):
  model, params = llama3
  run = lambda **kw: np.asarray(gen.generate(model, params, PROMPT_IDS, PROMPT_MASK,
                                             max_new_tokens=6, **kw).ids)
  greedy = run()
  np.testing.assert_array_equal(run(temperature=1.5, top_k=1, rng=jax.random.key(7)), greedy)
  a = run(temperature=1.5, top_p=0.95, rng=jax.random.key(7))
  np.testing.assert_array_equal(run(temperature=1.5, top_p=0.95, rng=jax.random.key(7)), a)
  assert not np.array_equal(run(temperature=1.5, top_p=0.95, rng=jax.random.key(8)), a)


def test_one_compile_for_new_prompts_subnets_and_sampling_settings(llama3):
  model, params = llama3
  adapters, subnet = random_adapters(params, 'glora')
  other_subnet = subnet_lib.sample(jax.random.key(11), adapters)
  assert not np.array_equal(subnet, other_subnet)
  other_prompts = (PROMPT_IDS + 3) % 400
  sizes = lambda: (gen.prefill._cache_size(), gen.decode._cache_size())
  run = lambda ids, s, **kw: gen.generate(model, params, ids, PROMPT_MASK, max_new_tokens=4,
                                          adapters=adapters, subnet=s, **kw)
  first = run(PROMPT_IDS, subnet).ids
  before = sizes()
  second = run(other_prompts, other_subnet).ids
  assert sizes() == before and not np.array_equal(first, second)
  run(PROMPT_IDS, subnet, temperature=0.7, top_k=5, rng=jax.random.key(1))
  sampled = sizes()
  assert sampled == (before[0], before[1] + 1)  # greedy or not is the one static choice
  run(other_prompts, other_subnet, temperature=1.3, top_p=0.8, rng=jax.random.key(2))
  assert sizes() == sampled


# --------------------------------------------------------------------------- #
# Text: tokenizer, stop strings, chat, loading
# --------------------------------------------------------------------------- #


def test_text_generation_equals_ids_generation(llama3):
  generator = gen.load(FIXTURES / 'hf_llama3')
  assert generator.eos_ids == (1,) and generator.pad_id == 2
  prompts = ['the cat sat', 'a dog ran far', 'birds sing']
  completions = generator(prompts, max_new_tokens=4, batch_size=3)
  # The last batch of two is filled up with a copy to the first's shape.
  assert generator(prompts, max_new_tokens=4, batch_size=2) == completions
  ids = [generator.tokenizer.encode(p).ids for p in prompts]
  width = max(map(len, ids))
  padded = np.array([[2] * (width - len(i)) + i for i in ids])
  alone = gen.generate(*llama3, padded, padded != 2, max_new_tokens=4, eos_ids=(1,), pad_id=2)
  for r, (prompt, c) in enumerate(zip(prompts, completions)):
    assert c.prompt == prompt and c.prompt_ids == ids[r] and ids[r][0] == 0  # bos
    assert c.new_ids == np.asarray(alone.ids[r, :int(alone.lengths[r])]).tolist()
    assert c.text == generator.tokenizer.decode(c.new_ids)


def test_stop_strings_cut_text_and_ids():
  generator = gen.load(FIXTURES / 'hf_llama3')
  tokenizer = generator.tokenizer
  ids = tokenizer.encode('one. two. three', add_special_tokens=False).ids
  kept, text = gen.cut_at_stop(tokenizer, ids, ['xyz', '. t'])
  assert text == 'one'
  assert '. t' in tokenizer.decode(kept) and '. t' not in tokenizer.decode(kept[:-1])
  assert gen.cut_at_stop(tokenizer, ids, ['xyz']) == (ids, 'one. two. three')


def test_eos_ids_from_the_tokenizer_and_generation_config(tmp_path):
  shutil.copytree(FIXTURES / 'hf_qwen2', tmp_path / 'm')
  assert gen.load(tmp_path / 'm').eos_ids == (0,)
  config = json.loads((tmp_path / 'm' / 'generation_config.json').read_text())
  (tmp_path / 'm' / 'generation_config.json').write_text(json.dumps({**config,
                                                                     'eos_token_id': [0, 7]}))
  assert gen.load(tmp_path / 'm').eos_ids == (0, 7)


def test_chat_prompts_use_the_checkpoint_template(tmp_path):
  from glora_jax.data import chat
  generator = gen.load(FIXTURES / 'hf_llama3')
  template = chat.load_template(FIXTURES / 'hf_llama3')
  rendered = chat.render(template, [{'role': 'user', 'content': 'hi there'}],
                         add_generation_prompt=True,
                         tokens=chat.special_tokens(FIXTURES / 'hf_llama3'))
  ids = generator.encode('hi there', chat=True)
  assert ids == generator.tokenizer.encode(rendered, add_special_tokens=False).ids
  assert ids.count(0) == 1  # the template's bos, not a second one from the tokenizer
  without = tmp_path / 'm'
  without.mkdir()
  for name in ('config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'):
    shutil.copy(FIXTURES / 'hf_llama3' / name, without / name)
  with pytest.raises(errors.DataError, match='has no chat template'):
    gen.load(without).encode('hi', chat=True)


def guarded_error(capsys, fn) -> str:
  """The one 'error:' line cli.run_guarded prints for fn (and its exit code 2)."""
  assert cli.run_guarded(fn) == 2
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  return lines[0]


def test_bad_inputs_are_one_error_line(capsys, tmp_path):
  (tmp_path / 'empty.txt').write_text('\n \n')
  assert 'prompts file' in guarded_error(capsys, lambda: gen.read_prompts(tmp_path / 'empty.txt'))
  (tmp_path / 'p.jsonl').write_text('{"prompt": "a"}\n{"text": "b"}\n')
  assert 'p.jsonl:2: no "prompt" string' in guarded_error(
      capsys, lambda: gen.read_prompts(tmp_path / 'p.jsonl'))
  assert "model family 'bert' (text_classification) cannot generate" in guarded_error(
      capsys, lambda: gen.load(FIXTURES / 'hf_bert'))
  assert 'is neither a HF checkpoint' in guarded_error(capsys, lambda: gen.load(tmp_path))
  assert 'is not a train.py workdir' in guarded_error(
      capsys, lambda: gen.load(FIXTURES / 'hf_llama3', subnet_file=tmp_path / 's.json'))
  (tmp_path / 'p.txt').write_text('first prompt\nsecond prompt\n')
  assert gen.read_prompts(tmp_path / 'p.txt') == ['first prompt', 'second prompt']


# --------------------------------------------------------------------------- #
# generate.py
# --------------------------------------------------------------------------- #


def run_cli(*args):
  proc = subprocess.run([sys.executable, 'generate.py', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=120)
  return proc.returncode, proc.stdout, proc.stderr.strip().splitlines()


def test_cli_json_equals_the_library():
  code, out, err = run_cli('--model', 'tests/fixtures/hf_llama3', '--prompt', 'the cat sat',
                           '--json', '--max_new_tokens', '4')
  assert code == 0, err
  (line,) = out.strip().splitlines()
  record = json.loads(line)
  (expected,) = gen.load(FIXTURES / 'hf_llama3')(['the cat sat'], max_new_tokens=4)
  assert record == {'prompt': 'the cat sat', 'ids': expected.prompt_ids + expected.new_ids,
                    'new_ids': expected.new_ids, 'text': expected.text}


@pytest.mark.parametrize('args, expected', [
    (['--model', 'tests/fixtures/nosuch', '--prompt', 'hi'],
     'error: model directory tests/fixtures/nosuch does not exist'),
    (['--model', 'tests/fixtures/hf_qwen2', '--prompt', 'hi', '--max_new_tokens', '200'],
     'error: max_new_tokens 200 after a prompt of 2 tokens needs 202 positions; the model has 128'),
])
def test_cli_bad_input_is_one_error_line(args, expected):
  code, out, err = run_cli(*args)
  assert code == 2 and out == ''
  assert len(err) == 1 and err[0].startswith(expected), err
