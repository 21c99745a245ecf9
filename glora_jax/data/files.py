"""Readers for a user's own data files: JSON lines or CSV text tables, and image folders.

Each split is a file, a glob of files, or (images) a folder with one subfolder per class.
"""
from __future__ import annotations

import csv
import dataclasses
import glob
import json
import math
import operator
import os
import pathlib
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from glora_jax.data import vtab
from glora_jax.errors import DataError

FORMATS = ('json', 'csv')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp')
IMAGE_KINDS = 'a PNG, JPEG, BMP, GIF or WebP image'
# Only plain decimal numbers count: int() and float() would also take '1_000', 'nan' or 'inf',
# which are more likely class names than numbers.
_INT = re.compile(r'[+-]?\d+')
_FLOAT = re.compile(r'[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?')
_SHOWN = 20  # How many fields or labels an error message lists before '...'.

Record = tuple[str, dict[str, Any]]


def _listing(values: Iterable[Any]) -> str:
  values = list(values)
  return repr(values) if len(values) <= _SHOWN else repr(values[:_SHOWN])[:-1] + ', ...]'


def expand(pattern: str) -> list[pathlib.Path]:
  """The files a split names: the file itself, or a glob's matches sorted (`~` expanded, `**` recursive)."""
  path = os.path.expanduser(os.fspath(pattern))
  # A file whose name holds glob characters ('data[1].json') is still itself.
  if os.path.isfile(path):
    return [pathlib.Path(path)]
  if os.path.isdir(path):
    raise DataError(f"'{pattern}' is a directory; expected a file or a glob of files (such as "
                    f"'{os.path.join(pattern, '*')}')")
  matches = sorted(m for m in glob.glob(path, recursive=True) if os.path.isfile(m))
  if not matches:
    raise DataError(f"no file matches '{pattern}'; expected a file or a glob of files")
  return [pathlib.Path(m) for m in matches]


def _read_text(path: pathlib.Path) -> str:
  try:
    # utf-8-sig: a byte-order mark (as spreadsheet programs write) would otherwise become
    # part of the first field name.
    return path.read_text(encoding='utf-8-sig')
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 text ({e}); expected a UTF-8 file') from e
  except OSError as e:
    raise DataError(f'{path} cannot be read ({e}); expected a readable file') from e


def _json_records(path: pathlib.Path) -> list[Record]:
  content = _read_text(path)
  if content.lstrip().startswith('['):
    try:
      items = json.loads(content)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{e.lineno} is not valid JSON ({e.msg}); expected a JSON array of '
                      'objects or one JSON object per line') from e
    records = [(f'{path}:[{index}]', item) for index, item in enumerate(items)]
  else:
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
      if not line.strip():
        continue
      try:
        records.append((f'{path}:{number}', json.loads(line)))
      except json.JSONDecodeError as e:
        raise DataError(f'{path}:{number} is not valid JSON ({e.msg}); expected one JSON object '
                        'per line') from e
  for origin, item in records:
    if not isinstance(item, dict):
      raise DataError(f'{origin} is a JSON {type(item).__name__}, not an object; expected one '
                      'JSON object per example, such as {"text": "...", "label": "..."}')
  return records


def _csv_records(path: pathlib.Path) -> list[Record]:
  # csv.reader rather than DictReader: it tells where each row starts, and a row with too
  # few or too many fields is an error here instead of None values or a None key.
  records, header = [], None
  try:
    with open(path, encoding='utf-8-sig', newline='') as f:
      reader = csv.reader(f)
      while True:
        start = reader.line_num + 1
        try:
          row = next(reader)
        except StopIteration:
          break
        if not row:
          continue  # A blank line, as DictReader skips them.
        if header is None:
          repeated = sorted({name for name in row if row.count(name) > 1})
          if repeated:
            raise DataError(f'{path}:{start} repeats the column names {repeated}; expected a header '
                            'of distinct column names')
          header = row
        elif len(row) != len(header):
          raise DataError(f'{path}:{start} has {len(row)} fields; expected {len(header)}, as the '
                          f'header has {header}')
        else:
          records.append((f'{path}:{start}', dict(zip(header, row))))
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 text ({e}); expected a UTF-8 file') from e
  except csv.Error as e:
    raise DataError(f'{path}:{reader.line_num} is not valid CSV ({e}); expected comma-separated '
                    'rows under a header row') from e
  except OSError as e:
    raise DataError(f'{path} cannot be read ({e}); expected a readable file') from e
  return records


