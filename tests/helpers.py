"""Shared by the training, search and fault tests: the tiny real-data config, reading a
run's trained params back, and checking the plots a run draws."""

import matplotlib.image

from configs import tiny_bbc_glora
from glora_jax.train import setup


def tiny_config(**overrides):
  """configs/tiny_bbc_glora.py with synchronous saves and dotted overrides
  ({'mesh.data': 4, 'num_epochs': 2})."""
  c = tiny_bbc_glora.get_config()
  c.checkpoint.async_save = False
  c.update_from_flattened_dict(overrides)
  return c


def trainable_of(config, workdir):
  """The trainable params of the latest checkpoint in a train.py workdir."""
  return setup.load_trained(workdir, config)[1]


def assert_png(path, height, width):
  """`path` is a PNG image of height x width pixels with something drawn on it."""
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n', f'{path} is not a PNG'
  image = matplotlib.image.imread(path)
  assert image.shape[:2] == (height, width), image.shape
  assert image[..., :3].std() > 0.01, f'{path} is blank'
