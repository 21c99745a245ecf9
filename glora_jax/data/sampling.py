"""Seeded, stratified subsets of a split: k examples per class (few-shot protocols) and a
validation share carved off a training split that comes without one.
"""
from __future__ import annotations

import numpy as np

from glora_jax.errors import DataError


def _members(labels: np.ndarray) -> dict[int, np.ndarray]:
  labels = np.asarray(labels)
  if labels.dtype.kind not in 'iu':
    raise DataError(f'stratified sampling needs class labels; got labels of dtype {labels.dtype} '
                    '(a regression target has no classes)')
  return {int(c): np.flatnonzero(labels == c) for c in np.unique(labels)}


def k_shot(labels: np.ndarray, shots: int, seed: int, num_classes: int | None = None) -> np.ndarray:
  """Indices of exactly `shots` examples of each class, in source order.

  Classes are visited in increasing label order with one generator,
  np.random.default_rng(seed), each drawing `shots` of its members without
  replacement: the same seed gives the same subset everywhere, another seed
  another one (GLoRA's few-shot protocol averages over seeds). With num_classes,
  every class 0..num_classes-1 must have `shots` examples; without, those present.
  """
  if shots < 1:
    raise DataError(f'data.shots is {shots}; expected k >= 1 examples per class (0: no sampling)')
  members = _members(labels)
  classes = range(num_classes) if num_classes else sorted(members)
  short = {c: len(members.get(c, ())) for c in classes if len(members.get(c, ())) < shots}
  if short:
    raise DataError(f'data.shots={shots} needs {shots} training examples of every class; classes '
                    f'{sorted(short)} have only {list(short.values())}')
  rng = np.random.default_rng(seed)
  chosen = [rng.choice(members[c], size=shots, replace=False) for c in classes]
  return np.sort(np.concatenate(chosen))


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(kept, carved) indices, each in source order: round(fraction x n_c) examples of
  each class c (at least one where the class has two or more) carved off, the
  rest kept. Labels that are not classes (regression) are carved uniformly."""
  if not 0.0 < fraction < 1.0:
    raise DataError(f'data.val_fraction is {fraction}; expected a share in (0, 1)')
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  if labels.dtype.kind not in 'iu':
    groups = [np.arange(len(labels))]
  else:
    groups = [m for _, m in sorted(_members(labels).items())]
  carved = []
  for group in groups:
    take = int(round(fraction * len(group)))
    take = min(max(take, 1 if len(group) > 1 else 0), len(group) - 1)
    carved.append(rng.choice(group, size=take, replace=False))
  carved = np.sort(np.concatenate(carved)).astype(np.int64)
  if carved.size == 0:
    raise DataError(f'data.val_fraction={fraction} of {len(labels)} training examples carves none; '
                    'expected a larger split or fraction')
  kept = np.setdiff1d(np.arange(len(labels)), carved)
  return kept, carved
