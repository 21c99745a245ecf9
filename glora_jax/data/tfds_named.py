"""Any tfds dataset prepared in the data_dir, named `data.name = 'tfds:<name>[/<config>]'`.

Found and described from its files alone; read through tfds.data_source (array_record, no
TensorFlow, never a download).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import re
from typing import Any, Mapping

import numpy as np
import tensorflow_datasets as tfds

from glora_jax.data import prepared, vtab
from glora_jax.errors import DataError, DatasetNotPreparedError

PREFIX = 'tfds:'
CANONICAL_KEYS = ('image', 'text', 'text_pair', 'label')
_NAME_RE = re.compile(r'^[A-Za-z0-9_]+(/[A-Za-z0-9_.-]+)?$')
_FLOAT_DTYPES = ('float16', 'bfloat16', 'float32', 'float64')
_INT_DTYPES = ('int8', 'int16', 'int32', 'int64', 'uint8', 'uint16', 'uint32', 'uint64')
# Records read per __getitems__ when a whole column is scanned: bounds the memory of a scan.
_SCAN_CHUNK = 1024
# tfds's own list of builder packages (registered._import_legacy_builders), see builder_cls.
_BUILDER_PACKAGES = (
    'audio', 'graphs', 'image', 'image_classification', 'object_detection', 'nearest_neighbors',
    'question_answering', 'd4rl', 'ranking', 'recommendation', 'rl_unplugged', 'rlds.datasets',
    'robotics', 'robomimic', 'structured', 'summarization', 'text', 'text_simplification',
    'time_series', 'translate', 'video', 'vision_language')


def parse(name: str) -> tuple[str, str | None]:
  """'tfds:glue/sst2' -> ('glue', 'sst2'); 'tfds:food101' -> ('food101', None)."""
  if not isinstance(name, str) or not name.startswith(PREFIX) or not _NAME_RE.match(name[len(PREFIX):]):
    raise DataError(f"dataset name {name!r} is malformed; expected 'tfds:<name>[/<config>]', "
                    "e.g. 'tfds:food101' or 'tfds:glue/sst2'")
  dataset, _, config = name[len(PREFIX):].partition('/')
  return dataset, config or None


def _split_id(tfds_id: str) -> tuple[str, str | None, str]:
  """(name, config, 'name[/config]') of a tfds id, with or without the 'tfds:' prefix."""
  name, config = parse(tfds_id if str(tfds_id).startswith(PREFIX) else PREFIX + str(tfds_id))
  return name, config, f'{name}/{config}' if config else name


def how_to_prepare(tfds_id: str, data_dir: pathlib.Path) -> str:
  """The command that prepares a dataset as array_record (vtab.VtabTask.how_to_prepare's wording)."""
  name, _, full = _split_id(tfds_id)
  return (
      f'Prepare it once as array_record, on a machine with network access (and TensorFlow if '
      f"this tfds builder needs it), then copy {data_dir}/{name} here if needed: "
      f'python -c "import tensorflow_datasets as tfds; '
      f"tfds.builder('{full}', data_dir='{data_dir}')"
      f".download_and_prepare(file_format='array_record')\" "
      f'(a builder that needs a manual download says so on its tfds catalog page). A copy already '
      f'prepared as tfrecord converts, with TensorFlow installed, by: tfds convert_format '
      f'--dataset_version_dir=<its version folder> --out_file_format=array_record.')


def find(tfds_id: str, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The newest prepared version folder of tfds_id; files only, so it answers in milliseconds."""
  name, config, full = _split_id(tfds_id)
  data_dir = prepared.resolve_data_dir(data_dir)
  try:
    return prepared.find_prepared(data_dir, name, config, '*', how_to_prepare(full, data_dir))
  except DatasetNotPreparedError:
    root = prepared.dataset_dir(data_dir, name)
    if config is None and root.is_dir():
      # A builder with configs keeps one folder per config: the name alone is then incomplete.
      configs = sorted(d.name for d in root.iterdir()
                       if d.is_dir() and prepared.prepared_versions(data_dir, name, d.name))
      if configs:
        raise DataError(f"dataset '{name}' is prepared only per config; expected "
                        f"'tfds:{name}/<config>' with a config among {configs}") from None
    raise


@dataclasses.dataclass(frozen=True)
class FeatureInfo:
  """One top-level feature as features.json describes it."""
  kind: str  # 'image', 'text', 'class_label', 'tensor', or the JSON's own name for others
  dtype: str = ''  # of tensors and images
  shape: tuple[int | None, ...] = ()  # of tensors and images; None where free
  num_classes: int = 0  # of class labels


@dataclasses.dataclass(frozen=True)
class Features:
  """What a prepared dataset holds, read from its dataset_info.json and features.json.

  label_key: the ClassLabel named 'label', else the only ClassLabel, else a scalar float
  Tensor named 'label' (label_kind 'regression', num_classes 1); None (num_classes 0) if none.
  """
  tfds_id: str  # 'name[/config]'
  data_dir: pathlib.Path
  version_dir: pathlib.Path
  feature_info: dict[str, FeatureInfo]
  image_keys: tuple[str, ...]
  text_keys: tuple[str, ...]  # in feature order (tfds sorts features by key)
  label_key: str | None
  label_kind: str | None  # 'classification', 'regression' or None
  num_classes: int
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  supervised_keys: tuple[str, ...] | None

  @property
  def version(self) -> str:
    return self.version_dir.name


def _feature_info(key: str, spec: Mapping[str, Any], where: pathlib.Path) -> FeatureInfo:
  def shape_of(content):
    dims = (content.get('shape') or {}).get('dimensions', [])
    return tuple(None if int(d) < 0 else int(d) for d in dims)

  if 'image' in spec:
    return FeatureInfo('image', spec['image'].get('dtype', 'uint8'), shape_of(spec['image']))
  if 'text' in spec:
    return FeatureInfo('text')
  if 'classLabel' in spec:
    try:
      return FeatureInfo('class_label', 'int64', (), int(spec['classLabel']['numClasses']))
    except (KeyError, TypeError, ValueError):
      raise DataError(f"feature '{key}' in {where} is a ClassLabel without a numClasses; "
                      'expected {"classLabel": {"numClasses": "<n>"}}') from None
  if 'tensor' in spec:
    return FeatureInfo('tensor', spec['tensor'].get('dtype', ''), shape_of(spec['tensor']))
  kinds = [k for k in spec if k != 'pythonClassName']
  return FeatureInfo(kinds[0] if kinds else spec.get('pythonClassName', 'unknown'))


def _features_spec(version_dir: pathlib.Path, info: Mapping[str, Any]) -> tuple[dict, pathlib.Path]:
  """The features JSON: dataset_info.json's 'features' where tfds put them there, else features.json."""
  if info.get('features') is not None:
    return info['features'], version_dir / 'dataset_info.json'
  where = version_dir / 'features.json'
  if not where.is_file():
    raise DataError(f'{version_dir} has no features.json and its dataset_info.json no features; '
                    'expected one of them, as tfds writes when it prepares a dataset')
  try:
    with open(where, encoding='utf-8') as f:
      return json.load(f), where
  except ValueError as e:
    raise DataError(f'{where} is not valid JSON ({_one_line(e)}); expected the file tfds wrote') from None


def _top_level(spec: Any, where: pathlib.Path) -> dict[str, Any]:
  try:
    return dict(spec['featuresDict']['features'])
  except (KeyError, TypeError):
    raise DataError(f'features in {where} are not a FeaturesDict; expected '
                    '{"featuresDict": {"features": {...}}}') from None


def _class_names(version_dir: pathlib.Path, key: str, info: FeatureInfo,
                 spec: Mapping[str, Any] | None) -> tuple[str, ...]:
  """A ClassLabel's names: tfds's <key>.labels.txt, else names inline in the JSON, else '0'..'n-1'."""
  path = version_dir / f'{key}.labels.txt'
  inline = ((spec or {}).get('classLabel') or {}).get('names')
  if path.is_file():
    names = [line.strip() for line in path.read_text(encoding='utf-8').splitlines() if line.strip()]
  elif inline:
    names, path = list(inline), f"the features JSON of {version_dir}"
  else:
    return tuple(str(i) for i in range(info.num_classes))
  if len(names) != info.num_classes:
    raise DataError(f"{path} lists {len(names)} class names for feature '{key}'; expected "
                    f'{info.num_classes}, its numClasses')
  return tuple(names)


def _supervised_keys(info: Mapping[str, Any]) -> tuple[str, ...] | None:
  keys = info.get('supervisedKeys')
  if not keys:
    return None
  if 'tuple' in keys:  # tfds >= 4.4 writes {"tuple": {"items": [{"featureKey": ...}, ...]}}.
    items = [item.get('featureKey') for item in keys['tuple'].get('items', [])]
    return tuple(items) if all(items) else None
  if 'input' in keys and 'output' in keys:  # Older tfds wrote {"input": ..., "output": ...}.
    return (keys['input'], keys['output'])
  return None


def _split_sizes(info: Mapping[str, Any]) -> dict[str, int]:
  return {s['name']: sum(int(n) for n in s.get('shardLengths', [])) for s in info.get('splits', [])}


def _pick_label(features: dict[str, FeatureInfo]) -> tuple[str | None, str | None]:
  class_labels = [k for k, f in features.items() if f.kind == 'class_label']
  if 'label' in class_labels:
    return 'label', 'classification'
  if len(class_labels) == 1:
    return class_labels[0], 'classification'
  label = features.get('label')
  if label and label.kind == 'tensor' and label.shape == () and label.dtype in _FLOAT_DTYPES:
    return 'label', 'regression'
  return None, None


def describe(tfds_id: str, data_dir: str | os.PathLike | None = None) -> Features:
  """The features, label and split sizes of a prepared dataset, from its files (no tfds call)."""
  data_dir = prepared.resolve_data_dir(data_dir)
  version_dir = find(tfds_id, data_dir)
  info = prepared.read_dataset_info(version_dir)
  spec, where = _features_spec(version_dir, info)
  specs = _top_level(spec, where)
  features = {key: _feature_info(key, value, where) for key, value in specs.items()}
  label_key, label_kind = _pick_label(features)
  num_classes, class_names = 0, ()
  if label_kind == 'classification':
    num_classes = features[label_key].num_classes
    class_names = _class_names(version_dir, label_key, features[label_key], specs[label_key])
  elif label_kind == 'regression':
    num_classes = 1
  return Features(
      tfds_id=_split_id(tfds_id)[2], data_dir=data_dir, version_dir=version_dir,
      feature_info=features,
      image_keys=tuple(k for k, f in features.items() if f.kind == 'image'),
      text_keys=tuple(k for k, f in features.items() if f.kind == 'text'),
      label_key=label_key, label_kind=label_kind, num_classes=num_classes,
      class_names=class_names, split_sizes=_split_sizes(info),
      supervised_keys=_supervised_keys(info))


def _split_dict(version_dir: pathlib.Path, info: Mapping[str, Any]) -> tfds.core.SplitDict:
  """tfds's own SplitDict of the prepared files, so slices count exactly as tfds.data_source does."""
  infos = []
  for split in info.get('splits', []):
    template = tfds.core.ShardedFileTemplate(
        data_dir=version_dir, dataset_name=info.get('name', ''), filetype_suffix='array_record',
        template=split.get('filepathTemplate', '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}'))
    infos.append(tfds.core.SplitInfo(
        name=split['name'], shard_lengths=[int(n) for n in split.get('shardLengths', [])],
        num_bytes=int(split.get('numBytes', 0)), filename_template=template))
  return tfds.core.SplitDict(infos)


def _one_line(error: Exception) -> str:
  return ' '.join(str(error).split())


def check_split(tfds_id: str, split: str, data_dir: str | os.PathLike | None = None) -> int:
  """How many examples a tfds split string ('train', 'train[:800]', 'train[10%:]+validation')
  selects; DataError for an unknown split, a malformed or out-of-range slice, or no example."""
  return _count(_split_id(tfds_id)[2], find(tfds_id, data_dir), split)


def _count(full: str, version_dir: pathlib.Path, split: str) -> int:
  info = prepared.read_dataset_info(version_dir)
  sizes = _split_sizes(info)
  try:
    tfds.core.ReadInstruction.from_spec(split)
  except (ValueError, NotImplementedError):
    raise DataError(f"split {split!r} of '{full}' is malformed; expected a tfds split such as "
                    "'train', 'train[:800]', 'train[10%:]' or 'train+validation'") from None
  for part in re.split(r'\s*\+\s*', split):
    base = re.match(r'[\w-]+', part).group(0)  # from_spec accepted it, so it starts with a name.
    if base != 'all' and base not in sizes:
      raise DataError(f"split '{base}' of '{full}' does not exist in {version_dir}; expected one "
                      f'of {sorted(sizes)}')
  try:
    count = _split_dict(version_dir, info)[split].num_examples
  except ValueError as e:
    raise DataError(f"split {split!r} of '{full}' cannot be read: {_one_line(e).rstrip('.')}; "
                    f'expected a slice within the split sizes {sizes}') from None
  if count == 0:
    raise DataError(f"split '{split}' of '{full}' is empty; expected at least one example")
  return count


def _open(features: Features, split: str, skip: tuple[str, ...]):
  """tfds.data_source of the described version; features in `skip` come back as undecoded bytes."""
  # Pinned to the version, so tfds reads the very folder `find` chose.
  name = f'{features.tfds_id}:{features.version}'
  data_dir = features.data_dir
  if not skip:
    return prepared.open_data_source(name, split, data_dir)
  return tfds.data_source(name, split=split, data_dir=os.fspath(data_dir), download=False,
                          decoders={key: tfds.decode.SkipDecoding() for key in skip})


def _label_dtype(key: str, info: FeatureInfo, full: str) -> type:
  if info.kind == 'class_label' or (info.kind == 'tensor' and info.shape == () and info.dtype in _INT_DTYPES):
    return np.int32
  if info.kind == 'tensor' and info.shape == () and info.dtype in _FLOAT_DTYPES:
    return np.float32
  raise DataError(f"feature '{key}' of '{full}' is a {info.kind} {info.dtype}{list(info.shape)}; "
                  'expected a ClassLabel or a scalar int or float tensor as the label')


def _check_keys(keys: Mapping[str, str], features: Features) -> None:
  wanted = {'image': ('image',), 'text': ('text',), 'text_pair': ('text',),
            'label': ('class_label', 'tensor')}
  for canonical, key in keys.items():
    if canonical not in wanted:
      raise DataError(f"key '{canonical}' is not a canonical key; expected one of {list(CANONICAL_KEYS)}")
    info = features.feature_info.get(key)
    if info is None:
      raise DataError(f"'{features.tfds_id}' has no feature '{key}' (for '{canonical}'); expected "
                      f'one of {sorted(features.feature_info)}')
    if info.kind not in wanted[canonical]:
      raise DataError(f"feature '{key}' of '{features.tfds_id}' is a {info.kind}, not usable as "
                      f"'{canonical}'; expected a {' or '.join(wanted[canonical])} feature")
  if 'text_pair' in keys and 'text' not in keys:
    raise DataError("keys map 'text_pair' without 'text'; expected 'text' for the first segment")


def default_keys(features: Features) -> dict[str, str]:
  """Canonical keys for open_split: the first image and the label for image datasets, else
  the first two text features and the label."""
  keys = {}
  if features.image_keys:
    keys['image'] = features.image_keys[0]
  else:
    keys.update(zip(('text', 'text_pair'), features.text_keys[:2]))
  if features.label_key:
    keys['label'] = features.label_key
  return keys


class TfdsSource:
  """A split as a random-access source of {canonical key: numpy value} examples.

  Text comes back as str, images as uint8 arrays (image_size 0) or vtab.preprocess_image's
  float32 (size, size, 3), labels as int32 (classification) or float32 (regression).
  Records are read on demand; only labels() and text_columns scan the whole split.
  """

  def __init__(self, features: Features, split: str, keys: Mapping[str, str], image_size: int = 0):
    _check_keys(keys, features)
    if image_size < 0:
      raise DataError(f'image_size is {image_size}; expected 0 (images as stored) or a positive size')
    self.features = features
    self.split = split
    self.keys = dict(keys)
    self.image_size = image_size
    _count(features.tfds_id, features.version_dir, split)  # DataError now, not at the first read.
    self.label_dtype = None
    if 'label' in self.keys:
      label_key = self.keys['label']
      self.label_dtype = _label_dtype(label_key, features.feature_info[label_key], features.tfds_id)
    # Images no canonical key asks for are skipped undecoded: decoding is most of a read.
    unused = tuple(k for k in features.image_keys if k not in self.keys.values())
    self.raw_source = _open(features, split, unused)
    self._labels = None

  @property
  def label_kind(self) -> str | None:
    if self.label_dtype is None:
      return None
    return 'regression' if self.label_dtype is np.float32 else 'classification'

  @property
  def num_classes(self) -> int:
    """Classes of a ClassLabel label; 1 for regression; 0 without a label or its class count."""
    info = self.features.feature_info.get(self.keys.get('label'))
    if info is None:
      return 0
    return info.num_classes if info.kind == 'class_label' else int(self.label_kind == 'regression')

  @property
  def class_names(self) -> tuple[str, ...]:
    if self.keys.get('label') == self.features.label_key:
      return self.features.class_names
    info = self.features.feature_info[self.keys['label']] if 'label' in self.keys else None
    if info is None or info.kind != 'class_label':
      return ()
    return _class_names(self.features.version_dir, self.keys['label'], info, None)

  def __len__(self) -> int:
    return len(self.raw_source)

  def _convert(self, raw: Mapping[str, Any]) -> dict[str, Any]:
    example = {}
    for canonical in CANONICAL_KEYS:
      if canonical not in self.keys:
        continue
      value = raw[self.keys[canonical]]
      if canonical in ('text', 'text_pair'):
        example[canonical] = value.decode('utf-8') if isinstance(value, bytes) else str(value)
      elif canonical == 'image':
        image = np.asarray(value)
        example[canonical] = vtab.preprocess_image(image, self.image_size) if self.image_size else image
      else:
        example[canonical] = self.label_dtype(value)
    return example

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self.raw_source[int(index)])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    indices = [int(i) for i in indices]
    return [self._convert(raw) for raw in _read(self.raw_source, indices)]

  def labels(self) -> np.ndarray:
    """The whole label column, read once without decoding any image, then cached."""
    if 'label' not in self.keys:
      raise DataError(f"split '{self.split}' of '{self.features.tfds_id}' was opened without a "
                      "'label' key; expected keys to map 'label' to a feature")
    if self._labels is None:
      # tfds.data_source takes decoders (tfds 4.9.10), so image bytes are read but never decoded.
      source = (_open(self.features, self.split, self.features.image_keys)
                if 'image' in self.keys else self.raw_source)
      key = self.keys['label']
      self._labels = np.asarray(
          [raw[key] for raw in _scan(source)], dtype=self.label_dtype)
      self._labels.setflags(write=False)
    return self._labels


def _read(source, indices: list[int]) -> list[Mapping[str, Any]]:
  getitems = getattr(source, '__getitems__', None)
  return getitems(indices) if getitems else [source[i] for i in indices]


def _scan(source):
  for start in range(0, len(source), _SCAN_CHUNK):
    yield from _read(source, list(range(start, min(start + _SCAN_CHUNK, len(source)))))


def open_split(tfds_id: str, split: str, data_dir: str | os.PathLike | None = None,
               keys: Mapping[str, str] | None = None, image_size: int = 0) -> TfdsSource:
  """A split of a prepared dataset as a TfdsSource; keys maps canonical keys ('image', 'text',
  'text_pair', 'label') to feature keys (default_keys(describe(...)) when None)."""
  features = describe(tfds_id, data_dir)
  return TfdsSource(features, split, default_keys(features) if keys is None else keys, image_size)


def text_columns(source: TfdsSource) -> dict[str, np.ndarray]:
  """A text split whole: {'text', 'text_pair' (if mapped), 'label' (if mapped)} arrays,
  object arrays of str and int32 or float32 labels."""
  if 'text' not in source.keys or 'image' in source.keys:
    raise DataError(f"text_columns reads text splits; '{source.features.tfds_id}' was opened with "
                    f"keys {source.keys}, expected a 'text' key and no 'image'")
  rows = list(_scan(source))
  columns = {}
  for canonical in ('text', 'text_pair'):
    if canonical in source.keys:
      column = np.empty(len(rows), dtype=object)
      column[:] = [row[canonical] for row in rows]
      columns[canonical] = column
  if 'label' in source.keys:
    columns['label'] = np.asarray([row['label'] for row in rows], dtype=source.label_dtype)
  return columns


def builder_cls(name: str) -> type:
  """tfds.builder_cls(name), also when tfds's registry stops at a builder package whose extra
  dependency is missing (tfds 4.9.10 without h5py never registers 'text', so not 'glue')."""
  try:
    return tfds.builder_cls(name)
  except tfds.core.DatasetNotFoundError:
    for package in _BUILDER_PACKAGES:
      try:
        importlib.import_module(f'tensorflow_datasets.{package}')
      except ImportError:
        pass  # Only that package's builders stay unregistered.
    return tfds.builder_cls(name)
