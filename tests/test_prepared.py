"""Tests for glora_jax.data.prepared: the data_dir (argument, then the environment
variables configs/common.py documents), version specs, and finding the newest prepared
array_record version on disk without tfds."""
import json
import pathlib
import re

import pytest

from glora_jax import errors
from glora_jax.data import prepared


def test_data_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv('GLORA_DATA_DIR', raising=False)
  monkeypatch.delenv('TFDS_DATA_DIR', raising=False)
  assert prepared.resolve_data_dir() == prepared.DEFAULT_DATA_DIR.expanduser()
  monkeypatch.setenv('TFDS_DATA_DIR', str(tmp_path / 'tfds'))
  assert prepared.resolve_data_dir() == tmp_path / 'tfds'
  monkeypatch.setenv('GLORA_DATA_DIR', str(tmp_path / 'glora'))
  assert prepared.resolve_data_dir() == tmp_path / 'glora'
  assert prepared.resolve_data_dir(tmp_path / 'given') == tmp_path / 'given'


def test_the_config_documents_the_variables_the_code_reads():
  common = (pathlib.Path(__file__).parents[1] / 'configs' / 'common.py').read_text()
  documented = re.search(r"c\.data\.data_dir = ''  # '' = (.*)", common).group(1)
  assert documented == ', else '.join(
      [f'${v}' for v in prepared.DATA_DIR_ENV_VARS] + [str(prepared.DEFAULT_DATA_DIR)])


@pytest.mark.parametrize('version,spec,matches', [
    ('3.0.2', '3.*.*', True), ('3.0.2', '3.0.2', True), ('3.0.2', '*', True), ('3.0.2', '', True),
    ('3.0.2', '3.1.*', False), ('3.0.2', '2.*.*', False), ('3.0.2', '*.*.3', False)])
def test_version_matches(version, spec, matches):
  assert prepared.version_matches(version, spec) is matches


def test_a_malformed_version_spec_is_refused():
  with pytest.raises(ValueError, match="version spec '3.\\*' is malformed"):
    prepared.version_matches('3.0.2', '3.*')


def fake_version(root, version, file_format='array_record', info=True):
  folder = root / version
  folder.mkdir(parents=True)
  if info:
    (folder / 'dataset_info.json').write_text(json.dumps({'fileFormat': file_format}))
  return folder


def test_find_prepared_takes_the_newest_complete_matching_version(tmp_path):
  root = tmp_path / 'dtd'
  fake_version(root, '2.9.9')
  fake_version(root, '3.0.1')
  newest = fake_version(root, '3.0.10')  # numerically newer than 3.0.2
  fake_version(root, '3.0.2')
  fake_version(root, '3.1.0', info=False)  # still being written
  (root / 'downloads').mkdir()
  assert prepared.prepared_versions(tmp_path, 'dtd') == ['2.9.9', '3.0.1', '3.0.2', '3.0.10']
  assert prepared.find_prepared(tmp_path, 'dtd', None, '3.*.*', 'prepare it') == newest
  assert prepared.find_prepared(tmp_path, 'dtd', None, '2.*.*', 'prepare it') == root / '2.9.9'


def test_find_prepared_names_what_is_there_and_how_to_prepare(tmp_path):
  fake_version(tmp_path / 'eurosat' / 'rgb', '1.0.0')
  with pytest.raises(errors.DatasetNotPreparedError) as e:
    prepared.find_prepared(tmp_path, 'eurosat', 'rgb', '2.*.*', 'Run the preparation.')
  assert str(e.value) == (
      f"dataset 'eurosat/rgb' (version 2.*.*) is not prepared in data_dir {tmp_path} (expected "
      f"{tmp_path}/eurosat/rgb/<version>/dataset_info.json; found other versions ['1.0.0']). "
      'Run the preparation.')
  fake_version(tmp_path / 'svhn', '3.0.0', file_format='tfrecord')
  with pytest.raises(errors.DatasetNotPreparedError, match='stored as tfrecord.*only array_record'):
    prepared.find_prepared(tmp_path, 'svhn', None, '*', '')
