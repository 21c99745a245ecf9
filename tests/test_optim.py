"""optim.lr_multipliers: per-path learning rates, as torch param groups with lr x m."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from glora_jax.train import steps


def test_lr_multipliers_equal_adamw_at_the_scaled_rate_per_leaf():
  """Each leaf against its own optax.adamw at lr x m (Adam and decoupled weight decay
  are per leaf, so a param group with lr x m is exactly that), over 4 steps."""
  key = jax.random.key(0)
  params = {'adapters': {'l0': {'Cd': jnp.ones((6, 2)), 'Cu': jnp.full((2, 1), 0.5),
                                'Bd': jnp.ones((4, 2))}},
            'model': {'head': jnp.ones((3,))}}
  rules = (('adapters/.*/C[du]', 0.1), ('model/.*', 3.0))
  lr, wd = 1e-2, 0.05
  opt = steps.make_optimizer(lr, wd, lr_multipliers=rules)
  state = opt.init(params)
  expect = {'adapters/l0/Cd': 0.1, 'adapters/l0/Cu': 0.1, 'adapters/l0/Bd': 1.0, 'model/head': 3.0}
  refs = {}
  flat = {'adapters/l0/Cd': params['adapters']['l0']['Cd'], 'adapters/l0/Cu': params['adapters']['l0']['Cu'],
          'adapters/l0/Bd': params['adapters']['l0']['Bd'], 'model/head': params['model']['head']}
  for name, m in expect.items():
    ref = optax.adamw(lr * m, weight_decay=wd)
    refs[name] = [ref, ref.init(flat[name]), flat[name]]
  p = params
  for _ in range(4):
    key, k = jax.random.split(key)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.fold_in(k, x.size), x.shape), p)
    updates, state = opt.update(grads, state, p)
    p = optax.apply_updates(p, updates)
    g = {'adapters/l0/Cd': grads['adapters']['l0']['Cd'], 'adapters/l0/Cu': grads['adapters']['l0']['Cu'],
         'adapters/l0/Bd': grads['adapters']['l0']['Bd'], 'model/head': grads['model']['head']}
    for name, (ref, rs, rp) in refs.items():
      u, rs = ref.update(g[name], rs, rp)
      refs[name] = [ref, rs, optax.apply_updates(rp, u)]
  got = {'adapters/l0/Cd': p['adapters']['l0']['Cd'], 'adapters/l0/Cu': p['adapters']['l0']['Cu'],
         'adapters/l0/Bd': p['adapters']['l0']['Bd'], 'model/head': p['model']['head']}
  for name in expect:
    np.testing.assert_allclose(got[name], refs[name][2], rtol=1e-6, atol=1e-7)
  # the multipliers did something: C moved a tenth as far as B from the same start
  assert float(jnp.abs(got['adapters/l0/Cd'] - 1).mean()) < 0.2 * float(jnp.abs(got['adapters/l0/Bd'] - 1).mean())


def test_first_matching_rule_wins():
  params = {'adapters': {'Cd': jnp.ones(2)}, 'model': {'w': jnp.ones(2)}}
  opt = steps.make_optimizer(1.0, 0.0, lr_multipliers=(('adapters/Cd', 0.5), ('adapters/.*', 0.0001)))
  u, _ = opt.update({'adapters': {'Cd': jnp.ones(2)}, 'model': {'w': jnp.ones(2)}}, opt.init(params), params)
  np.testing.assert_allclose(u['adapters']['Cd'], -0.5, rtol=1e-5)  # Adam's first step is -lr x 1
  np.testing.assert_allclose(u['model']['w'], -1.0, rtol=1e-5)
  with pytest.raises(ValueError, match='must be > 0'):
    steps.make_optimizer(1.0, 0.0, lr_multipliers=(('adapters/Cd', 0.0),))
