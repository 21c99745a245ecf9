"""The main job: GLoRA supernet on every linear layer of all-MiniLM-L6-v2, BBC News
(BENCH_PROTOCOL.md: AdamW lr 1e-3, wd 0.01, batch 32, 5 epochs, max_len 128).

  python train.py --config configs/bbc_minilm_glora.py --workdir runs/bbc
  python train.py --config configs/bbc_minilm_glora.py:8shot --workdir runs/bbc8
  python train.py --config configs/bbc_minilm_glora.py:quick --workdir runs/bbc   # README main job
"""
from configs.common import BBC_OPTIONS, apply_setting, base_config, parse_arg


def get_config(arg: str | None = None):
  arg = parse_arg(arg, __file__, **BBC_OPTIONS, quick=False)
  c = base_config()
  c.method = 'glora'
  c.adapter.ranks = (4,)
  apply_setting(c, arg)
  if arg.quick:  # the README's main job: train + search in about 10 CPU minutes
    c.num_epochs = 2
    c.data.max_len = 64
  return c
