"""Tests of VTAB-1k: task registry, split definitions, preprocessing, offline failure, mock data.

Split sizes use tiny fake prepared datasets (tfds.testing.mock_data ignores split slicing).
"""
import json
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from glora_jax import errors
from glora_jax.data import pipeline, prepared, registry, testing, vtab

LOW = float(((0.0 - vtab.IMAGENET_MEAN) / vtab.IMAGENET_STD).min())
HIGH = float(((1.0 - vtab.IMAGENET_MEAN) / vtab.IMAGENET_STD).max())


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('tfds')
  # cifar100: val200 sits after the first 90% of train, so train needs 2000 examples.
  testing.write_fake_prepared('cifar100', path, {'train': 2000, 'test': 30})
  testing.write_fake_prepared('dtd', path, {'train': 850, 'validation': 210, 'test': 30})
  testing.write_fake_prepared('smallnorb', path, {'train': 800, 'test': 410})
  return path


def test_registry_has_the_19_tasks():
  assert len(vtab.TASKS) == 19
  groups = [task.group for task in vtab.TASKS.values()]
  assert (groups.count('natural'), groups.count('specialized'), groups.count('structured')) == (7, 4, 8)
  assert vtab.TASKS['diabetic_retinopathy'].tfds_id == 'diabetic_retinopathy_detection/btgraham-300'
  assert vtab.TASKS['smallnorb_ele'].label_key == 'label_elevation'
  assert {n: vtab.TASKS[n].num_classes for n in ('clevr_count', 'clevr_dist', 'kitti', 'dsprites_ori')} == {
      'clevr_count': 8, 'clevr_dist': 6, 'kitti': 4, 'dsprites_ori': 16}


def test_split_strings_follow_task_adaptation():
  cifar = vtab.TASKS['cifar']
  assert cifar.tfds_split('train800', 50000) == 'train[:800]'
  assert cifar.tfds_split('val200', 50000) == 'train[45000:45200]'
  assert cifar.tfds_split('train800val200', 50000) == 'train[:800]+train[45000:45200]'
  assert cifar.tfds_split('test', 50000) == 'test'
  assert vtab.TASKS['eurosat'].tfds_split('test', 27000) == 'train[21600:]'
  assert vtab.TASKS['dsprites_loc'].tfds_split('val200', 737280) == 'train[589824:590024]'
  assert vtab.TASKS['clevr_count'].tfds_split('test', 70000) == 'validation'
  assert vtab.TASKS['smallnorb_azi'].tfds_split('val200') == 'test[:200]'
  assert vtab.TASKS['smallnorb_azi'].tfds_split('test') == 'test[50%:]'
  assert vtab.TASKS['kitti'].tfds_split('train800val200') == 'train[:800]+validation[:200]'


@pytest.mark.parametrize('task, test_size', [('cifar', 30), ('dtd', 30), ('smallnorb_azi', 205)])
def test_split_sizes(data_dir, task, test_size):
  sizes = {split: len(vtab.open_split(task, split, data_dir)) for split in vtab.SPLITS}
  assert sizes == {'train800': 800, 'val200': 200, 'train800val200': 1000, 'test': test_size}


@pytest.mark.parametrize('task, id_key', [('cifar', 'id'), ('dtd', 'file_name')])
def test_train800_and_val200_are_disjoint(data_dir, task, id_key):
  def ids(split):
    source = vtab.open_split(task, split, data_dir)
    return [ex[id_key] for ex in source.__getitems__(range(len(source)))]
  train, val = ids('train800'), ids('val200')
  assert len(set(train)) == 800 and len(set(val)) == 200
  assert not set(train) & set(val)
  if task == 'dtd':
    assert ids('train800val200') == train + val
  else:  # val200 is the 200 records right after VTAB's train (90% of tfds train).
    stored = prepared.open_data_source('cifar100', 'train', data_dir)
    assert val == [ex['id'] for ex in stored.__getitems__(range(1800, 2000))]


def test_preprocessing_shape_and_range(data_dir):
  source = registry.load_source('vtab/dtd', 'val200', data_dir)
  example = source[0]
  assert example['image'].shape == (224, 224, 3) and example['image'].dtype == np.float32
  assert LOW - 1e-5 <= example['image'].min() and example['image'].max() <= HIGH + 1e-5
  raw = vtab.open_split('dtd', 'val200', data_dir)[0]
  assert example['label'].dtype == np.int32 and example['label'] == raw['label']
  batch = next(iter(pipeline.eval_iterator(source, 8, process_index=0, process_count=1)))
  assert batch['image'].shape == (8, 224, 224, 3) and batch['mask'].all()
  gray = registry.load_source('vtab/smallnorb_ele', 'test', data_dir)[0]  # (96, 96, 1) tiled to 3.
  assert gray['image'].shape == (224, 224, 3)
  np.testing.assert_allclose(gray['image'][..., 0] * vtab.IMAGENET_STD[0] + vtab.IMAGENET_MEAN[0],
                             gray['image'][..., 2] * vtab.IMAGENET_STD[2] + vtab.IMAGENET_MEAN[2], atol=1e-5)


