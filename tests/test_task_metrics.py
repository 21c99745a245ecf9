"""Tests for glora_jax.metrics: each task metric against sklearn.metrics / scipy.stats and
values worked out by hand, weights, degenerate inputs and the errors."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from glora_jax import metrics


@pytest.fixture
def skm():
  return pytest.importorskip('sklearn.metrics')


@pytest.fixture
def stats():
  return pytest.importorskip('scipy.stats')


def quiet(fn, *args):
  """fn(*args) with the warnings of ill-defined cases (zero division, constant input)
  silenced: those are the cases where the references differ from us on purpose."""
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    return fn(*args)


# Binary labels: TP=2, FN=1, FP=1, TN=4 (targets first as sklearn takes them).
T2 = np.array([1, 1, 1, 0, 0, 0, 0, 0])
P2 = np.array([1, 1, 0, 1, 0, 0, 0, 0])
CLASSES = [  # (preds, targets): multiclass, imbalanced, a class only predicted
    (np.array([0, 2, 1, 2, 0, 1, 1, 2, 2, 0]), np.array([0, 1, 1, 2, 0, 2, 1, 2, 0, 0])),
    (np.array([0, 0, 0, 0, 0, 0, 0, 1, 0, 0]), np.array([0, 0, 0, 0, 0, 0, 1, 1, 0, 0])),
    (np.array([3, 0, 1, 1, 0]), np.array([0, 0, 1, 1, 2])),
]
BINARY = [
    (P2, T2),
    (np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 0]), np.array([1, 1, 1, 0, 0, 0, 0, 0, 0, 0])),
    (np.array([1, 1, 1, 1, 1, 1, 0, 1]), np.array([0, 0, 0, 0, 0, 1, 0, 0])),
    (np.array([0, 1, 0, 1]), np.array([1, 0, 1, 0])),
]
REAL = [  # (preds, targets), with ties on either side
    (np.array([1.0, 2.0, 2.0, 3.0, 5.0, 4.0]), np.array([0.5, 0.5, 2.0, 1.0, 3.0, 3.0])),
    (np.array([3, 1, 4, 1, 5, 9, 2, 6]), np.array([2, 7, 1, 8, 2, 8, 1, 8])),
    (np.array([0.1, 0.2, 0.3, 0.4]), np.array([4.0, 3.0, 2.0, 1.0])),
]


def test_worked_by_hand():
  # TP=2 FN=1 FP=1 TN=4: MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
  #   = (8 - 1) / sqrt(3*3*5*5) = 7/15; F1 = 2TP / (2TP + FP + FN) = 4/6; accuracy 6/8.
  assert metrics.matthews_corrcoef(P2, T2) == pytest.approx(7 / 15, abs=1e-12)
  assert metrics.f1(P2, T2) == pytest.approx(2 / 3, abs=1e-12)
  assert metrics.accuracy(P2, T2) == 0.75
  # x - mean = (-1, 0, 1), y - mean = (-7, -1, 8)/3: r = (15/3) / sqrt(2 * 114/9) = 15/sqrt(228).
  assert metrics.pearson([1, 2, 3], [2, 4, 7]) == pytest.approx(15 / np.sqrt(228), abs=1e-12)
  # ranks (1, 2.5, 2.5, 4) and (1, 2, 3, 4): centred dot 4.5, squares 4.5 and 5: r = sqrt(0.9).
  assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(np.sqrt(0.9), abs=1e-12)
  # Three classes, s=6, c=3; p=(2,2,2), t=(3,2,1), sum p_k t_k = 12:
  #   (3*6 - 12) / sqrt((36 - 12)(36 - 14)) = 6/sqrt(528).
  assert metrics.matthews_corrcoef([0, 0, 1, 1, 2, 2], [0, 0, 1, 2, 1, 0]) == pytest.approx(
      6 / np.sqrt(528), abs=1e-12)


@pytest.mark.parametrize('p,t', CLASSES + BINARY)
def test_accuracy_and_mcc_match_sklearn(skm, p, t):
  assert metrics.accuracy(p, t) == pytest.approx(skm.accuracy_score(t, p), abs=1e-12)
  assert metrics.matthews_corrcoef(p, t) == pytest.approx(skm.matthews_corrcoef(t, p), abs=1e-12)


@pytest.mark.parametrize('p,t', BINARY)
def test_f1_matches_sklearn(skm, p, t):
  assert metrics.f1(p, t) == pytest.approx(skm.f1_score(t, p), abs=1e-12)


@pytest.mark.parametrize('p,t', REAL)
def test_correlations_match_scipy(stats, p, t):
  assert metrics.pearson(p, t) == pytest.approx(stats.pearsonr(p, t)[0], abs=1e-12)
  assert metrics.spearman(p, t) == pytest.approx(stats.spearmanr(p, t)[0], abs=1e-12)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_random_cases_match_the_references(skm, stats, seed):
  rng = np.random.default_rng(seed)
  n = 200
  t = rng.integers(0, 4, n)
  p = np.where(rng.random(n) < 0.6, t, rng.integers(0, 4, n))
  assert metrics.accuracy(p, t) == pytest.approx(skm.accuracy_score(t, p), abs=1e-12)
  assert metrics.matthews_corrcoef(p, t) == pytest.approx(skm.matthews_corrcoef(t, p), abs=1e-12)
  tb, pb = t % 2, p % 2
  assert metrics.f1(pb, tb) == pytest.approx(skm.f1_score(tb, pb), abs=1e-12)
  y = rng.integers(0, 6, n) / 5  # STS-B-like scores on a grid: many ties
  x = y + rng.normal(0, 0.3, n)
  x[:20] = np.round(x[:20], 1)
  assert metrics.pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
  assert metrics.spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_degenerate_cases(skm, stats):
  zeros, ones = np.zeros(6, int), np.ones(6, int)
  mixed = np.array([0, 1, 1, 0, 1, 0])
  # sklearn defines these: MCC 0.0 when one side is a single class; F1 0.0 with no TP.
  for p, t in [(zeros, mixed), (mixed, ones), (ones, ones), (zeros, zeros)]:
    assert metrics.matthews_corrcoef(p, t) == quiet(skm.matthews_corrcoef, t, p) == 0.0
  for p, t in [(zeros, mixed), (ones, zeros), (zeros, zeros)]:  # last: zero_division
    assert metrics.f1(p, t) == quiet(skm.f1_score, t, p) == 0.0
  assert metrics.f1(ones, ones) == skm.f1_score(ones, ones) == 1.0
  # scipy gives NaN for a constant side; we give 0.0 (a search fitness must be a number).
  x = np.array([0.1, 0.1, 0.1, 0.1])  # its float mean is not exactly 0.1
  y = np.array([1.0, 2.0, 3.0, 4.0])
  for p, t in [(x, y), (y, x), (x, x)]:
    assert np.isnan(quiet(stats.pearsonr, p, t)[0])
    assert metrics.pearson(p, t) == 0.0
    assert metrics.spearman(p, t) == 0.0
  assert metrics.pearson([3.0], [2.0]) == metrics.spearman([3.0], [2.0]) == 0.0


def test_ints_floats_and_bools_give_python_floats():
  b = np.array([True, False, True, True])
  i = np.array([1, 0, 0, 1])
  for fn in metrics.METRICS.values():
    for p, t in [(b, i), (i, i.astype(np.float32)), (b.tolist(), i.tolist())]:
      assert type(fn(p, t)) is float
  assert metrics.accuracy(b, i) == 0.75
  assert metrics.f1(b, i) == metrics.f1(b.astype(float), i) == pytest.approx(0.8)
  assert metrics.pearson(b, i) == pytest.approx(metrics.pearson(b.astype(float), i))


def test_names():
  names = ['accuracy', 'f1', 'matthews_corrcoef', 'pearson', 'spearman']
  assert list(metrics.METRICS) == names
  assert metrics.HIGHER_IS_BETTER == dict.fromkeys(names, True)
  metrics.check_names(names)
  metrics.check_names([])
  with pytest.raises(ValueError, match=r"unknown metric \['mcc'\]; known: .*'spearman'"):
    metrics.check_names(['accuracy', 'mcc'])
  with pytest.raises(ValueError, match='string'):
    metrics.check_names('accuracy')


def test_compute_keeps_the_rows_of_positive_weight(skm):
  p, t = CLASSES[0]
  w = np.array([1, 1, 0, 1, 1, 0, 1, 1, 0, 0])
  got = metrics.compute(['accuracy', 'matthews_corrcoef'], p, t, w)
  keep = w > 0
  assert got == {'accuracy': metrics.accuracy(p[keep], t[keep]),
                 'matthews_corrcoef': metrics.matthews_corrcoef(p[keep], t[keep])}
  assert got['accuracy'] == pytest.approx(skm.accuracy_score(t, p, sample_weight=w))
  assert got['matthews_corrcoef'] == pytest.approx(skm.matthews_corrcoef(t, p, sample_weight=w))
  assert metrics.compute(['accuracy'], p, t) == {'accuracy': metrics.accuracy(p, t)}
  # Padding rows may hold anything, NaN included: they are dropped before scoring.
  x = np.array([1.0, 2.0, 4.0, np.nan])
  y = np.array([1.0, 3.0, 2.0, 0.0])
  got = metrics.compute(['pearson', 'spearman'], x, y, np.array([1.0, 1.0, 1.0, 0.0]))
  assert got['pearson'] == metrics.pearson(x[:3], y[:3])
  assert got['spearman'] == pytest.approx(0.5, abs=1e-12)  # ranks (1,2,3) and (1,3,2)
  assert metrics.compute([], p, t) == {}


def test_errors():
  p, t = CLASSES[0]
  with pytest.raises(ValueError, match=r"unknown metric \['auc'\]; known: "):
    metrics.compute(['accuracy', 'auc'], p, t)
  with pytest.raises(ValueError, match=r'shape \(10,\) but targets \(9,\)'):
    metrics.compute(['accuracy'], p, t[:9])
  with pytest.raises(ValueError, match=r'shape \(3,\) but targets \(4,\)'):
    metrics.pearson([1, 2, 3], [1, 2, 3, 4])
  with pytest.raises(ValueError, match=r'weights have shape \(9,\)'):
    metrics.compute(['accuracy'], p, t, np.ones(9))
  with pytest.raises(ValueError, match='no example has weight > 0'):
    metrics.compute(['accuracy'], p, t, np.zeros(10))
  with pytest.raises(ValueError, match='no example to score'):
    metrics.accuracy([], [])
  with pytest.raises(ValueError, match='expected binary labels 0 and 1'):
    metrics.f1(p, t)
  with pytest.raises(ValueError, match='NaN or Inf'):
    metrics.pearson([1.0, np.nan], [1.0, 2.0])
  with pytest.raises(ValueError, match='expected bools, ints or floats'):
    metrics.accuracy(['a', 'b'], ['a', 'b'])
