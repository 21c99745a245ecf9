"""Tests for glora_jax.train.loop (train_and_evaluate) on real bundled data (tiny model):
loss falls, 1 vs 8 devices agree, a fresh subnet per step without recompiling, and
resume equals uninterrupted."""
import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_png, tiny_config as tiny, trainable_of
from glora_jax import peft
from glora_jax import subnet as subnet_lib
from glora_jax.train import loop, setup, sharding


def losses(workdir):
  with open(workdir / 'metrics.csv') as f:
    return [float(r['train_loss']) for r in csv.DictReader(f) if r['train_loss']]


def test_loss_falls_on_real_data(tmp_path):
  summary = loop.train_and_evaluate(tiny(num_epochs=4), tmp_path, progress=False)
  curve = losses(tmp_path)
  assert len(curve) == 16
  assert np.mean(curve[-4:]) < np.mean(curve[:4]) - 0.1, curve
  assert summary['finished']
  # The reported accuracy and loss, recomputed from the saved params on the whole eval
  # split in one forward pass (no evaluator, no batching or padding).
  config = tiny(num_epochs=4)
  run, trainable = setup.load_trained(tmp_path, config)
  split = run.model_data.splits['eval']
  batch = {k: jnp.asarray(v) for k, v in split.items()}
  logits = np.asarray(run.model_data.forward_loss.forward(
      peft.combine(run.frozen, trainable['model']),
      peft.Adapters(params=trainable['adapters'], spec=run.spec), setup.eval_subnet(run),
      batch, False, None), np.float64)
  labels = np.asarray(split['label'])
  assert summary['val_accuracy'] == pytest.approx(np.mean(logits.argmax(-1) == labels), abs=1e-9)
  z = logits - logits.max(-1, keepdims=True)
  nll = np.log(np.exp(z).sum(-1)) - z[np.arange(len(labels)), labels]
  assert summary['val_loss'] == pytest.approx(nll.mean(), rel=1e-4)
  # figsize (10, 3.5) at 100 dpi.
  assert_png(tmp_path / 'curves.png', 350, 1000)


def test_one_device_and_eight_devices_agree(tmp_path):
  assert jax.device_count() == 8
  one = tiny(**{'mesh.num_devices': 1})
  eight = tiny(**{'mesh.data': 4, 'mesh.model': 2})
  loop.train_and_evaluate(one, tmp_path / 'one', stop_after_steps=4, progress=False)
  loop.train_and_evaluate(eight, tmp_path / 'eight', stop_after_steps=4, progress=False)
  np.testing.assert_allclose(losses(tmp_path / 'one'), losses(tmp_path / 'eight'), rtol=1e-5, atol=1e-5)
  # Parameters agree up to Adam's amplification of rounding: a coordinate whose
  # gradient is ~1e-9 moves by ~lr per step whatever the sign its reduction order
  # gave it, so allow lr * steps (1e-3 * 4) absolute.
  a, b = trainable_of(one, tmp_path / 'one'), trainable_of(eight, tmp_path / 'eight')
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=4e-3), a, b)


def test_fresh_subnet_each_step_same_on_every_replica_one_compile():
  run = setup.build(tiny(**{'mesh.data': 4, 'mesh.model': 2}))
  batches, optimizer, _, state = setup.make_training(run)
  jit_step, state_sh, frozen_sh = setup.make_jitted_step(run, optimizer, state)
  state = jax.device_put(state, state_sh)
  frozen = jax.device_put(run.frozen, frozen_sh)
  seen = []
  for _, batch in zip(range(4), batches):
    state, metrics, subnet = jit_step(state, frozen, sharding.put_batch(batch, run.mesh))
    shards = [np.asarray(s.data) for s in subnet.addressable_shards]
    assert len(shards) == 8 and all(np.array_equal(shards[0], s) for s in shards)
    seen.append(shards[0].tobytes())
  assert len(set(seen)) == 4
  assert jit_step._cache_size() == 1


def test_resume_equals_uninterrupted(tmp_path, shared_compiles):
  config = tiny(num_epochs=2)
  loop.train_and_evaluate(config, tmp_path / 'straight', progress=False)
  loop.train_and_evaluate(config, tmp_path / 'split', stop_after_steps=3, progress=False)
  loop.train_and_evaluate(config, tmp_path / 'split', progress=False)
  a, b = trainable_of(config, tmp_path / 'straight'), trainable_of(config, tmp_path / 'split')
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
  assert losses(tmp_path / 'straight') == pytest.approx(losses(tmp_path / 'split'), rel=1e-6)


def test_fixed_subnet_training_uses_that_subnet(tmp_path):
  run = setup.build(tiny())
  fixed = subnet_lib.largest(run.spec)
  path = tmp_path / 'subnet.json'
  path.write_text(subnet_lib.dumps(run.spec, fixed))
  config = tiny(subnet=str(path))
  loop.train_and_evaluate(config, tmp_path / 'fixed', stop_after_steps=2, progress=False)
  with open(tmp_path / 'fixed' / 'metrics.csv') as f:
    counts = {int(r['subnet_params']) for r in csv.DictReader(f) if r['subnet_params']}
  assert counts == {int(subnet_lib.count_params(run.spec, fixed))}
