"""Tests for glora_jax.data.testing: a fake prepared dataset has the real builder's name,
version and features, the split sizes asked for, and is read by tfds.data_source exactly
as a real prepared one (found by prepared.find_prepared)."""
import numpy as np
import tensorflow_datasets as tfds

from glora_jax.data import prepared, testing


def test_fake_dtd_is_found_and_read_like_the_real_one(tmp_path):
  version_dir = testing.write_fake_prepared('dtd', tmp_path / 'a', {'train': 5, 'test': 3})
  real = tfds.builder_cls('dtd')
  assert version_dir == prepared.find_prepared(tmp_path / 'a', 'dtd', None, '*', '')
  assert version_dir.name == str(real.VERSION)
  train = prepared.open_data_source('dtd', 'train', tmp_path / 'a')
  test = prepared.open_data_source('dtd', 'test', tmp_path / 'a')
  assert (len(train), len(test)) == (5, 3)
  examples = [train[i] for i in range(5)]
  # tfds shuffles the examples as it writes them; the names are '<split>/<index>'.
  assert sorted(e['file_name'] for e in examples) == [f'train/{i:06d}'.encode() for i in range(5)]
  num_classes = 47  # DTD's texture classes
  for e in examples:
    assert e['image'].dtype == np.uint8 and e['image'].shape == (8, 8, 3)
    assert 0 <= e['label'] < num_classes

  again = testing.write_fake_prepared('dtd', tmp_path / 'b', {'train': 5, 'test': 3})
  other = testing.write_fake_prepared('dtd', tmp_path / 'c', {'train': 5, 'test': 3}, seed=1)
  def read_labels(d):
    source = prepared.open_data_source('dtd', 'train', tmp_path / d)
    return sorted((source[i]['file_name'], source[i]['label']) for i in range(5))

  labels = {d: read_labels(d) for d in 'abc'}
  assert labels['a'] == labels['b'] and labels['a'] != labels['c']
  assert (again.parent.parent, other.parent.parent) == (tmp_path / 'b', tmp_path / 'c')
