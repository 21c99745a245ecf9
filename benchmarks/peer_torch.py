"""The PyTorch peer of benchmarks/speed.py: HF transformers + PEFT on the same shapes.

Run by `speed.py --peer PYTHON` as a worker in its own environment (never in CI):

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 transformers peft safetensors numpy
    python benchmarks/speed.py --peer /tmp/torchenv/bin/python

It loads the same all-MiniLM-L6-v2 files (the directory is passed by the parent),
builds the same batch (numpy seed 0: ids in [1000, 20000), labels in [0, 5)), and
answers one line per command on stdin, so that the parent interleaves its rounds
with ours (ABAB) on the same cores:

    forward N  -> {"wall_ms": [...], "cpu_ms": [...]}  eval-mode forward, no grad
    lora N     -> the same for a PEFT LoRA r=8 train step (AdamW)
    quit

Model: BertModel, masked mean pooling, a fresh Linear(384, 5) head (the protocol's
classifier, as ours); dropout 0.1 in training, as BERT's config; LoRA r=8,
alpha=16 on query, key, value and the three dense layers (36 layers, as our
default targets), lora_dropout 0 (ours has none), the head trained
(modules_to_save); AdamW(lr 1e-3, weight decay 0.01), as our optimizer.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch


class Classifier(torch.nn.Module):
  def __init__(self, bert, num_classes=5):
    super().__init__()
    self.bert = bert
    self.head = torch.nn.Linear(bert.config.hidden_size, num_classes)

  def forward(self, input_ids, attention_mask, token_type_ids):
    hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                       token_type_ids=token_type_ids).last_hidden_state
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return self.head(pooled)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument('--minilm_dir', required=True)
  ap.add_argument('--batch', type=int, default=32)
  ap.add_argument('--tokens', type=int, default=128)
  args = ap.parse_args()
  from peft import LoraConfig, get_peft_model
  from transformers import BertModel

  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  ids = torch.as_tensor(rng.integers(1000, 20000, (args.batch, args.tokens)), dtype=torch.long)
  labels = torch.as_tensor(rng.integers(0, 5, args.batch), dtype=torch.long)
  mask = torch.ones_like(ids)
  types = torch.zeros_like(ids)

  base = Classifier(BertModel.from_pretrained(args.minilm_dir, add_pooling_layer=False))
  base.eval()

  def forward():
    with torch.inference_mode():
      base(ids, mask, types)

  lora_model = get_peft_model(
      Classifier(BertModel.from_pretrained(args.minilm_dir, add_pooling_layer=False)),
      LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                 target_modules=['query', 'key', 'value', 'dense'], modules_to_save=['head']))
  lora_model.train()
  optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad],
                                lr=1e-3, weight_decay=0.01)

  def lora_step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(lora_model(ids, mask, types), labels)
    loss.backward()
    optimizer.step()

  cases = {'forward': forward, 'lora': lora_step}
  for fn in cases.values():  # warm-up
    fn(); fn()
  trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
  print(json.dumps({'ready': True, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
                    'trainable_params': trainable}), flush=True)
  for line in sys.stdin:
    parts = line.split()
    if not parts or parts[0] == 'quit':
      break
    fn, n = cases[parts[0]], int(parts[1])
    wall, cpu = [], []
    for _ in range(n):
      t, c = time.perf_counter(), time.process_time()
      fn()
      wall.append(1e3 * (time.perf_counter() - t))
      cpu.append(1e3 * (time.process_time() - c))
    print(json.dumps({'wall_ms': wall, 'cpu_ms': cpu}), flush=True)


if __name__ == '__main__':
  main()
