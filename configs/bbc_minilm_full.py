"""Full fine-tuning baseline (every parameter trainable), BBC News protocol, lr 5e-5."""
from configs.common import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'full'
  c.optim.lr = 5e-5
  if arg == '8shot':
    c.data.train_split, c.num_epochs = 'train_8shot', 20
  return c
