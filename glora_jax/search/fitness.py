"""Fitness of many subnets at once: validation accuracy (next-token accuracy for a causal
LM) with inherited supernet weights, jax.vmap over a chunk of candidates, compiled once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from glora_jax import data
from glora_jax.train import sharding, steps


def make_chunk_evaluator(task: steps.Task, spec, mesh, frozen_shardings, chunk: int):
  """f(trainable, frozen, batch, subnets (chunk, L, S)) -> (chunk, 3) sums of
  (loss, examples, correct). The candidate axis is split over the 'data' mesh
  axis when it divides evenly (each device evaluates its own candidates)."""
  eval_step = steps.make_eval_step(task, spec)

  def evaluate_chunk(trainable, frozen, batch, subnets):
    return jnp.stack(jax.vmap(lambda s: eval_step(trainable, frozen, batch, s))(subnets), -1)

  rep = sharding.replicated(mesh)
  cand_axis = 'data' if chunk % mesh.shape['data'] == 0 else None
  cand_sh = NamedSharding(mesh, P(cand_axis))
  return jax.jit(evaluate_chunk, in_shardings=(rep, frozen_shardings, rep, cand_sh),
                 out_shardings=cand_sh)


class Fitness:
  """Callable: (n, L, S) int32 candidates -> (n,) accuracy on `arrays`, higher is
  better: correct / count of the task's loss sums, so top-1 accuracy for a
  classifier and next-token accuracy over real tokens for a causal LM.

  Candidates are padded to whole chunks (padding repeats the first candidate and
  is discarded), so every call runs the same compiled function."""

  def __init__(self, task, spec, mesh, trainable, frozen, frozen_shardings, arrays,
               chunk: int = 8, batch_size: int = 32):
    self.fn = make_chunk_evaluator(task, spec, mesh, frozen_shardings, chunk)
    self.chunk, self.batch_size = chunk, batch_size
    self.trainable, self.frozen = trainable, frozen
    # Evaluation batches are fixed: build (and transfer) them once.
    self.batches = [jax.device_put(b, sharding.replicated(mesh))
                    for b in data.eval_iterator(arrays, batch_size)]
    self.evaluated = 0

  def __call__(self, cands) -> np.ndarray:
    cands = np.asarray(cands, np.int32)
    n = len(cands)
    pad = (-n) % self.chunk
    if pad:
      cands = np.concatenate([cands, np.repeat(cands[:1], pad, axis=0)])
    acc = []
    for start in range(0, len(cands), self.chunk):
      sub = jnp.asarray(cands[start:start + self.chunk])
      totals = sum(self.fn(self.trainable, self.frozen, b, sub) for b in self.batches)
      totals = np.asarray(jax.device_get(totals), np.float64)
      acc.append(totals[:, 2] / np.maximum(totals[:, 1], 1))
    self.evaluated += n
    return np.concatenate(acc)[:n]
