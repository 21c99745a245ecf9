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
  frozen_sh = sharding.tree_shardings(run.frozen, run.model_data.partition_rules, run.mesh)
  cands = np.asarray(jax.vmap(lambda k: subnet.sample(k, run.spec))(
      jax.random.split(jax.random.key(0), 6)))
  args = (run.model_data.forward_loss, run.spec, run.mesh, trainable, run.frozen, frozen_sh,
          run.model_data.splits['eval'])
  vmapped = fitness.Fitness(*args, chunk=8, batch_size=16)
  single = fitness.Fitness(*args, chunk=1, batch_size=16)
  batched_acc, complete, batched_loss = vmapped(cands)
  assert complete.all()  # no racing: every candidate scored on the whole split
  np.testing.assert_allclose(batched_acc, [single(c[None]).accuracy[0] for c in cands], atol=1e-9)
  vmapped(cands[:3])  # another count of candidates: padded to the same chunk
  assert vmapped.fn._cache_size() == 1 and single.fn._cache_size() == 1
  # and against the training evaluator, one subnet at a time
  evaluate = setup.make_evaluator(run, 16)
  loss0, scores0 = evaluate(trainable, run.frozen, run.model_data.splits['eval'], cands[0])
  acc0 = scores0['accuracy']
  assert abs(acc0 - batched_acc[0]) < 1e-9
  assert abs(loss0 - batched_loss[0]) < 1e-5 * max(1.0, abs(loss0))  # the loss tie-break's value


# The tests below score candidates in chunks of 8, the mesh's data-parallel size: each
# simulated device scores its own candidate. A chunk that does not divide it (1, 4) is
# replicated on all 8 devices: eight times the work for the same scores (as the test above
# shows for chunks of 1 and 8).
CHUNK = 8


def _fitness_args(supernet):
  run, trainable = setup.load_trained(supernet)
  frozen_sh = sharding.tree_shardings(run.frozen, run.model_data.partition_rules, run.mesh)
  return run, (run.model_data.forward_loss, run.spec, run.mesh, trainable, run.frozen, frozen_sh)


def test_racing_scores_the_better_half_on_the_whole_split(supernet):
  run, args = _fitness_args(supernet)
  val = run.model_data.splits['eval']
  cands = np.asarray(jax.vmap(lambda k: subnet.sample(k, run.spec))(
      jax.random.split(jax.random.key(3), 7)))
  full_acc = fitness.Fitness(*args, val, chunk=CHUNK, batch_size=16)(cands).accuracy
  raced = fitness.Fitness(*args, val, chunk=CHUNK, batch_size=16, race=0.5)
  assert 1 <= raced.heat < len(raced.batches)
  # The first heat is the first `heat` batches: score them alone, as an independent split.
  first = {k: v[:raced.heat * 16] for k, v in val.items()}
  heat_acc = fitness.Fitness(*args, first, chunk=CHUNK, batch_size=16)(cands).accuracy
  acc, complete, _ = raced(cands)
  expected = np.zeros(7, bool)
  expected[np.argsort(-heat_acc, kind='stable')[:4]] = True  # ceil(7 / 2) survivors
  np.testing.assert_array_equal(complete, expected)
  np.testing.assert_allclose(acc[complete], full_acc[complete], atol=1e-9)
  np.testing.assert_allclose(acc[~complete], heat_acc[~complete], atol=1e-9)
  assert raced.batch_evaluations == 7 * raced.heat + 4 * (len(raced.batches) - raced.heat)


def test_racing_by_loss_keeps_the_heat_half_of_lowest_loss(supernet):
  """rank_by='loss': the heat's survivors are those of lowest heat loss (an
  independent Fitness of the heat's batches alone), and they get their whole-split
  loss."""
  run, args = _fitness_args(supernet)
  val = run.model_data.splits['eval']
  cands = np.asarray(jax.vmap(lambda k: subnet.sample(k, run.spec))(
      jax.random.split(jax.random.key(4), 7)))
  full = fitness.Fitness(*args, val, chunk=CHUNK, batch_size=16)(cands)
  raced = fitness.Fitness(*args, val, chunk=CHUNK, batch_size=16, race=0.5, rank_by='loss')
  first = {k: v[:raced.heat * 16] for k, v in val.items()}
  heat = fitness.Fitness(*args, first, chunk=CHUNK, batch_size=16)(cands)
  _, complete, loss = raced(cands)
  expected = np.zeros(7, bool)
  expected[np.argsort(heat.loss, kind='stable')[:4]] = True
  np.testing.assert_array_equal(complete, expected)
  np.testing.assert_allclose(loss[complete], full.loss[complete], rtol=1e-6)
  np.testing.assert_allclose(loss[~complete], heat.loss[~complete], rtol=1e-6)
  # Ranked by accuracy the same heat keeps another half here (else the test shows nothing).
  by_acc = np.zeros(7, bool)
  by_acc[np.argsort(-heat.accuracy, kind='stable')[:4]] = True
  assert not np.array_equal(by_acc, expected)