def read_records(pattern: str, fmt: str) -> list[Record]:
  """Every record of the files `pattern` matches, in order, as ('<file>:<line>', record).

  fmt 'json': one JSON object per non-blank line, or a whole file that is a JSON array of
  objects (origins '<file>:[<index>]'). fmt 'csv': a header row, then one row per record
  (values are strings; a row's line counts the header as line 1).
  """
  if fmt not in FORMATS:
    raise DataError(f"data format '{fmt}' is not known; expected one of {list(FORMATS)}")
  read = _json_records if fmt == 'json' else _csv_records
  return [record for path in expand(pattern) for record in read(path)]


def _number_or_text(value: str) -> str | int | float:
  stripped = value.strip()
  if _INT.fullmatch(stripped):
    return int(stripped)
  if _FLOAT.fullmatch(stripped):
    return float(stripped)
  return value


def _field(origin: str, record: dict, key: str, config_key: str) -> Any:
  if key not in record:
    raise DataError(f"{origin} has no field '{key}'; its fields are {_listing(list(record))}; set "
                    f'{config_key} to the field that holds it')
  return record[key]


def _text(origin: str, record: dict, key: str, config_key: str) -> str:
  value = _field(origin, record, key, config_key)
  if not isinstance(value, str):
    raise DataError(f"{origin} field '{key}' is {value!r}; expected a string of text (or set "
                    f'{config_key} to the field that holds the text)')
  return value


def _label(origin: str, record: dict, key: str, parse_numbers: bool) -> str | int | float:
  value = _field(origin, record, key, 'data.label_key')
  if isinstance(value, str):
    if not value.strip():
      raise DataError(f"{origin} field '{key}' is empty; expected a label (a class name or a number)")
    return _number_or_text(value) if parse_numbers else value
  # bool is an int in Python, but true/false is more likely a mistake than classes 0 and 1.
  if isinstance(value, (int, float)) and not isinstance(value, bool):
    return value
  shown = json.dumps(value, default=repr)
  raise DataError(f"{origin} field '{key}' is {shown}; expected a label: a class name string, an "
                  'integer class index, or a number to regress')


def _object_array(values: list) -> np.ndarray:
  # np.empty then fill: np.array would try to nest sequences and pick a string dtype.
  array = np.empty(len(values), dtype=object)
  array[:] = values
  return array


def text_columns(records: Sequence[Record], text_key: str = 'text', text_pair_key: str = '',
                 label_key: str = 'label', source: str = '', *,
                 parse_numbers: bool = False) -> dict[str, np.ndarray]:
  """The records as columns: 'text' (and 'text_pair' when text_pair_key is set), object arrays
  of str, and 'label', an object array of the raw labels (str, int or float).

  parse_numbers (for CSV, whose values are all strings): a label that reads as an int becomes
  an int, as a float a float, so a CSV and a JSON file of the same data give the same labels.
  """
  if not records:
    raise DataError(f'{source or "the data"} holds no examples; expected at least one')
  texts, pairs, labels = [], [], []
  for origin, record in records:
    texts.append(_text(origin, record, text_key, 'data.text_key'))
    if text_pair_key:
      pairs.append(_text(origin, record, text_pair_key, 'data.text_pair_key'))
    labels.append(_label(origin, record, label_key, parse_numbers))
  columns = {'text': _object_array(texts)}
  if text_pair_key:
    columns['text_pair'] = _object_array(pairs)
  columns['label'] = _object_array(labels)
  return columns


