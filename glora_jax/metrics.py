"""Task metrics of (predictions, targets) over a whole eval split, on the host in numpy:
accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def _pair(preds, targets) -> tuple[np.ndarray, np.ndarray]:
  """preds and targets as flat arrays of one shape, non-empty and finite."""
  p, t = np.asarray(preds), np.asarray(targets)
  if p.shape != t.shape:
    raise ValueError(f'preds have shape {p.shape} but targets {t.shape}; expected the same shape')
  if p.size == 0:
    raise ValueError('no example to score; expected at least one prediction')
  for what, a in (('preds', p), ('targets', t)):
    if a.dtype.kind not in 'biuf':
      raise ValueError(f'{what} have dtype {a.dtype}; expected bools, ints or floats')
    if a.dtype.kind == 'f' and not np.isfinite(a).all():
      raise ValueError(f'{what} hold NaN or Inf; expected finite numbers')
  return p.ravel(), t.ravel()


def accuracy(preds, targets) -> float:
  """The share of examples whose prediction equals the target."""
  p, t = _pair(preds, targets)
  return float(np.mean(p == t))


def f1(preds, targets) -> float:
  """Binary F1 of the positive class 1, labels in {0, 1}: 2TP / (2TP + FP + FN), as
  sklearn's f1_score; 0.0 when nothing is predicted or labelled 1 (sklearn's default
  zero_division='warn' gives 0.0 there too, with a warning)."""
  p, t = _pair(preds, targets)
  for what, a in (('preds', p), ('targets', t)):
    if not np.isin(a, (0, 1)).all():
      raise ValueError(f'f1 {what} hold {np.setdiff1d(a, (0, 1))[:5].tolist()}; '
                       f'expected binary labels 0 and 1')
  p, t = p == 1, t == 1
  tp = np.sum(p & t)
  wrong = np.sum(p != t)  # FP + FN
  return 0.0 if tp + wrong == 0 else float(2 * tp / (2 * tp + wrong))


def matthews_corrcoef(preds, targets) -> float:
  """Multiclass Matthews correlation from the confusion matrix, as sklearn's:
  (c*s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2)(s^2 - sum_k t_k^2)), c the correct
  count, s the example count, p_k / t_k the predicted / true counts of class k; 0.0 when
  the denominator is 0 (all predictions or all targets one class)."""
  p, t = _pair(preds, targets)
  _, codes = np.unique(np.concatenate([p, t]), return_inverse=True)
  k = codes.max() + 1
  p_sum = np.bincount(codes[:p.size], minlength=k).astype(np.float64)
  t_sum = np.bincount(codes[p.size:], minlength=k).astype(np.float64)
  c = float(np.sum(p == t))
  s = float(p.size)
  cov_tp = c * s - np.dot(t_sum, p_sum)
  cov_pp = s ** 2 - np.dot(p_sum, p_sum)
  cov_tt = s ** 2 - np.dot(t_sum, t_sum)
  denom = cov_pp * cov_tt
  return 0.0 if denom == 0 else float(cov_tp / np.sqrt(denom))


def _corr(x: np.ndarray, y: np.ndarray) -> float:
  """Pearson's r of two flat arrays; 0.0 when either is constant (scipy gives NaN)."""
  x, y = x.astype(np.float64), y.astype(np.float64)
  if (x == x[0]).all() or (y == y[0]).all():
    return 0.0
  xm, ym = x - x.mean(), y - y.mean()
  r = np.dot(xm / np.linalg.norm(xm), ym / np.linalg.norm(ym))
  return float(np.clip(r, -1.0, 1.0))


def _rank(a: np.ndarray) -> np.ndarray:
  """Ranks from 1, ties given their average rank (scipy.stats.rankdata 'average')."""
  order = np.argsort(a, kind='mergesort')
  s = a[order]
  first = np.concatenate([[True], s[1:] != s[:-1]])
  dense = np.empty(a.size, np.int64)
  dense[order] = np.cumsum(first)
  starts = np.concatenate([np.flatnonzero(first), [a.size]])
  return 0.5 * (starts[dense] + starts[dense - 1] + 1)


def pearson(preds, targets) -> float:
  """Pearson correlation, as scipy.stats.pearsonr; 0.0 (not NaN) when a side is
  constant, so that a search fitness is always a number."""
  return _corr(*_pair(preds, targets))


def spearman(preds, targets) -> float:
  """Spearman correlation: Pearson of the ranks, ties averaged, as
  scipy.stats.spearmanr; 0.0 (not NaN) when a side is constant."""
  p, t = _pair(preds, targets)
  return _corr(_rank(p), _rank(t))


METRICS: dict[str, Callable[..., float]] = {
    'accuracy': accuracy,
    'f1': f1,
    'matthews_corrcoef': matthews_corrcoef,
    'pearson': pearson,
    'spearman': spearman,
}
HIGHER_IS_BETTER: dict[str, bool] = {name: True for name in METRICS}


def check_names(names: Sequence[str]) -> None:
  """Raises ValueError unless every name is a key of METRICS."""
  if isinstance(names, str):
    raise ValueError(f"metric names must be a sequence of names, got the string '{names}'; "
                     f"expected e.g. ['{names}']")
  unknown = [n for n in names if n not in METRICS]
  if unknown:
    raise ValueError(f'unknown metric {unknown}; known: {list(METRICS)}')


def compute(names: Sequence[str], preds, targets, weights=None) -> dict[str, float]:
  """Each named metric over the examples of weight > 0 (weights None: all of them; a
  padded eval batch gives its padding rows weight 0)."""
  check_names(names)
  p, t = np.asarray(preds), np.asarray(targets)
  if p.shape != t.shape:
    raise ValueError(f'preds have shape {p.shape} but targets {t.shape}; expected the same shape')
  if weights is None:
    keep = np.ones(p.shape, bool)
  else:
    w = np.asarray(weights)
    if w.shape != p.shape:
      raise ValueError(f'weights have shape {w.shape}; expected the shape of preds, {p.shape}')
    keep = w > 0
  if not keep.any():
    raise ValueError('no example has weight > 0; expected at least one to score')
  p, t = p[keep], t[keep]
  return {n: METRICS[n](p, t) for n in names}
