"""Evolution operators: rates, mixing, budgets, de-duplication, determinism, resume."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import peft, subnet
from glora_jax.adapters import glora
from glora_jax.search import evolution


def make_spec(layers=6, width=16):
  params = {f'layer_{i}': {'kernel': jnp.zeros((width, width)), 'bias': jnp.zeros(width)}
            for i in range(layers)}
  return peft.attach(params, glora.family(ranks=(2, 4)), targets=r'.*/kernel').spec


def test_mutation_redraws_at_the_stated_rate():
  spec = make_spec()
  num = jnp.asarray(spec.num_options)
  parents = subnet.sample_table(jax.random.key(0), num, (1,))
  kids = evolution.mutate(jax.random.key(1), parents, num, 4000, 0.2)
  changed = float(jnp.mean(kids != parents[0]))
  # A redraw lands on the old value with probability 1/options, so the visible
  # change rate is 0.2 * mean(1 - 1/options).
  expected = 0.2 * float(np.mean(1 - 1 / spec.num_options))
  assert abs(changed - expected) < 0.01


def test_crossover_takes_each_choice_from_either_parent():
  spec = make_spec()
  a = jnp.zeros((1,) + spec.num_options.shape, jnp.int32)
  b = jnp.asarray(spec.num_options - 1)[None]
  parents = jnp.concatenate([a, b])
  kids = evolution.crossover(jax.random.key(2), parents, 2000)
  from_a, from_b = np.asarray(kids == a[0]), np.asarray(kids == b[0])
  assert np.all(from_a | from_b)
  mixed = from_a.any(axis=(1, 2)) & from_b.any(axis=(1, 2))
  assert mixed.mean() > 0.4  # about half the kids pick mixed parents, all of those mix
  both_parents = ~(from_a.all(axis=(1, 2)) | from_b.all(axis=(1, 2)))
  assert abs(float(np.asarray(from_a)[both_parents].mean()) - 0.5) < 0.02


def test_children_are_in_budget_unseen_and_distinct():
  spec = make_spec()
  num = jnp.asarray(spec.num_options)
  costs, fixed = jnp.asarray(spec.option_costs), jnp.asarray(0)
  archive = subnet.sample_table(jax.random.key(3), num, (40,))
  parents = archive[:10]
  low, high = 50, 600
  kids, ok = evolution.propose(jax.random.key(4), parents, archive, jnp.ones(40, bool), num, costs,
                               fixed, low, high, n_mut=25, n_cross=25, tries=10, prob=0.2)
  kids = np.asarray(kids)[np.asarray(ok)]
  assert len(kids) > 0
  n = np.asarray(jax.vmap(lambda s: subnet.count_params(spec, s))(jnp.asarray(kids)))
  assert np.all((n >= low) & (n <= high))
  seen = {c.tobytes() for c in np.asarray(archive)}
  assert not any(k.tobytes() in seen for k in kids)
  assert len({k.tobytes() for k in kids}) == len(kids)


def test_search_is_seeded_resumable_and_compiles_once(tmp_path):
  spec = make_spec()
  weights = np.random.default_rng(0).normal(size=spec.num_options.shape)

  def fitness(cands):  # a deterministic toy fitness of the arrays
    return np.tanh((np.asarray(cands) * weights).sum(axis=(1, 2)) / 10)

  cfg = evolution.SearchConfig(population=12, generations=5, parents=4, mutations=6, crossovers=6,
                               param_limit=2000, seed=3)
  compiled_before = evolution.propose._cache_size()
  (tmp_path / 'a').mkdir()
  full = evolution.run(spec, fitness, cfg, tmp_path / 'a', log=lambda s: None)
  assert evolution.propose._cache_size() - compiled_before == 1  # 5 generations, 1 compile
  again = evolution.run(spec, fitness, cfg, None, log=lambda s: None)
  np.testing.assert_array_equal(full.cands[:full.size], again.cands[:again.size])
  (tmp_path / 'b').mkdir()
  evolution.run(spec, fitness, cfg, tmp_path / 'b', log=lambda s: None, stop_after_generations=2)
  resumed = evolution.run(spec, fitness, cfg, tmp_path / 'b', log=lambda s: None)
  np.testing.assert_array_equal(full.cands[:full.size], resumed.cands[:resumed.size])
  np.testing.assert_array_equal(full.accuracy[:full.size], resumed.accuracy[:resumed.size])
  assert full.size == 12 + 5 * 12  # the random population, then 5 generations
  params = np.asarray(jax.vmap(lambda s: subnet.count_params(spec, s))(jnp.asarray(full.cands[:full.size])))
  assert params.max() <= 2000
  assert len({c.tobytes() for c in full.cands[:full.size]}) == full.size


def test_pareto_front():
  params = np.array([10, 20, 30, 15, 40])
  acc = np.array([0.5, 0.7, 0.6, 0.5, 0.9])
  np.testing.assert_array_equal(evolution.pareto_front(params, acc), [0, 1, 4])


def test_archive_ranks_race_losers_after_complete_candidates():
  spec = make_spec(layers=2)
  archive = evolution.Archive(spec, 8)
  cands = np.arange(5)[:, None, None] * np.ones((1,) + spec.num_options.shape, np.int32)
  # A race's heat loser (index 1) with the highest, partial, accuracy.
  archive.add(cands, np.array([0.6, 0.99, 0.7, 0.7, 0.5]), np.array([30, 5, 20, 10, 1]), 0,
              np.array([True, False, True, True, True]))
  np.testing.assert_array_equal(archive.top(5), [3, 2, 0, 4, 1])  # ties: fewer params first
  np.testing.assert_array_equal(archive.front(), [4, 3])  # the loser is not on the front
  saved = archive.to_json()
  old = {k: v for k, v in saved.items() if k != 'complete'}  # a search state from before racing
  archive.load(old)
  assert archive.complete[:5].all()
  archive.load(saved)
  np.testing.assert_array_equal(archive.complete[:5], [True, False, True, True, True])


def test_loss_tie_break_ranks_equal_accuracies_by_val_loss():
  """tie_break='loss': equal accuracy -> lower val loss first (unknown loss last),
  then fewer params; the order checked against a plain sort of the tuples."""
  spec = make_spec(layers=2)
  acc = np.array([0.9, 0.9, 0.8, 0.9, 0.9, 0.9])
  loss = np.array([0.30, 0.10, 0.05, np.nan, 0.10, 0.20])
  params = np.array([10, 50, 1, 5, 40, 20])
  cands = np.arange(6)[:, None, None] * np.ones((1,) + spec.num_options.shape, np.int32)
  by_loss = evolution.Archive(spec, 8, 'loss')
  by_loss.add(cands, acc, params, 0, True, loss)
  expected = sorted(range(6), key=lambda i: (-acc[i], np.inf if np.isnan(loss[i]) else loss[i], params[i]))
  np.testing.assert_array_equal(by_loss.top(6), expected)  # [4, 1, 5, 0, 3, 2]
  by_params = evolution.Archive(spec, 8)
  by_params.add(cands, acc, params, 0, True, loss)
  np.testing.assert_array_equal(by_params.top(6), [3, 0, 5, 4, 1, 2])
  saved = by_loss.to_json()  # the loss survives a resume; NaN as null
  assert saved['loss'][3] is None
  by_loss.load(json.loads(json.dumps(saved)))
  np.testing.assert_array_equal(by_loss.top(6), expected)
  by_loss.load({k: v for k, v in saved.items() if k != 'loss'})  # a state from before: no loss
  assert np.isnan(by_loss.loss[:6]).all()
  with pytest.raises(ValueError, match="tie_break 'x' is unknown"):
    evolution.SearchConfig(tie_break='x')


def test_loss_tie_break_changes_the_chosen_subnet():
  """A fitness whose accuracy ties everywhere: 'params' chooses the cheapest
  candidate, 'loss' the one with the lowest loss, in the same archive."""
  spec = make_spec(layers=4)
  weights = np.random.default_rng(1).normal(size=spec.num_options.shape)

  def fit(cands):
    cands = np.asarray(cands)
    return np.full(len(cands), 0.5), np.ones(len(cands), bool), (cands * weights).sum(axis=(1, 2))

  chosen = {}
  for tie in evolution.TIE_BREAKS:
    cfg = evolution.SearchConfig(population=12, generations=2, parents=3, mutations=3,
                                 crossovers=3, param_limit=1e9, tie_break=tie)
    archive = evolution.run(spec, fit, cfg, log=lambda s: None)
    n = archive.size
    best = archive.top(1)[0]
    chosen[tie] = archive.cands[best]
    if tie == 'loss':
      assert archive.loss[best] == archive.loss[:n].min()
    else:
      assert archive.params[best] == archive.params[:n].min()
  assert not np.array_equal(chosen['loss'], chosen['params'])


def test_rank_by_loss_orders_and_fronts_by_val_loss():
  """rank_by='loss': complete first, then lower val loss (unknown last), then higher
  accuracy, then fewer params, against a plain sort of the tuples; the front is fewer
  params against lower loss, checked by brute-force dominance."""
  spec = make_spec(layers=2)
  acc = np.array([0.9, 0.8, 0.95, 0.9, 0.7, 0.8, 0.99])
  loss = np.array([0.30, 0.10, 0.20, np.nan, 0.10, 0.25, 0.05])
  params = np.array([10, 50, 30, 5, 40, 20, 1])
  complete = np.array([True, True, True, True, True, True, False])  # 6: a heat loser
  cands = np.arange(7)[:, None, None] * np.ones((1,) + spec.num_options.shape, np.int32)
  for tie in evolution.TIE_BREAKS:  # tie_break is unused when ranking by loss
    archive = evolution.Archive(spec, 8, tie, 'loss')
    archive.add(cands, acc, params, 0, complete, loss)
    finite = np.where(np.isnan(loss), np.inf, loss)
    expected = sorted(range(7), key=lambda i: (not complete[i], finite[i], -acc[i], params[i]))
    np.testing.assert_array_equal(archive.top(7), expected)  # [1, 4, 2, 5, 0, 3, 6]
    dominated = lambda i: any(params[j] <= params[i] and finite[j] <= finite[i] and
                              (params[j], finite[j]) != (params[i], finite[i])
                              for j in range(6) if j != i)
    want = sorted((i for i in range(6) if np.isfinite(finite[i]) and not dominated(i)),
                  key=lambda i: params[i])
    np.testing.assert_array_equal(archive.front(), want)  # [0, 5, 2, 4]
  with pytest.raises(ValueError, match="rank_by 'x' is unknown"):
    evolution.SearchConfig(rank_by='x')


def test_rank_by_loss_chooses_the_lowest_loss_over_a_higher_accuracy():
  """A fitness whose accuracy and loss disagree: 'accuracy' chooses the most accurate
  candidate, 'loss' the one of lowest loss, each the archive's extreme."""
  spec = make_spec(layers=4)
  rng = np.random.default_rng(2)
  w_acc, w_loss = rng.normal(size=(2,) + spec.num_options.shape)

  def fit(cands):
    cands = np.asarray(cands, float)
    return (cands * w_acc).sum(axis=(1, 2)), np.ones(len(cands), bool), (cands * w_loss).sum(axis=(1, 2))

  chosen = {}
  for rank in evolution.RANKS:
    cfg = evolution.SearchConfig(population=12, generations=2, parents=3, mutations=3,
                                 crossovers=3, param_limit=1e9, rank_by=rank)
    archive = evolution.run(spec, fit, cfg, log=lambda s: None)
    n, best = archive.size, archive.top(1)[0]
    chosen[rank] = archive.cands[best]
    if rank == 'loss':
      assert archive.loss[best] == archive.loss[:n].min()
    else:
      assert archive.accuracy[best] == archive.accuracy[:n].max()
  assert not np.array_equal(chosen['loss'], chosen['accuracy'])


