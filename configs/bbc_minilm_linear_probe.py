"""Linear probe: frozen MiniLM in evaluation mode, a trainable head only, lr 1e-3."""
from configs.common import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'linear_probe'
  c.model.dropout = 0.0  # the frozen encoder runs in evaluation mode
  if arg == '8shot':
    c.data.train_split, c.num_epochs = 'train_8shot', 20
  return c
