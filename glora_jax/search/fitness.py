"""Fitness of many subnets at once: the task's headline metric on the validation split
(accuracy, next-token accuracy, GLUE's F1 / MCC / Pearson) with inherited supernet weights,
jax.vmap over a chunk of candidates, compiled once.

The chunk (candidates per vmapped call) is a backend's trade: on this 2-core CPU one
at a time is fastest, on an accelerator a larger chunk fills the device. `chunk=None`
measures it at start-up (`probe_chunk`). Racing (`race`) scores every candidate on the
first part of the eval split and only the better half on the rest.
"""
from __future__ import annotations

import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from glora_jax import data
from glora_jax.search.evolution import RANKS
from glora_jax.train import sharding, steps

PROBE_CHUNKS = (1, 8)  # times the data-parallel size: the chunks `probe_chunk` tries


def make_chunk_evaluator(task: steps.ForwardLoss, spec, mesh, frozen_shardings, chunk: int,
                         predictions=None):
  """f(trainable, frozen, batch, subnets (chunk, L, S)) -> (chunk, 3) sums of
  (loss, examples, correct), and with `predictions` (a task's) also each candidate's
  per-example predictions (chunk, batch). The candidate axis is split over the
  'data' mesh axis when it divides evenly (each device evaluates its own candidates)."""
  eval_step = steps.make_eval_step(task, spec, predictions)

  def evaluate_chunk(trainable, frozen, batch, subnets):
    return jax.vmap(lambda s: eval_step(trainable, frozen, batch, s))(subnets)

  rep = sharding.replicated(mesh)
  cand_axis = 'data' if chunk % mesh.shape['data'] == 0 else None
  cand_sh = NamedSharding(mesh, P(cand_axis))
  return jax.jit(evaluate_chunk, in_shardings=(rep, frozen_shardings, rep, cand_sh),
                 out_shardings=cand_sh)


class Scores(NamedTuple):
  """A Fitness call's result, one entry per candidate. accuracy: the task's headline
  metric, correct / count of its sums or (a scored task, as GLUE's) its metric of the
  predictions (higher is better); complete: scored on the whole eval split (False
  only for a race's heat losers); loss: the task's mean loss over the same examples
  (the search's tie-break with SearchConfig.tie_break='loss')."""
  accuracy: np.ndarray
  complete: np.ndarray
  loss: np.ndarray


