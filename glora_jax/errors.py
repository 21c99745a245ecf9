"""The errors a user can meet and fix, each a one-line message naming what is wrong.

The command lines print these without a traceback (cli.py); this module imports nothing
from the package, so any module can raise them without an import cycle.
"""


class ConfigError(ValueError):
  """A configuration value that cannot work; raised before anything is written."""


class NonFiniteLossError(FloatingPointError):
  """Training produced NaN/Inf; the last good checkpoint is kept."""


class CheckpointMismatchError(ValueError):
  """A checkpoint that belongs to another model or adapter configuration, or is damaged."""


class BudgetError(ValueError):
  """No subnet of the search space meets the parameter budget."""


class MissingAssetError(FileNotFoundError):
  """A bundled asset is not installed; the message says how to install it."""


class DatasetNotPreparedError(FileNotFoundError):
  """A dataset is not in the data_dir; the message says how to prepare it."""


class ExportError(ValueError):
  """Merged parameters that the plain model an export describes would not read exactly."""


class DataError(ValueError):
  """Data that cannot be read as asked: a malformed file, a missing field, an empty split,
  a label the training split never saw; the message names the file (and line) at fault."""
