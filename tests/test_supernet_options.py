"""Supernet options (config.supernet) through the real training path: one-line
config errors, a mesh of 8 simulated devices against one device with every key
identical on every replica, and a resumed run equal to an uninterrupted one."""

import jax
import numpy as np
import pytest

from helpers import tiny_config as tiny, trainable_of
from glora_jax.errors import CheckpointMismatchError, ConfigError
from glora_jax import subnet
from glora_jax.train import loop, setup, sharding, steps

OPTIONS = {'supernet.sandwich': 'largest_smallest', 'supernet.num_random': 1,
           'supernet.sampling': 'fair', 'supernet.distill': 0.5, 'supernet.temperature': 2.0,
           'supernet.progressive_epochs': 1.0}


@pytest.mark.parametrize('overrides, message', [
    ({'supernet.sandwich': 'both'}, "supernet.sandwich 'both' is unknown; allowed: ['none', 'largest', 'largest_smallest']"),
    ({'supernet.sampling': 'round_robin'}, "supernet.sampling 'round_robin' is unknown; allowed: ['uniform', 'fair']"),
    ({'supernet.num_random': -1}, 'supernet.num_random must be an integer >= 0, got -1'),
    ({'supernet.num_random': 0}, 'supernet.num_random=0 trains no subnet without a sandwich'),
    ({'supernet.distill': 1.5}, 'supernet.distill must be in [0, 1] (the weight of the KL term), got 1.5'),
    ({'supernet.temperature': 0.0}, 'supernet.temperature must be > 0, got 0.0'),
    ({'supernet.progressive_epochs': 3.0}, 'supernet.progressive_epochs must be in [0, num_epochs=2], got 3.0'),
    ({'method': 'lora', 'supernet.sandwich': 'largest'}, "supernet options other than the defaults train a GLoRA supernet; method is 'lora'"),
    ({'supernet.anchor': '/nonexistent/anchor.json', 'supernet.sandwich': 'largest'},
     'supernet.anchor: subnet file /nonexistent/anchor.json does not exist'),
    ({'supernet.anchor': __file__}, "supernet.anchor takes the largest subnet's roles, which only sandwich"),
    ({'supernet.head_weight': 1.0, 'supernet.sandwich': 'largest'},
     'supernet.head_weight must be in [0, 1) (0: the mean over subnets), got 1.0'),
    ({'supernet.head_weight': 0.7}, "supernet.head_weight weighs the sandwich's head against the other"),
    ({'supernet.head_weight': 0.7, 'supernet.sandwich': 'largest', 'supernet.num_random': 0},
     "supernet.head_weight weighs the sandwich's head against the other"),
])
def test_bad_supernet_options_are_one_line_config_errors(overrides, message):
  with pytest.raises(ConfigError) as e:
    setup.validate(tiny(**overrides))
  assert str(e.value).startswith(message) and '\n' not in str(e.value)


def test_defaults_are_the_authors_and_options_cost_passes():
  assert steps.supernet_options(tiny()) == steps.SupernetOptions()
  assert steps.SupernetOptions().backbone_passes() == 1
  options = steps.supernet_options(tiny(**OPTIONS), steps_per_epoch=4)
  assert options == steps.SupernetOptions(num_random=1, sandwich='largest_smallest', sampling='fair',
                                          distill=0.5, temperature=2.0, widen_steps=4)
  assert options.backbone_passes() == 3  # the teacher is the sandwich's largest: no extra forward


def run_steps(config, n):
  run = setup.build(config)
  batches, optimizer, _, state = setup.make_training(run)
  jit_step, state_sh, frozen_sh = setup.make_jitted_step(run, optimizer, state)
  state, frozen = jax.device_put(state, state_sh), jax.device_put(run.frozen, frozen_sh)
  losses, subnets = [], []
  for _, batch in zip(range(n), batches):
    state, metrics, sub = jit_step(state, frozen, sharding.put_batch(batch, run.mesh))
    shards = [np.asarray(s.data) for s in sub.addressable_shards]
    assert all(np.array_equal(shards[0], s) for s in shards)  # one draw on every replica
    losses.append(float(metrics['loss']))
    subnets.append(shards[0])
  assert jit_step._cache_size() == 1
  return losses, subnets


