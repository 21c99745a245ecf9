"""End to end on real bundled data: train a tiny supernet, search, merge, export."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny_bbc_glora
from helpers import assert_png
from glora_jax import peft
from glora_jax import subnet
from glora_jax.search import driver, evolution, export, fitness
from glora_jax.train import loop, setup, sharding


@pytest.fixture(scope='module')
def supernet(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('supernet')
  config = tiny_bbc_glora.get_config()
  config.checkpoint.async_save = False
  loop.train_and_evaluate(config, workdir, progress=False)
  return workdir


def test_vmapped_fitness_equals_one_at_a_time(supernet):
  run, trainable = setup.load_trained(supernet)
  frozen_sh = sharding.tree_shardings(run.frozen, run.bundle.partition_rules, run.mesh)
  cands = np.asarray(jax.vmap(lambda k: subnet.sample(k, run.spec))(
      jax.random.split(jax.random.key(0), 6)))
  args = (run.bundle.task, run.spec, run.mesh, trainable, run.frozen, frozen_sh,
          run.bundle.splits['eval'])
  vmapped = fitness.Fitness(*args, chunk=8, batch_size=16)
  single = fitness.Fitness(*args, chunk=1, batch_size=16)
  batched_acc = vmapped(cands)
  np.testing.assert_allclose(batched_acc, [single(c[None])[0] for c in cands], atol=1e-9)
  vmapped(cands[:3])  # another count of candidates: padded to the same chunk
  assert vmapped.fn._cache_size() == 1 and single.fn._cache_size() == 1
  # and against the training evaluator, one subnet at a time
  evaluate = setup.make_evaluator(run, 16)
  _, acc0 = evaluate(trainable, run.frozen, run.bundle.splits['eval'], cands[0])
  assert abs(acc0 - batched_acc[0]) < 1e-9


def test_search_writes_everything_and_merged_matches(supernet, tmp_path):
  cfg = evolution.SearchConfig(population=8, generations=3, parents=4, mutations=4, crossovers=4,
                               param_limit=80_000, seed=1)
  summary = driver.search_and_export(supernet, cfg, out=tmp_path, chunk=4, eval_batch_size=16,
                                     log=lambda s: None)
  assert json.loads((tmp_path / 'summary.json').read_text()) == json.loads(
      json.dumps(summary, default=str))
  assert summary['adapter_params'] <= 80_000
  assert summary['merged_prediction_agreement'] == 1.0
  assert summary['test_accuracy'] == summary['test_accuracy_merged']
  state = json.loads((tmp_path / 'search_state.json').read_text())
  assert len(state['archive']['accuracy']) == 8 + 3 * 8  # random population + 3 generations
  # The chosen subnet is the archive's best, and every file counts its parameters alike.
  spec = setup.build(setup.load_config(supernet)).spec
  best = subnet.loads(spec, (tmp_path / 'best_subnet.json').read_text())
  assert summary['adapter_params'] == int(subnet.count_params(spec, best))
  assert summary['val_accuracy'] == max(state['archive']['accuracy'])
  cands = np.asarray(state['archive']['cands'], np.int32).reshape((-1,) + spec.num_options.shape)
  assert any(np.array_equal(c, best) for c in cands)
  front = json.loads((tmp_path / 'pareto.json').read_text())
  assert [p['params'] for p in front] == sorted(p['params'] for p in front)
  for point in front:
    assert point['params'] == int(subnet.count_params(spec, subnet.from_dict(spec, point['subnet'])))
    assert point['val_accuracy'] in state['archive']['accuracy']
  assert front[-1]['val_accuracy'] == summary['val_accuracy']
  assert_png(tmp_path / 'search.png', 380, 1000)  # figsize (10, 3.8) at 100 dpi

  # The plain model (no adapter code) on the exported safetensors gives the same
  # predictions as the adapted supernet with the chosen subnet.
  run, trainable = setup.load_trained(supernet)
  chosen = subnet.loads(run.spec, (tmp_path / 'best_subnet.json').read_text())
  merged = export.load_safetensors(tmp_path / 'merged_params.safetensors')
  assert set(peft.flatten(merged)) == set(peft.flatten(run.bundle.params))
  test = run.bundle.splits['test']
  batch = {k: jnp.asarray(v[:16]) for k, v in test.items()}
  plain = run.bundle.model.apply({'params': merged}, batch['input_ids'], batch['attention_mask'],
                                 batch['token_type_ids'])
  adapters = peft.Adapters(params=trainable['adapters'], spec=run.spec)
  adapted = peft.forward(run.bundle.model, peft.combine(run.frozen, trainable['model']), adapters,
                         chosen, batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  np.testing.assert_allclose(plain, adapted, rtol=1e-4, atol=1e-4)
  orbax_merged = export.load_orbax(tmp_path / 'merged_params')
  jax.tree.map(np.testing.assert_array_equal, orbax_merged, merged)
  # The same through the loader every export has: model_config.json builds the model.
  loaded_model, loaded = export.load_merged(tmp_path)
  assert loaded_model.config == run.bundle.model.config
  np.testing.assert_array_equal(loaded_model.apply({'params': loaded}, batch['input_ids'],
                                                   batch['attention_mask'], batch['token_type_ids']),
                                plain)
