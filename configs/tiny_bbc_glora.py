"""A tiny randomly initialised BERT on a BBC News subset: for tests and smoke runs."""
from configs.common import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = arg or 'glora'
  c.model.name = 'bert_random'
  c.model.hidden = 32
  c.model.layers = 2
  c.model.heads = 2
  c.data.max_len = 32
  c.data.limit = 64
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 2
  c.optim.lr = 3e-3
  c.log_every_steps = 1
  c.checkpoint.every_steps = 2
  return c
