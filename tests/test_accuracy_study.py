"""benchmarks/accuracy_bbc.py's tables: a seed filter and the mean +- std over seeds,
checked against rows written by hand and numpy."""
import numpy as np
import pytest

from benchmarks import accuracy_bbc


def _row(test):
  return {'adapter_params': 10, 'head_params': 2, 'val_accuracy': 0.5, 'test_accuracy': test,
          'median_step_ms': None, 'wall_s': 1.0, 'lr': 1e-3, 'backbone_passes': 5,
          'passes_per_step': 1}


RESULTS = {
    'lora/seed0': _row(0.90), 'lora/seed1': _row(0.92), 'lora/seed3': _row(0.80),
    'glora/seed12/largest': _row(0.70), 'glora/seed1/search<=331,776 (lora budget)': _row(0.95),
    'lora/seed1/lr=2e-3': _row(0.60),
}


def test_only_seeds_keeps_the_runs_of_those_seeds_and_no_seed_prefix():
  kept = accuracy_bbc.only_seeds(RESULTS, {1})
  assert sorted(kept) == ['glora/seed1/search<=331,776 (lora budget)', 'lora/seed1',
                          'lora/seed1/lr=2e-3']  # 'seed12' is not seed 1
  assert sorted(accuracy_bbc.only_seeds(RESULTS, {12})) == ['glora/seed12/largest']


def test_summary_over_chosen_seeds_is_their_mean_and_sample_std():
  table = accuracy_bbc.summary_table(accuracy_bbc.only_seeds(RESULTS, {0, 1}))
  (line,) = [l for l in table.splitlines() if l.startswith('| lora |')]
  v = np.array([0.90, 0.92])
  assert f'| 2 |' in line and f'{v.mean():.4f} ± {v.std(ddof=1):.4f}' in line
  everything = accuracy_bbc.summary_table(RESULTS)
  (line,) = [l for l in everything.splitlines() if l.startswith('| lora |')]
  v = np.array([0.90, 0.92, 0.80])
  assert f'| 3 |' in line and f'{v.mean():.4f} ± {v.std(ddof=1):.4f}' in line


def test_compare_is_the_seed_by_seed_difference_on_the_seeds_both_rows_have():
  results = {**RESULTS, 'glora/seed0/search<=331,776 (lora budget)': _row(0.93),
             'glora/seed2/search<=331,776 (lora budget)': _row(0.99)}  # no LoRA seed 2
  text = accuracy_bbc.compare(results, 'lora', 'glora/search<=331,776 (lora budget)')
  d = np.array([0.93 - 0.90, 0.95 - 0.92])  # seeds 0 and 1 only
  assert 'seed 0: 0.9300 - 0.9000 = +0.0300' in text and 'seed 2' not in text
  assert (f'mean {d.mean():+.4f} ± {d.std(ddof=1):.4f} (std), standard error '
          f'{d.std(ddof=1) / np.sqrt(2):.4f}, 2 seeds') in text


def test_compare_of_rows_without_a_common_seed_is_an_error_naming_their_seeds():
  results = {'lora/seed0': _row(0.9), 'glora/seed1/largest': _row(0.8)}
  with pytest.raises(SystemExit, match=r"no seed in common") as e:
    accuracy_bbc.compare(results, 'lora', 'glora/largest')
  assert "'lora' (seeds [0])" in str(e.value) and "'glora/largest' (seeds [1])" in str(e.value)


def test_fewshot_table_pairs_glora_with_lora_by_seed_per_k():
  glora = 'glora_anchor_b_d_e_unshared/seed{}/search<=331,776 (lora budget, from anchor)'
  by_k = {1: {'lora/seed0': _row(0.60), 'lora/seed1': _row(0.70), 'lora/seed2': _row(0.50),
              glora.format(0): _row(0.65), glora.format(1): _row(0.72)},  # seed 2 not searched
          4: {'lora/seed0': _row(0.80), glora.format(0): _row(0.79), 'surm/seed0': _row(0.9)}}
  lines = accuracy_bbc.fewshot_table(by_k).splitlines()
  d = np.array([0.05, 0.02])
  assert lines[2] == (f'| 1 | 0.6000 ± 0.1000 (3) | - | 0.6850 ± {np.std([0.65, 0.72], ddof=1):.4f} (2) '
                      f'| {d.mean():+.4f} ± {d.std(ddof=1):.4f} | met |')
  assert lines[3] == '| 4 | 0.8000 (1) | 0.9000 (1) | 0.7900 (1) | -0.0100 | missed by 0.0100 |'