def test_options_on_a_mesh_equal_one_device():
  one = run_steps(tiny(**OPTIONS, **{'mesh.num_devices': 1}), 4)
  eight = run_steps(tiny(**OPTIONS, **{'mesh.data': 4, 'mesh.model': 2}), 4)
  np.testing.assert_allclose(one[0], eight[0], rtol=1e-5)
  for a, b in zip(one[1], eight[1]):
    np.testing.assert_array_equal(a, b)
  assert one[1][0].shape[0] == 3  # largest, smallest allowed, one fair draw
  # progressive over 1 epoch (4 steps): at step 0 every subnet is the largest
  assert all(np.array_equal(s, one[1][0][0]) for s in one[1][0])
  assert not np.array_equal(one[1][3][1], one[1][3][0])


def test_resume_with_options_equals_uninterrupted(tmp_path, shared_compiles):
  config = tiny(**OPTIONS, **{'mesh.num_devices': 1, 'num_epochs': 1})  # 4 steps
  loop.train_and_evaluate(config, tmp_path / 'straight', progress=False)
  loop.train_and_evaluate(config, tmp_path / 'split', stop_after_steps=2, progress=False)
  # Resuming the half-run with other supernet options is refused, naming them.
  other = tiny(**dict(OPTIONS, **{'supernet.sampling': 'uniform'}),
               **{'mesh.num_devices': 1, 'num_epochs': 1})
  with pytest.raises(CheckpointMismatchError, match=r"supernet is \{.*'sampling': 'fair'.*\} in "
                     r"the checkpoint but \{.*'sampling': 'uniform'"):
    loop.train_and_evaluate(other, tmp_path / 'split', progress=False)
  loop.train_and_evaluate(config, tmp_path / 'split', progress=False)
  a, b = trainable_of(config, tmp_path / 'straight'), trainable_of(config, tmp_path / 'split')
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), a, b)


def test_an_anchor_of_another_space_is_a_config_error_before_training(tmp_path):
  path = tmp_path / 'anchor.json'
  path.write_text('{"encoder/layer_9/attention/query": {"A": "none"}}')
  with pytest.raises(ConfigError) as e:
    setup.build(tiny(**{'supernet.anchor': str(path), 'supernet.sandwich': 'largest'}))
  assert str(e.value).startswith('supernet.anchor: subnet names layers that are not adapted')


def test_fingerprint_names_the_anchor_and_head_weight_only_when_set(tmp_path):
  """Supernet checkpoints written before supernet.anchor or supernet.head_weight
  existed have no such key; a run at their defaults fingerprints the same, one that
  sets either differs."""
  config = tiny(**{'supernet.sandwich': 'largest'})
  run = setup.build(config)
  plain = setup.training_fingerprint(config, run.spec, run.trainable)
  assert 'anchor' not in plain['supernet'] and plain['supernet']['sandwich'] == 'largest'
  path = tmp_path / 'anchor.json'
  path.write_text(subnet.dumps(run.spec, subnet.largest(run.spec)))
  anchored = tiny(**{'supernet.sandwich': 'largest', 'supernet.anchor': str(path)})
  assert setup.training_fingerprint(anchored, run.spec, run.trainable)['supernet']['anchor'] == str(path)
  # supernet.head_weight likewise: absent at its default (0, the mean), named when set.
  assert 'head_weight' not in plain['supernet']
  weighted = tiny(**{'supernet.sandwich': 'largest', 'supernet.head_weight': 0.75})
  assert setup.training_fingerprint(weighted, run.spec, run.trainable)['supernet']['head_weight'] == 0.75



def test_unshared_vectors_train_and_resume_only_as_such(tmp_path):
  """adapter.share_vectors=False through the real training path: the vector and
  constant options' own params train, and a resume that would share them is
  refused (the trainable shapes differ). Their maths and merge: test_glora.py."""
  config = tiny(**{'adapter.share_vectors': False, 'mesh.num_devices': 1, 'num_epochs': 1})
  loop.train_and_evaluate(config, tmp_path, stop_after_steps=2, progress=False)
  adapters = trainable_of(config, tmp_path)['adapters']
  assert all(set(p) >= {'Av', 'Bv', 'Cv', 'Ac', 'Bc', 'Dc', 'Ec'} for p in adapters.values())
  assert any(float(np.abs(p['Bv']).max()) > 0 for p in adapters.values())  # drawn and trained
  with pytest.raises(CheckpointMismatchError, match='trainable_shapes'):
    loop.train_and_evaluate(tiny(**{'mesh.num_devices': 1, 'num_epochs': 1}), tmp_path, progress=False)
