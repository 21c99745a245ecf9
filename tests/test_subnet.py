"""Subnets as data: sampled and counted under jit and vmap without recompiling,
named in readable JSON and back."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import peft
from glora_jax import subnet as subnet_lib
from test_peft import mlp_setup, perturbed  # the small adapted MLP the peft tests use


def test_new_keys_give_new_subnets_without_recompiling():
  model, params, x, adapters = mlp_setup()
  adapters = perturbed(adapters)
  traces = []

  @jax.jit
  def step(key, a):
    traces.append(1)
    subnet = subnet_lib.sample(key, a)
    return subnet, peft.forward(model, params, a, subnet, x), subnet_lib.count_params(a, subnet)

  seen = set()
  for i in range(8):
    subnet, _, _ = step(jax.random.key(i), adapters)
    seen.add(np.asarray(subnet).tobytes())
  assert len(traces) == 1
  assert len(seen) == 8


def test_vmap_over_subnets_equals_loop():
  model, params, x, adapters = mlp_setup()
  adapters = perturbed(adapters)
  subnets = jax.vmap(lambda k: subnet_lib.sample(k, adapters))(jax.random.split(jax.random.key(0), 6))
  fwd = lambda s: peft.forward(model, params, adapters, s, x)
  batched = jax.jit(jax.vmap(fwd))(subnets)
  counts = jax.vmap(lambda s: subnet_lib.count_params(adapters, s))(subnets)
  for i in range(6):
    np.testing.assert_allclose(batched[i], fwd(subnets[i]), rtol=1e-5, atol=1e-6)
    assert int(counts[i]) == int(subnet_lib.count_params(adapters, subnets[i]))


def test_count_params_matches_report_and_independent_sum():
  _, params, _, adapters = mlp_setup()
  subnet = subnet_lib.sample(jax.random.key(3), adapters)
  named = subnet_lib.to_dict(adapters, subnet)
  # independent count from the readable form
  sizes = {'fc1': (16, 48), 'fc2': (48, 16)}
  total = 0
  for path, row in named.items():
    d_in, d_out = sizes[path]
    for s, opt in row.items():
      if opt.startswith('lora_'):
        total += int(opt[5:]) * ((d_in + 1) if s == 'C' else (d_in + d_out))
      elif opt == 'vector':
        total += d_in if s == 'C' else d_out
      elif opt == 'constant':
        total += 1
  assert int(subnet_lib.count_params(adapters, subnet)) == total
  rep = peft.report(params, adapters, subnet, head=params['head'])
  assert rep.adapter_params == total
  assert rep.head_params == 16 * 3 + 3
  assert 'fc1' in str(rep) and 'trainable%' in str(rep)


def test_subnet_json_round_trip():
  _, _, _, adapters = mlp_setup()
  subnet = np.asarray(subnet_lib.sample(jax.random.key(7), adapters))
  text = subnet_lib.dumps(adapters, subnet)
  assert set(json.loads(text)['fc1']) == {'A', 'B', 'C', 'D', 'E'}
  np.testing.assert_array_equal(subnet_lib.loads(adapters, text), subnet)


# --------------------------------------------------------------------------- #
# Bad input
# --------------------------------------------------------------------------- #


def test_unknown_option_name_in_subnet():
  _, _, _, adapters = mlp_setup()
  row = {'A': 'lora_3', 'B': 'none', 'C': 'none', 'D': 'none', 'E': 'none'}
  with pytest.raises(ValueError, match=r"'fc1': unknown option 'lora_3' for support 'A'; allowed: \['lora_2'"):
    subnet_lib.from_dict(adapters, {'fc1': row, 'fc2': row})


# --------------------------------------------------------------------------- #
# Supernet sampling rules: option order, progressive shrinking, fair sampling
# --------------------------------------------------------------------------- #


def test_option_order_runs_from_most_to_fewest_parameters():
  _, _, _, adapters = mlp_setup()
  spec = adapters.spec
  order = subnet_lib.option_order(spec.num_options, spec.option_costs)
  np.testing.assert_array_equal(order[..., 0], subnet_lib.largest(spec))
  for (l, s), n in np.ndenumerate(spec.num_options):
    costs = spec.option_costs[l, s][order[l, s, :n]]
    assert sorted(order[l, s, :n]) == list(range(n))  # a permutation of the real options
    assert all(costs[:-1] >= costs[1:])
    assert list(order[l, s, n:]) == list(range(n, order.shape[-1]))  # padding last
  # GLoRA's A: lora_4, lora_2, vector, constant, none (ranks (2, 4)).
  names = adapters.spec.layers[0].family.options('A')
  assert [names[i] for i in order[0, 0, :len(names)]] == ['lora_4', 'lora_2', 'vector', 'constant', 'none']


def test_progressive_shrinking_allows_options_in_equal_stages():
  num = np.array([[4, 3, 1]], np.int32)
  allowed = lambda step: np.asarray(subnet_lib.allowed_options(num, step, 12))[0].tolist()
  # n options widen from 1 to n at steps 12 * k / (n - 1): 4 options at 0, 4, 8, 12.
  assert allowed(0) == [1, 1, 1]
  assert allowed(3) == [1, 1, 1]
  assert allowed(4) == [2, 1, 1]
  assert allowed(6) == [2, 2, 1]
  assert allowed(8) == [3, 2, 1]
  assert allowed(11) == [3, 2, 1]
  assert allowed(12) == [4, 3, 1]
  assert allowed(1000) == [4, 3, 1]
  np.testing.assert_array_equal(subnet_lib.allowed_options(num, 0, 0), num)  # off: everything
  # Draws stay inside the allowed set, the most expensive options first.
  _, _, _, adapters = mlp_setup()
  spec = adapters.spec
  order = subnet_lib.option_order(spec.num_options, spec.option_costs)
  for step, widen in ((0, 8), (3, 8), (5, 8)):
    ok = subnet_lib.allowed_options(spec.num_options, step, widen)
    draws = np.asarray(subnet_lib.sample_allowed(jax.random.key(step), order, ok, (300,)))
    for (l, s), m in np.ndenumerate(np.asarray(ok)):
      assert set(draws[:, l, s]) == set(order[l, s, :m].tolist())
  at_start = subnet_lib.sample_allowed(jax.random.key(0), order, subnet_lib.allowed_options(
      spec.num_options, 0, 8), (5,))
  assert all(np.array_equal(s, subnet_lib.largest(spec)) for s in np.asarray(at_start))


def test_fair_sampling_draws_every_option_once_per_cycle():
  _, _, _, adapters = mlp_setup()
  spec = adapters.spec
  num = spec.num_options  # 5 options for A, B; 4 for C; 3 for D, E
  order = jnp.asarray(subnet_lib.option_order(num, spec.option_costs))
  draw = jax.jit(lambda g: subnet_lib.fair_sample(jax.random.key(4), g, order, num))
  draws = np.stack([np.asarray(draw(g)) for g in range(120)])  # 120 = lcm(5, 4, 3) * 2
  for (l, s), n in np.ndenumerate(num):
    seq = draws[:, l, s]
    for start in range(0, 120, n):  # every cycle of n draws: each option exactly once
      assert sorted(seq[start:start + n]) == list(range(n)), (l, s, seq[start:start + n])
  # Cycles use fresh permutations, independent across layers and supports.
  a_fc1 = [tuple(draws[c * 5:(c + 1) * 5, 0, 0]) for c in range(24)]
  a_fc2 = [tuple(draws[c * 5:(c + 1) * 5, 1, 0]) for c in range(24)]
  assert len(set(a_fc1)) > 10 and a_fc1 != a_fc2
  # A function of (key, draw) only: the same draw again is the same subnet.
  np.testing.assert_array_equal(draw(37), draws[37])
  # With an allowed subset, cycles run over that subset.
  allowed = np.minimum(num, 2)
  sub = np.stack([np.asarray(subnet_lib.fair_sample(jax.random.key(4), g, order, allowed))
                  for g in range(8)])
  for (l, s), m in np.ndenumerate(allowed):
    for start in range(0, 8, m):
      assert sorted(sub[start:start + m, l, s]) == sorted(np.asarray(order)[l, s, :m].tolist())
