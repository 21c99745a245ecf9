"""A run's data from its config.data, whatever the way in: a bundled or VTAB dataset by name,
files ('json', 'csv', 'imagefolder'), any prepared tfds dataset ('tfds:<name>[/<config>]') or
GLUE ('glue/<task>'); then a validation share carved off train, k-shot sampling, a limit.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from glora_jax.data import files, glue, registry, sampling, tfds_named
from glora_jax.errors import DataError

ROLES = ('train', 'eval', 'test')
FILE_FORMATS = ('json', 'csv', 'imagefolder')
GLUE_PREFIX = 'glue/'
# The task's metrics when config.data.metrics leaves them to the data (headline first).
DEFAULT_METRICS = {'classification': ('accuracy',), 'regression': ('pearson', 'spearman')}


@dataclasses.dataclass(frozen=True)
class TaskData:
  """A dataset as a task reads it.

  splits: role ('train', 'eval', 'test') -> for text, columns {'text', 'text_pair'
  (sentence pairs), 'label'} in memory; for images, a random-access source of
  {'image', 'label'} examples (read lazily) or, for small bundled sets, arrays.
  record: what the run writes beside its checkpoints (data.json) and its export
  (labels and how its subsets were drawn), JSON-ready."""
  modality: str  # 'text' | 'image'
  kind: str  # 'classification' | 'regression'
  class_names: tuple[str, ...]
  metrics: tuple[str, ...]  # the headline (the search's fitness) first
  splits: dict[str, Any]
  record: dict

  @property
  def num_classes(self) -> int:
    """Outputs of the task head: one per class, one for regression."""
    return 1 if self.kind == 'regression' else len(self.class_names)


class Subset:
  """Examples `indices` of a random-access source, itself random access (k-shot, a
  carved validation split); `labels` as its source's, without reading an image."""

  def __init__(self, source, indices: np.ndarray):
    self.source, self.indices = source, np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, index: int):
    return self.source[int(self.indices[index])]

  def __getitems__(self, indices):
    picked = [int(self.indices[i]) for i in indices]
    getitems = getattr(self.source, '__getitems__', None)
    return getitems(picked) if getitems else [self.source[i] for i in picked]

  @property
  def labels(self) -> np.ndarray:
    return labels_of(self.source)[self.indices]


def labels_of(split) -> np.ndarray:
  """The label column of a split: columns' 'label', or a source's labels (a method
  or an attribute) read without decoding images."""
  if isinstance(split, Mapping):
    return np.asarray(split['label'])
  labels = getattr(split, 'labels', None)
  if labels is None:
    raise DataError(f'{type(split).__name__} gives no labels without reading every example; '
                    'data.shots and data.val_fraction need them')
  return np.asarray(labels() if callable(labels) else labels)


def size(split) -> int:
  """Examples in a split: columns' length, or a source's len."""
  return len(labels_of(split)) if isinstance(split, Mapping) else len(split)


def take(split, indices: np.ndarray):
  """Examples `indices` of a split: columns indexed, a source viewed."""
  if isinstance(split, Mapping):
    return {k: np.asarray(v)[indices] for k, v in split.items()}
  return Subset(split, indices)


def _data_dir(dc) -> str | None:
  return dc.get('data_dir') or None


def _wanted(dc) -> dict[str, str]:
  return {role: dc.get(f'{role}_split', '') for role in ROLES if dc.get(f'{role}_split', '')}


