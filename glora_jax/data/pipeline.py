"""Numpy batches from an indexable source: seeded epoch shuffling, per-host slices, resumable state.

Training and evaluation iterators share one class; its state is three ints a checkpoint can hold.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np

Batch = dict[str, np.ndarray]
STATE_KEYS = ('epoch', 'position', 'seed')


def _stack(examples: Sequence[Mapping[str, Any]]) -> Batch:
  keys = examples[0].keys()
  return {key: np.stack([np.asarray(ex[key]) for ex in examples]) for key in keys}


class BatchIterator:
  """Batches of a source, epoch after epoch, in an order fixed by the seed.

  Source: a mapping of equally long arrays (columns, indexed all at once) or a sequence of
  example dicts with `len` and `[i]` (a tfds data source; `__getitems__` is used when present).

  Order: with shuffle, `rng = np.random.default_rng(seed)` is made once and epoch e visits the
  examples in the order of the (e+1)-th `rng.permutation(n)`; without shuffle, in source order.
  Batches are cut from that order every `batch_size` examples (batch_size is global: all hosts).

  The last partial batch of an epoch is kept as a smaller batch (the default, as the accuracy
  protocol trains), dropped (drop_remainder), or padded to full size (pad_remainder, for jitted
  evaluation: shapes stay static). Every batch has a float32 `mask`, 0 only on padding rows, so
  a mask-weighted mean counts each example exactly once.

  Hosts: every host computes the same global batch and keeps rows
  [process_index * b : (process_index + 1) * b] of it, b = batch_size // process_count; so
  batches do not depend on the number of hosts.

  State: `state` is {'epoch', 'position', 'seed'}, position being how many examples of the
  current epoch's order were already yielded. `BatchIterator(..., state=saved)` or
  `restore(saved)` continues with exactly the batches an uninterrupted iterator would yield.
  """

  def __init__(self, source, batch_size: int, *, shuffle: bool = True, seed: int = 0,
               num_epochs: int | None = None, drop_remainder: bool = False,
               pad_remainder: bool = False, transform: Callable[[Batch], Batch] | None = None,
               process_index: int | None = None, process_count: int | None = None,
               state: Mapping[str, int] | None = None):
    if process_index is None or process_count is None:
      import jax  # pylint: disable=import-outside-toplevel
      process_index = jax.process_index() if process_index is None else process_index
      process_count = jax.process_count() if process_count is None else process_count
    self.num_examples = self._count(source)
    self._columns = ({key: np.asarray(value) for key, value in source.items()}
                     if isinstance(source, Mapping) else None)
    self._source = source
    if batch_size <= 0:
      raise ValueError(f'batch_size is {batch_size}; expected a positive number')
    if drop_remainder and pad_remainder:
      raise ValueError('drop_remainder and pad_remainder are both set; expected at most one')
    if not 0 <= process_index < process_count:
      raise ValueError(f'process_index {process_index} is outside [0, process_count={process_count})')
    if batch_size % process_count:
      raise ValueError(f'batch_size {batch_size} does not divide across {process_count} hosts; '
                       f'expected a multiple of {process_count}')
    if self.num_examples == 0:
      raise ValueError('the source is empty; expected at least one example')
    remainder = self.num_examples % batch_size
    if drop_remainder and self.num_examples < batch_size:
      raise ValueError(f'the source has {self.num_examples} examples, fewer than batch_size '
                       f'{batch_size}, so drop_remainder would leave no batch at all')
    if remainder and not (drop_remainder or pad_remainder) and remainder % process_count:
      raise ValueError(f'the last batch holds {remainder} examples, which do not split evenly over '
                       f'{process_count} hosts; set drop_remainder or pad_remainder')
    self.batch_size = batch_size
    self.shuffle = shuffle
    self.num_epochs = num_epochs
    self.drop_remainder = drop_remainder
    self.pad_remainder = pad_remainder
    self.transform = transform
    self.process_index = process_index
    self.process_count = process_count
    self._seed = int(seed)
    self._epoch = 0
    self._position = 0
    self._rng = None
    self._rng_epochs_drawn = 0
    self._order = None
    self._order_epoch = -1
    if state is not None:
      self.restore(state)

  @staticmethod
  def _count(source) -> int:
    if isinstance(source, Mapping):
      lengths = {key: len(value) for key, value in source.items()}
      if not lengths or len(set(lengths.values())) != 1:
        raise ValueError(f'source columns have lengths {lengths}; expected one common length')
      return next(iter(lengths.values()))
    return len(source)

  # ---- state ----
  @property
  def state(self) -> dict[str, int]:
    """Where the iterator stands, as plain ints (JSON-ready): epoch, position, seed."""
    return {'epoch': self._epoch, 'position': self._position, 'seed': self._seed}

  def restore(self, state: Mapping[str, int]) -> None:
    missing = [key for key in STATE_KEYS if key not in state]
    if missing:
      raise ValueError(f'iterator state {dict(state)} lacks {missing}; expected keys {list(STATE_KEYS)}')
    epoch, position, seed = (int(state[key]) for key in STATE_KEYS)
    if epoch < 0 or not 0 <= position <= self.num_examples:
      raise ValueError(f'iterator state {dict(state)} is out of range; expected epoch >= 0 and '
                       f'0 <= position <= {self.num_examples}')
    if position % self.batch_size and position != self.num_examples:
      raise ValueError(f'iterator state position {position} is not at a batch boundary of '
                       f'batch_size {self.batch_size}; was it saved with another batch size?')
    if seed != self._seed:
      self._rng, self._rng_epochs_drawn = None, 0
      self._order, self._order_epoch = None, -1
    self._epoch, self._position, self._seed = epoch, position, seed

  # ---- order ----
  def _epoch_order(self, epoch: int) -> np.ndarray:
    if self._order_epoch == epoch:
      return self._order
    if not self.shuffle:
      order = np.arange(self.num_examples)
    else:
      if self._rng is None or self._rng_epochs_drawn > epoch:
        # Going back (a restore): replay the generator from the seed; cheap next to an epoch.
        self._rng, self._rng_epochs_drawn = np.random.default_rng(self._seed), 0
      while self._rng_epochs_drawn <= epoch:
        order = self._rng.permutation(self.num_examples)
        self._rng_epochs_drawn += 1
    self._order, self._order_epoch = order, epoch
    return order

  @property
  def batches_per_epoch(self) -> int:
    full, remainder = divmod(self.num_examples, self.batch_size)
    return full + (1 if remainder and not self.drop_remainder else 0)

  def _epoch_length(self) -> int:
    """Examples of an epoch's order that are yielded (all but a dropped remainder)."""
    if self.drop_remainder:
      return self.num_examples - self.num_examples % self.batch_size
    return self.num_examples

  # ---- reading ----
  def _gather(self, indices: np.ndarray) -> Batch:
    if self._columns is not None:
      return {key: value[indices] for key, value in self._columns.items()}
    getitems = getattr(self._source, '__getitems__', None)
    examples = getitems([int(i) for i in indices]) if getitems else [self._source[int(i)] for i in indices]
    return _stack(examples)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    if self._position >= self._epoch_length():
      self._epoch, self._position = self._epoch + 1, 0
    if self.num_epochs is not None and self._epoch >= self.num_epochs:
      raise StopIteration
    order = self._epoch_order(self._epoch)
    start = self._position
    indices = order[start:start + self.batch_size]
    real = len(indices)
    mask = np.ones(real, dtype=np.float32)
    if real < self.batch_size and self.pad_remainder:
      # Padding rows repeat the batch's first example (valid inputs, no NaNs) and are masked out.
      indices = np.concatenate([indices, np.full(self.batch_size - real, indices[0])])
      mask = np.concatenate([mask, np.zeros(self.batch_size - real, dtype=np.float32)])
    local = len(indices) // self.process_count
    rows = slice(self.process_index * local, (self.process_index + 1) * local)
    batch = self._gather(indices[rows])
    batch['mask'] = mask[rows]
    if self.transform is not None:
      batch = self.transform(batch)
    self._position = start + real
    if self._position >= self._epoch_length():
      self._epoch, self._position = self._epoch + 1, 0
    return batch


def train_iterator(source, batch_size: int, *, seed: int, num_epochs: int | None = None,
                   drop_remainder: bool = False, state: Mapping[str, int] | None = None,
                   **kwargs) -> BatchIterator:
  """Shuffled batches for training; keeps the partial last batch unless drop_remainder."""
  return BatchIterator(source, batch_size, shuffle=True, seed=seed, num_epochs=num_epochs,
                       drop_remainder=drop_remainder, state=state, **kwargs)


def eval_iterator(source, batch_size: int, **kwargs) -> BatchIterator:
  """One pass in source order, last batch padded and masked: every example counted exactly once."""
  return BatchIterator(source, batch_size, shuffle=False, num_epochs=1, pad_remainder=True, **kwargs)
