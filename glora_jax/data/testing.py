"""Tiny prepared tfds datasets for tests: a real builder's features and layout, random or given content.

Written as array_record without TensorFlow, so VTAB code paths run end to end on any machine.
"""
from __future__ import annotations

import inspect
import io
import os
import pathlib
import tempfile

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from glora_jax.data import tfds_named

_FAKE_IMAGE_SIDE = 8  # Used where the real feature leaves height/width free.
# PNG-encoding noise is most of the writing time: examples cycle through a few encoded images.
_IMAGE_POOL_SIZE = 16


def _png(pixels: np.ndarray) -> bytes:
  from PIL import Image  # pylint: disable=import-outside-toplevel
  buffer = io.BytesIO()
  Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, format='PNG')
  return buffer.getvalue()


def _fake_value(feature, key: str, split: str, index: int, rng: np.random.Generator,
                image_pool: dict):
  if isinstance(feature, tfds.features.Image):
    pool_key = (key, index % _IMAGE_POOL_SIZE)
    if pool_key not in image_pool:
      shape = [d if d is not None else _FAKE_IMAGE_SIDE for d in feature.shape]
      image_pool[pool_key] = _png(rng.integers(0, 256, size=shape, dtype=np.uint8))
    return image_pool[pool_key]
  if isinstance(feature, tfds.features.ClassLabel):
    return int(rng.integers(feature.num_classes))
  if isinstance(feature, tfds.features.Text):
    return f'{split}/{index:06d}'  # Unique per example, so tests can check disjointness.
  if isinstance(feature, tfds.features.Tensor):
    return np.zeros([d or 1 for d in feature.shape], dtype=feature.np_dtype)
  raise NotImplementedError(
      f"fake data for feature '{key}' of type {type(feature).__name__} is not supported; "
      'supported: Image, ClassLabel, Text, Tensor')


def _write(tfds_id: str, data_dir: str | os.PathLike, split_names, make_examples) -> pathlib.Path:
  """Prepares tfds_id through a subclass of its REAL builder whose splits hold
  `make_examples(features, split)`, an iterable of example dicts; returns its version folder."""
  name, _, config = tfds_id.partition('/')
  real_cls = tfds_named.builder_cls(name)

  class FakeBuilder(real_cls, skip_registration=True):  # pylint: disable=abstract-method
    code_path = epath.Path(inspect.getfile(real_cls))  # See prepared.LocalBuilder.

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(split) for split in split_names}

    def _generate_examples(self, split):  # pylint: disable=arguments-differ
      yield from enumerate(make_examples(self.info.features, split))

  FakeBuilder.name = real_cls.name
  data_dir = pathlib.Path(data_dir)
  builder = FakeBuilder(config=config or None, data_dir=os.fspath(data_dir), file_format='array_record')
  with tempfile.TemporaryDirectory() as downloads:
    builder.download_and_prepare(download_dir=downloads, download_config=tfds.download.DownloadConfig(
        try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return pathlib.Path(builder.data_dir)


def write_fake_prepared(tfds_id: str, data_dir: str | os.PathLike,
                        split_sizes: dict[str, int], seed: int = 0) -> pathlib.Path:
  """Writes `tfds_id` ('cifar100', 'eurosat/rgb') with random examples into data_dir; returns its version folder.

  The features, name and version are those of the real tfds builder, so tfds.data_source reads
  it exactly like the real prepared dataset. Text features hold '<split>/<index>'.
  """
  rng = np.random.default_rng(seed)
  image_pool = {}

  def make_examples(features, split):
    for index in range(split_sizes[split]):
      yield {key: _fake_value(feature, key, split, index, rng, image_pool)
             for key, feature in features.items()}

  return _write(tfds_id, data_dir, list(split_sizes), make_examples)


def write_prepared(tfds_id: str, data_dir: str | os.PathLike,
                   examples: dict[str, list[dict]]) -> pathlib.Path:
  """Writes `tfds_id` with the given examples per split into data_dir; returns its version folder.

  Values are in the feature's python form: str for Text, int (or a class name) for ClassLabel,
  float or int for a Tensor, a uint8 (H, W, C) array for Image (written as PNG). A feature an
  example leaves out gets write_fake_prepared's value (as GLUE's 'idx'). tfds shuffles the
  examples as it writes them, so read them back by content, not position.
  """
  rng = np.random.default_rng(0)
  image_pool = {}

  def make_examples(features, split):
    for index, given in enumerate(examples[split]):
      unknown = sorted(set(given) - set(features.keys()))
      if unknown:
        raise ValueError(f"example {index} of split '{split}' has features {unknown} that "
                         f"'{tfds_id}' lacks; expected some of {sorted(features.keys())}")
      example = {}
      for key, feature in features.items():
        if key not in given:
          example[key] = _fake_value(feature, key, split, index, rng, image_pool)
        elif isinstance(feature, tfds.features.Image) and isinstance(given[key], np.ndarray):
          example[key] = _png(np.asarray(given[key], dtype=np.uint8))
        else:
          example[key] = given[key]
      yield example

  return _write(tfds_id, data_dir, list(examples), make_examples)
