"""What the command lines share: expected errors become one line and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable


def expected_errors() -> tuple[type[BaseException], ...]:
  from glora_jax.bundled import MissingAssetError
  from glora_jax.train.checkpoint import CheckpointMismatchError
  from glora_jax.train.loop import ConfigError, NonFiniteLossError
  errors = [ConfigError, CheckpointMismatchError, MissingAssetError, NonFiniteLossError]
  from glora_jax.search.evolution import BudgetError
  errors.append(BudgetError)
  try:
    from glora_jax.data import DatasetNotPreparedError
    errors.append(DatasetNotPreparedError)
  except ImportError:
    pass
  return tuple(errors)


def run_guarded(fn: Callable[[], object]) -> int:
  """Runs fn; an expected failure prints 'error: <one line>' and returns 2."""
  try:
    fn()
  except expected_errors() as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  return 0
