"""Every family's merged GLoRA export is read by its real library as the model we merged:
scripts/make_torch_fixtures.py (`--only exports`) loaded the files interop.save_pretrained
wrote into transformers and timm and recorded their outputs; here today's code rebuilds
the same merge and must still compute what was recorded, so the record still speaks
for it. CI has no torch: the script's builder is imported, torch is not."""
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECORD = ROOT / 'tests' / 'fixtures' / 'merged_exports_reference.npz'


def _load_script():
  """scripts/make_torch_fixtures.py as a module, and proof that importing it brings no
  torch-side library along (CI has none)."""
  before = set(sys.modules)
  spec = importlib.util.spec_from_file_location('make_torch_fixtures',
                                                ROOT / 'scripts' / 'make_torch_fixtures.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  brought = {m for m in set(sys.modules) - before
             if m.split('.')[0] in ('torch', 'transformers', 'timm', 'peft', 'tokenizers')}
  assert not brought, f'importing the fixture script imported {sorted(brought)}'
  return module


fixtures = _load_script()


def _close(actual, expected, what):
  """Within 1e-5 of the outputs' scale: float32 sums in another order."""
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max(),
                             err_msg=what)


def test_the_record_is_of_this_builder():
  record = np.load(RECORD)
  assert tuple(record['ranks']) == fixtures.EXPORT_RANKS
  assert float(record['scale']) == fixtures.EXPORT_SCALE
  assert json.loads(str(record['subnet'])) == fixtures.EXPORT_SUBNET
  for directory, seed in fixtures.EXPORT_SEEDS.items():
    assert int(record[f'{directory}/seed']) == seed, directory


def _base_outputs(directory: str) -> np.ndarray:
  """The fixture's own outputs before any adapter (its real library's)."""
  if directory == 'vit_timm_export':
    return np.load(fixtures.OUT / 'vit_timm_export_reference.npz')['timm_logits']
  if directory in fixtures.EXPORT_ENCODERS:
    return np.load(fixtures.OUT / 'hf_encoders_reference.npz')[f'{directory}/last_hidden_state']
  return np.load(fixtures.OUT / 'hf_decoders_reference.npz')[f'{directory}/logits']


@pytest.mark.parametrize('directory', sorted(fixtures.EXPORT_SEEDS))
def test_the_real_library_reads_our_merged_export_as_our_model(directory, tmp_path):
  record = np.load(RECORD)
  built = fixtures.merged_export(directory, tmp_path, adapted=False)
  ours, library = built['ours'], record[f'{directory}/library']
  # Today's merge computes what was recorded, so the library's record describes it...
  _close(ours, record[f'{directory}/ours'], f'{directory}: our merged outputs changed')
  # ...and the library, reading the files we wrote, computed our outputs.
  _close(library, ours, f'{directory}: {record[f"{directory}/versions"]} vs ours')
  # The files written today name the class the library built from the recorded ones
  # (timm: the architecture it built its VisionTransformer from).
  written = fixtures.written_class(tmp_path)
  assert written == str(record[f'{directory}/written']), directory
  if directory != 'vit_timm_export':
    assert written == str(record[f'{directory}/built']), directory
  if directory in fixtures.DECODERS:
    # C and E gave o_proj and the MLP biases: Qwen2 and Mistral, whose configs hold none
    # there, are written (and were built by transformers) as Llamas with both flags on.
    config = built['model'].config
    assert (config.model_type, config.attention_bias, config.mlp_bias) == ('llama', True, True)
  # Not vacuous: the merge moves the outputs far beyond the tolerance.
  base = _base_outputs(directory)
  assert np.abs(ours - base).max() > 1e-2 * np.abs(base).max(), directory


def test_the_library_computed_the_adapted_model():
  """The real library's outputs of the merged files are peft.forward's with the
  adapters, as recorded (tests/test_models_registry.py checks merged vs adapted today)."""
  record = np.load(RECORD)
  for directory in fixtures.EXPORT_SEEDS:
    scale = np.abs(record[f'{directory}/library']).max()
    assert float(record[f'{directory}/library_vs_adapted']) < 1e-5 * scale, directory
