"""The causal-LM task on users' data: packed rows give the unpacked loss, the chunked loss
the full one. (A GLoRA Alpaca run on a checkpoint, searched by multiple-choice accuracy:
tests/test_tasks_e2e.py, which trains that checkpoint anyway.)"""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from glora_jax.data import lm_data
from glora_jax.models import registry
from glora_jax.train import tasks

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
