"""Several hosts, shown on one machine: train.py as 2 processes x 4 simulated CPU
devices (jax.distributed on localhost, CPU collectives through gloo)."""
import csv
import json
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from glora_jax import peft
from glora_jax.train import checkpoint, setup

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / 'configs' / 'tiny_bbc_glora.py')
# The config's defaults (asynchronous saves among them) on a mesh that spans all
# 8 global devices; one epoch of 4 steps, each saved and kept for comparisons.
FLAGS = ('--config.mesh.data=8', '--config.mesh.model=1', '--config.model.scan_layers=True',
         '--config.num_epochs=1',
         '--config.checkpoint.every_steps=1', '--config.checkpoint.keep=4')
RUN_TIMEOUT_S = 300  # a whole run; far above the ~1 min one takes on 2 cores
# Runs train.py with BatchIterator.__next__ logging, for every batch a process
# reads, a digest of each of its rows (training and evaluation alike).
RECORDING_TRAIN = '''
import hashlib, json, os, runpy, sys
from glora_jax.data import pipeline
read = pipeline.BatchIterator.__next__
def recorded(self):
  batch = read(self)
  rows = [hashlib.sha1(b''.join(batch[k][i].tobytes() for k in sorted(batch))).hexdigest()[:16]
          for i in range(len(batch['mask']))]
  with open(os.environ['ROWS_LOG'], 'a') as f:
    f.write(json.dumps({'train': self.shuffle, 'process': [self.process_index, self.process_count],
                        'rows': rows}) + '\\n')
  return batch
pipeline.BatchIterator.__next__ = recorded
sys.argv[0] = 'train.py'
runpy.run_path('train.py', run_name='__main__')
'''


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def launch(workdir, *flags, processes=2, rows_log=None):
  """train.py on the tiny config as `processes` processes of 8 // processes CPU
  devices each (one process: no --distributed). Output goes to workdir.<i>.log."""
  workdir = pathlib.Path(workdir)
  port = free_port()
  # The test process's own XLA_FLAGS (tests/conftest.py) ask for 8 devices.
  xla_flags = ' '.join(f for f in os.environ.get('XLA_FLAGS', '').split()
                       if not f.startswith('--xla_force_host_platform_device_count'))
  procs = []
  for i in range(processes):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'{xla_flags} --xla_force_host_platform_device_count={8 // processes}')
    args = [f'--config={TINY}', f'--workdir={workdir}', *FLAGS, *flags]
    if processes > 1:
      args += ['--distributed', f'--coordinator_address=127.0.0.1:{port}',
               f'--num_processes={processes}', f'--process_id={i}']
    if rows_log is not None:
      env['ROWS_LOG'] = f'{rows_log}.{i}'
      cmd = [sys.executable, '-c', RECORDING_TRAIN, *args]
    else:
      cmd = [sys.executable, str(ROOT / 'train.py'), *args]
    log = open(f'{workdir}.{i}.log', 'w')
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    log.close()
  return procs


def log_tail(procs, workdir, chars=3000):
  return '\n'.join(f'--- process {i} (exit {p.poll()}):\n' +
                   pathlib.Path(f'{workdir}.{i}.log').read_text()[-chars:]
                   for i, p in enumerate(procs))


def kill_all(procs):
  for p in procs:
    if p.poll() is None:
      p.send_signal(signal.SIGKILL)
    p.wait()


def wait_all(procs, workdir, timeout=RUN_TIMEOUT_S):
  """Waits for every process to succeed. If one fails or the time runs out, the
  others (perhaps stuck in a collective) are killed and the test fails."""
  deadline = time.time() + timeout
  while any(p.poll() is None for p in procs):
    failed = [p for p in procs if p.poll() not in (None, 0)]
    if failed or time.time() > deadline:
      kill_all(procs)
      pytest.fail(f'{"a process failed" if failed else "timed out"}:\n{log_tail(procs, workdir)}')
    time.sleep(0.2)
  assert all(p.returncode == 0 for p in procs), log_tail(procs, workdir)
  return [pathlib.Path(f'{workdir}.{i}.log').read_text() for i in range(len(procs))]


def read_rows(path):
  """{'train': [((process_index, process_count), rows) of each batch], 'eval': [...]}
  as one process read them."""
  out = {'train': [], 'eval': []}
  for line in pathlib.Path(path).read_text().splitlines():
    r = json.loads(line)
    out['train' if r['train'] else 'eval'].append((tuple(r['process']), r['rows']))
  return out


def checkpoint_steps(workdir):
  ckpts = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.exists() else []


def losses(workdir):
  with open(pathlib.Path(workdir) / 'metrics.csv') as f:
    return [(int(r['step']), float(r['train_loss'])) for r in csv.DictReader(f) if r['train_loss']]


class Restorer:
  """Trainable params of any saved step, restored in this process (1 process, 8
  devices) onto its default device; the run is built once for every workdir."""

  def __init__(self, workdir):
    self.run = setup.build(setup.load_config(workdir))
    self.fingerprint = setup.fingerprint(self.run.config, self.run.spec, self.run.trainable)

  def __call__(self, workdir, step=None) -> dict:
    if step is None:  # the latest
      return peft.flatten(setup.load_trained(workdir, run=self.run)[1])
    mngr = checkpoint.manager(pathlib.Path(workdir) / 'checkpoints')
    try:
      restored = checkpoint.restore(mngr, setup.abstract_state(self.run), self.fingerprint, step)
    finally:
      mngr.close()
    assert restored is not None, f'no checkpoint in {workdir}'
    return peft.flatten(restored[1]['trainable'])


