"""One name per dataset: which exist, their splits and classes, and how training reads a split.

Bundled datasets (bbc_news, mnist5k) are prepared on first use; 'vtab/<task>' ones must be prepared by the user.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from glora_jax import bundled
from glora_jax.data import bbc_news, mnist, prepared, text, vtab

VTAB_PREFIX = 'vtab/'
TEXT_DATASETS = (bbc_news.NAME,)
BUNDLED_DATASETS = (bbc_news.NAME, mnist.NAME)


def dataset_names() -> tuple[str, ...]:
  return BUNDLED_DATASETS + tuple(VTAB_PREFIX + task for task in vtab.TASKS)


def _check_name(name: str) -> None:
  if name not in dataset_names():
    raise ValueError(f"unknown dataset '{name}'; known datasets: {', '.join(dataset_names())}")


def _vtab_task(name: str) -> vtab.VtabTask | None:
  return vtab.TASKS[name[len(VTAB_PREFIX):]] if name.startswith(VTAB_PREFIX) else None


def splits(name: str) -> tuple[str, ...]:
  _check_name(name)
  if name == bbc_news.NAME:
    return bbc_news.SPLITS
  if name == mnist.NAME:
    return mnist.SPLITS
  return vtab.SPLITS


def num_classes(name: str) -> int:
  _check_name(name)
  if name == bbc_news.NAME:
    return len(bbc_news.class_names())
  if name == mnist.NAME:
    return len(mnist.CLASS_NAMES)
  return _vtab_task(name).num_classes


def class_names(name: str, data_dir: str | os.PathLike | None = None) -> tuple[str, ...]:
  """Label names in label order. VTAB names come from the prepared dataset's label file when the
  label is a tfds ClassLabel, otherwise (derived labels, or not prepared) they are '0', '1', ...
  """
  _check_name(name)
  if name == bbc_news.NAME:
    return bbc_news.class_names()
  if name == mnist.NAME:
    return mnist.CLASS_NAMES
  task = _vtab_task(name)
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


def load_source(name: str, split: str, data_dir: str | os.PathLike | None = None,
                download: bool = False):
  """A split as a random-access source of example dicts, read through tfds.data_source.

  bbc_news and mnist5k give tfds's raw examples and are prepared on first use. VTAB tasks give
  preprocessed {'image': (224, 224, 3) float32, 'label'} and must already be prepared in
  data_dir (a clear error says how otherwise), unless download=True.
  """
  _check_name(name)
  if name == bbc_news.NAME:
    return bbc_news.data_source(split, data_dir)
  if name == mnist.NAME:
    return mnist.data_source(split, data_dir)
  return vtab.load_split(_vtab_task(name), split, data_dir, download=download)


def load_arrays(name: str, split: str, data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """A whole split of a small bundled dataset as a dict of numpy arrays (see bbc_news/mnist.load_split)."""
  _check_name(name)
  if name == bbc_news.NAME:
    return bbc_news.load_split(split, data_dir)
  if name == mnist.NAME:
    return mnist.load_split(split, data_dir)
  raise ValueError(f"dataset '{name}' is read lazily (its images do not fit in memory at 224x224); "
                   f'use load_source, expected one of {list(BUNDLED_DATASETS)} here')


@functools.lru_cache(maxsize=32)
def _tokenized_split(name: str, split: str, tokenizer_path: str, max_len: int,
                     data_dir: str) -> dict[str, np.ndarray]:
  arrays = load_arrays(name, split, data_dir)
  batch = text.tokenize(arrays['text'], tokenizer_path, max_len)
  batch['label'] = arrays['label'].astype(np.int32)
  for value in batch.values():
    value.setflags(write=False)  # Shared by every caller through the cache.
  return batch


def load_text_classification(name: str = bbc_news.NAME, split: str = 'train',
                             tokenizer_path: str | os.PathLike | None = None,
                             max_len: int = text.DEFAULT_MAX_LEN,
                             data_dir: str | os.PathLike | None = None
                             ) -> tuple[dict[str, np.ndarray], dict]:
  """A text split tokenised once and kept in memory, with what a model head needs to know.

  Returns (arrays, metadata): arrays are input_ids, attention_mask, token_type_ids
  (n, max_len) int32 and label (n,) int32, in the split file's order (read-only, shared by
  the cache); metadata is {'name', 'split', 'num_classes', 'class_names', 'max_len'}.
  """
  _check_name(name)
  if name not in TEXT_DATASETS:
    raise ValueError(f"dataset '{name}' is not a text dataset; expected one of {list(TEXT_DATASETS)}")
  if split not in splits(name):
    raise ValueError(f"dataset '{name}' has no split '{split}'; expected one of {list(splits(name))}")
  # One cache entry per file, whether it was named or defaulted.
  path = os.fspath(bundled.minilm_tokenizer_path() if tokenizer_path is None else tokenizer_path)
  arrays = dict(_tokenized_split(name, split, path, int(max_len),
                                 os.fspath(prepared.resolve_data_dir(data_dir))))
  metadata = {'name': name, 'split': split, 'num_classes': num_classes(name),
              'class_names': class_names(name), 'max_len': int(max_len)}
  return arrays, metadata