def test_racing_search_chooses_the_same_subnet_with_fewer_evaluations(supernet):
  run, args = _fitness_args(supernet)
  val = run.model_data.splits['eval']
  best, cost = {}, {}
  for race in (0.0, 0.5):
    cfg = evolution.SearchConfig(population=8, generations=3, parents=4, mutations=4,
                                 crossovers=4, param_limit=80_000, seed=1, race=race)
    fit = fitness.Fitness(*args, val, chunk=CHUNK, batch_size=16, race=race)
    archive = evolution.run(run.spec, fit, cfg, None, log=lambda m: None)
    top = archive.top(1)[0]
    assert archive.complete[top]
    best[race], cost[race] = archive.cands[top], fit.batch_evaluations
    if race:
      assert not archive.complete[:archive.size].all()
      front = archive.front()
      assert archive.complete[front].all() and top in front
  np.testing.assert_array_equal(best[0.5], best[0.0])
  assert cost[0.5] < 0.8 * cost[0.0]


def test_chunk_probe_picks_the_fastest_measured(supernet):
  run, args = _fitness_args(supernet)
  logged = []
  fit = fitness.Fitness(*args, run.model_data.splits['eval'], chunk=None, batch_size=16,
                        log=logged.append)
  assert set(fit.probe) == {c * run.mesh.shape["data"] for c in fitness.PROBE_CHUNKS}
  assert fit.chunk == min(fit.probe, key=fit.probe.get)
  assert fit.fn._cache_size() == 1  # the probe's compiled evaluator is kept, not rebuilt
  assert f'chunk {fit.chunk}' in logged[0]


def test_search_writes_everything_and_merged_matches(supernet, tmp_path):
  cfg = evolution.SearchConfig(population=8, generations=3, parents=4, mutations=4, crossovers=4,
                               param_limit=80_000, seed=1)
  summary = driver.search_and_export(supernet, cfg, out=tmp_path, chunk=CHUNK, eval_batch_size=16,
                                     requantize='int8', log=lambda s: None)
  assert json.loads((tmp_path / 'summary.json').read_text()) == json.loads(
      json.dumps(summary, default=str))
  assert summary['adapter_params'] <= 80_000
  assert summary['merged_prediction_agreement'] == 1.0
  assert summary['test_accuracy'] == summary['test_accuracy_merged']
  # --requantize int8: the merged kernels of the adapter targets quantized again and
  # scored (the weight bound is checked below, on the exported kernels).
  rq = summary['requantized']
  assert rq['kind'] == 'int8, block 64' and rq['kernels'] == len(
      [p for p in setup.build(setup.load_config(supernet)).spec.paths])
  assert 0 < rq['relative_weight_error'] < 0.02 and rq['max_abs_weight_error'] > 0
  assert 0.9 <= rq['prediction_agreement'] <= 1.0
  assert abs(rq['test_accuracy'] - summary['test_accuracy_merged']) <= 1 - rq['prediction_agreement']
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
  assert set(peft.flatten(merged)) == set(peft.flatten(run.model_data.params))
  # int8 in blocks of 64 moves a weight by at most half a step, absmax / 254 of its block.
  largest = max(np.abs(peft.flatten(merged)[f'{p}/kernel']).max() for p in run.spec.paths)
  assert rq['max_abs_weight_error'] <= largest / 254 * (1 + 1e-6)
  test = run.model_data.splits['test']
  batch = {k: jnp.asarray(v[:16]) for k, v in test.items()}
  plain = run.model_data.model.apply({'params': merged}, batch['input_ids'], batch['attention_mask'],
                                 batch['token_type_ids'])
  adapters = peft.Adapters(params=trainable['adapters'], spec=run.spec)
  adapted = peft.forward(run.model_data.model, peft.combine(run.frozen, trainable['model']), adapters,
                         chosen, batch['input_ids'], batch['attention_mask'], batch['token_type_ids'])
  np.testing.assert_allclose(plain, adapted, rtol=1e-4, atol=1e-4)
  orbax_merged = export.load_orbax(tmp_path / 'merged_params')
  jax.tree.map(np.testing.assert_array_equal, orbax_merged, merged)
  # The same through the loader every export has: model_config.json builds the model.
  # model_config.json records the base the adapters were merged into (float here).
  assert json.loads((tmp_path / 'model_config.json').read_text())['merged_from'] == {
      'frozen_quant': 'none'}
  loaded_model, loaded = export.load_merged(tmp_path)
  assert loaded_model.config == run.model_data.model.config
  np.testing.assert_array_equal(loaded_model.apply({'params': loaded}, batch['input_ids'],
                                                   batch['attention_mask'], batch['token_type_ids']),
                                plain)
