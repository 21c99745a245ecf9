"""SURM circulant ΔW (LoRA replacement) on every linear layer of MiniLM, BBC News protocol.

Structured deltas want a much larger learning rate than LoRA (block-circulant
adapters elsewhere use about 0.1); tune on val only (benchmarks/accuracy_bbc.py).
"""
import ml_collections

from configs.common import base_config


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'surm'
  c.adapter.surm = ml_collections.ConfigDict({'kind': 'circulant', 'form': 'lora', 'scale': 1.0})
  c.optim.lr = 1e-2
  if arg == '8shot':
    c.data.train_split, c.num_epochs = 'train_8shot', 20
  return c
