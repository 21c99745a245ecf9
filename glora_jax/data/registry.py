"""One name per dataset: which exist, their splits and classes, and how training reads a split.

Bundled datasets (bbc_news, mnist5k) are prepared on first use; 'vtab/<task>' ones must be prepared by the user.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import numpy as np

from glora_jax.data import bbc_news, mnist, prepared, vtab

VTAB_PREFIX = 'vtab/'


@dataclasses.dataclass(frozen=True)
class Dataset:
  """What the registry knows of one dataset; each public function below reads one field."""

  splits: tuple[str, ...]
  num_classes: Callable[[], int]
  class_names: Callable[[str | os.PathLike | None], tuple[str, ...]]  # (data_dir)
  load_source: Callable[..., Any]  # (split, data_dir, download) -> random-access source
  # (split, data_dir) -> the whole split as numpy arrays; None: read lazily only.
  load_arrays: Callable[..., dict[str, np.ndarray]] | None = None
  text: bool = False


def _vtab_class_names(task: vtab.VtabTask, data_dir: str | os.PathLike | None) -> tuple[str, ...]:
  fallback = tuple(str(i) for i in range(task.num_classes))
  if task.label_fn is not None:
    return fallback
  data_dir = prepared.resolve_data_dir(data_dir)
  versions = [v for v in prepared.prepared_versions(data_dir, task.tfds_name, task.config)
              if prepared.version_matches(v, task.version)]
  if not versions:
    return fallback
  labels_file = prepared.dataset_dir(data_dir, task.tfds_name, task.config) / versions[-1] / f'{task.label_key}.labels.txt'
  if not labels_file.is_file():
    return fallback
  names = tuple(labels_file.read_text(encoding='utf-8').splitlines())
  return names if len(names) == task.num_classes else fallback


def _vtab_dataset(task: vtab.VtabTask) -> Dataset:
  return Dataset(
      splits=vtab.SPLITS,
      num_classes=lambda: task.num_classes,
      class_names=functools.partial(_vtab_class_names, task),
      load_source=lambda split, data_dir, download: vtab.load_split(
          task, split, data_dir, download=download))


DATASETS: dict[str, Dataset] = {
    bbc_news.NAME: Dataset(
        splits=bbc_news.SPLITS,
        num_classes=lambda: len(bbc_news.class_names()),
        class_names=lambda data_dir: bbc_news.class_names(),
        load_source=lambda split, data_dir, download: bbc_news.data_source(split, data_dir),
        load_arrays=bbc_news.load_split,
        text=True),
    mnist.NAME: Dataset(
        splits=mnist.SPLITS,
        num_classes=lambda: len(mnist.CLASS_NAMES),
        class_names=lambda data_dir: mnist.CLASS_NAMES,
        load_source=lambda split, data_dir, download: mnist.data_source(split, data_dir),
        load_arrays=mnist.load_split),
    **{VTAB_PREFIX + name: _vtab_dataset(task) for name, task in vtab.TASKS.items()},
}
TEXT_DATASETS = tuple(name for name, d in DATASETS.items() if d.text)
BUNDLED_DATASETS = tuple(name for name, d in DATASETS.items() if d.load_arrays is not None)


def dataset_names() -> tuple[str, ...]:
  return tuple(DATASETS)


def _dataset(name: str) -> Dataset:
  if name not in DATASETS:
    raise ValueError(f"unknown dataset '{name}'; known datasets: {', '.join(dataset_names())}")
  return DATASETS[name]


def splits(name: str) -> tuple[str, ...]:
  return _dataset(name).splits


def num_classes(name: str) -> int:
  return _dataset(name).num_classes()


def class_names(name: str, data_dir: str | os.PathLike | None = None) -> tuple[str, ...]:
  """Label names in label order. VTAB names come from the prepared dataset's label file when the
  label is a tfds ClassLabel, otherwise (derived labels, or not prepared) they are '0', '1', ...
  """
  return _dataset(name).class_names(data_dir)


def load_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
                download: bool = False):
  """A split as a random-access source of example dicts, read through tfds.data_source.

  bbc_news and mnist5k give tfds's raw examples and are prepared on first use. VTAB tasks give
  preprocessed {'image': (224, 224, 3) float32, 'label'} and must already be prepared in
  data_dir (a clear error says how otherwise), unless download=True.
  """
  return _dataset(name).load_source(split, data_dir, download)


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """A whole split of a small bundled dataset as a dict of numpy arrays (see bbc_news/mnist.load_split)."""
  dataset = _dataset(name)
  if dataset.load_arrays is None:
    raise ValueError(f"dataset '{name}' is read lazily (its images do not fit in memory at 224x224); "
                     f'use load_source, expected one of {list(BUNDLED_DATASETS)} here')
  return dataset.load_arrays(split, data_dir)
