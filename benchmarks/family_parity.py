"""Each model family against its real library: our outputs for the committed fixtures
(tiny random checkpoints and the outputs transformers 5.25 / timm 1.0.31 recorded, by
scripts/make_torch_fixtures.py), read through interop.load_pretrained. Prints the
largest absolute difference and the outputs' scale per fixture; no torch needed.

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


if __name__ == '__main__':
  main()
