"""What a run writes beside its checkpoints: metrics.csv (kept across resumes), JSON
files written atomically, and the plots of training (curves.png) and search (search.png).
"""
from __future__ import annotations

import csv
import json
import pathlib

import numpy as np


class MetricsLog:
  """Appends rows to workdir/metrics.csv (kept across resumes). path None keeps
  the rows in memory only: in a run of several processes only the first writes."""
  FIELDS = ('step', 'epoch', 'train_loss', 'train_accuracy', 'lr', 'subnet_params',
            'examples_per_s', 'val_loss', 'val_accuracy', 'val_score')  # val_score: the headline metric

  def __init__(self, path: pathlib.Path | None, resume_step: int):
    self.path = path
    self.rows = []
    if path is None:
      return
    if path.exists():  # drop rows a killed run logged after its last checkpoint
      with open(path) as f:
        self.rows = [r for r in csv.DictReader(f) if int(r['step']) <= resume_step]
    with open(path, 'w', newline='') as f:
      w = csv.DictWriter(f, self.FIELDS)
      w.writeheader()
      w.writerows(self.rows)

  def add(self, **row):
    row = {k: row.get(k, '') for k in self.FIELDS}
    self.rows.append(row)
    if self.path is None:
      return
    with open(self.path, 'a', newline='') as f:
      csv.DictWriter(f, self.FIELDS).writerow(row)


def write_json(path, obj, indent: int | None = 1) -> None:
  """Atomic JSON write (temp file + rename); indent=None writes one line."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + '.tmp')
  tmp.write_text(json.dumps(obj, indent=indent, sort_keys=True, default=str))
  tmp.replace(path)


def _pyplot():
  # Imported when a plot is drawn, on the file-only Agg backend: runs are often
  # headless, with no display for an interactive backend to open.
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def _save(fig, path: pathlib.Path) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  _pyplot().close(fig)


def plot_curves(rows: list[dict], path: pathlib.Path, metric: str = 'accuracy') -> None:
  """Training loss and the validation metric (`metric` names it) against step, from MetricsLog rows."""
  plt = _pyplot()
  steps_ = [r['step'] for r in rows if r.get('train_loss') not in (None, '')]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
  axes[0].plot(steps_, [float(r['train_loss']) for r in rows if r.get('train_loss') not in (None, '')])
  axes[0].set(xlabel='step', ylabel='train loss', title='training loss')
  # The headline metric (val_score), or accuracy in a workdir written before val_score.
  key = 'val_score' if any(r.get('val_score') not in (None, '') for r in rows) else 'val_accuracy'
  ev = [r for r in rows if r.get(key) not in (None, '')]
  axes[1].plot([r['step'] for r in ev], [float(r[key]) for r in ev], 'o-')
  axes[1].set(xlabel='step', ylabel=metric, title=f'validation {metric}')
  _save(fig, path)


def plot_search(archive, front: np.ndarray, path: pathlib.Path) -> None:
  """A search's candidates (parameters vs val accuracy, the Pareto front marked) and
  its progress per generation. `archive` is a search.evolution.Archive."""
  plt = _pyplot()
  # Candidates scored on the whole eval split only (a race's first-heat losers have a
  # partial accuracy, not comparable).
  done = np.flatnonzero(archive.complete[:archive.size])
  acc, gen = archive.accuracy[done], archive.generation[done]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  sc = axes[0].scatter(archive.params[done] / 1e3, acc, c=gen, s=12, cmap='viridis')
  axes[0].plot(archive.params[front] / 1e3, archive.accuracy[front], 'r.-', label='Pareto front')
  axes[0].set(xlabel='adapter parameters (K)', ylabel='val accuracy', title='candidates')
  axes[0].legend(loc='lower right')
  fig.colorbar(sc, ax=axes[0], label='generation')
  gens = np.unique(gen)
  best_so_far = [acc[gen <= g].max() for g in gens]
  best_in_gen = [acc[gen == g].max() for g in gens]
  axes[1].plot(gens, best_so_far, 'o-', label='best so far')
  axes[1].plot(gens, best_in_gen, 's--', label='best of generation')
  axes[1].set(xlabel='generation', ylabel='val accuracy', title='progress')
  axes[1].legend()
  _save(fig, path)
