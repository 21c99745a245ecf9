"""Subnets as data: sampled and counted under jit and vmap without recompiling,
named in readable JSON and back."""
import json

import jax
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