class Fitness:
  """Callable: (n, L, S) int32 candidates -> Scores (accuracy, complete, loss) on
  `arrays`: accuracy is the task's headline metric, correct / count of its loss sums
  (top-1 accuracy for a classifier) or model_data's headline of them (a causal LM's
  token_log_likelihood or next_token_accuracy over its target tokens).

  Candidates are padded to whole chunks (padding repeats the first candidate and
  is discarded), so every call runs the same compiled function.

  chunk: candidates per vmapped call; None measures the fastest of PROBE_CHUNKS
  (times the mesh's data size) on the first eval batch (`probe`, logged).

  race: 0 scores every candidate on the whole split (complete is all True). In
  (0, 1), a first heat scores all candidates on the first ceil(race x batches)
  eval batches; the better half (ties to the earlier candidate) go on to the rest
  and get their whole-split accuracy; the others keep their heat accuracy and
  complete=False (the search ranks them after every complete candidate).
  rank_by: what "better" means in the heat: 'accuracy' (higher) or 'loss' (lower
  mean loss), SearchConfig.rank_by.

  model_data: the task (train.tasks.ModelAndData); a scored one is ranked by its
  headline metric of the candidates' predictions (`accuracy` holds it)."""

  def __init__(self, task, spec, mesh, trainable, frozen, frozen_shardings, arrays,
               chunk: int | None = 8, batch_size: int = 32, race: float = 0.0,
               rank_by: str = 'accuracy', log=lambda msg: None, model_data=None):
    if not 0.0 <= race < 1.0:
      raise ValueError(f'race must be in [0, 1) (the share of the eval split in the first '
                       f'heat; 0 = off), got {race}')
    if rank_by not in RANKS:
      raise ValueError(f"rank_by '{rank_by}' is unknown; allowed: {list(RANKS)}")
    self.trainable, self.frozen = trainable, frozen
    self.batch_size, self.race, self.rank_by = batch_size, race, rank_by
    # Evaluation batches are fixed: build (and transfer) them once.
    host_batches = list(data.eval_iterator(arrays, batch_size))
    self.batches = [jax.device_put(b, sharding.replicated(mesh)) for b in host_batches]
    # A scored task (model_data.scored: F1, MCC, correlations) is scored from each
    # candidate's predictions and the labels of the real rows, on the host; another
    # (a causal LM) by its headline of the loss sums.
    self.model_data = model_data
    self.scored = model_data is not None and model_data.scored
    predictions = None
    if self.scored:
      predictions = self.model_data.predictions
      self.real = [np.asarray(b['mask']) > 0 for b in host_batches]
      self.targets = [np.asarray(b['label'])[r] for b, r in zip(host_batches, self.real)]
    self.heat = (max(1, min(len(self.batches) - 1, math.ceil(race * len(self.batches))))
                 if race and len(self.batches) > 1 else len(self.batches))
    make = lambda c: make_chunk_evaluator(task, spec, mesh, frozen_shardings, c, predictions)
    self.probe = None
    if chunk is None:  # the probe's compiled evaluator of the chosen chunk is kept
      chunk, self.fn, self.probe = probe_chunk(
          make, [c * mesh.shape['data'] for c in PROBE_CHUNKS], trainable, frozen,
          self.batches[0], spec)
      log('search chunk probe (s per candidate on one eval batch): ' +
          ', '.join(f'{c}: {t:.3f}' for c, t in self.probe.items()) + f'; chunk {chunk}')
    elif chunk <= 0:
      raise ValueError(f'chunk must be > 0 (or None to measure it), got {chunk}')
    else:
      self.fn = make(chunk)
    self.chunk = chunk
    self.evaluated = 0  # candidates scored
    self.batch_evaluations = 0  # candidate x eval-batch forwards run

  def sums(self, cands, batches) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, 3) sums of (loss, count, correct) of each candidate over the eval batches
    numbered `batches`, and (scored tasks) its predictions on their real rows, in
    order (n, rows); None otherwise."""
    cands = np.asarray(cands, np.int32)
    n = len(cands)
    pad = (-n) % self.chunk
    if pad:
      cands = np.concatenate([cands, np.repeat(cands[:1], pad, axis=0)])
    sums, preds = [], []
    for start in range(0, len(cands), self.chunk):
      sub = jnp.asarray(cands[start:start + self.chunk])
      outs = jax.device_get([self.fn(self.trainable, self.frozen, self.batches[i], sub)
                             for i in batches])
      if not self.scored:
        sums.append(np.sum(np.asarray(outs, np.float64), axis=0))
      else:
        sums.append(np.sum(np.asarray([o[0] for o in outs], np.float64), axis=0))
        preds.append(np.concatenate([np.asarray(o[1])[:, self.real[i]]
                                     for o, i in zip(outs, batches)], axis=1))
    self.batch_evaluations += n * len(batches)
    return (np.concatenate(sums)[:n],
            np.concatenate(preds)[:n] if self.scored else None)

  def _scores(self, sums: np.ndarray, preds, batches, complete) -> Scores:
    """Scores of candidates' sums (and predictions) over the batches numbered `batches`."""
    if not self.scored:
      return _scores(sums, complete, self.model_data)
    targets = np.concatenate([self.targets[i] for i in batches])
    fitness = np.array([_headline(self.model_data, s, p, targets) for s, p in zip(sums, preds)])
    return Scores(fitness, complete, sums[:, 0] / np.maximum(sums[:, 1], 1))

  def __call__(self, cands) -> Scores:
    cands = np.asarray(cands, np.int32)
    n = len(cands)
    self.evaluated += n
    every = list(range(len(self.batches)))
    if self.heat == len(self.batches) or n < 2:
      return self._scores(*self.sums(cands, every), every, np.ones(n, bool))
    first, rest = every[:self.heat], every[self.heat:]
    totals, preds = self.sums(cands, first)
    heat = self._scores(totals, preds, first, None)
    worse = -heat.accuracy if self.rank_by == 'accuracy' else heat.loss
    survivors = np.argsort(worse, kind='stable')[:math.ceil(n / 2)]
    more, more_preds = self.sums(cands[survivors], rest)
    totals[survivors] += more
    complete = np.zeros(n, bool)
    complete[survivors] = True
    if not self.scored:
      return _scores(totals, complete, self.model_data)
    fitness = heat.accuracy.copy()
    whole = self._scores(totals[survivors], np.concatenate([preds[survivors], more_preds], 1),
                         every, None)
    fitness[survivors] = whole.accuracy
    return Scores(fitness, complete, totals[:, 0] / np.maximum(totals[:, 1], 1))


def _headline(model_data, sums, preds, targets) -> float:
  """A scored task's headline metric of one candidate; -inf when it cannot be scored
  (a diverged candidate's NaN predictions), so the search ranks it last."""
  try:
    return model_data.score(sums, preds, targets)[model_data.metric]
  except ValueError:
    return -math.inf


def _scores(sums: np.ndarray, complete, model_data=None) -> Scores:
  """Scores of (n, 3) sums of (loss, count, correct): the headline metric of
  model_data.score (a causal LM's), else correct / count."""
  count = np.maximum(sums[:, 1], 1)
  if model_data is None:
    fitness = sums[:, 2] / count
  else:
    fitness = np.array([model_data.score(s)[model_data.metric] for s in sums])
  return Scores(fitness, complete, sums[:, 0] / count)


def probe_chunk(make, chunks, trainable, frozen, batch, spec, repeats: int = 2):
  """The chunk (of `chunks`) with the least time per candidate on `batch`: each is
  compiled, run once, then timed `repeats` times (the minimum). Returns (chunk, its
  compiled evaluator, {chunk: seconds per candidate})."""
  times, fns = {}, {}
  for c in dict.fromkeys(chunks):
    fn = fns[c] = make(c)
    subnets = jnp.zeros((c,) + tuple(spec.num_options.shape), jnp.int32)
    jax.block_until_ready(fn(trainable, frozen, batch, subnets))  # compile
    best = math.inf
    for _ in range(repeats):
      t = time.perf_counter()
      jax.block_until_ready(fn(trainable, frozen, batch, subnets))
      best = min(best, time.perf_counter() - t)
    times[c] = best / c
  best_chunk = min(times, key=times.get)
  return best_chunk, fns[best_chunk], times
