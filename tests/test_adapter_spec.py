"""adapter_spec: the static tables of options and costs, counted by hand from the
papers' definitions (REFERENCE.md section 1; LoRA: r (in + out)), and the report."""
import jax.numpy as jnp
import numpy as np

from glora_jax import adapter_spec
from glora_jax.adapters import glora, lora

D_IN, D_HID, D_OUT = 16, 48, 12


def params():
  return {'fc1': {'kernel': jnp.zeros((D_IN, D_HID)), 'bias': jnp.zeros(D_HID)},
          'fc2': {'kernel': jnp.zeros((D_HID, D_OUT))},
          'head': {'kernel': jnp.zeros((D_OUT, 3)), 'bias': jnp.zeros(3)}}


def glora_costs(d_in, d_out, ranks):
  """Each GLoRA option's parameters from its definition: A, B low rank r (out x r +
  r x in), C low rank r (in x r + r x 1), vectors of `out` (A, B, D, E) or `in` (C),
  a constant 1, none 0; options in the encoding's order."""
  low = [r * (d_out + d_in) for r in ranks]
  return [low + [d_out, 1, 0], low + [d_out, 1, 0], [r * (d_in + 1) for r in ranks] + [d_in, 0],
          [d_out, 1, 0], [d_out, 1, 0]]


def test_tables_and_counts_match_the_definitions():
  adapters = adapter_spec.attach(params(), rules=[('fc1/kernel', glora.family(ranks=(2, 4))),
                                                  ('fc2/kernel', lora.family(rank=3))])
  spec = adapters.spec
  assert spec.paths == ('fc1', 'fc2') and spec.num_supports == 5
  np.testing.assert_array_equal(spec.num_options, [[5, 5, 4, 3, 3], [1, 1, 1, 1, 1]])
  expected = glora_costs(D_IN, D_HID, (2, 4))
  for j, row in enumerate(expected):
    np.testing.assert_array_equal(spec.option_costs[0, j, :len(row)], row)
  assert not spec.option_costs[1].any()  # LoRA: no choices, all in its fixed cost
  np.testing.assert_array_equal(spec.fixed_costs, [0, 3 * (D_HID + D_OUT)])
  assert spec.num_choices == 5 * 5 * 4 * 3 * 3

  rng = np.random.default_rng(0)
  for _ in range(5):
    sub = np.zeros((2, 5), np.int32)
    sub[0] = [rng.integers(n) for n in spec.num_options[0]]
    by_hand = [sum(expected[j][sub[0, j]] for j in range(5)), 3 * (D_HID + D_OUT)]
    np.testing.assert_array_equal(spec.layer_params(sub), by_hand)
    backbone = {k: v for k, v in params().items() if k != 'head'}
    rep = adapter_spec.report(backbone, adapters, sub, head=params()['head'])
    assert [row[3] for row in rep.rows] == by_hand
    assert rep.adapter_params == sum(by_hand) and rep.head_params == D_OUT * 3 + 3
    # stored: every supernet leaf (GLoRA at its largest rank 4), LoRA's A and B
    assert rep.stored_adapter_params == (
        2 * 4 * (D_IN + D_HID) + 4 * (D_IN + 1) + 2 * D_HID + 3 * (D_HID + D_OUT))
    assert rep.backbone_params == D_IN * D_HID + D_HID + D_HID * D_OUT


def test_chosen_option_costs_gathers_for_a_batch_of_subnets():
  spec = adapter_spec.attach(params(), glora.family(ranks=(2,)), targets=r'fc\d/kernel').spec
  subs = np.stack([np.zeros((2, 5), np.int32), spec.num_options - 1])  # first and last options
  costs = np.asarray(adapter_spec.chosen_option_costs(spec.option_costs, subs))
  assert costs.shape == (2, 2, 5)
  np.testing.assert_array_equal(costs[1], 0)  # the last option of every support is 'none'
  np.testing.assert_array_equal(costs[0, 0], [2 * (D_IN + D_HID)] * 2 + [2 * (D_IN + 1), D_HID, D_HID])
