"""Tests for glora_jax.train.metrics: metrics.csv across a resume, atomic JSON, and the
two plots (PNG of the size their figure asks for, something drawn)."""
import csv
import json
import types

import numpy as np

from helpers import assert_png
from glora_jax.train import metrics


def read_csv(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def row(step, **kw):
  return dict({'step': step, 'epoch': 0, 'train_loss': 1.0 / step, 'lr': 1e-3}, **kw)


def as_written(r):
  """A row as csv gives it back: every field, as a string, '' where not given."""
  return {k: '' if r.get(k) is None else str(r[k]) for k in metrics.MetricsLog.FIELDS}


def test_rows_are_appended_and_a_resume_drops_those_after_its_checkpoint(tmp_path):
  path = tmp_path / 'metrics.csv'
  log = metrics.MetricsLog(path, resume_step=0)
  rows = [row(s, val_accuracy=0.5 if s == 4 else None) for s in range(1, 6)]
  for r in rows:
    log.add(**r)
  assert read_csv(path) == [as_written(r) for r in rows]
  assert path.read_text().splitlines()[0] == ','.join(metrics.MetricsLog.FIELDS)

  resumed = metrics.MetricsLog(path, resume_step=3)  # the run died after step 5, saved at 3
  assert read_csv(path) == [as_written(r) for r in rows[:3]] == resumed.rows
  resumed.add(**row(4))
  assert [int(r['step']) for r in read_csv(path)] == [1, 2, 3, 4]


def test_without_a_path_rows_stay_in_memory(tmp_path):
  log = metrics.MetricsLog(None, resume_step=0)
  log.add(**row(1))
  assert log.rows == [{k: row(1).get(k, '') for k in metrics.MetricsLog.FIELDS}]
  assert list(tmp_path.iterdir()) == []


def test_write_json_replaces_whole_files_sorted_and_leaves_no_temporary(tmp_path):
  path = tmp_path / 'summary.json'
  metrics.write_json(path, {'b': 1, 'a': [1, 2], 'p': tmp_path})
  assert json.loads(path.read_text()) == {'a': [1, 2], 'b': 1, 'p': str(tmp_path)}
  assert path.read_text().index('"a"') < path.read_text().index('"b"')
  metrics.write_json(path, {'c': 3}, indent=None)
  assert path.read_text() == '{"c": 3}'
  assert [p.name for p in tmp_path.iterdir()] == ['summary.json']


def test_plot_curves_draws_a_png_of_its_figure_size(tmp_path):
  rows = [as_written(row(s, val_accuracy=0.2 * s if s % 2 == 0 else None)) for s in range(1, 7)]
  metrics.plot_curves(rows, tmp_path / 'curves.png')
  assert_png(tmp_path / 'curves.png', 350, 1000)  # figsize (10, 3.5) at 100 dpi


def test_plot_search_draws_a_png_of_its_figure_size(tmp_path):
  rng = np.random.default_rng(0)
  n = 12
  archive = types.SimpleNamespace(
      size=n, params=np.concatenate([rng.integers(1000, 9000, n), np.zeros(4, int)]),
      accuracy=np.concatenate([rng.random(n), np.zeros(4)]),
      generation=np.concatenate([np.repeat([0, 1, 2], 4), np.zeros(4, int)]),
      complete=np.concatenate([np.ones(n, bool), np.zeros(4, bool)]))
  metrics.plot_search(archive, np.array([0, 3, 7]), tmp_path / 'search.png')
  assert_png(tmp_path / 'search.png', 380, 1000)  # figsize (10, 3.8) at 100 dpi
