"""SURM circulant ΔW (LoRA replacement) on every linear layer of MiniLM, BBC News protocol.

Learning rate 1e-3, chosen on val only: the 8-shot sweep 1e-4 / 1e-3 / 1e-2 gave val
0.500 / 0.865 / 0.515 (BENCHMARKS.md; `benchmarks/accuracy_bbc.py --lr surm=...`).
The larger rates that block-circulant adapters use elsewhere (about 0.1) wreck the
pretrained features here: a circulant ΔW is full rank, every entry moves each step.
"""
import ml_collections

from configs.common import BBC_OPTIONS, apply_setting, base_config, parse_arg


def get_config(arg: str | None = None):
  c = base_config()
  c.method = 'surm'
  c.adapter.surm = ml_collections.ConfigDict({'kind': 'circulant', 'form': 'lora', 'scale': 1.0})
  c.optim.lr = 1e-3
  return apply_setting(c, parse_arg(arg, __file__, **BBC_OPTIONS))