@dataclasses.dataclass(frozen=True)
class LabelEncoding:
  """Labels of every split as model targets: class indices (int32) or regression targets (float32)."""
  kind: str  # 'classification' or 'regression'
  class_names: tuple[str, ...]  # Empty for regression.
  labels: dict[str, np.ndarray]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def _label_type(role: str, value: Any) -> str:
  if isinstance(value, (bool, np.bool_)):
    raise DataError(f'{role} split has label {value}; expected a class name string, an integer class '
                    'index or a number (not true/false)')
  if isinstance(value, (str, np.str_)):
    return 'str'
  if isinstance(value, (int, np.integer)):
    return 'int'
  if isinstance(value, (float, np.floating)):
    if not math.isfinite(value):
      raise DataError(f'{role} split has label {value}; expected a finite number')
    return 'int' if float(value).is_integer() else 'float'
  raise DataError(f'{role} split has label {value!r} of type {type(value).__name__}; expected a class '
                  'name string, an integer class index or a number')


def _check_seen(raw: Mapping[str, np.ndarray], train: str, train_labels: list) -> None:
  known = set(train_labels)
  for role, column in raw.items():
    if role == train:
      continue
    unseen = [value for value in column if value not in known]
    if unseen:
      more = f' (and {len(unseen) - 1} more such labels)' if len(unseen) > 1 else ''
      raise DataError(f"{role} split has label '{unseen[0]}'{more} that the train split never has; "
                      f"train's labels: {_listing(train_labels)}")


def encode_labels(raw: Mapping[str, np.ndarray], train: str = 'train') -> LabelEncoding:
  """Every split's raw labels (role -> column, as text_columns makes) encoded alike.

  All strings: classification over the sorted unique train labels. All integers (integral
  floats count): classification over classes 0..max train label, named str(i). Any other
  float: regression, float32 targets everywhere. Every eval/test label must occur in train.
  """
  if train not in raw:
    raise ValueError(f"raw labels have roles {list(raw)}; expected the train role '{train}' among them")
  if len(raw[train]) == 0:
    raise DataError(f'{train} split holds no labels; expected at least one')
  seen: dict[str, tuple[str, Any]] = {}  # Label type -> (role, an example), for the messages.
  for role, column in raw.items():
    for value in column:
      seen.setdefault(_label_type(role, value), (role, value))
  if 'str' in seen and len(seen) > 1:
    (text_role, text), (number_role, number) = seen['str'], seen.get('int', seen.get('float'))
    raise DataError(f"labels mix class names and numbers ({text_role} split has '{text}', "
                    f'{number_role} split has {number}); expected all class name strings or all numbers')
  if 'float' in seen:
    labels = {role: np.asarray([float(v) for v in column], dtype=np.float32)
              for role, column in raw.items()}
    return LabelEncoding('regression', (), labels)
  if 'str' in seen:
    class_names = tuple(sorted({str(v) for v in raw[train]}))
    _check_seen(raw, train, list(class_names))
    index = {name: i for i, name in enumerate(class_names)}
    labels = {role: np.asarray([index[str(v)] for v in column], dtype=np.int32)
              for role, column in raw.items()}
    return LabelEncoding('classification', class_names, labels)
  as_ints = {role: [int(v) for v in column] for role, column in raw.items()}
  for role, values in as_ints.items():
    low, high = min(values, default=0), max(values, default=0)
    if low < 0:
      raise DataError(f'{role} split has label {low}; expected class indices 0 or more (or class '
                      'name strings)')
    if high > np.iinfo(np.int32).max:
      raise DataError(f'{role} split has label {high}; expected class indices below 2**31')
  train_labels = sorted(set(as_ints[train]))
  _check_seen(as_ints, train, train_labels)
  class_names = tuple(str(i) for i in range(train_labels[-1] + 1))
  labels = {role: np.asarray(values, dtype=np.int32) for role, values in as_ints.items()}
  return LabelEncoding('classification', class_names, labels)


def label_mapping(encoding: LabelEncoding) -> dict[str, Any]:
  """The encoding as a JSON-ready record {'kind', 'class_names'}, for the run and the export."""
  return {'kind': encoding.kind, 'class_names': list(encoding.class_names)}


def _image_error(path: pathlib.Path, error: Exception) -> DataError:
  return DataError(f'image {path} does not decode ({error}); expected {IMAGE_KINDS}')