def test_race_share_is_checked():
  with pytest.raises(ValueError, match=r'race must be in \[0, 1\)'):
    evolution.SearchConfig(race=1.0)


def test_budget_that_no_subnet_meets():
  spec = make_spec()
  with pytest.raises(ValueError, match='no subnet meets the parameter budget'):
    evolution.check_budget(spec, evolution.SearchConfig(min_param_limit=1e6, param_limit=2e6))


def test_random_fill_meets_a_tight_budget():
  """A budget far below the average subnet: uniform draws alone almost never meet
  it; the thinned half of the random fill does."""
  spec = make_spec(layers=12)
  num, costs = jnp.asarray(spec.num_options), jnp.asarray(spec.option_costs)
  mean = float(jnp.mean(jax.vmap(lambda s: subnet.count_params(spec, s))(
      subnet.sample_table(jax.random.key(0), num, (256,)))))
  limit = mean / 8
  cands, ok = evolution.propose_random(jax.random.key(1), jnp.zeros((1,) + spec.num_options.shape, jnp.int32),
                                       jnp.zeros(1, bool), num, costs, jnp.asarray(0), 0, limit,
                                       n=20, tries=10)
  found = np.asarray(cands)[np.asarray(ok)]
  assert len(found) >= 10
  n = np.asarray(jax.vmap(lambda s: subnet.count_params(spec, s))(jnp.asarray(found)))
  assert n.max() <= limit
  uniform = subnet.sample_table(jax.random.key(2), num, (200,))
  u = np.asarray(jax.vmap(lambda s: subnet.count_params(spec, s))(uniform))
  assert (u <= limit).mean() < 0.05  # the case the thinning exists for


