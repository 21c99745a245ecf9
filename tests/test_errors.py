"""Tests for glora_jax.errors: every error a user can meet is one the command lines
print as one 'error:' line (cli.expected_errors lists them all), each is still caught
as the built-in error it refines, and the module imports nothing of the package."""
import ast
import inspect
import pathlib

import pytest

from glora_jax import cli, errors

BASES = {'ConfigError': ValueError, 'NonFiniteLossError': FloatingPointError,
         'CheckpointMismatchError': ValueError, 'BudgetError': ValueError,
         'MissingAssetError': FileNotFoundError, 'DatasetNotPreparedError': FileNotFoundError,
         'ExportError': ValueError, 'DataError': ValueError}


def error_classes():
  return {name: cls for name, cls in inspect.getmembers(errors, inspect.isclass)
          if cls.__module__ == errors.__name__}


def test_every_error_class_is_expected_by_the_command_lines():
  assert set(error_classes()) == set(BASES)
  assert set(cli.expected_errors()) == set(error_classes().values())


@pytest.mark.parametrize('name', sorted(BASES))
def test_each_error_is_caught_as_its_builtin_and_printed_as_one_line(name, capsys):
  cls = error_classes()[name]
  with pytest.raises(BASES[name]):
    raise cls('x')

  def fail():
    raise cls(f'{name} said what is wrong')

  assert cli.run_guarded(fail) == 2
  captured = capsys.readouterr()
  assert captured.out == '' and captured.err == f'error: {name} said what is wrong\n'


def test_an_unexpected_error_is_not_swallowed():
  def fail():
    raise KeyError('a bug')

  with pytest.raises(KeyError):
    cli.run_guarded(fail)
  assert cli.run_guarded(lambda: None) == 0


def test_errors_module_imports_nothing_of_the_package():
  tree = ast.parse(pathlib.Path(errors.__file__).read_text())
  imported = [n for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
              for n in ([a.name for a in node.names] if isinstance(node, ast.Import)
                        else [node.module or ''])]
  assert imported == []
