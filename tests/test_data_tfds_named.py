"""Tests for glora_jax.data.tfds_named and glue: any prepared tfds dataset by name, described from
its files and read through tfds.data_source, on tiny datasets written with the real builders."""
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from glora_jax.data import glue, testing, tfds_named, vtab
from glora_jax.errors import DataError, DatasetNotPreparedError

SST2 = {
    'train': [{'sentence': 'a gripping film', 'label': 1}, {'sentence': 'dull and long', 'label': 0},
              {'sentence': 'ünïcode wörks', 'label': 1}, {'sentence': 'not good', 'label': 0}],
    'validation': [{'sentence': 'fine', 'label': 1}, {'sentence': 'awful', 'label': 0}],
}
STSB = {
    'train': [{'sentence1': 'a cat', 'sentence2': 'a kitten', 'label': 4.5},
              {'sentence1': 'a car', 'sentence2': 'the sea', 'label': 0.25},
              {'sentence1': 'he runs', 'sentence2': 'he jogs', 'label': 3.75}],
    'validation': [{'sentence1': 'x', 'sentence2': 'y', 'label': 1.0}],
}
MRPC = {
    'train': [{'sentence1': 'one', 'sentence2': 'uno', 'label': 1},
              {'sentence1': 'two', 'sentence2': 'tres', 'label': 0}],
    'validation': [{'sentence1': 'three', 'sentence2': 'tres', 'label': 1}],
}


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds_named')
  testing.write_prepared('glue/sst2', root, SST2)
  testing.write_prepared('glue/stsb', root, STSB)
  testing.write_prepared('glue/mrpc', root, MRPC)
  testing.write_fake_prepared('oxford_flowers102', root, {'train': 5, 'validation': 2, 'test': 2})
  return root


def _rows(examples, *keys):
  return sorted(tuple(ex[k] for k in keys) for ex in examples)


def test_parse():
  assert tfds_named.parse('tfds:glue/sst2') == ('glue', 'sst2')
  assert tfds_named.parse('tfds:food101') == ('food101', None)
  assert tfds_named.parse('tfds:diabetic_retinopathy_detection/btgraham-300')[1] == 'btgraham-300'
  for bad in ('glue/sst2', 'tfds:', '', 'tfds:a/b/c', 'tfds:glue/sst2:2.0.0', 'tfds:/sst2'):
    with pytest.raises(DataError, match="expected 'tfds:<name>"):
      tfds_named.parse(bad)


def test_describe_text_datasets(data_dir):
  sst2 = tfds_named.describe('glue/sst2', data_dir)
  assert (sst2.text_keys, sst2.image_keys, sst2.label_key, sst2.label_kind) == (
      ('sentence',), (), 'label', 'classification')
  assert (sst2.num_classes, sst2.class_names) == (2, ('negative', 'positive'))
  assert sst2.split_sizes == {'train': 4, 'validation': 2}
  sst2_config, = [c for c in tfds_named.builder_cls('glue').BUILDER_CONFIGS if c.name == 'sst2']
  assert sst2.version == str(sst2_config.version)
  stsb = tfds_named.describe('tfds:glue/stsb', data_dir)  # The data.name form works too.
  assert (stsb.text_keys, stsb.label_key, stsb.label_kind, stsb.num_classes, stsb.class_names) == (
      ('sentence1', 'sentence2'), 'label', 'regression', 1, ())
  mrpc = tfds_named.describe('glue/mrpc', data_dir)
  assert mrpc.class_names == ('not_equivalent', 'equivalent')
  assert tfds_named.default_keys(mrpc) == {'text': 'sentence1', 'text_pair': 'sentence2', 'label': 'label'}


@pytest.mark.parametrize('task, given, text_keys', [
    ('sst2', SST2, ('sentence',)), ('stsb', STSB, ('sentence1', 'sentence2')),
    ('mrpc', MRPC, ('sentence1', 'sentence2'))])
def test_open_split_gives_back_the_written_examples(data_dir, task, given, text_keys):
  canonical = ('text', 'text_pair')[:len(text_keys)]
  dtype = np.float32 if task == 'stsb' else np.int32
  for split in ('train', 'validation'):
    source = glue.open_split(task, split, data_dir)
    examples = source.__getitems__(range(len(source)))
    assert [source[i] for i in range(len(source))] == examples
    for ex in examples:
      assert set(ex) == {*canonical, 'label'} and isinstance(ex['text'], str)
      assert ex['label'].dtype == dtype and ex['label'].shape == ()
    expected = _rows(given[split], *text_keys, 'label')
    assert _rows(examples, *canonical, 'label') == expected
    columns = tfds_named.text_columns(source)
    assert set(columns) == {*canonical, 'label'} and columns['label'].dtype == dtype
    assert all(columns[k].dtype == object for k in canonical)
    assert sorted(zip(*(columns[k] for k in (*canonical, 'label')))) == expected
    np.testing.assert_array_equal(source.labels(), columns['label'])
    assert source.labels() is source.labels()  # Cached.
  assert source.label_kind == ('regression' if task == 'stsb' else 'classification')