def test_preprocess_image_is_bicubic_resize_then_imagenet_normalisation():
  from PIL import Image
  image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)
  expected = np.asarray(Image.fromarray(image).resize((224, 224), Image.BICUBIC), np.float32) / 255
  np.testing.assert_allclose(vtab.preprocess_image(image),
                             (expected - vtab.IMAGENET_MEAN) / vtab.IMAGENET_STD, rtol=1e-6)


def test_unprepared_dataset_fails_fast_with_instructions(tmp_path):
  start = time.perf_counter()
  with pytest.raises(errors.DatasetNotPreparedError) as raised:
    registry.load_source('vtab/svhn', 'train800', data_dir=tmp_path)
  assert time.perf_counter() - start < 5.0  # "Does not hang on the network", not a benchmark.
  message = str(raised.value)
  assert 'svhn_cropped' in message and str(tmp_path) in message
  assert "download_and_prepare(file_format='array_record')" in message
  assert not list(tmp_path.iterdir())  # Nothing was written.
  assert 'tensorflow' not in sys.modules


def test_tfrecord_copy_is_reported_not_read(tmp_path):
  version_dir = tmp_path / 'dmlab' / '2.0.1'
  version_dir.mkdir(parents=True)
  (version_dir / 'dataset_info.json').write_text(json.dumps({'fileFormat': 'tfrecord'}))
  with pytest.raises(errors.DatasetNotPreparedError, match='convert_format'):
    vtab.open_split('dmlab', 'test', tmp_path)


def test_unknown_names_list_the_known_ones():
  with pytest.raises(ValueError, match='vtab/clevr_count'):
    registry.load_source('vtab/clever_count', 'test')
  with pytest.raises(ValueError, match='smallnorb_azi'):
    vtab.get_task('smallnorb_azimuth')
  with pytest.raises(ValueError, match='train800val200'):
    vtab.open_split('dtd', 'train1000', '/nonexistent')


def test_derived_labels():
  assert vtab.preprocess_example('clevr_count', {
      'image': np.zeros((4, 4, 3), np.uint8), 'objects': {'size': np.zeros(5)}})['label'] == 2
  coords = np.array([[0.0, 0.0, 9.2], [0.0, 0.0, 12.0]])
  assert vtab.TASKS['clevr_dist'].label({'objects': {'pixel_coords': coords}}) == 3
  no_vehicle = {'objects': {'type': np.array([4, 5]), 'location': np.zeros((2, 3))}}
  assert vtab.TASKS['kitti'].label(no_vehicle) == 3
  near_car = {'objects': {'type': np.array([0, 4]), 'location': np.array([[0, 0, 5.0], [0, 0, 1.0]])}}
  assert vtab.TASKS['kitti'].label(near_car) == 0
  assert vtab.TASKS['dsprites_loc'].label({'label_x_position': 31}) == 15
  assert vtab.TASKS['dsprites_ori'].label({'label_orientation': 39}) == 15
  assert vtab.TASKS['dsprites_ori'].label({'label_orientation': 3}) == 1


class _OneByOne:
  """Hides a mock source's __getitems__, which tfds 4.9.10's mock_data binds without `self`."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    return self.source[index]


# Each task's label from a raw example, written here from task_adaptation's definitions.
RAW_LABEL = {
    # The closest object's depth, bucketed by the last threshold strictly below it.
    'clevr_dist': lambda ex: int(np.searchsorted([0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0],
                                                 np.min(ex['objects']['pixel_coords'][:, 2])) - 1),
    'dsprites_loc': lambda ex: int(ex['label_x_position']) * 16 // 32,  # 32 positions in 16
    'dsprites_ori': lambda ex: int(ex['label_orientation']) * 16 // 40,  # 40 angles in 16
    'smallnorb_azi': lambda ex: int(ex['label_azimuth']),
    'dmlab': lambda ex: int(ex['label']),
}


# Not kitti: mock_data draws each field of a Sequence with its own length, unlike real examples.
@pytest.mark.parametrize('task', sorted(RAW_LABEL))
def test_mock_data_sources_preprocess_without_tensorflow(task):
  spec = vtab.TASKS[task]
  with tfds.testing.mock_data(num_examples=3):
    raw = tfds.data_source(spec.tfds_id, split='train')
    source = vtab.VtabSource(task, _OneByOne(raw))
    batch = next(iter(pipeline.eval_iterator(source, 4, process_index=0, process_count=1)))
    want = [RAW_LABEL[task](raw[i]) for i in range(3)]
  assert batch['image'].shape == (4, 224, 224, 3) and batch['image'].dtype == np.float32
  assert batch['mask'].tolist() == [1, 1, 1, 0]
  assert batch['label'][:3].tolist() == want
  assert 'tensorflow' not in sys.modules

