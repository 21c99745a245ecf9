"""Test set-up: 8 simulated CPU devices (set before jax is imported) so sharding
tests run anywhere; float32 matmuls at full precision for tight comparisons."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

jax.config.update('jax_default_matmul_precision', 'highest')
