"""Tests for glora_jax.train.tasks: the causal-LM loss against a numpy reference
(padding, masked rows) and the predictions its accuracy counts; a checkpoint directory
of any encoder family fine-tuned on its own tokenizer's ids."""
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from glora_jax import data
from glora_jax.data import text
from glora_jax.train import loop, setup, tasks

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


def test_lm_loss_equals_numpy_reference_with_padding_and_masked_rows():
  rng = np.random.default_rng(0)
  batch_size, seq, vocab = 3, 6, 7
  logits = rng.standard_normal((batch_size, seq, vocab)).astype(np.float32)
  ids = rng.integers(0, vocab, (batch_size, seq))
  attention = np.array([[1, 1, 1, 1, 1, 1],
                        [1, 1, 1, 0, 0, 0],   # padded after 3 tokens
                        [1, 1, 1, 1, 1, 0]])
  row_mask = np.array([1.0, 1.0, 0.0])  # the last row pads the batch: it counts for nothing
  batch = {'input_ids': jnp.asarray(ids), 'attention_mask': jnp.asarray(attention),
           'mask': jnp.asarray(row_mask)}
  logp = np.asarray(jax.nn.log_softmax(jnp.asarray(logits), -1), np.float64)
  # Position t - 1 predicts token t, counted where token t is real in a real row.
  counted = [(b, t) for b in range(batch_size) for t in range(1, seq)
             if attention[b, t] and row_mask[b]]
  nll = sum(-logp[b, t - 1, ids[b, t]] for b, t in counted)
  correct = sum(int(np.argmax(logits[b, t - 1]) == ids[b, t]) for b, t in counted)
  total, count, hits = tasks.lm_loss(jnp.asarray(logits), batch)
  assert count == len(counted) == 5 + 2
  np.testing.assert_allclose(total, nll, rtol=1e-6)
  assert hits == correct

  preds, weights = tasks.lm_predictions(jnp.asarray(logits), batch)
  np.testing.assert_array_equal(preds, logits[:, :-1].argmax(-1))
  assert {(b, t + 1) for b, t in zip(*np.nonzero(np.asarray(weights)))} == set(counted)

  without_row_mask = {k: v for k, v in batch.items() if k != 'mask'}
  _, count_all, _ = tasks.lm_loss(jnp.asarray(logits), without_row_mask)
  assert count_all == attention[:, 1:].sum()  # every row counts when the batch has no 'mask'


@pytest.mark.parametrize('directory, family', [('hf_roberta', 'roberta'), ('hf_bert', 'bert')])
def test_an_encoder_checkpoint_fine_tunes_on_its_own_tokenizers_ids(directory, family, tmp_path):
  """model.checkpoint=<a directory transformers wrote>: the family comes from its
  config.json (the config's model.name is MiniLM's), the text from its tokenizer.json,
  and a classifier head of the task's classes trains on top."""
  config = helpers.tiny_config(**{'model.checkpoint': str(FIXTURES / directory),
                                  'mesh.num_devices': 1, 'num_epochs': 1})
  run = setup.build(config)
  assert run.model_data.family.name == family
  train = run.model_data.splits['train']
  texts = data.load_arrays('bbc_news', 'train')['text'][:2]
  expected = text.tokenize(texts, FIXTURES / directory / 'tokenizer.json', config.data.max_len)
  np.testing.assert_array_equal(train['input_ids'][:2], expected['input_ids'])
  assert train['input_ids'].max() < run.model_data.model.config.vocab_size
  assert run.model_data.params['head']['kernel'].shape == (32, 5)
  loop.train_and_evaluate(config, tmp_path, progress=False)
  summary = json.loads((tmp_path / 'summary.json').read_text())
  assert summary['finished'] and np.isfinite(summary['val_loss'])