@pytest.mark.parametrize('split', ['train[:2]', 'train[1:]', 'train[25%:75%]', 'train[-1:]',
                                   'train[2:1]', 'train+validation[:1]', 'all'])
def test_slices_select_what_tfds_selects(data_dir, split):
  raw = tfds.data_source('glue/sst2', split=split, data_dir=str(data_dir), download=False)
  assert tfds_named.check_split('glue/sst2', split, data_dir) == len(raw)
  source = tfds_named.open_split('glue/sst2', split, data_dir, {'text': 'sentence', 'label': 'label'})
  assert len(source) == len(raw)
  assert [(ex['text'], int(ex['label'])) for ex in source.__getitems__(range(len(source)))] == [
      (r['sentence'].decode(), r['label']) for r in raw.__getitems__(range(len(raw)))]


def test_bad_splits_are_data_errors(data_dir):
  for split in ('train[4:]', 'train[:0]', 'validation[-2:0]'):
    with pytest.raises(DataError, match=r"split '.*' of 'glue/sst2' is empty; expected at least one"):
      tfds_named.check_split('glue/sst2', split, data_dir)
  with pytest.raises(DataError, match=r"split 'test' of 'glue/sst2' does not exist.*\['train', 'validation'\]"):
    tfds_named.open_split('glue/sst2', 'test[:5]', data_dir, {'text': 'sentence'})
  with pytest.raises(DataError, match='incompatible with 4 examples'):
    tfds_named.check_split('glue/sst2', 'train[:800]', data_dir)
  with pytest.raises(DataError, match='malformed'):
    tfds_named.check_split('glue/sst2', 'train[a:b]', data_dir)


def test_not_prepared_names_the_command_at_once(tmp_path, data_dir):
  start = time.perf_counter()
  with pytest.raises(DatasetNotPreparedError) as raised:
    tfds_named.find('glue/cola', tmp_path)
  assert time.perf_counter() - start < 0.1
  message = str(raised.value)
  assert '\n' not in message
  assert (f"tfds.builder('glue/cola', data_dir='{tmp_path}')"
          ".download_and_prepare(file_format='array_record')") in message
  with pytest.raises(DatasetNotPreparedError, match="tfds.builder\\('food101'"):
    tfds_named.open_split('food101', 'train', tmp_path, {'label': 'label'})
  # A builder with configs, named without one.
  with pytest.raises(DataError, match=r"expected 'tfds:glue/<config>' with a config among \['mrpc', 'sst2', 'stsb'\]"):
    tfds_named.find('glue', data_dir)
  assert 'tensorflow' not in sys.modules


def test_image_dataset_by_name(data_dir):
  features = tfds_named.describe('oxford_flowers102', data_dir)
  assert (features.image_keys, features.label_key, features.label_kind) == (('image',), 'label', 'classification')
  assert features.num_classes == 102 and features.class_names[0] == 'pink primrose'
  assert features.supervised_keys == ('image', 'label')
  assert tfds_named.default_keys(features) == {'image': 'image', 'label': 'label'}  # Not file_name.
  raw = tfds.data_source('oxford_flowers102', split='train', data_dir=str(data_dir), download=False)
  source = tfds_named.open_split('oxford_flowers102', 'train', data_dir)
  assert len(source) == 5 and source.class_names == features.class_names
  for i in range(len(source)):
    assert source[i]['image'].dtype == np.uint8 and source[i]['image'].shape == (8, 8, 3)
    np.testing.assert_array_equal(source[i]['image'], raw[i]['image'])
  resized = tfds_named.open_split('oxford_flowers102', 'train[1:3]', data_dir,
                                  {'image': 'image', 'label': 'label'}, image_size=16)
  example = resized[0]
  assert example['image'].dtype == np.float32 and example['image'].shape == (16, 16, 3)
  np.testing.assert_allclose(example['image'], vtab.preprocess_image(raw[1]['image'], 16))
  labels = source.labels()
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, [source[i]['label'] for i in range(len(source))])
  np.testing.assert_array_equal(resized.labels(), labels[1:3])


