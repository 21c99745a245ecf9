"""The causal-LM task on users' data: packed rows give the unpacked loss, the chunked loss
the full one, and a GLoRA Alpaca run on a real checkpoint's files reports its tokens and
is searched by multiple-choice accuracy as lm-eval-harness computes it."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import instruct
from glora_jax.data import lm_data
from glora_jax.models import registry
from glora_jax.train import loop, tasks

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'
LLAMA = FIXTURES / 'hf_llama3'
RECORDS = [(f'a.json:{i}', {'instruction': instruction, 'input': extra, 'output': output})
           for i, (instruction, extra, output) in enumerate([
               ('Name a sport.', '', 'Football.'),
               ('Say hello', 'to the BBC', 'Hello BBC!'),
               ('Count to three.', '', 'One two three.'),
               ('Who won?', 'the league', 'Chelsea won it.')])]


def _rows(packing, max_len=300):
  renderer = lm_data.Renderer('alpaca', LLAMA)
  return lm_data.build_rows(RECORDS, renderer, LLAMA / 'tokenizer.json', max_len, packing=packing)


def _sums(forward, loss, params, rows):
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  return np.asarray(loss(forward(params, None, None, batch, False, None), batch))


def test_packed_rows_give_the_unpacked_loss():
  model, params = registry.load(LLAMA)
  family = registry.of_model(model)
  forward = tasks.make_forward(family, model)
  packed, packed_report = _rows(packing=True, max_len=300)
  unpacked, unpacked_report = _rows(packing=False, max_len=300)
  assert packed['input_ids'].shape[0] == 2 and unpacked['input_ids'].shape[0] == 4
  assert packed_report['real_tokens'] == unpacked_report['real_tokens']
  assert packed_report['real_fraction'] > unpacked_report['real_fraction']
  total_p, count_p, hits_p = _sums(forward, tasks.lm_loss, params, packed)
  total_u, count_u, hits_u = _sums(forward, tasks.lm_loss, params, unpacked)
  assert count_p == count_u == unpacked['loss_weights'].sum()  # the first token weighs 0
  assert hits_p == hits_u
  np.testing.assert_allclose(total_p, total_u, rtol=1e-5)


def test_chunked_loss_and_gradients_equal_the_full_ones():
  model, params = registry.load(LLAMA)
  family = registry.of_model(model)
  rows, _ = _rows(packing=True)
  forward_with, chunked_loss, _ = tasks.chunked_lm(family, chunk=37)
  full = lambda p: _sums(tasks.make_forward(family, model), tasks.lm_loss, p, rows)
  chunked = lambda p: _sums(forward_with(model), chunked_loss, p, rows)
  np.testing.assert_allclose(chunked(params), full(params), rtol=1e-5)
  batch = {k: jnp.asarray(v) for k, v in rows.items()}
  grad = lambda fwd, loss: jax.grad(lambda p: loss(fwd(p, None, None, batch, False, None), batch)[0])(params)
  g_full = grad(tasks.make_forward(family, model), tasks.lm_loss)
  g_chunked = grad(forward_with(model), chunked_loss)
  for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_chunked)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_glora_search_ranked_by_multiple_choice_accuracy(tmp_path):
  from glora_jax import peft
  from glora_jax import subnet as subnet_lib
  from glora_jax.data import multiple_choice as mc
  from glora_jax.search import driver, evolution
  from glora_jax.train import setup
  data = tmp_path / 'alpaca.json'
  data.write_text(json.dumps([r for _, r in RECORDS] * 3))  # a JSON array, as Alpaca ships
  choices = tmp_path / 'mc.jsonl'
  choices.write_text('\n'.join(json.dumps(e) for e in [
      {'context': 'The league was won by', 'choices': ['Chelsea', 'a cat', 'Bolton Wanderers'], 'gold': 0},
      {'context': 'One, two,', 'choices': ['three', 'blue'], 'gold': 0},
      {'context': 'Hello', 'choices': ['BBC!', 'world', 'there', 'you'], 'gold': 1}]))
  config = instruct.get_config('method=glora,tiny')
  config.model.checkpoint = str(LLAMA)
  config.data.train_split = config.data.test_split = str(data)
  config.data.val_fraction = 0.25
  config.checkpoint.async_save = False
  config.mesh.num_devices = 1
  loop.train_and_evaluate(config, tmp_path / 'run', progress=False)
  record = json.loads((tmp_path / 'run' / 'data.json').read_text())
  assert record['format'] == 'alpaca' and record['packing'] is True
  assert record['tokens']['train']['examples'] == 9 and record['tokens']['eval']['examples'] == 3
  assert record['tokens']['train']['rows'] < 9  # packed
  trained = json.loads((tmp_path / 'run' / 'summary.json').read_text())
  assert trained['val_metric'] == 'token_log_likelihood'
  assert trained['val_perplexity'] == pytest.approx(np.exp(-trained['val_token_log_likelihood']),
                                                    rel=1e-5)
  search = evolution.SearchConfig(population=3, generations=1, parents=2, mutations=1,
                                  crossovers=1, param_limit=1e9, seed=0)
  with pytest.raises(Exception, match="--fitness 'perplexity' is not a metric this task ranks by"):
    driver.search_and_export(tmp_path / 'run', search, out=tmp_path / 'bad', fitness='perplexity')
  summary = driver.search_and_export(tmp_path / 'run', search, out=tmp_path / 'search', chunk=1,
                                     eval_batch_size=2, fitness='mc_acc_norm',
                                     mc_file=str(choices), export_formats=['flax'],
                                     log=lambda s: None)
  assert summary['val_metric'] == 'mc_acc_norm'
  # The fitness of the chosen subnet is the harness's acc_norm of the adapted model.
  run, trainable = setup.load_trained(tmp_path / 'run')
  chosen = subnet_lib.loads(run.spec, (tmp_path / 'search' / 'best_subnet.json').read_text())
  forward = tasks.make_forward(run.model_data.family, run.model_data.model)
  adapted = lambda p, ids, mask: forward(p[0], p[1], p[2], {'input_ids': ids, 'attention_mask': mask},
                                         False, None)
  params = (peft.combine(run.frozen, trainable['model']),
            peft.Adapters(params=trainable['adapters'], spec=run.spec), jnp.asarray(chosen))
  reference = mc.evaluate_file(choices, run.model_data.model, params, LLAMA, batch_size=4,
                               max_len=config.data.max_len, forward=adapted)
  assert summary['val_mc_acc_norm'] == pytest.approx(reference['acc_norm'])
  assert 'test_token_log_likelihood' in summary
