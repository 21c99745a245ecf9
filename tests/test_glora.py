"""GLoRA layer maths against an independent numpy reference (REFERENCE.md §1); LoRA's are
in test_lora.py."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax.adapters import glora

# --------------------------------------------------------------------------- #
# Independent reference, written from REFERENCE.md in PyTorch layout.
# --------------------------------------------------------------------------- #


def ref_matrix_support(down, up, opt):
  """A, B (down (out,R), up (R,in)) or C (down (in,R), up (R,1))."""
  if opt.startswith('lora_'):
    r = int(opt.split('_')[1])
    return down[:, :r] @ up[:r, :]
  if opt == 'vector':
    return down[:, 0:1]
  if opt == 'constant':
    return down[0, 0]
  assert opt == 'none'
  return 0.0


def ref_vector_support(v, opt):
  return {'vector': v, 'constant': v[0], 'none': 0.0}[opt]


def ref_glora(w0, b0, p, choice):
  """W' = W0 + W0*A + B,  b' = b0 + b0*D + E + W0 @ C  (torch layout)."""
  a = ref_matrix_support(p['Ad'], p['Au'], choice['A'])
  b = ref_matrix_support(p['Bd'], p['Bu'], choice['B'])
  c = ref_matrix_support(p['Cd'], p['Cu'], choice['C'])
  d = ref_vector_support(p['D'], choice['D'])
  e = ref_vector_support(p['E'], choice['E'])
  b0 = np.zeros(w0.shape[0]) if b0 is None else b0
  w = w0 + w0 * a + b
  c_col = np.broadcast_to(np.asarray(c, np.float64), (w0.shape[1], 1)) if np.ndim(c) == 0 else c
  bias = b0 + b0 * d + e + (w0 @ c_col)[:, 0]
  return w, bias


def ref_count(choice, d_in, d_out):
  n = 0
  for s in 'AB':
    opt = choice[s]
    n += {'vector': d_out, 'constant': 1, 'none': 0}.get(opt, 0)
    if opt.startswith('lora_'):
      n += int(opt[5:]) * (d_in + d_out)
  opt = choice['C']
  n += {'vector': d_in, 'none': 0}.get(opt, 0)
  if opt.startswith('lora_'):
    n += int(opt[5:]) * (d_in + 1)
  for s in 'DE':
    n += {'vector': d_out, 'constant': 1, 'none': 0}[choice[s]]
  return n


def random_params(fam, key, d_in, d_out):
  """Supernet params with every leaf nonzero (the real init zeroes half of them)."""
  p = fam.init(key, (d_in, d_out))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  return jax.tree.unflatten(tree, [jax.random.normal(k, l.shape) for k, l in zip(keys, leaves)])


def all_choices(fam):
  return list(itertools.product(*[range(len(fam.options(s))) for s in fam.supports]))


@pytest.mark.parametrize('d_in,d_out', [(16, 16), (16, 48), (48, 16)])
@pytest.mark.parametrize('with_bias', [True, False])
def test_every_option_matches_numpy_reference(d_in, d_out, with_bias):
  fam = glora.space(ranks=(2, 4))
  key = jax.random.key(0)
  p = random_params(fam, key, d_in, d_out)
  w0 = np.asarray(jax.random.normal(jax.random.key(1), (d_out, d_in)), np.float64)
  b0 = np.asarray(jax.random.normal(jax.random.key(2), (d_out,)), np.float64) if with_bias else None
  kernel = jnp.asarray(w0.T, jnp.float32)
  bias = None if b0 is None else jnp.asarray(b0, jnp.float32)
  delta = jax.jit(fam.delta)
  np_p = jax.tree.map(lambda x: np.asarray(x, np.float64), p)
  choices = all_choices(fam)
  assert len(choices) == 5 * 5 * 4 * 3 * 3
  # every option of every support appears; exhaustively check a strided subset + all
  # single-support variations around a base choice, to keep the test fast.
  rng = np.random.default_rng(0)
  picked = [choices[i] for i in rng.choice(len(choices), 60, replace=False)]
  for j, s in enumerate(fam.supports):
    for o in range(len(fam.options(s))):
      c = [0, 0, 0, 0, 0]
      c[j] = o
      picked.append(tuple(c))
  for c in picked:
    named = {s: fam.options(s)[o] for s, o in zip(fam.supports, c)}
    dk, db = delta(p, jnp.asarray(c, jnp.int32), kernel, bias)
    w_ref, b_ref = ref_glora(w0, b0, np_p, named)
    np.testing.assert_allclose(np.asarray(kernel + dk).T, w_ref, rtol=1e-5, atol=1e-4, err_msg=str(named))
    b_got = np.asarray(db) + (0 if b0 is None else b0)
    np.testing.assert_allclose(b_got, b_ref, rtol=1e-5, atol=1e-4, err_msg=str(named))


def test_default_space_has_432_choices_and_reference_counts():
  fam = glora.space()
  assert np.prod([len(fam.options(s)) for s in fam.supports]) == 432
  d_in, d_out = 16, 48
  costs = fam.option_costs((d_in, d_out))
  for c in all_choices(fam):
    named = {s: fam.options(s)[o] for s, o in zip(fam.supports, c)}
    assert sum(costs[j][o] for j, o in enumerate(c)) == ref_count(named, d_in, d_out), named


def test_vector_on_c_counts_input_width_not_output():
  fam = glora.space()
  costs = fam.option_costs((16, 48))
  assert costs[2][fam.options('C').index('vector')] == 16


def test_init_is_identity_for_every_choice():
  fam = glora.space(ranks=(4, 8))
  p = fam.init(jax.random.key(3), (24, 40))
  kernel = jax.random.normal(jax.random.key(4), (24, 40))
  bias = jax.random.normal(jax.random.key(5), (40,))
  for c in all_choices(fam)[::7]:
    dk, db = fam.delta(p, jnp.asarray(c), kernel, bias)
    assert float(jnp.abs(dk).max()) == 0.0 and float(jnp.abs(db).max()) == 0.0


def test_xavier_bounds_of_up_projections():
  fam = glora.space(ranks=(4,))
  p = fam.init(jax.random.key(0), (300, 200))
  # bound sqrt(6 / (fan_in + fan_out)) of the (R, in) / (R, 1) tensors
  assert float(jnp.abs(p['Au']).max()) <= np.sqrt(6 / (4 + 300))
  assert float(jnp.abs(p['Au']).max()) > 0.9 * np.sqrt(6 / (4 + 300))
  assert float(jnp.abs(p['Cu']).max()) <= np.sqrt(6 / (4 + 1))
  assert p['Au'].shape == (4, 300) and p['Ad'].shape == (200, 4) and p['Cd'].shape == (300, 4)


@pytest.mark.parametrize('make', [lambda: glora.space(ranks=(0,)), lambda: glora.space(ranks=())])
def test_bad_family_arguments(make):
  with pytest.raises(ValueError):
    make()


def test_unknown_support_name():
  with pytest.raises(ValueError, match="unknown GLoRA support 'F'"):
    glora.space().options('F')