# PIL raises OSError (UnidentifiedImageError among them) for most bad files, but SyntaxError,
# ValueError or DecompressionBombError for some.
def _decode_errors() -> tuple[type[Exception], ...]:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class ImageFolder:
  """A folder with one subfolder of images per class, as a random-access source of
  {'image', 'label'} examples; images are decoded when read.

  Classes are the sorted subfolder names, or `class_names` (an eval or test split uses
  train's). image_size 0 gives the file's pixels, uint8 (H, W, 1) for grayscale and (H, W, 3)
  otherwise; image_size > 0 gives vtab.preprocess_image's (size, size, 3) float32.
  """

  def __init__(self, directory: str | os.PathLike, class_names: Sequence[str] | None = None,
               image_size: int = 0):
    if image_size < 0:
      raise ValueError(f'image_size is {image_size}; expected 0 (raw pixels) or a positive size')
    self.directory = pathlib.Path(os.path.expanduser(os.fspath(directory)))
    self.image_size = image_size
    if not self.directory.is_dir():
      raise DataError(f"'{directory}' is not a directory; expected a folder with one subfolder of "
                      'images per class')
    # Hidden folders are tool litter (.ipynb_checkpoints, .git), never a class.
    folders = sorted(p.name for p in self.directory.iterdir()
                     if p.is_dir() and not p.name.startswith('.'))
    if not folders:
      raise DataError(f'{self.directory} has no class subfolders; expected one subfolder of images '
                      'per class')
    if class_names is None:
      self.class_names = tuple(folders)
    else:
      self.class_names = tuple(class_names)
      strangers = [name for name in folders if name not in self.class_names]
      if strangers:
        raise DataError(f"{self.directory} has class folder '{strangers[0]}' that the train split "
                        f"never has; train's classes: {_listing(self.class_names)}")
    paths, labels = [], []
    for label, name in enumerate(self.class_names):
      images = self._images_in(self.directory / name)
      if not images and class_names is None:
        raise DataError(f'{self.directory / name} holds no images; expected at least one file '
                        f'ending in {", ".join(IMAGE_EXTENSIONS)} in each class folder')
      paths += images
      labels += [label] * len(images)
    if not paths:
      raise DataError(f'{self.directory} holds no images; expected files ending in '
                      f'{", ".join(IMAGE_EXTENSIONS)} in its class folders')
    self.paths = tuple(paths)
    self.labels = np.asarray(labels, dtype=np.int32)

  @staticmethod
  def _images_in(folder: pathlib.Path) -> list[pathlib.Path]:
    """The folder's image files, nested folders included, sorted by their path inside it."""
    if not folder.is_dir():
      return []  # An eval or test split need not hold every class.
    found = []
    for path in folder.rglob('*'):
      relative = path.relative_to(folder)
      # Hidden names include macOS's '._photo.jpg' resource forks, which are not images.
      if any(part.startswith('.') for part in relative.parts):
        continue
      if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
        found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  def __len__(self) -> int:
    return len(self.paths)

  def read_pixels(self, index: int) -> np.ndarray:
    """An image's pixels as stored: uint8 (H, W, 1) for grayscale files, (H, W, 3) otherwise."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    path = self.paths[index]
    try:
      with Image.open(path) as image:
        if image.mode in ('L', '1'):
          return np.asarray(image.convert('L'), dtype=np.uint8)[..., None]
        return np.asarray(image.convert('RGB'), dtype=np.uint8)
    except _decode_errors() as e:
      raise _image_error(path, e) from e

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = operator.index(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f'index {index} is outside an image folder of {len(self)} images')
    index %= len(self)
    pixels = self.read_pixels(index)
    image = vtab.preprocess_image(pixels, self.image_size) if self.image_size else pixels
    return {'image': image, 'label': np.int32(self.labels[index])}

  def __getitems__(self, indices: Iterable[int]) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]

  def verify(self) -> None:
    """Checks every file is an image PIL can read, without decoding its pixels (cheap, not
    complete: a truncated file can still pass)."""
    from PIL import Image  # pylint: disable=import-outside-toplevel
    for path in self.paths:
      try:
        with Image.open(path) as image:
          image.verify()
      except _decode_errors() as e:
        raise _image_error(path, e) from e
