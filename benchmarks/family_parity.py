"""Each model family against its real library, both ways, from the committed fixtures
(scripts/make_torch_fixtures.py; no torch needed here): (1) our outputs for the tiny
checkpoints transformers 5.25 / timm 1.0.31 wrote, read through interop.load_pretrained,
against the outputs the library recorded; (2) the record of `--only exports`: each
family's merged GLoRA export (C and E on in every layer) read by the real library,
against our merged and adapted outputs (tests/test_interop_exports.py checks that
today's code still computes what was recorded).

    python benchmarks/family_parity.py
"""
from __future__ import annotations

import pathlib

import jax
import numpy as np

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / 'tests' / 'fixtures'
# Fixture directory -> the family its config.json names.
FAMILY_OF = {'hf_bert': 'bert', 'hf_roberta': 'roberta', 'hf_llama3': 'llama',
             'hf_llama32': 'llama', 'hf_llama_linear': 'llama', 'hf_qwen2': 'qwen2',
             'hf_mistral': 'mistral', 'vit_timm_export': 'vit'}


def reference(directory: str) -> tuple[tuple, dict, np.ndarray]:
  """(model inputs, keyword inputs, the real library's outputs) of a fixture: logits of
  a decoder or a ViT, an encoder's last hidden state (BERT: sentence pairs too)."""
  family = FAMILY_OF[directory]
  if family == 'vit':
    ref = np.load(FIXTURES / 'vit_timm_export_reference.npz')
    return (ref['images'],), {}, ref['timm_logits']
  encoder = family in ('bert', 'roberta')
  ref = np.load(FIXTURES / f"hf_{'encoders' if encoder else 'decoders'}_reference.npz")
  args = (ref[f'{directory}/input_ids'], ref[f'{directory}/attention_mask'])
  kwargs = {'token_type_ids': ref[f'{directory}/token_type_ids']} if family == 'bert' else {}
  return args, kwargs, ref[f"{directory}/{'last_hidden_state' if encoder else 'logits'}"]


def outputs(directory: str) -> tuple[np.ndarray, np.ndarray]:
  """(ours, the library's) for one fixture."""
  from glora_jax import interop
  args, kwargs, expected = reference(directory)
  model, params = interop.load_pretrained(FIXTURES / directory)
  ours = jax.jit(lambda p: model.apply({'params': p}, *args, **kwargs))(params)
  return np.asarray(ours), expected


def main() -> None:
  jax.config.update('jax_default_matmul_precision', 'highest')
  print('| fixture | family | max abs difference | max abs output |')
  print('|---|---|---:|---:|')
  for directory, family in FAMILY_OF.items():
    ours, expected = outputs(directory)
    print(f'| {directory} | {family} | {np.abs(ours - expected).max():.2g} | '
          f'{np.abs(expected).max():.3g} |')
  record = np.load(FIXTURES / 'merged_exports_reference.npz')
  print('\nMerged GLoRA exports read by the real library (the record of --only exports):\n')
  print('| fixture | written as | built by the library | max abs library - merged | '
        'max abs library - adapted | max abs output |')
  print('|---|---|---|---:|---:|---:|')
  for directory in sorted({k.split('/')[0] for k in record.files if '/' in k}):
    r = lambda key: record[f'{directory}/{key}']
    print(f"| {directory} | {r('written')} | {r('built')} | {float(r('library_vs_ours')):.2g} | "
          f"{float(r('library_vs_adapted')):.2g} | {np.abs(r('library')).max():.3g} |")


if __name__ == '__main__':
  main()
