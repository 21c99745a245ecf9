"""VTAB-1k: the 19 tasks, their tfds datasets and splits (as google-research/task_adaptation), GLoRA preprocessing.

Reads array_record datasets the user prepared in a data_dir; never downloads unless asked explicitly.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Callable

import numpy as np
import tensorflow_datasets as tfds

from glora_jax import errors
from glora_jax.data import prepared

# VTAB-1k training uses train800val200 (or train800 while tuning on val200) and reports on test.
SPLITS = ('train800', 'val200', 'train800val200', 'test')
IMAGE_SIZE = 224
# timm's IMAGENET_DEFAULT_MEAN / _STD, as the GLoRA (NOAH) VTAB loaders use.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)

Example = dict[str, Any]


def _clevr_count(example: Example) -> int:
  # Scenes hold 3 to 10 objects: classes 0..7.
  return len(example['objects']['size']) - 3


def _bucket(value: float, thresholds: list[float]) -> int:
  """Index of the last threshold strictly below value (task_adaptation's reduce_max(where(thrs < value)))."""
  below = np.nonzero(np.asarray(thresholds) - value < 0)[0]
  if below.size == 0:
    raise ValueError(f'value {value} lies below every threshold {thresholds}; expected above {thresholds[0]}')
  return int(below.max())


def _clevr_distance(example: Example) -> int:
  depth = np.min(example['objects']['pixel_coords'][:, 2])
  return _bucket(depth, [0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0])


def _kitti_vehicle_distance(example: Example) -> int:
  objects = example['objects']
  # Types 0, 1, 2 are Car, Van, Truck; 1000 m stands for "no vehicle" (the 4th class).
  vehicle_depths = objects['location'][np.asarray(objects['type']) < 3, 2]
  depth = np.min(np.concatenate([vehicle_depths, [1000.0]]))
  return _bucket(depth, [-100.0, 8.0, 20.0, 999.0])


def _grouped(key: str, num_original: int, num_classes: int) -> Callable[[Example], int]:
  """dSprites groups neighbouring values: label = floor(value / (num_original / num_classes))."""
  factor = num_original / num_classes

  def label_fn(example: Example) -> int:
    return int(np.floor(float(example[key]) / factor))
  return label_fn


def _binary_to_255(image: np.ndarray) -> np.ndarray:
  # dSprites pixels are 0/1; task_adaptation scales them by 255 (clipped so mock data stays uint8).
  return np.clip(image.astype(np.int32) * 255, 0, 255).astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class VtabTask:
  """One VTAB-1k task: where its data lives in tfds and how its splits and labels are made.

  val_from says where val200 comes from: 'validation' (the tfds validation split), 'test'
  (smallNORB: the first half of tfds test is VTAB's val), or 'train' (the first
  train_percent% of tfds train is VTAB's train; val200 is the 200 examples right after it).
  test is a tfds split string; 'rest_of_train' means what follows train and val
  (val_percent%) inside tfds train.
  """
  name: str
  group: str  # natural, specialized or structured
  tfds_name: str
  config: str | None
  version: str  # tfds version spec of the prepared data
  label_key: str  # feature the label is read or derived from
  num_classes: int
  val_from: str
  test: str
  train_percent: int | None = None
  val_percent: int | None = None
  label_fn: Callable[[Example], int] | None = None
  image_fn: Callable[[np.ndarray], np.ndarray] | None = None

  @property
  def tfds_id(self) -> str:
    return f'{self.tfds_name}/{self.config}' if self.config else self.tfds_name

  def tfds_split(self, split: str, num_train: int | None = None) -> str:
    """The tfds split string of a VTAB split; num_train (size of tfds train) where percentages apply."""
    if split not in SPLITS:
      raise ValueError(f"VTAB has no split '{split}'; expected one of {list(SPLITS)}")
    if self.val_from == 'train':
      if num_train is None:
        raise ValueError(f"task '{self.name}' needs the size of tfds train to place val200")
      train_count = self.train_percent * num_train // 100
      val200 = f'train[{train_count}:{train_count + 200}]'
    else:
      val200 = f'{self.val_from}[:200]'
    if split == 'test':
      if self.test == 'rest_of_train':
        val_count = self.val_percent * num_train // 100
        return f'train[{train_count + val_count}:]'
      return self.test
    return {'train800': 'train[:800]', 'val200': val200,
            'train800val200': f'train[:800]+{val200}'}[split]

  def label(self, example: Example) -> int:
    return int(self.label_fn(example)) if self.label_fn else int(example[self.label_key])

  def how_to_prepare(self, data_dir: pathlib.Path) -> str:
    manual = ''
    if self.tfds_name in ('diabetic_retinopathy_detection', 'resisc45'):
      manual = (f' {self.tfds_name} needs a manual download first, placed in '
                f'{data_dir}/downloads/manual (see its tfds catalog page).')
    return (
        f'Prepare it once as array_record, on a machine with network access (and TensorFlow if '
        f"this tfds builder needs it), then copy {data_dir}/{self.tfds_name} here if needed: "
        f'python -c "import tensorflow_datasets as tfds; '
        f"tfds.builder('{self.tfds_id}', data_dir='{data_dir}')"
        f".download_and_prepare(file_format='array_record')\" "
        f'(or glora_jax.data.vtab.load_split(..., download=True)). A copy already prepared as '
        f'tfrecord converts, with TensorFlow installed, by: tfds convert_format '
        f'--dataset_version_dir=<its version folder> --out_file_format=array_record.{manual}')


def _natural(name, tfds_name, version, num_classes, val_from, test='test', train_percent=None, config=None):
  return VtabTask(name, 'natural', tfds_name, config, version, 'label', num_classes, val_from, test,
                  train_percent=train_percent)


_TASK_LIST = (
    # Natural.
    _natural('cifar', 'cifar100', '3.*.*', 100, 'train', train_percent=90),
    _natural('caltech101', 'caltech101', '3.*.*', 102, 'train', train_percent=90),
    _natural('dtd', 'dtd', '3.*.*', 47, 'validation'),
    _natural('oxford_flowers102', 'oxford_flowers102', '2.*.*', 102, 'validation'),
    # task_adaptation pinned 3.*.*; tfds 4.9 can only prepare 4.0.0, so any version is accepted.
    _natural('oxford_iiit_pet', 'oxford_iiit_pet', '*', 37, 'train', train_percent=80),
    _natural('svhn', 'svhn_cropped', '3.*.*', 10, 'train', train_percent=90),
    _natural('sun397', 'sun397', '4.*.*', 397, 'validation', config='tfds'),
    # Specialized.
    VtabTask('patch_camelyon', 'specialized', 'patch_camelyon', None, '2.*.*', 'label', 2,
             'validation', 'test'),
    VtabTask('eurosat', 'specialized', 'eurosat', 'rgb', '2.*.*', 'label', 10, 'train',
             'rest_of_train', train_percent=60, val_percent=20),
    VtabTask('resisc45', 'specialized', 'resisc45', None, '3.*.*', 'label', 45, 'train',
             'rest_of_train', train_percent=60, val_percent=20),
    VtabTask('diabetic_retinopathy', 'specialized', 'diabetic_retinopathy_detection',
             'btgraham-300', '3.*.*', 'label', 5, 'validation', 'test'),
    # Structured.
    VtabTask('clevr_count', 'structured', 'clevr', None, '3.*.*', 'objects/size', 8, 'train',
             'validation', train_percent=90, label_fn=_clevr_count),
    VtabTask('clevr_dist', 'structured', 'clevr', None, '3.*.*', 'objects/pixel_coords', 6,
             'train', 'validation', train_percent=90, label_fn=_clevr_distance),
    VtabTask('dmlab', 'structured', 'dmlab', None, '2.0.1', 'label', 6, 'validation', 'test'),
    # task_adaptation used kitti 3.1.0; tfds 4.9 prepares 3.3.0.
    VtabTask('kitti', 'structured', 'kitti', None, '3.*.*', 'objects/location', 4, 'validation',
             'test', label_fn=_kitti_vehicle_distance),
    VtabTask('dsprites_loc', 'structured', 'dsprites', None, '2.*.*', 'label_x_position', 16,
             'train', 'rest_of_train', train_percent=80, val_percent=10,
             label_fn=_grouped('label_x_position', 32, 16), image_fn=_binary_to_255),
    VtabTask('dsprites_ori', 'structured', 'dsprites', None, '2.*.*', 'label_orientation', 16,
             'train', 'rest_of_train', train_percent=80, val_percent=10,
             label_fn=_grouped('label_orientation', 40, 16), image_fn=_binary_to_255),
    VtabTask('smallnorb_azi', 'structured', 'smallnorb', None, '2.*.*', 'label_azimuth', 18,
             'test', 'test[50%:]'),
    VtabTask('smallnorb_ele', 'structured', 'smallnorb', None, '2.*.*', 'label_elevation', 9,
             'test', 'test[50%:]'),
)
TASKS: dict[str, VtabTask] = {task.name: task for task in _TASK_LIST}


def get_task(name: str | VtabTask) -> VtabTask:
  if isinstance(name, VtabTask):
    return name
  if name not in TASKS:
    raise ValueError(f"unknown VTAB task '{name}'; known tasks: {', '.join(TASKS)}")
  return TASKS[name]


def preprocess_image(image: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """GLoRA's VTAB transform: bicubic resize to size x size, scale to [0, 1], ImageNet mean/std; HWC float32."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  image = np.asarray(image)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)  # Grayscale tasks are tiled to 3 channels, as VTAB does.
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'image has shape {image.shape} and dtype {image.dtype}; expected (H, W, 3) or '
                     '(H, W, 1) uint8')
  resized = Image.fromarray(image).resize((size, size), resample=Image.BICUBIC)
  pixels = np.asarray(resized, dtype=np.float32) / 255.0
  return (pixels - IMAGENET_MEAN) / IMAGENET_STD


def preprocess_example(task: str | VtabTask, example: Example, size: int = IMAGE_SIZE) -> dict[str, np.ndarray]:
  """A raw tfds example of the task as {'image': (size, size, 3) float32, 'label': int32 scalar}."""
  task = get_task(task)
  image = example['image']
  if task.image_fn is not None:
    image = task.image_fn(image)
  return {'image': preprocess_image(image, size), 'label': np.int32(task.label(example))}


def _split_sizes(version_dir: pathlib.Path) -> dict[str, int]:
  info = prepared.read_dataset_info(version_dir)
  return {s['name']: sum(int(n) for n in s.get('shardLengths', [])) for s in info.get('splits', [])}


def prepare_task(task: str | VtabTask, data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Downloads and prepares a task's tfds dataset as array_record: network, and maybe TensorFlow.

  Only called when the user asks for it (download=True); nothing else here downloads.
  """
  task = get_task(task)
  data_dir = prepared.resolve_data_dir(data_dir)
  builder = tfds.builder(task.tfds_id, data_dir=os.fspath(data_dir))
  builder.download_and_prepare(file_format='array_record')
  return pathlib.Path(builder.data_dir)


def open_split(task: str | VtabTask, split: str, data_dir: str | os.PathLike | None = None,
               download: bool = False):
  """The raw tfds data source of a VTAB-1k split (undecoded features, as tfds stores them).

  Looks for the prepared files first, so a missing dataset fails at once with how to prepare
  it; with download=True it is downloaded and prepared instead.
  """
  task = get_task(task)
  if split not in SPLITS:
    raise ValueError(f"VTAB has no split '{split}'; expected one of {list(SPLITS)}")
  data_dir = prepared.resolve_data_dir(data_dir)
  find = lambda: prepared.find_prepared(data_dir, task.tfds_name, task.config, task.version,
                                        task.how_to_prepare(data_dir))
  try:
    version_dir = find()
  except errors.DatasetNotPreparedError:
    if not download:
      raise
    prepare_task(task, data_dir)
    version_dir = find()
  sizes = _split_sizes(version_dir)
  tfds_split = task.tfds_split(split, sizes.get('train'))
  return prepared.open_data_source(f'{task.tfds_id}:{version_dir.name}', tfds_split, data_dir)


class VtabSource:
  """A VTAB-1k split with GLoRA preprocessing: random access to {'image', 'label'} numpy examples."""

  def __init__(self, task: str | VtabTask, raw_source, image_size: int = IMAGE_SIZE):
    self.task = get_task(task)
    self.raw_source = raw_source
    self.image_size = image_size

  def __len__(self) -> int:
    return len(self.raw_source)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return preprocess_example(self.task, self.raw_source[index], self.image_size)

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    getitems = getattr(self.raw_source, '__getitems__', None)
    indices = [int(i) for i in indices]
    raw = getitems(indices) if getitems else [self.raw_source[i] for i in indices]
    return [preprocess_example(self.task, example, self.image_size) for example in raw]

  @property
  def num_classes(self) -> int:
    return self.task.num_classes


def load_split(task: str | VtabTask, split: str, data_dir: str | os.PathLike | None = None,
               download: bool = False, image_size: int = IMAGE_SIZE) -> VtabSource:
  """A preprocessed VTAB-1k split, read lazily (a test split can hold tens of thousands of images)."""
  return VtabSource(task, open_split(task, split, data_dir, download), image_size)
