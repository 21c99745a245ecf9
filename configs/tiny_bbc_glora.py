"""The first 2 pretrained MiniLM layers on a BBC News subset (64 examples, 32 tokens):
for tests and smoke runs. `:lora` etc. picks another method."""
from configs.common import base_config, parse_arg


def get_config(arg: str | None = None):
  c = base_config()
  c.method = parse_arg(arg, __file__, method='glora').method
  c.model.name = 'minilm'
  c.model.keep_layers = 2  # of MiniLM's 6 pretrained layers
  c.data.max_len = 32
  c.data.limit = 64
  c.batch_size = 16
  c.eval_batch_size = 16
  c.num_epochs = 2
  c.optim.lr = 1e-3
  c.log_every_steps = 1
  c.checkpoint.every_steps = 2
  return c
