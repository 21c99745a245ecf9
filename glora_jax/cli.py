"""What the command lines share: expected errors become one line and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable

from glora_jax import errors


def expected_errors() -> tuple[type[BaseException], ...]:
  return (errors.ConfigError, errors.CheckpointMismatchError, errors.MissingAssetError,
          errors.NonFiniteLossError, errors.BudgetError, errors.DatasetNotPreparedError,
          errors.ExportError)


def run_guarded(fn: Callable[[], object]) -> int:
  """Runs fn; an expected failure prints 'error: <one line>' and returns 2."""
  try:
    fn()
  except expected_errors() as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  return 0
