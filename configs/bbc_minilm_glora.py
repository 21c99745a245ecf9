"""The main job: GLoRA supernet on every linear layer of all-MiniLM-L6-v2, BBC News
(BENCH_PROTOCOL.md: AdamW lr 1e-3, wd 0.01, batch 32, 5 epochs, max_len 128).

  python train.py --config configs/bbc_minilm_glora.py --workdir runs/bbc
  python train.py --config configs/bbc_minilm_glora.py:8shot --workdir runs/bbc8
  python train.py --config configs/bbc_minilm_glora.py:quick --workdir runs/bbc   # README main job
"""
from configs.common import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'glora'
  c.adapter.ranks = (4,)
  if arg == '8shot':
    c.data.train_split = 'train_8shot'
    c.num_epochs = 20
  elif arg == 'quick':  # the README's main job: train + search in about 10 CPU minutes
    c.num_epochs = 2
    c.data.max_len = 64
  elif arg:
    raise ValueError(f"unknown argument '{arg}' for bbc_minilm_glora; use 8shot or quick")
  return c
