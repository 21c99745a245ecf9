"""Test set-up: 8 simulated CPU devices (set before jax is imported) so sharding
tests run anywhere; float32 matmuls at full precision for tight comparisons; the
`shared_compiles` fixture."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')


@pytest.fixture
def shared_compiles(tmp_path, monkeypatch):
  """One JAX compilation cache for the runs of one test, in this process and in the
  train.py / search.py processes it starts: a resumed (or second) run loads the programs
  the first run compiled (the same HLO, so the same executable) instead of compiling them
  again, tens of seconds a run on 2 CPU cores. Other tests compile as before."""
  from jax.experimental.compilation_cache import compilation_cache
  path = str(tmp_path / 'jax_cache')
  monkeypatch.setenv('JAX_COMPILATION_CACHE_DIR', path)  # the processes it starts
  monkeypatch.setenv('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # the small ones add up
  settings = {'jax_compilation_cache_dir': path, 'jax_persistent_cache_min_compile_time_secs': 0.0}
  before = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # this process: the cache is set up again, in `path`
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()