def toy_fitness(spec):
  weights = np.random.default_rng(0).normal(size=spec.num_options.shape)
  return lambda cands: np.tanh((np.asarray(cands) * weights).sum(axis=(1, 2)) / 10)


def test_authors_schedule_evaluates_1050_candidates():
  """The authors' defaults: 50 random, then 20 generations of 50 (25 mutations, 25
  crossovers, random top-up): 1,050 evaluations."""
  spec = make_spec(layers=6)
  archive = evolution.run(spec, toy_fitness(spec), evolution.SearchConfig(param_limit=1e9),
                          log=lambda s: None)
  assert archive.size == 1050
  assert np.bincount(archive.generation[:archive.size]).tolist() == [50] * 21
  assert len({c.tobytes() for c in archive.cands[:archive.size]}) == 1050


@pytest.mark.parametrize('refill, per_generation', [('population', 12), ('children', 6)])
def test_refill_tops_every_generation_up_to_population(refill, per_generation):
  """Population 12 with 3 + 3 children: the authors top each generation up to 12
  with random candidates; 'children' keeps the 6 children only."""
  spec = make_spec()
  cfg = evolution.SearchConfig(population=12, generations=4, parents=4, mutations=3, crossovers=3,
                               param_limit=1e9, seed=1, refill=refill)
  archive = evolution.run(spec, toy_fitness(spec), cfg, log=lambda s: None)
  assert np.bincount(archive.generation[:archive.size]).tolist() == [12] + [per_generation] * 4