def _from_files(dc) -> TaskData:
  """json / csv texts, or an imagefolder: each split a file, a glob or a directory."""
  wanted = _wanted(dc)
  if 'train' not in wanted:
    raise DataError(f"data.name '{dc.name}' reads files: data.train_split names them (a file, a "
                    'glob, or for imagefolder a directory of class folders)')
  if dc.name == 'imagefolder':
    train = files.ImageFolder(wanted['train'], image_size=dc.get('image_size', 0))
    splits = {role: train if role == 'train' else files.ImageFolder(
        path, class_names=train.class_names, image_size=dc.get('image_size', 0))
              for role, path in wanted.items()}
    for folder in splits.values():  # an image that does not decode fails now, not mid-run
      folder.verify()
    return TaskData('image', 'classification', train.class_names, (), splits,
                    {'class_names': list(train.class_names), 'kind': 'classification'})
  columns = {role: files.text_columns(
      files.read_records(path, dc.name), dc.get('text_key') or 'text',
      dc.get('text_pair_key') or '', dc.get('label_key') or 'label', source=path,
      parse_numbers=dc.name == 'csv')
             for role, path in wanted.items()}
  encoding = files.encode_labels({role: c['label'] for role, c in columns.items()})
  splits = {role: dict(c, label=encoding.labels[role]) for role, c in columns.items()}
  return TaskData('text', encoding.kind, encoding.class_names, (), splits,
                  files.label_mapping(encoding))


def _keys(dc, features: tfds_named.Features) -> dict[str, str]:
  """tfds features for the canonical keys: the defaults, or data.text_key, text_pair_key,
  label_key where set."""
  keys = tfds_named.default_keys(features)
  for canonical in ('text', 'text_pair', 'label'):
    if dc.get(f'{canonical}_key'):
      keys[canonical] = dc[f'{canonical}_key']
  return keys


def _from_tfds(dc, tfds_id: str, keys: dict[str, str] | None = None,
               metrics: tuple[str, ...] = ()) -> TaskData:
  """A prepared tfds dataset by name; text read whole, images lazily."""
  data_dir = _data_dir(dc)
  features = tfds_named.describe(tfds_id, data_dir)
  keys = keys or _keys(dc, features)
  if 'label' not in keys:
    raise DataError(f"'{tfds_id}' has no label feature to train on (features "
                    f'{sorted(features.feature_info)}); set data.label_key')
  sources = {}
  for role, split in _wanted(dc).items():
    tfds_named.check_split(tfds_id, split, data_dir)
    sources[role] = tfds_named.open_split(tfds_id, split, data_dir, keys,
                                          image_size=dc.get('image_size', 0))
  train = sources.get('train') or next(iter(sources.values()))
  modality = 'image' if 'image' in keys else 'text'
  splits = ({role: tfds_named.text_columns(s) for role, s in sources.items()}
            if modality == 'text' else sources)
  kind = train.label_kind
  names = train.class_names if kind == 'classification' else ()
  if kind == 'classification' and not names:
    names = tuple(str(i) for i in range(train.num_classes))
  return TaskData(modality, kind, names, metrics, splits,
                  {'kind': kind, 'class_names': list(names), 'tfds': tfds_id,
                   'version': features.version})


def _from_glue(dc) -> TaskData:
  """A GLUE task: its sentence (pair) features, label and metrics (glue.TASKS)."""
  try:
    task = glue.get_task(dc.name)
  except ValueError as e:
    raise DataError(str(e)) from None
  return _from_tfds(dc, task.tfds_id, task.keys, task.metrics)


def _from_registry(dc) -> TaskData:
  """bbc_news, mnist5k and the VTAB-1k tasks."""
  name, data_dir = dc.name, _data_dir(dc)
  registry.splits(name)  # an unknown name fails here, naming the known ones
  names = registry.class_names(name, data_dir)
  splits = {}
  for role, split in _wanted(dc).items():
    if split not in registry.splits(name):
      raise DataError(f"dataset '{name}' has no split '{split}' (data.{role}_split); expected one "
                      f'of {list(registry.splits(name))}')
    if name in registry.TEXT_DATASETS:
      arrays = registry.load_arrays(name, split, data_dir)
      splits[role] = {'text': arrays['text'], 'label': arrays['label'].astype(np.int32)}
    elif name in registry.BUNDLED_DATASETS:
      arrays = registry.load_arrays(name, split, data_dir)
      splits[role] = {'image': arrays['image'], 'label': arrays['label'].astype(np.int32)}
    else:
      splits[role] = registry.load_source(name, split, data_dir)
  modality = 'text' if name in registry.TEXT_DATASETS else 'image'
  return TaskData(modality, 'classification', names, (), splits,
                  {'kind': 'classification', 'class_names': list(names)})


