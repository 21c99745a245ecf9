"""benchmarks/search_trust.py: Kendall's tau-b against a pair-by-pair count and scipy,
and the choice of subnets spread over a search's Pareto front and archive."""
import itertools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import search_trust
from glora_jax import peft
from glora_jax import subnet as subnet_lib
from glora_jax.adapters import glora


def tau_by_pairs(x, y):
  """tau-b from its definition: (C - D) / sqrt((n0 - n1)(n0 - n2)), n0 pairs, n1 and
  n2 the pairs tied in x and in y."""
  c = d = tx = ty = 0
  pairs = list(itertools.combinations(range(len(x)), 2))
  for i, j in pairs:
    a, b = x[i] - x[j], y[i] - y[j]
    tx += a == 0
    ty += b == 0
    c += a * b > 0
    d += a * b < 0
  return (c - d) / np.sqrt((len(pairs) - tx) * (len(pairs) - ty))


@pytest.mark.parametrize('seed', range(5))
def test_kendall_tau_b_matches_its_definition_and_scipy(seed):
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 6, 9) / 200  # accuracies on 200 examples: ties are common
  y = 0.5 * x + rng.integers(0, 6, 9) / 200
  tau = search_trust.kendall_tau(x, y)
  assert tau == pytest.approx(tau_by_pairs(x, y), abs=1e-12)
  stats = pytest.importorskip('scipy.stats')
  assert tau == pytest.approx(stats.kendalltau(x, y).statistic, abs=1e-12)


def test_kendall_tau_extremes():
  assert search_trust.kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
  assert search_trust.kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
  assert np.isnan(search_trust.kendall_tau([1, 2, 3], [5, 5, 5]))


def test_spread_keeps_both_ends_and_even_steps():
  params = [50, 10, 40, 20, 30, 60, 70, 80, 90, 100, 0]
  picked = search_trust.spread(params, 4)
  assert [params[i] for i in picked] == [0, 30, 70, 100]
  assert sorted(search_trust.spread([3, 1, 2], 8)) == [0, 1, 2]  # fewer than asked: all


def test_picks_from_the_front_then_the_archive(tmp_path):
  params = {f'layer_{i}': {'kernel': jnp.zeros((8, 8)), 'bias': jnp.zeros(8)} for i in range(3)}
  spec = peft.attach(params, glora.family(ranks=(2,)), targets=r'.*/kernel').spec
  cands = np.stack([np.asarray(subnet_lib.sample(jax.random.key(i), spec)) for i in range(12)])
  counts = [int(subnet_lib.count_params(spec, c)) for c in cands]
  acc = list(np.linspace(0.5, 0.9, 12))
  front = [{'params': counts[i], 'val_accuracy': acc[i], 'generation': 0,
            'subnet': subnet_lib.to_dict(spec, cands[i])} for i in (0, 1, 2)]
  (tmp_path / 'pareto.json').write_text(json.dumps(front))
  (tmp_path / 'search_state.json').write_text(json.dumps({'archive': {
      'cands': cands.tolist(), 'accuracy': acc, 'params': counts, 'generation': [0] * 12}}))
  points = search_trust.pick_subnets(spec, tmp_path, 6, 'front')
  assert len(points) == 6 and [p['from'] for p in points].count('front') == 3
  assert len({p['subnet'].tobytes() for p in points}) == 6  # the archive adds new subnets only
  assert [p['params'] for p in points] == sorted(p['params'] for p in points)
  for p in points:
    assert p['params'] == int(subnet_lib.count_params(spec, p['subnet']))
  every = search_trust.pick_subnets(spec, tmp_path, 4, 'archive')
  # positions round(linspace(0, 11, 4)) = 0, 4, 7, 11 of the archive sorted by parameters
  assert [p['params'] for p in every] == [sorted(counts)[i] for i in (0, 4, 7, 11)]


def test_retrain_config_fixes_the_subnet_and_starts_from_the_supernet_or_scratch(tmp_path):
  """The supernet's recipe with the subnet fixed: inherited weights for
  retrain_epochs, or --from_scratch a fresh init for the supernet's own epochs."""
  from helpers import tiny_config
  config = tiny_config(**{'supernet.sandwich': 'largest', 'optim.lr': 3e-3})
  (tmp_path / 'config.json').write_text(config.to_json())
  subnet_file = tmp_path / 'point0.json'
  inherited = search_trust.retrain_config(tmp_path, subnet_file, False, 5)
  assert (inherited.subnet, inherited.init_from, inherited.num_epochs) == (str(subnet_file), str(tmp_path), 5)
  scratch = search_trust.retrain_config(tmp_path, subnet_file, True, 5)
  assert (scratch.subnet, scratch.init_from, scratch.num_epochs) == (str(subnet_file), '', config.num_epochs)
  for c in (inherited, scratch):
    assert c.optim.lr == 3e-3 and c.eval_every_epochs == 0 and c.checkpoint.keep == 1
  assert search_trust.retrain_config(tmp_path, subnet_file, True, 5).seed == config.seed
  assert search_trust.retrain_config(tmp_path, subnet_file, True, 5, seed=config.seed + 7).seed == config.seed + 7


def test_seed_agreement_is_the_mean_pairwise_tau_of_the_seeds():
  rng = np.random.default_rng(0)
  values = rng.integers(0, 8, (4, 8)) / 200  # 4 seeds x 8 subnets, ties common
  pairs = [tau_by_pairs(values[a], values[b]) for a, b in itertools.combinations(range(4), 2)]
  assert search_trust.seed_agreement(values) == pytest.approx(np.mean(pairs), abs=1e-12)
  same = np.tile(values[:1], (3, 1))
  assert search_trust.seed_agreement(same) == 1.0  # seeds that agree fully
  assert search_trust.seed_agreement(np.stack([values[0], -values[0]])) == -1.0
  # a seed whose values are all equal has no ranking: its pairs are left out
  with_constant = np.concatenate([values[:2], np.full((1, 8), 0.5)])
  assert search_trust.seed_agreement(with_constant) == pytest.approx(pairs[0], abs=1e-12)
  assert np.isnan(search_trust.seed_agreement(values[:1]))


def test_run_dir_keeps_the_single_seed_layout_for_the_configs_seed(tmp_path):
  assert search_trust.run_dir(tmp_path, 3, 0, 0) == tmp_path / 'point3'
  assert search_trust.run_dir(tmp_path, 3, 2, 0) == tmp_path / 'point3_seed2'
  assert search_trust.run_dir(tmp_path, 3, 0, 5) == tmp_path / 'point3_seed0'