# A key bias cannot change attention (softmax ignores a shift shared by every key),
# so the gradient of GLoRA's key-bias supports is zero up to rounding, and Adam turns
# that rounding into steps of up to lr. The rounding depends on the order in which
# the gradient all-reduce sums the 8 devices' parts: in one process XLA's own, over
# two processes gloo's. Those leaves are noise in both runs and are left out.
INERT = re.compile(r'adapters/.*/attention/key/(C.*|D|E)')


def check_each_process_reads_its_half_of_every_batch(base):
  whole = read_rows(base / 'rows_one.0')
  halves = [read_rows(base / f'rows_two.{i}') for i in range(2)]
  for kind in ('train', 'eval'):
    assert whole[kind] and all(len(h[kind]) == len(whole[kind]) for h in halves), kind
    for step, (_, rows) in enumerate(whole[kind]):
      (p0, rows0), (p1, rows1) = halves[0][kind][step], halves[1][kind][step]
      assert (p0, p1) == ((0, 2), (1, 2))
      # Process 0 read the first half of the global batch and process 1 the second:
      # neither read the whole batch, and together they read exactly it.
      assert len(rows0) == len(rows1) == len(rows) // 2, (kind, step)
      assert rows0 + rows1 == rows, (kind, step)


def check_one_complete_checkpoint_per_step_from_both_processes(one, two):
  assert checkpoint_steps(two) == checkpoint_steps(one) == [1, 2, 3, 4]
  entries = sorted(p.name for p in (two / 'checkpoints').iterdir())
  assert entries == ['1', '2', '3', '4'], entries  # no temporary or per-process directories
  for step in (1, 2, 3, 4):
    state = two / 'checkpoints' / str(step) / 'state'
    assert (state.parent / 'commit_success.txt').is_file()
    for i in range(2):  # each process wrote its part into the one directory
      assert (state / 'array_metadatas' / f'process_{i}').is_file()
      assert any((state / f'ocdbt.process_{i}').rglob('*')), step
  # The files beside the checkpoints come from process 0 alone, each row once.
  assert json.loads((two / 'summary.json').read_text())['step'] == 4
  assert [s for s, _ in losses(two)] == [s for s, _ in losses(one)] == [1, 2, 3, 4]
  np.testing.assert_allclose([l for _, l in losses(two)], [l for _, l in losses(one)], rtol=1e-5)


def check_two_processes_end_like_one(restore, one, two):
  a, b = restore(one), restore(two)
  assert a.keys() == b.keys()
  compared = [k for k in a if not INERT.fullmatch(k)]
  assert len(compared) > len(a) // 2, sorted(a)
  for k in compared:
    np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-5, err_msg=k)
  summaries = [json.loads((w / 'summary.json').read_text()) for w in (one, two)]
  assert summaries[0]['val_loss'] == pytest.approx(summaries[1]['val_loss'], rel=1e-5)
  assert summaries[0]['val_accuracy'] == summaries[1]['val_accuracy']


def check_kill_one_process_then_resume_both(restore, two, killed):
  procs = launch(killed)
  deadline = time.time() + RUN_TIMEOUT_S
  try:
    # Orbax renames a step's directory into place once every process has written
    # its part, so its appearance means step 2 is saved: kill after it, mid-epoch.
    while 2 not in checkpoint_steps(killed):
      assert all(p.poll() is None for p in procs), log_tail(procs, killed)
      assert time.time() < deadline, 'timed out waiting to kill process 1'
      time.sleep(0.05)
    procs[1].send_signal(signal.SIGKILL)
    # The survivor fails or hangs at its next collective; a cluster scheduler ends it.
    try:
      procs[0].wait(timeout=5)
    except subprocess.TimeoutExpired:
      pass
  finally:
    kill_all(procs)
  kept = checkpoint_steps(killed)
  assert kept and kept[-1] < 4, kept  # the run was cut short
  # The last good checkpoint is intact: it holds what the uninterrupted run saved at that step.
  last = restore(killed, kept[-1])
  for k, v in restore(two, kept[-1]).items():
    np.testing.assert_allclose(last[k], v, rtol=0, atol=1e-7, err_msg=k)
  # Both processes rerun with the same command resume from it and end alike.
  for log in wait_all(launch(killed), killed):
    assert f'resumed from {killed}/checkpoints/{kept[-1]}' in log, log[-2000:]
  leftovers = [p.name for p in (killed / 'checkpoints').iterdir() if not p.name.isdigit()]
  assert not leftovers, leftovers
  # Same processes, same summation order: every leaf agrees, the inert ones too.
  resumed = restore(killed)
  for k, v in restore(two).items():
    np.testing.assert_allclose(resumed[k], v, rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.slow
def test_two_processes_of_four_devices(tmp_path):
  """The same config as 1 process x 8 devices and as 2 processes x 4 devices, then
  the 2-process run killed and resumed. One test, so that pytest-xdist keeps its
  phases in one worker, in order, and each run is made once."""
  one, two, killed = tmp_path / 'one', tmp_path / 'two', tmp_path / 'killed'
  wait_all(launch(one, processes=1, rows_log=tmp_path / 'rows_one'), one)
  wait_all(launch(two, processes=2, rows_log=tmp_path / 'rows_two'), two)
  check_each_process_reads_its_half_of_every_batch(tmp_path)
  check_one_complete_checkpoint_per_step_from_both_processes(one, two)
  restore = Restorer(one)
  check_two_processes_end_like_one(restore, one, two)
  check_kill_one_process_then_resume_both(restore, two, killed)
