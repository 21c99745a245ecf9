"""Tests for glora_jax.data.registry: one table of datasets by name (the two bundled ones
and every VTAB-1k task), each name's splits and classes, and an unknown name or a lazy
dataset refused with what is known."""
import pytest

from glora_jax import bundled
from glora_jax.data import registry, vtab


def test_one_name_per_dataset():
  assert registry.dataset_names() == ('bbc_news', 'mnist5k',
                                      *(f'vtab/{t}' for t in vtab.TASKS))
  assert len(vtab.TASKS) == 19
  assert registry.TEXT_DATASETS == ('bbc_news',)
  assert registry.BUNDLED_DATASETS == ('bbc_news', 'mnist5k')


def test_bbc_news_classes_are_the_corpus_folders():
  folders = sorted(p.name for p in bundled.bbc_news_dir().iterdir() if p.is_dir())
  assert registry.class_names('bbc_news') == tuple(folders)
  assert registry.num_classes('bbc_news') == 5
  assert registry.splits('bbc_news') == ('train', 'val', 'test', 'train_4shot', 'train_8shot',
                                         'train_16shot')


def test_mnist_and_vtab_classes():
  assert registry.class_names('mnist5k') == tuple(str(d) for d in range(10))
  assert registry.num_classes('mnist5k') == 10
  # Without the prepared data a VTAB task's classes are numbered.
  assert registry.class_names('vtab/dtd', '/nonexistent') == tuple(str(i) for i in range(47))
  assert registry.num_classes('vtab/cifar') == 100
  assert registry.splits('vtab/dtd') == ('train800', 'val200', 'train800val200', 'test')


def test_an_unknown_name_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown dataset 'bbc'; known datasets: bbc_news, mnist5k, "
                                       'vtab/'):
    registry.splits('bbc')


def test_a_lazy_dataset_has_no_arrays():
  with pytest.raises(ValueError, match="dataset 'vtab/dtd' is read lazily.*'bbc_news', 'mnist5k'"):
    registry.load_arrays('vtab/dtd', 'test')