def _resolve(dc) -> TaskData:
  name = dc.name
  if name in FILE_FORMATS:
    return _from_files(dc)
  if name.startswith(GLUE_PREFIX) or name.startswith(tfds_named.PREFIX + GLUE_PREFIX):
    return _from_glue(dc)
  if name.startswith(tfds_named.PREFIX):
    return _from_tfds(dc, '/'.join(filter(None, tfds_named.parse(name))))
  if name in registry.dataset_names():
    return _from_registry(dc)
  raise DataError(f"unknown dataset '{name}'; expected one of {list(registry.dataset_names())}, "
                  f"{list(FILE_FORMATS)} (your files), 'tfds:<name>[/<config>]' (prepared with "
                  f"tensorflow-datasets) or 'glue/<task>' ({', '.join(glue.TASKS)})")


def _carve_val(data: TaskData, dc, record: dict) -> dict:
  """An eval split carved off train (data.val_fraction, seeded by data.val_seed) when
  none is named: stratified by class, recorded by index into the train split."""
  fraction = dc.get('val_fraction', 0.0)
  splits = dict(data.splits)
  if not fraction:
    return splits
  if 'eval' in splits:
    raise DataError(f'data.val_fraction={fraction} carves an eval split off train, but '
                    f"data.eval_split='{dc.eval_split}' names one; set data.eval_split='' or "
                    'data.val_fraction=0')
  labels = labels_of(splits['train'])
  kept, carved = sampling.stratified_split(labels, fraction, dc.get('val_seed', 0))
  splits['eval'], splits['train'] = take(splits['train'], carved), take(splits['train'], kept)
  record['val_from_train'] = {'fraction': fraction, 'seed': dc.get('val_seed', 0),
                              'indices': carved.tolist()}
  return splits


def _check(data: TaskData, splits: dict, dc) -> None:
  """Every split holds examples; eval and test labels are classes train knows."""
  for role, split in splits.items():
    if size(split) == 0:
      raise DataError(f"the {role} split ('{dc.get(f'{role}_split', '')}' of {dc.name}) holds no "
                      'examples; expected at least one')
  if data.kind == 'classification' and 'train' in splits and isinstance(splits['train'], Mapping):
    seen = set(np.unique(labels_of(splits['train'])).tolist())
    for role in ('eval', 'test'):
      if role in splits and isinstance(splits[role], Mapping):
        unseen = sorted(set(np.unique(labels_of(splits[role])).tolist()) - seen)
        if unseen:
          names = [data.class_names[i] if 0 <= i < len(data.class_names) else i for i in unseen]
          raise DataError(f'the {role} split has labels {names[:10]} that the train split never '
                          'has; expected only classes seen in training')


def open_task(dc) -> TaskData:
  """The data of config.data, checked and subset: eval carved off train
  (val_fraction), `shots` examples of each class kept in train (shots_seed), then
  the first `limit` examples of every split (tests). Eval and test are never
  subsampled by shots."""
  data = _resolve(dc)
  record = dict(data.record)
  splits = _carve_val(data, dc, record)
  shots = dc.get('shots', 0)
  if shots:
    if data.kind != 'classification':
      raise DataError(f'data.shots={shots} draws examples per class; {dc.name} is a regression task')
    keep = sampling.k_shot(labels_of(splits['train']), shots, dc.get('shots_seed', 0),
                           len(data.class_names))
    splits['train'] = take(splits['train'], keep)
    record['shots'] = {'k': shots, 'seed': dc.get('shots_seed', 0), 'indices': keep.tolist()}
  if dc.get('limit', 0):
    splits = {role: take(s, np.arange(min(dc.limit, size(s)))) for role, s in splits.items()}
  _check(data, splits, dc)
  metrics = tuple(dc.get('metrics', ()) or ()) or data.metrics or DEFAULT_METRICS[data.kind]
  record['metrics'] = list(metrics)
  return dataclasses.replace(data, splits=splits, record=record, metrics=metrics)
