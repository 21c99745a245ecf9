"""Full fine-tuning baseline (every parameter trainable), BBC News protocol, lr 5e-5."""
from configs.common import BBC_OPTIONS, apply_setting, base_config, parse_arg


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'full'
  c.optim.lr = 5e-5
  return apply_setting(c, parse_arg(arg, __file__, **BBC_OPTIONS))
