"""Where prepared tfds datasets live, how they are found on disk, and how local ones are written.

Reading always goes through `tfds.data_source` (array_record, no TensorFlow); nothing here touches the network.
"""
from __future__ import annotations

import inspect
import json
import os
import pathlib
import re
import tempfile
from typing import Any, Callable

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from glora_jax.errors import DatasetNotPreparedError

# Checked in this order; the first that is set wins.
DATA_DIR_ENV_VARS = ('GLORA_DATA_DIR', 'TFDS_DATA_DIR')
DEFAULT_DATA_DIR = pathlib.Path('~/tensorflow_datasets')

_VERSION_RE = re.compile(r'^(\d+)\.(\d+)\.(\d+)$')


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The data_dir to use: the argument, else $GLORA_DATA_DIR, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  if data_dir is None:
    for var in DATA_DIR_ENV_VARS:
      if os.environ.get(var):
        data_dir = os.environ[var]
        break
    else:
      data_dir = DEFAULT_DATA_DIR
  return pathlib.Path(data_dir).expanduser()


def _version_tuple(text: str) -> tuple[int, int, int] | None:
  match = _VERSION_RE.match(text)
  return tuple(int(x) for x in match.groups()) if match else None


def version_matches(version: str, spec: str) -> bool:
  """Whether '3.0.2' matches a tfds version spec such as '3.*.*', '3.0.2' or '*'."""
  if spec in ('*', ''):
    return True
  parts = spec.split('.')
  if len(parts) != 3:
    raise ValueError(f"version spec '{spec}' is malformed; expected 'X.Y.Z' with '*' wildcards, e.g. '3.*.*'")
  return all(p == '*' or p == v for p, v in zip(parts, version.split('.')))


def dataset_dir(data_dir: pathlib.Path, name: str, config: str | None = None) -> pathlib.Path:
  """The folder holding one version sub-folder per prepared version: data_dir/name[/config]."""
  return data_dir / name / config if config else data_dir / name


def prepared_versions(data_dir: pathlib.Path, name: str, config: str | None = None) -> list[str]:
  """Versions of name[/config] fully prepared in data_dir (those with a dataset_info.json), oldest first."""
  root = dataset_dir(data_dir, name, config)
  if not root.is_dir():
    return []
  found = [d.name for d in root.iterdir()
           if _version_tuple(d.name) and (d / 'dataset_info.json').is_file()]
  return sorted(found, key=_version_tuple)


def read_dataset_info(version_dir: pathlib.Path) -> dict[str, Any]:
  """The dataset_info.json tfds wrote, as a plain dict (no tfds call)."""
  with open(version_dir / 'dataset_info.json', encoding='utf-8') as f:
    return json.load(f)


def find_prepared(data_dir: pathlib.Path, name: str, config: str | None, version_spec: str,
                  how_to_prepare: str) -> pathlib.Path:
  """The newest prepared version folder matching version_spec, stored as array_record.

  Only looks at files, so it answers in milliseconds and never reaches tfds or the network.
  Raises DatasetNotPreparedError, with how_to_prepare in its message, when there is none.
  """
  full = f'{name}/{config}' if config else name
  versions = prepared_versions(data_dir, name, config)
  matching = [v for v in versions if version_matches(v, version_spec)]
  if not matching:
    found = f'; found other versions {versions}' if versions else ''
    raise DatasetNotPreparedError(
        f"dataset '{full}' (version {version_spec}) is not prepared in data_dir {data_dir} "
        f"(expected {dataset_dir(data_dir, name, config)}/<version>/dataset_info.json{found}). "
        f'{how_to_prepare}')
  version_dir = dataset_dir(data_dir, name, config) / matching[-1]
  file_format = read_dataset_info(version_dir).get('fileFormat', 'tfrecord')
  if file_format != 'array_record':
    raise DatasetNotPreparedError(
        f"dataset '{full}' at {version_dir} is stored as {file_format}, but tfds.data_source reads "
        f"only array_record (expected fileFormat 'array_record' in its dataset_info.json). "
        f'{how_to_prepare}')
  return version_dir


def open_data_source(name: str, split: str, data_dir: pathlib.Path):
  """tfds.data_source for a dataset already found on disk; download=False so it can never fetch."""
  return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False)


def open_local_split(name: str, splits: tuple[str, ...], split: str,
                     data_dir: str | os.PathLike | None, prepare) -> Any:
  """A split of a bundled dataset as a tfds data source; `prepare(data_dir)` writes the
  dataset on first use."""
  if split not in splits:
    raise ValueError(f"{name} has no split '{split}'; expected one of {list(splits)}")
  prepare(data_dir)
  return open_data_source(name, split, resolve_data_dir(data_dir))


def read_columns(source, columns: dict[str, Callable[[list], np.ndarray]]) -> dict[str, np.ndarray]:
  """Every example of a data source in its order, one array per feature: `columns` maps
  a feature to the function that makes its list of values an array."""
  examples = source.__getitems__(range(len(source)))
  return {key: to_array([ex[key] for ex in examples]) for key, to_array in columns.items()}


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds builder over bundled files, written by `prepare_local_builder`.

  A subclass sets name, VERSION, RELEASE_NOTES, DESCRIPTION and SUPERVISED_KEYS, returns
  its tfds features from `_features()` (and optionally `_metadata()`), and generates the
  examples. Records keep the order they are generated in, so a seed shuffles the same
  list everywhere.
  """

  DESCRIPTION: str = ''
  SUPERVISED_KEYS: tuple[str, str] | None = None

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    # tfds 4.9.10 derives code_path through `importlib_resources`, which it declares only
    # for Python < 3.9, so preparing any builder defined inside a package fails without it.
    cls.code_path = epath.Path(inspect.getfile(cls))

  def _features(self) -> dict[str, Any]:
    raise NotImplementedError

  def _metadata(self) -> tfds.core.MetadataDict | None:
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict(self._features()),
        supervised_keys=self.SUPERVISED_KEYS,
        disable_shuffling=True,
        metadata=self._metadata(),
    )


def prepare_local_builder(builder_cls: type[LocalBuilder],
                          data_dir: pathlib.Path) -> pathlib.Path:
  """Writes a builder whose inputs are local files as array_record into data_dir, once.

  Idempotent: an existing dataset_info.json means done, checked before tfds is asked anything.
  Concurrent-safe: tfds writes into an `incomplete.*` folder and renames it into place; a
  process that loses that race gets an OSError from its rename while the winner's complete
  copy is already there, so the loser uses it. No TensorFlow is needed because the features
  are written from bytes and numbers (tfds encodes those with protobuf alone).
  """
  version_dir = data_dir / builder_cls.name / str(builder_cls.VERSION)
  if (version_dir / 'dataset_info.json').is_file():
    return version_dir
  data_dir.mkdir(parents=True, exist_ok=True)
  builder = builder_cls(data_dir=os.fspath(data_dir), file_format='array_record')
  config = tfds.download.DownloadConfig(
      try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP)
  # tfds creates an (unused) downloads folder; keep it out of the user's data_dir.
  with tempfile.TemporaryDirectory(prefix=f'{builder_cls.name}-downloads-') as downloads:
    try:
      builder.download_and_prepare(download_dir=downloads, download_config=config)
    except OSError:
      if not (version_dir / 'dataset_info.json').is_file():
        raise
  return version_dir
