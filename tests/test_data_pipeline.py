"""Tests of the batch iterator: seeded order, resume from saved state, evaluation coverage, host slices.

Pure numpy sources, so every test runs in milliseconds.
"""
import itertools
import json

import numpy as np
import pytest

from glora_jax.data import pipeline

HOST = dict(process_index=0, process_count=1)


def columns(n):
  return {'x': np.arange(n, dtype=np.int32) * 10, 'y': np.arange(n, dtype=np.float32)}


def take(iterator, count):
  return [dict(batch) for batch in itertools.islice(iterator, count)]


def assert_same_batches(first, second):
  assert len(first) == len(second)
  for a, b in zip(first, second):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_order_is_one_generator_one_permutation_per_epoch():
  n, seed = 10, 3
  it = pipeline.train_iterator(columns(n), 10, seed=seed, num_epochs=3, **HOST)
  rng = np.random.default_rng(seed)
  for batch in it:
    np.testing.assert_array_equal(batch['x'], rng.permutation(n) * 10)


def test_same_seed_same_batches_other_seed_other_batches():
  make = lambda seed: take(pipeline.train_iterator(columns(50), 8, seed=seed, **HOST), 20)
  assert_same_batches(make(0), make(0))
  assert not np.array_equal(make(0)[0]['x'], make(1)[0]['x'])


@pytest.mark.parametrize('drop_remainder', [False, True])
@pytest.mark.parametrize('stop_after', [0, 2, 4, 6, 7, 13])
def test_resume_from_saved_state_continues_identically(drop_remainder, stop_after):
  make = lambda state=None: pipeline.train_iterator(
      columns(29), 8, seed=5, num_epochs=4, drop_remainder=drop_remainder, state=state, **HOST)
  reference = list(make())
  interrupted = make()
  head = take(interrupted, stop_after)
  saved = json.loads(json.dumps(interrupted.state))  # What a checkpoint stores.
  assert set(saved) == {'epoch', 'position', 'seed'} and all(isinstance(v, int) for v in saved.values())
  assert_same_batches(head + list(make(saved)), reference)
  resumed = make()
  resumed.restore(saved)
  assert_same_batches(head + list(resumed), reference)


def test_partial_last_batch_is_kept_by_default_and_can_be_dropped():
  kept = list(pipeline.train_iterator(columns(20), 8, seed=0, num_epochs=1, **HOST))
  assert [len(b['x']) for b in kept] == [8, 8, 4]
  assert sorted(np.concatenate([b['x'] for b in kept]).tolist()) == list(range(0, 200, 10))
  dropped = list(pipeline.train_iterator(columns(20), 8, seed=0, num_epochs=2, drop_remainder=True, **HOST))
  assert [len(b['x']) for b in dropped] == [8, 8, 8, 8]
  assert all(b['mask'].all() for b in kept + dropped)


@pytest.mark.parametrize('n, batch_size', [(10, 5), (11, 5), (3, 8), (1225, 32), (7, 1)])
def test_eval_covers_every_example_exactly_once(n, batch_size):
  batches = list(pipeline.eval_iterator(columns(n), batch_size, **HOST))
  assert len(batches) == -(-n // batch_size)
  assert all(len(b['x']) == batch_size for b in batches)  # Static shapes for jit.
  seen = np.concatenate([b['x'][b['mask'] > 0] for b in batches])
  assert all(b['mask'].dtype == np.float32 for b in batches)
  np.testing.assert_array_equal(seen, np.arange(n) * 10)


def test_hosts_split_each_global_batch():
  source = columns(37)
  single = list(pipeline.train_iterator(source, 8, seed=2, num_epochs=2, pad_remainder=True, **HOST))
  per_host = [list(pipeline.train_iterator(source, 8, seed=2, num_epochs=2, pad_remainder=True,
                                           process_index=i, process_count=4)) for i in range(4)]
  assert all(len(batches) == len(single) for batches in per_host)
  for step, batch in enumerate(single):
    for key in ('x', 'mask'):
      np.testing.assert_array_equal(np.concatenate([host[step][key] for host in per_host]), batch[key])
  with pytest.raises(ValueError, match='hosts'):
    pipeline.train_iterator(source, 8, seed=0, process_index=0, process_count=3)
  with pytest.raises(ValueError, match='pad_remainder'):
    pipeline.train_iterator(source, 8, seed=0, process_index=0, process_count=2)  # Last batch: 5.


def test_sequence_of_examples_source():
  class Source:  # Like a tfds data source: len, [i], and batched __getitems__.
    def __init__(self):
      self.batched_reads = 0

    def __len__(self):
      return 6

    def __getitem__(self, i):
      return {'image': np.full((2, 2), i, np.uint8), 'label': i % 3}

    def __getitems__(self, indices):
      self.batched_reads += 1
      return [self[i] for i in indices]

  source = Source()
  batches = list(pipeline.eval_iterator(source, 4, transform=lambda b: {**b, 'label': b['label'] + 100}, **HOST))
  assert source.batched_reads == 2
  assert batches[0]['image'].shape == (4, 2, 2) and batches[0]['label'].tolist() == [100, 101, 102, 100]
  assert batches[1]['mask'].tolist() == [1, 1, 0, 0]


def test_invalid_arguments_are_named():
  with pytest.raises(ValueError, match='fewer than batch_size'):
    pipeline.train_iterator(columns(5), 8, seed=0, drop_remainder=True, **HOST)
  with pytest.raises(ValueError, match='common length'):
    pipeline.eval_iterator({'a': np.zeros(3), 'b': np.zeros(4)}, 2, **HOST)
  with pytest.raises(ValueError, match='lacks'):
    pipeline.train_iterator(columns(10), 2, seed=0, state={'epoch': 0}, **HOST)
  with pytest.raises(ValueError, match='batch boundary'):
    pipeline.train_iterator(columns(10), 4, seed=0, state={'epoch': 0, 'position': 3, 'seed': 0}, **HOST)