def test_uniform_random_fill_is_the_authors_sampler():
  """random_fill='uniform': the random candidates are the first acceptable of
  uniform draws (no thinning)."""
  spec = make_spec()
  num, costs = jnp.asarray(spec.num_options), jnp.asarray(spec.option_costs)
  empty, none = jnp.zeros((1,) + spec.num_options.shape, jnp.int32), jnp.zeros(1, bool)
  key = jax.random.key(5)
  cands, ok = evolution.propose_random(key, empty, none, num, costs, jnp.asarray(0), 0, 1e9,
                                       n=6, tries=2, thinned=False)
  uniform = subnet.sample_table(jax.random.split(key)[0], num, (12,))
  assert np.all(np.asarray(ok))
  np.testing.assert_array_equal(cands, uniform[:6])
  with pytest.raises(ValueError, match="search random_fill 'thin' is unknown"):
    evolution.SearchConfig(random_fill='thin')
  with pytest.raises(ValueError, match="search refill 'all' is unknown"):
    evolution.SearchConfig(refill='all')


def test_initial_subnets_open_the_first_population_within_the_budget():
  """start='anchor' (driver): the given subnets are the first candidates evaluated,
  those over the budget and repeats left out, the rest of the population random."""
  spec = make_spec()
  largest, cheapest = subnet.largest(spec), np.zeros(spec.num_options.shape, np.int32)
  limit = int(subnet.count_params(spec, largest)) - 1  # the largest is just over it
  cfg = evolution.SearchConfig(population=8, generations=1, parents=2, mutations=2, crossovers=2,
                               param_limit=limit, seed=3)
  archive = evolution.run(spec, toy_fitness(spec), cfg, log=lambda s: None,
                          initial=np.stack([cheapest, largest, cheapest]))
  np.testing.assert_array_equal(archive.cands[0], cheapest)
  assert not any(np.array_equal(c, largest) for c in archive.cands[:archive.size])
  assert np.bincount(archive.generation[:archive.size]).tolist() == [8, 8]
  assert len({c.tobytes() for c in archive.cands[:archive.size]}) == archive.size
  plain = evolution.run(spec, toy_fitness(spec), cfg, log=lambda s: None)
  assert not np.array_equal(plain.cands[0], cheapest)  # random first candidate without it
  with pytest.raises(ValueError, match="search start 'best' is unknown"):
    evolution.SearchConfig(start='best')


def test_a_state_saved_before_a_newer_field_resumes_at_its_default(tmp_path):
  """A search_state.json written before `start` existed resumes with start='random'
  (what it ran) and is refused with start='anchor' (another search)."""
  spec = make_spec()
  cfg = evolution.SearchConfig(population=6, generations=2, parents=2, mutations=3, crossovers=3,
                               param_limit=1e9, seed=2)
  full = evolution.run(spec, toy_fitness(spec), cfg, None, log=lambda s: None)
  evolution.run(spec, toy_fitness(spec), cfg, tmp_path, log=lambda s: None, stop_after_generations=1)
  state = tmp_path / 'search_state.json'
  saved = json.loads(state.read_text())
  del saved['config']['start']
  state.write_text(json.dumps(saved))
  resumed = evolution.run(spec, toy_fitness(spec), cfg, tmp_path, log=lambda s: None)
  np.testing.assert_array_equal(full.cands[:full.size], resumed.cands[:resumed.size])
  state.write_text(json.dumps(saved))
  with pytest.raises(ValueError, match='is from a search with other settings'):
    evolution.run(spec, toy_fitness(spec), dataclasses.replace(cfg, start='anchor'), tmp_path,
                  log=lambda s: None)
