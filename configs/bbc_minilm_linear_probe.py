"""Linear probe: frozen MiniLM in evaluation mode, a trainable head only, lr 1e-3."""
from configs.common import BBC_OPTIONS, apply_setting, base_config, parse_arg


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'linear_probe'
  c.model.dropout = 0.0  # the frozen encoder runs in evaluation mode
  return apply_setting(c, parse_arg(arg, __file__, **BBC_OPTIONS))
