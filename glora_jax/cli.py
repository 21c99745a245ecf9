"""What the command lines share: expected errors, and bad flags or config overrides,
become one 'error:' line and exit code 2."""
from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
import re
import sys
from typing import Callable, Sequence

from glora_jax import errors


def expected_errors() -> tuple[type[BaseException], ...]:
  return (errors.ConfigError, errors.CheckpointMismatchError, errors.MissingAssetError,
          errors.NonFiniteLossError, errors.BudgetError, errors.DatasetNotPreparedError,
          errors.ExportError, errors.DataError)


def run_guarded(fn: Callable[[], object]) -> int:
  """Runs fn; an expected failure prints 'error: <one line>' and returns 2."""
  try:
    fn()
  except expected_errors() as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    return 2
  return 0


def main(work: Callable[[], object]) -> None:
  """Runs a command line: absl flags parsed by parse_flags, absl logging at WARNING
  (orbax logs every save at INFO), then work() through run_guarded (exit code 2 on
  an expected error). `work` may raise absl's app.UsageError."""
  from absl import app, logging

  def absl_main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    return run_guarded(work)

  app.run(absl_main, flags_parser=parse_flags)


_FLAG_KINDS = {'int': 'DEFINE_integer', 'float': 'DEFINE_float', 'str': 'DEFINE_string',
               'bool': 'DEFINE_bool'}


def define_dataclass_flags(cls, helps: dict[str, str], units: dict[str, float] | None = None
                           ) -> tuple[str, ...]:
  """One absl flag per int, float, str or bool field of dataclass `cls`, named as the
  field, with the field's default (divided by units[name] where given, e.g. 1e6 for a
  flag in millions) and helps[name] as its help. A field already defined as a flag, or
  of another type, is left out. Returns the names defined (for dataclass_from_flags).
  The flags belong to the calling module (so its --help lists them)."""
  from absl import flags
  units = units or {}
  caller = sys._getframe(1).f_globals['__name__']
  module_name = sys.argv[0] if caller == '__main__' else caller  # as absl names __main__
  names = []
  for field in dataclasses.fields(cls):
    kind = field.type if isinstance(field.type, str) else getattr(field.type, '__name__', '')
    if field.name in flags.FLAGS or kind not in _FLAG_KINDS or field.default is dataclasses.MISSING:
      continue
    default = field.default / units[field.name] if field.name in units else field.default
    getattr(flags, _FLAG_KINDS[kind])(field.name, default,
                                      helps.get(field.name, f'{cls.__name__}.{field.name}.'),
                                      module_name=module_name)
    names.append(field.name)
  return tuple(names)


def dataclass_from_flags(cls, names: Sequence[str], units: dict[str, float] | None = None):
  """cls(**the flags `names`, each times units[name] where given); a value the
  dataclass refuses (ValueError) is a ConfigError."""
  from absl import flags
  units = units or {}
  values = {n: flags.FLAGS[n].value * units[n] if n in units else flags.FLAGS[n].value
            for n in names}
  try:
    return cls(**values)
  except ValueError as e:
    raise errors.ConfigError(str(e)) from None


def _one_line(text: str) -> str:
  """A message on one line; of a traceback printed into a message, its last line
  without the exception's class name (what the config file itself said)."""
  lines = [line.strip() for line in str(text).splitlines() if line.strip()]
  if any(line.startswith('Traceback (most recent call last)') for line in lines):
    last = lines[-1]
    return re.sub(r'^[\w.]+(Error|Exception): ', '', last)
  return ' '.join(lines)


def _config_arg(argv: Sequence[str]) -> str | None:
  """The value of --config (`--config=path[:arg]` or `--config path[:arg]`), if given."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(value: str):
  """get_config(arg) of a config file, as ml_collections calls it; None if it fails."""
  path, _, arg = value.partition(':')
  try:
    spec = importlib.util.spec_from_file_location('_config_for_error_message', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()
  except Exception:  # noqa: BLE001 - the parse error itself is reported instead
    return None


def _unknown_config_field(config, argv: Sequence[str]) -> str | None:
  """The first `--config.a.b=...` in argv naming a field `config` lacks, said with the
  fields that exist where it fails; None if every override names a field."""
  for arg in argv:
    m = re.match(r'--config\.([^=\s]+)', arg)
    if not m:
      continue
    node, walked = config, []
    for part in m.group(1).split('.'):
      keys = list(node.keys()) if hasattr(node, 'keys') else None
      if keys is None or part not in keys:
        where = f"'{'.'.join(walked)}'" if walked else 'the config'
        allowed = ', '.join(sorted(keys)) if keys else f'none (it is a {type(node).__name__})'
        return (f"unknown config field '{m.group(1)}' in {arg}: {where} has no field "
                f"'{part}'; its fields: {allowed}")
      node, walked = node[part], walked + [part]
  return None


def flag_error_message(error: BaseException, argv: Sequence[str]) -> str:
  """One line for a failed flag parse: a config file that does not exist (with the
  configs beside it), an unknown config field (with the fields that exist there), or
  the config file's own message (e.g. the arguments it accepts)."""
  value = _config_arg(argv)
  if value is not None:
    path = pathlib.Path(value.partition(':')[0])
    if not path.is_file():
      folder = path.parent if path.parent.is_dir() else pathlib.Path('configs')
      known = sorted(p.name for p in folder.glob('*.py') if not p.name.startswith('_'))
      return f"--config {value}: no such file; configs in {folder}/: {', '.join(known)}"
    config = _load_config(value)
    unknown = _unknown_config_field(config, argv) if config is not None else None
    if unknown:
      return unknown
    if str(error).startswith('flag --config='):
      return f'--config {value}: {_one_line(error)}'
  return _one_line(error)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing for `app.run(main, flags_parser=parse_flags)`: a bad flag value,
  a config file or argument that does not load, or an unknown config field prints one
  'error:' line and exits 2, before main runs (so nothing is written)."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    config = flags.FLAGS['config'].value if 'config' in flags.FLAGS else None
    if config is not None:
      config.keys()  # a file that failed to load raises here, not later inside main
    return rest
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    print(f'error: {flag_error_message(e, argv[1:])}', file=sys.stderr, flush=True)
    sys.exit(2)
