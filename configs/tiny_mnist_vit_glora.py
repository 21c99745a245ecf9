"""A small ViT (Ti/7 width, 2 blocks) with a GLoRA supernet on the bundled MNIST digits
(random init): tests and smoke runs."""
from configs.common import base_config, parse_arg


def get_config(arg: str | None = None):
  c = base_config()
  c.task = 'image_classification'
  c.method = parse_arg(arg, __file__, method='glora').method
  c.model.name = 'vit'
  c.model.preset = 'Ti/7'
  c.model.depth = 2  # of the preset's 12 blocks: a supernet that compiles in seconds on a CPU
  c.model.image_size = 28
  c.model.in_channels = 1
  c.model.drop_path = 0.1
  c.data.name = 'mnist5k'
  c.data.limit = 64
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 1
  c.log_every_steps = 1
  return c
