"""LoRA baseline (rank 8, alpha 16, every linear layer of the encoder), BBC News protocol."""
from configs.common import BBC_OPTIONS, apply_setting, base_config, parse_arg


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'lora'
  c.optim.lr = 1e-3
  return apply_setting(c, parse_arg(arg, __file__, **BBC_OPTIONS))
