"""paths: '/'-joined leaf names, flatten and unflatten as inverses, and the natural
order that puts layer_2 before layer_10."""
import jax
import numpy as np

from glora_jax.paths import flatten, key_name, natural_key, unflatten


def nested():
  return {'encoder': {'layer_10': {'kernel': np.ones((2, 3)), 'bias': np.zeros(3)},
                      'layer_2': {'kernel': np.full((3, 2), 2.0)}},
          'head': {'kernel': np.arange(4.0)}}


def test_flatten_names_every_leaf_by_its_path():
  flat = flatten(nested())
  assert sorted(flat) == ['encoder/layer_10/bias', 'encoder/layer_10/kernel',
                          'encoder/layer_2/kernel', 'head/kernel']
  np.testing.assert_array_equal(flat['encoder/layer_2/kernel'], np.full((3, 2), 2.0))
  np.testing.assert_array_equal(flat['head/kernel'], [0.0, 1.0, 2.0, 3.0])


def test_unflatten_inverts_flatten_and_back():
  tree = nested()
  again = unflatten(flatten(tree))
  assert again.keys() == tree.keys()
  assert again['encoder'].keys() == tree['encoder'].keys()
  for path, leaf in flatten(tree).items():
    assert flatten(again)[path] is leaf  # the same arrays, not copies
  flat = {'a/b/c': 1, 'a/d': 2, 'e': 3}
  assert unflatten(flat) == {'a': {'b': {'c': 1}, 'd': 2}, 'e': 3}
  assert flatten(unflatten(flat)) == flat


def test_sequence_entries_are_named_by_index():
  flat = flatten({'blocks': [np.zeros(1), {'w': np.ones(1)}]})
  assert list(flat) == ['blocks/0', 'blocks/1/w']


def test_key_name_reads_dict_attribute_and_index_keys():
  assert key_name(jax.tree_util.DictKey('query')) == 'query'
  assert key_name(jax.tree_util.GetAttrKey('kernel')) == 'kernel'
  assert key_name(jax.tree_util.SequenceKey(3)) == '3'


def test_natural_key_orders_numbers_by_value():
  paths = ['layer_10/kernel', 'layer_2/kernel', 'layer_1/kernel', 'head/kernel', 'layer_2/bias']
  assert sorted(paths, key=natural_key) == [
      'head/kernel', 'layer_1/kernel', 'layer_2/bias', 'layer_2/kernel', 'layer_10/kernel']
  # Plain string order would put layer_10 first.
  assert sorted(paths)[1] == 'layer_1/kernel' and sorted(paths)[2] == 'layer_10/kernel'
  assert natural_key('encoder/layer_12/fc3') == ['encoder/layer_', 12, '/fc', 3, '']
