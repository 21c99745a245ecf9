"""The notebooks in notebooks/ run top to bottom in a kernel of this environment's Python,
as CI runs them; the committed ones carry no outputs; the README's notebook snippet runs
as written."""
import json
import os
import pathlib
import re
import sys
import time

import nbformat
import numpy as np
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / 'notebooks').glob('*.ipynb'))
CELL_TIMEOUT_S = 180  # one cell; a whole notebook takes well under a minute on 2 CPU cores
KERNEL = 'glora_jax_tests'


def _ids(paths):
  return [p.stem for p in paths]


def test_the_notebooks_are_there():
  assert {p.name for p in NOTEBOOKS} >= {'compose_adapters.ipynb', 'own_training_loop.ipynb',
                                         'search_by_hand.ipynb', 'to_pytorch.ipynb'}


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_committed_notebook_is_stripped(path):
  """Outputs are produced by execution, never committed."""
  nb = nbformat.read(path, as_version=4)
  nbformat.validate(nb)
  assert nb.cells[0].cell_type == 'markdown', f'{path.name}: begin with what it shows'
  for index, cell in enumerate(nb.cells):
    if cell.cell_type == 'code':
      assert not cell.outputs and cell.execution_count is None, (
          f'{path.name}: cell {index} carries outputs or an execution count; clear them '
          '(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)')


def _kernel_manager(tmp_path) -> AsyncKernelManager:
  """A kernel that runs this process's Python (not whatever 'python3' a user's jupyter
  path names)."""
  spec_dir = tmp_path / 'kernels' / KERNEL
  spec_dir.mkdir(parents=True)
  (spec_dir / 'kernel.json').write_text(json.dumps({
      'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
      'display_name': 'glora_jax tests', 'language': 'python'}))
  specs = KernelSpecManager(kernel_dirs=[str(tmp_path / 'kernels')])
  return AsyncKernelManager(kernel_name=KERNEL, kernel_spec_manager=specs)


def _kernel_env() -> dict[str, str]:
  """This environment, less conftest's 8 simulated devices: a notebook runs as a user's."""
  env = dict(os.environ)
  flags = env.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=8', '')
  env['XLA_FLAGS'] = flags.strip()
  return env


@pytest.mark.parametrize('path', NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, tmp_path):
  nb = nbformat.read(path, as_version=4)
  client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                          resources={'metadata': {'path': str(tmp_path)}})
  start = time.perf_counter()
  with client.setup_kernel(env=_kernel_env(), cleanup_kc=True):
    for index, cell in enumerate(nb.cells):
      if cell.cell_type != 'code':
        continue
      try:
        client.execute_cell(cell, index)
      except (CellExecutionError, CellTimeoutError) as e:
        first_line = cell.source.strip().splitlines()[0]
        trace = re.sub(r'\x1b\[[0-9;]*m', '', str(e))  # IPython's colours, unreadable in a log
        pytest.fail(f'{path.name}: cell {index} ({first_line!r}) failed:\n{trace}', pytrace=False)
  print(f'{path.name}: {time.perf_counter() - start:.1f} s')


def readme_notebook_snippet() -> str:
  """The python block of the README's '### In a notebook' section."""
  readme = (ROOT / 'README.md').read_text(encoding='utf-8')
  section = readme.split('\n### In a notebook\n', 1)[1]
  section = re.split(r'\n##+ ', section, maxsplit=1)[0]
  blocks = re.findall(r'```python\n(.*?)```', section, re.S)
  assert len(blocks) == 1, f"README's 'In a notebook' section has {len(blocks)} python blocks"
  return blocks[0]


def test_readme_notebook_snippet_runs_as_written():
  namespace = {}
  exec(compile(readme_notebook_snippet(), 'README.md (### In a notebook)', 'exec'), namespace)
  logits, plain, merged = namespace['logits'], namespace['plain'], namespace['merged']
  ids, mask = namespace['ids'], namespace['mask']
  assert logits.shape == (len(ids), 5)
  np.testing.assert_allclose(plain.apply({'params': merged}, ids, mask), logits, atol=1e-5, rtol=0)
  assert len(namespace['mixed'].spec.layers) == 36
