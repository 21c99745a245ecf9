"""Evolutionary search over integer-encoded subnets (the GLoRA authors' algorithm).

Operators are jitted array functions of jax.random keys: mutation, crossover,
random fill, budget filter and de-duplication against everything seen so far.
Candidate arrays have static shapes, so nothing recompiles across generations.
`run` is the search loop; it keeps a resumable state (one JSON per generation).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from glora_jax import subnet as subnet_lib
from glora_jax.errors import BudgetError
from glora_jax.adapter_spec import AdapterSpec
from glora_jax.train.metrics import write_json


REFILLS = ('population', 'children')
RANDOM_FILLS = ('mixed', 'uniform')
TIE_BREAKS = ('params', 'loss')
RANKS = ('accuracy', 'loss')
STARTS = ('random', 'anchor')


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  """The authors' defaults: a random population of 50, then 20 generations of
  evolution (50 + 20 x 50 = 1,050 evaluations), each with the top 10 as parents, 25
  mutations (p = 0.2) and 25 crossovers from 10x tries, topped up to `population`
  with random candidates; at most 1.0 M adapter parameters.

  generations: rounds of evolution after the random first population (the
  authors' count). refill: 'population' tops every generation up to `population`
  with random candidates (the authors); 'children' only up to mutations +
  crossovers (this code before issue 16). random_fill: 'mixed' draws half the
  random candidates uniformly (the authors' sampler) and half thinned towards
  cheap layers (ours: tight budgets are met); 'uniform' is the authors' alone.

  race: 0 (the authors) scores every candidate on the whole eval split. In (0, 1),
  racing (ours, off by default): each generation's candidates are scored on the
  first `race` share of the eval batches, the better half on the rest; the others
  are kept with their partial accuracy, marked incomplete, and ranked after every
  complete candidate (never parents, never on the Pareto front, never chosen).

  tie_break: how candidates of equal val accuracy are ranked (as parents and for the
  chosen subnet). 'params' (this code before issue 16): fewer adapter parameters
  first. 'loss' (ours): lower mean val loss first, then fewer parameters; on a small
  val split (BBC News: 200 documents, one document = 0.005) many candidates tie on
  accuracy and the loss still tells them apart. The authors sort by accuracy alone
  (ties in evaluation order).

  rank_by: what makes a candidate better, as a parent, in a race's heat, on the
  Pareto front and as the chosen subnet. 'accuracy' (the authors): higher val
  accuracy, then `tie_break`. 'loss' (ours): lower mean val loss, then higher
  accuracy, then fewer parameters (`tie_break` unused): on a small val split the
  mean loss is a finer and less noisy estimate than a count of correct documents.

  start: the first population. 'random' (the authors): random candidates only.
  'anchor' (ours): it begins with the subnet the supernet trained in every step (its
  config.supernet.anchor, else the largest subnet) when that meets the budget, the
  rest random; the evolution then also explores around the best-trained subnet."""
  population: int = 50
  generations: int = 20
  parents: int = 10
  mutations: int = 25
  crossovers: int = 25
  mutation_prob: float = 0.2
  tries: int = 10
  param_limit: float = 1.0e6
  min_param_limit: float = 0.0
  seed: int = 0
  refill: str = 'population'
  random_fill: str = 'mixed'
  race: float = 0.0
  tie_break: str = 'params'
  start: str = 'random'
  rank_by: str = 'accuracy'

  def __post_init__(self):
    for name in ('population', 'parents', 'tries'):
      if getattr(self, name) <= 0:
        raise ValueError(f'search {name} must be > 0, got {getattr(self, name)}')
    if self.generations < 0:
      raise ValueError(f'search generations must be >= 0, got {self.generations}')
    if self.refill not in REFILLS:
      raise ValueError(f"search refill '{self.refill}' is unknown; allowed: {list(REFILLS)}")
    if self.random_fill not in RANDOM_FILLS:
      raise ValueError(f"search random_fill '{self.random_fill}' is unknown; allowed: {list(RANDOM_FILLS)}")
    if self.tie_break not in TIE_BREAKS:
      raise ValueError(f"search tie_break '{self.tie_break}' is unknown; allowed: {list(TIE_BREAKS)}")
    if self.rank_by not in RANKS:
      raise ValueError(f"search rank_by '{self.rank_by}' is unknown; allowed: {list(RANKS)}")
    if self.start not in STARTS:
      raise ValueError(f"search start '{self.start}' is unknown; allowed: {list(STARTS)}")
    if not 0.0 <= self.race < 1.0:
      raise ValueError(f'search race must be in [0, 1) (the share of the eval split in the '
                       f'first heat; 0 = off), got {self.race}')
    if not 0.0 <= self.mutation_prob <= 1.0:
      raise ValueError(f'mutation_prob must be in [0, 1], got {self.mutation_prob}')
    if self.min_param_limit > self.param_limit:
      raise ValueError(f'min_param_limit {self.min_param_limit:g} is above param_limit '
                       f'{self.param_limit:g}')


# --------------------------------------------------------------------------- #
# Array operators
# --------------------------------------------------------------------------- #


def mutate(key, parents, num_options, n: int, prob: float):
  """n children: a random parent each, every choice redrawn with probability `prob`."""
  k_parent, k_flip, k_new = jax.random.split(key, 3)
  base = parents[jax.random.randint(k_parent, (n,), 0, parents.shape[0])]
  flip = jax.random.bernoulli(k_flip, prob, base.shape)
  return jnp.where(flip, subnet_lib.sample_table(k_new, num_options, (n,)), base)


def crossover(key, parents, n: int):
  """n children of two random parents, each choice from either with probability 1/2."""
  k_a, k_b, k_pick = jax.random.split(key, 3)
  a = parents[jax.random.randint(k_a, (n,), 0, parents.shape[0])]
  b = parents[jax.random.randint(k_b, (n,), 0, parents.shape[0])]
  return jnp.where(jax.random.bernoulli(k_pick, 0.5, a.shape), a, b)


def acceptable(cands, archive, archive_valid, costs, fixed_cost, low, high):
  """Mask of candidates that are within [low, high] parameters, not in the
  archive, and the first of their kind within `cands`."""
  params = subnet_lib.count_params_table(costs, fixed_cost, cands)
  in_budget = (params >= low) & (params <= high)
  seen = jnp.any(jnp.all(cands[:, None] == archive[None], axis=(2, 3)) & archive_valid[None], axis=1)
  same = jnp.all(cands[:, None] == cands[None], axis=(2, 3))
  earlier = jnp.tril(same, k=-1).any(axis=1)
  return in_budget & ~seen & ~earlier


def first_accepted(cands, ok, k: int):
  """The first k accepted candidates (static shape) and which of them are real."""
  order = jnp.argsort(~ok, stable=True)[:k]
  return cands[order], ok[order]


@functools.partial(jax.jit, static_argnames=('n_mut', 'n_cross', 'tries', 'prob'))
def propose(key, parents, archive, archive_valid, num_options, costs, fixed_cost, low, high, *,
            n_mut: int, n_cross: int, tries: int, prob: float):
  """One generation's children: up to n_mut mutations then up to n_cross
  crossovers, each drawn from `tries` times as many attempts, all acceptable
  and distinct from each other and from the archive."""
  k_mut, k_cross = jax.random.split(key)
  mut = mutate(k_mut, parents, num_options, n_mut * tries, prob)
  ok = acceptable(mut, archive, archive_valid, costs, fixed_cost, low, high)
  mut, mut_ok = first_accepted(mut, ok, n_mut)
  archive2 = jnp.concatenate([archive, mut])
  valid2 = jnp.concatenate([archive_valid, mut_ok])
  cross = crossover(k_cross, parents, n_cross * tries)
  ok = acceptable(cross, archive2, valid2, costs, fixed_cost, low, high)
  cross, cross_ok = first_accepted(cross, ok, n_cross)
  return jnp.concatenate([mut, cross]), jnp.concatenate([mut_ok, cross_ok])


def thinned_candidates(key, num_options, costs, n: int):
  """Uniform draws in which each layer keeps its draw with a per-candidate
  probability d ~ U(0, 1) and otherwise takes its cheapest options: candidates
  spread over the whole range of parameter counts, so tight budgets are met."""
  k_draw, k_density, k_keep = jax.random.split(key, 3)
  cands = subnet_lib.sample_table(k_draw, num_options, (n,))
  density = jax.random.uniform(k_density, (n, 1, 1))
  keep = jax.random.uniform(k_keep, (n, num_options.shape[0], 1)) < density
  cheapest, _ = subnet_lib.cheapest_and_largest(num_options, costs)
  return jnp.where(keep, cands, cheapest[None])


@functools.partial(jax.jit, static_argnames=('n', 'tries', 'thinned'))
def propose_random(key, archive, archive_valid, num_options, costs, fixed_cost, low, high, *,
                   n: int, tries: int, thinned: bool = True):
  """n acceptable random candidates: half of the attempts uniform (the authors'
  sampler), half thinned towards cheap layers (ours: uniform draws almost never
  meet a budget far below the average subnet's size); thinned=False: all uniform."""
  k_uniform, k_thin = jax.random.split(key)
  half = n * tries // 2 if thinned else 0
  cands = jnp.concatenate([subnet_lib.sample_table(k_uniform, num_options, (n * tries - half,)),
                           thinned_candidates(k_thin, num_options, costs, half)])
  ok = acceptable(cands, archive, archive_valid, costs, fixed_cost, low, high)
  return first_accepted(cands, ok, n)


# --------------------------------------------------------------------------- #
# The search loop (search/driver.py calls it, then merges and exports)
# --------------------------------------------------------------------------- #


def pareto_front(params: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
  """Indices of the non-dominated points (fewer parameters, higher accuracy),
  sorted by parameters."""
  order = np.lexsort((-accuracy, params))
  front, best = [], -np.inf
  for i in order:
    if accuracy[i] > best:
      front.append(int(i))
      best = accuracy[i]
  return np.asarray(front, np.int64)


class Archive:
  """Everything evaluated: candidates, accuracy, mean val loss (NaN where the fitness
  gave none), parameters, generation, and whether the accuracy is on the whole eval
  split (`complete`; False only for a candidate that lost a race's first heat). A
  fixed capacity array (so operator shapes never change) plus a valid mask.
  tie_break, rank_by: SearchConfig's, used by `top` and `front`."""

  def __init__(self, spec: AdapterSpec, capacity: int, tie_break: str = 'params',
               rank_by: str = 'accuracy'):
    if tie_break not in TIE_BREAKS:
      raise ValueError(f"tie_break '{tie_break}' is unknown; allowed: {list(TIE_BREAKS)}")
    if rank_by not in RANKS:
      raise ValueError(f"rank_by '{rank_by}' is unknown; allowed: {list(RANKS)}")
    self.tie_break, self.rank_by = tie_break, rank_by
    self.shape = spec.num_options.shape
    self.cands = np.zeros((capacity,) + self.shape, np.int32)
    self.valid = np.zeros(capacity, bool)
    self.accuracy = np.zeros(capacity)
    self.loss = np.full(capacity, np.nan)
    self.params = np.zeros(capacity, np.int64)
    self.generation = np.zeros(capacity, np.int32)
    self.complete = np.zeros(capacity, bool)
    self.size = 0

  def add(self, cands, accuracy, params, generation, complete=True, loss=np.nan):
    n = len(cands)
    if self.size + n > len(self.valid):
      raise RuntimeError('search archive is full; this is a bug in its capacity estimate')
    s = slice(self.size, self.size + n)
    self.cands[s], self.accuracy[s], self.params[s] = cands, accuracy, params
    self.loss[s] = loss
    self.generation[s], self.valid[s], self.complete[s] = generation, True, complete
    self.size += n

  def _loss(self) -> np.ndarray:
    """The val losses with an unknown one (NaN) as the worst."""
    return np.where(np.isnan(self.loss[:self.size]), np.inf, self.loss[:self.size])

  def top(self, k: int) -> np.ndarray:
    """The k best: complete before incomplete; then with rank_by 'accuracy' higher
    accuracy, then (tie_break 'loss') lower val loss, NaN last, then fewer params;
    with rank_by 'loss' lower val loss, NaN last, then higher accuracy, then fewer
    params."""
    n = self.size
    if self.rank_by == 'loss':
      keys = (self.params[:n], -self.accuracy[:n], self._loss())
    else:
      keys = (self.params[:n],) + ((self._loss(),) if self.tie_break == 'loss' else ())
      keys += (-self.accuracy[:n],)
    order = np.lexsort(keys + (~self.complete[:n],))
    return order[:k]

  def front(self) -> np.ndarray:
    """Indices of the Pareto front (pareto_front) among the complete candidates:
    fewer parameters against higher accuracy, or (rank_by 'loss') lower val loss."""
    idx = np.flatnonzero(self.complete[:self.size])
    score = self.accuracy[idx] if self.rank_by == 'accuracy' else -self._loss()[idx]
    return idx[pareto_front(self.params[idx], score)]

  def to_json(self) -> dict:
    n = self.size
    return {'cands': self.cands[:n].tolist(), 'accuracy': self.accuracy[:n].tolist(),
            'params': self.params[:n].tolist(), 'generation': self.generation[:n].tolist(),
            'complete': self.complete[:n].tolist(),
            'loss': [None if np.isnan(x) else float(x) for x in self.loss[:n]]}

  def load(self, d: dict):
    n = len(d['accuracy'])
    self.size = 0
    self.valid[:] = False
    if n:
      self.add(np.asarray(d['cands'], np.int32).reshape((n,) + self.shape),
               np.asarray(d['accuracy']), np.asarray(d['params']), np.asarray(d['generation']),
               np.asarray(d.get('complete', [True] * n), bool),
               np.asarray([np.nan if x is None else x for x in d.get('loss', [None] * n)], float))


def run(spec: AdapterSpec, fitness: Callable[[np.ndarray], np.ndarray], cfg: SearchConfig,
        state_dir: pathlib.Path | None = None, log: Callable[[str], None] = print,
        stop_after_generations: int | None = None, initial=None) -> Archive:
  """Runs the search, resuming from `state_dir/search_state.json` if present.

  initial: (k, layers, supports) subnets that open the first population, before its
  random candidates, those within the budget and not repeated (SearchConfig.start).

  fitness: (n, layers, supports) int32 -> (n,) validation accuracy, or a tuple
  (accuracy, complete[, loss]) (fitness.Fitness's Scores). Keys are a
  function of (seed, generation), so a resumed search ends where an
  uninterrupted one would."""
  num_options = jnp.asarray(spec.num_options)
  costs = jnp.asarray(spec.option_costs)
  fixed = jnp.asarray(int(spec.fixed_costs.sum()))
  low, high = jnp.asarray(cfg.min_param_limit), jnp.asarray(cfg.param_limit)
  check_budget(spec, cfg)
  per_gen = max(cfg.population, cfg.mutations + cfg.crossovers)
  # the random population + generations
  archive = Archive(spec, per_gen * (cfg.generations + 1), cfg.tie_break, cfg.rank_by)
  state_file = None if state_dir is None else pathlib.Path(state_dir) / 'search_state.json'
  start = 0
  if state_file is not None and state_file.exists():
    saved = json.loads(state_file.read_text())
    # A field newer than the saved state (e.g. start, tie_break) ran at its default,
    # which is always the behaviour from before the field existed.
    saved_cfg = {**dataclasses.asdict(SearchConfig()), **saved.get('config', {})}
    if saved_cfg != dataclasses.asdict(cfg) or saved.get('shape') != list(archive.shape):
      raise ValueError(f'{state_file} is from a search with other settings; delete it or use '
                       'the same flags')
    archive.load(saved['archive'])
    start = saved['next_generation']
    log(f'resumed search at generation {start} ({archive.size} candidates evaluated)')
  base_key = jax.random.key(cfg.seed)

  def fill_random(key, existing):
    """Acceptable random candidates, distinct from the archive and `existing`.
    Shapes are padded to fixed sizes so this compiles once."""
    pad = np.zeros((per_gen,) + archive.shape, np.int32)
    pad[:len(existing)] = existing
    cands, ok = propose_random(
        key, jnp.asarray(np.concatenate([archive.cands, pad])),
        jnp.asarray(np.concatenate([archive.valid, np.arange(per_gen) < len(existing)])),
        num_options, costs, fixed, low, high, n=per_gen, tries=cfg.tries,
        thinned=cfg.random_fill == 'mixed')
    return np.asarray(cands)[np.asarray(ok)]

  for gen in range(start, cfg.generations + 1):  # 0: the random population
    key = jax.random.fold_in(base_key, gen)
    k_children, k_fill = jax.random.split(key)
    empty = np.zeros((0,) + archive.shape, np.int32)
    if gen == 0:
      new = empty
      if initial is not None and len(initial):
        initial = np.asarray(initial, np.int32).reshape((-1,) + archive.shape)[:cfg.population]
        ok = acceptable(jnp.asarray(initial), jnp.asarray(archive.cands), jnp.asarray(archive.valid),
                        costs, fixed, low, high)
        new = initial[np.asarray(ok)]
        log(f'first population: {len(new)} of {len(initial)} given subnets within the budget')
    else:
      parents = archive.cands[archive.top(cfg.parents)]
      children, ok = propose(k_children, jnp.asarray(parents), jnp.asarray(archive.cands),
                             jnp.asarray(archive.valid), num_options, costs, fixed, low, high,
                             n_mut=cfg.mutations, n_cross=cfg.crossovers, tries=cfg.tries,
                             prob=cfg.mutation_prob)
      new = np.asarray(children)[np.asarray(ok)]
    target = (cfg.population if gen == 0 or cfg.refill == 'population'
              else cfg.mutations + cfg.crossovers)
    for attempt in range(cfg.tries):  # random fill, as the authors do
      if len(new) >= target:
        break
      extra = fill_random(jax.random.fold_in(k_fill, attempt), new)
      new = np.concatenate([new, extra[:target - len(new)]])
    if len(new) == 0:
      log(f'generation {gen}: no new candidate within the budget; stopping')
      break
    scored = fitness(new)
    acc, complete, *loss = scored if isinstance(scored, tuple) else (scored, np.ones(len(new), bool))
    params = np.asarray(jax.vmap(lambda s: subnet_lib.count_params(spec, s))(jnp.asarray(new)))
    archive.add(new, np.asarray(acc), params, gen, np.asarray(complete, bool),
                np.asarray(loss[0], float) if loss else np.nan)
    best = archive.top(1)[0]
    log(f'generation {gen}: evaluated {len(new)}, best val accuracy {archive.accuracy[best]:.4f} '
        f'(val loss {archive.loss[best]:.4f}) with {archive.params[best]:,} params')
    if state_file is not None:
      # One line: the archive holds every candidate, indented it would be several times larger.
      write_json(state_file, {'config': dataclasses.asdict(cfg), 'shape': list(archive.shape),
                              'archive': archive.to_json(), 'next_generation': gen + 1}, indent=None)
    if stop_after_generations is not None and gen + 1 >= stop_after_generations:
      break
  return archive


def check_budget(spec: AdapterSpec, cfg: SearchConfig) -> None:
  """Fails at once when no subnet can meet the parameter budget."""
  cheapest, most = subnet_lib.cheapest_and_largest(spec.num_options, spec.option_costs)
  lo, hi = spec.layer_params(cheapest).sum(), spec.layer_params(most).sum()
  if lo > cfg.param_limit or hi < cfg.min_param_limit:
    raise BudgetError(
        f'no subnet meets the parameter budget [{cfg.min_param_limit:,.0f}, {cfg.param_limit:,.0f}]: '
        f'subnets of this search space have between {lo:,} and {hi:,} adapter parameters')
