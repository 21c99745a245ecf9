"""LoRA baseline (rank 8, alpha 16, every linear layer of the encoder), BBC News protocol."""
from configs.common import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'lora'
  c.optim.lr = 1e-3
  if arg == '8shot':
    c.data.train_split, c.num_epochs = 'train_8shot', 20
  return c