def test_keys_are_checked(data_dir):
  with pytest.raises(DataError, match="key 'sentence' is not a canonical key"):
    tfds_named.open_split('glue/sst2', 'train', data_dir, {'sentence': 'sentence'})
  with pytest.raises(DataError, match=r"no feature 'premise' \(for 'text'\); expected one of \['idx', 'label', 'sentence'\]"):
    tfds_named.open_split('glue/sst2', 'train', data_dir, {'text': 'premise'})
  with pytest.raises(DataError, match="feature 'label' of 'oxford_flowers102' is a class_label, not usable as 'image'"):
    tfds_named.open_split('oxford_flowers102', 'train', data_dir, {'image': 'label'})
  source = tfds_named.open_split('oxford_flowers102', 'train', data_dir, {'image': 'image'})
  with pytest.raises(DataError, match="without a 'label' key"):
    source.labels()
  with pytest.raises(DataError, match='text_columns reads text splits'):
    tfds_named.text_columns(source)


class _NoDownloads:
  """Enough of a DownloadManager for glue's _split_generators to name its splits."""

  def download_and_extract(self, url):
    return '/nonexistent'

  def download(self, urls):
    return {key: '/nonexistent' for key in urls}


def test_glue_tasks_match_the_tfds_builder(tmp_path):
  glue_cls = tfds_named.builder_cls('glue')
  configs = {config.name for config in glue_cls.BUILDER_CONFIGS}
  for task in glue.TASKS.values():
    assert task.tfds_id.split('/') == ['glue', task.name] and task.name in configs
    builder = glue_cls(config=task.name, data_dir=str(tmp_path))  # Nothing is prepared.
    features = builder.info.features
    for key in filter(None, (task.text_key, task.text_pair_key)):
      assert isinstance(features[key], tfds.features.Text), (task.name, key)
    label = features[task.label_key]
    if task.regression:
      assert not isinstance(label, tfds.features.ClassLabel) and label.np_dtype == np.float32
    else:
      assert label.num_classes == task.num_classes, task.name
    # The pair tasks use every text feature; the single-sentence ones have just one.
    text_features = {k for k, f in features.items() if isinstance(f, tfds.features.Text)}
    assert text_features == {task.text_key, task.text_pair_key} - {''}
    split_names = {str(g.name) for g in builder._split_generators(_NoDownloads())}  # pylint: disable=protected-access
    assert {task.train_split, *task.eval_splits} <= split_names, (task.name, split_names)
    assert set(task.metrics) <= set(glue.METRICS) and task.headline in task.metrics
  assert glue.dev_split('mnli') == 'validation_matched' and glue.dev_split('rte') == 'validation'
  assert glue.TASKS['mrpc'].headline == 'f1' and glue.TASKS['stsb'].headline == 'pearson'
  assert glue.TASKS['cola'].metrics == ('matthews_corrcoef',)
  assert glue.get_task('tfds:glue/qqp').data_name == 'tfds:glue/qqp'


def test_write_prepared_keeps_given_images_and_split_names(tmp_path):
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, size=(5 + i, 7, 3), dtype=np.uint8) for i in range(3)]
  testing.write_prepared('oxford_flowers102', tmp_path, {
      'train': [{'image': image, 'label': 10 * i} for i, image in enumerate(images)]})
  source = tfds_named.open_split('oxford_flowers102', 'train', tmp_path)
  for example in source.__getitems__(range(3)):
    i = int(example['label']) // 10
    np.testing.assert_array_equal(example['image'], images[i])  # PNG is lossless.
  testing.write_prepared('glue/mnli', tmp_path, {
      'train': [{'premise': 'p', 'hypothesis': 'h', 'label': 'neutral'}],
      'validation_matched': [{'premise': 'p2', 'hypothesis': 'h2', 'label': 2}]})
  assert tfds_named.check_split('glue/mnli', glue.dev_split('mnli'), tmp_path) == 1
  dev = glue.open_split('mnli', 'validation_matched', tmp_path)
  assert dev[0] == {'text': 'p2', 'text_pair': 'h2', 'label': 2} and dev.class_names[2] == 'contradiction'
  assert int(glue.open_split('mnli', 'train', tmp_path)[0]['label']) == 1  # 'neutral' by name.
  with pytest.raises(ValueError, match=r"features \['sentence'\] that 'glue/rte' lacks"):
    testing.write_prepared('glue/rte', tmp_path, {'train': [{'sentence': 'x', 'label': 0}]})
