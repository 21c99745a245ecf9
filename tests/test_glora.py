"""GLoRA layer maths against an independent numpy reference (REFERENCE.md §1); LoRA's are
in test_lora.py."""
import itertools
import re

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax.adapters import glora

# --------------------------------------------------------------------------- #
# Independent reference, written from REFERENCE.md in PyTorch layout.
# --------------------------------------------------------------------------- #


def ref_matrix_support(down, up, opt, vec=None, const=None):
  """A, B (down (out,R), up (R,in)) or C (down (in,R), up (R,1)). Shared (the
  authors'): vector and constant from down's first column; else `vec`, `const`."""
  if opt.startswith('lora_'):
    r = int(opt.split('_')[1])
    return down[:, :r] @ up[:r, :]
  if opt == 'vector':
    return down[:, 0:1] if vec is None else vec[:, None]
  if opt == 'constant':
    return down[0, 0] if const is None else const[0]
  assert opt == 'none'
  return 0.0


def ref_vector_support(v, opt, const=None):
  return {'vector': v, 'constant': v[0] if const is None else const[0], 'none': 0.0}[opt]


def ref_glora(w0, b0, p, choice):
  """W' = W0 + W0*A + B,  b' = b0 + b0*D + E + W0 @ C  (torch layout). Unshared
  params (Av, Ac, ...) are used where present."""
  a = ref_matrix_support(p['Ad'], p['Au'], choice['A'], p.get('Av'), p.get('Ac'))
  b = ref_matrix_support(p['Bd'], p['Bu'], choice['B'], p.get('Bv'), p.get('Bc'))
  c = ref_matrix_support(p['Cd'], p['Cu'], choice['C'], p.get('Cv'))
  d = ref_vector_support(p['D'], choice['D'], p.get('Dc'))
  e = ref_vector_support(p['E'], choice['E'], p.get('Ec'))
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


def check_every_option(variant, d_in, d_out, share, with_bias):
  """`variant(fam.delta)` against ref_glora for 60 random choices of the 900 and
  every option of every support."""
  fam = glora.family(ranks=(2, 4), share_vectors=share)
  key = jax.random.key(0)
  p = random_params(fam, key, d_in, d_out)
  w0 = np.asarray(jax.random.normal(jax.random.key(1), (d_out, d_in)), np.float64)
  b0 = np.asarray(jax.random.normal(jax.random.key(2), (d_out,)), np.float64) if with_bias else None
  kernel = jnp.asarray(w0.T, jnp.float32)
  bias = None if b0 is None else jnp.asarray(b0, jnp.float32)
  delta = variant(fam.delta)
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


# (d_in, d_out, share_vectors, with_bias); eager calls cost ~30 ms each on CPU, so two
# small layers also run op by op and the rest compiled only.
LAYERS = [(16, 16, True), (16, 48, True), (48, 16, True), (16, 48, False), (48, 16, False)]
CASES = [(*layer, with_bias) for with_bias in (True, False) for layer in LAYERS]
EAGER_CASES = [(16, 48, True, True), (48, 16, False, False)]


class EveryOptionTest(chex.TestCase):
  """delta against the numpy reference, compiled and op by op: a pure function gives the
  same answer under jit."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*EAGER_CASES)
  def test_every_option_matches_numpy_reference(self, d_in, d_out, share, with_bias):
    check_every_option(self.variant, d_in, d_out, share, with_bias)

  @chex.variants(with_jit=True)
  @parameterized.parameters(*[c for c in CASES if c not in EAGER_CASES])
  def test_every_option_matches_numpy_reference_compiled(self, d_in, d_out, share, with_bias):
    check_every_option(self.variant, d_in, d_out, share, with_bias)


def test_default_space_has_432_choices_and_reference_counts():
  fam = glora.family()
  assert np.prod([len(fam.options(s)) for s in fam.supports]) == 432
  d_in, d_out = 16, 48
  costs = fam.option_costs((d_in, d_out))
  for c in all_choices(fam):
    named = {s: fam.options(s)[o] for s, o in zip(fam.supports, c)}
    assert sum(costs[j][o] for j, o in enumerate(c)) == ref_count(named, d_in, d_out), named


def test_vector_on_c_counts_input_width_not_output():
  fam = glora.family()
  costs = fam.option_costs((16, 48))
  assert costs[2][fam.options('C').index('vector')] == 16


@pytest.mark.parametrize('share', [True, False])
def test_init_is_identity_for_every_choice(share):
  fam = glora.family(ranks=(4, 8), share_vectors=share)
  p = fam.init(jax.random.key(3), (24, 40))
  kernel = jax.random.normal(jax.random.key(4), (24, 40))
  bias = jax.random.normal(jax.random.key(5), (40,))
  for c in all_choices(fam)[::7]:
    dk, db = fam.delta(p, jnp.asarray(c), kernel, bias)
    assert float(jnp.abs(dk).max()) == 0.0 and float(jnp.abs(db).max()) == 0.0


def test_unshared_vectors_leave_the_low_rank_factors_alone():
  """share_vectors=False: a layer that draws vector or constant options has a zero
  gradient on the low-rank factors (shared, their first columns move), and its own
  vector and constant params get the gradient instead."""
  x = jax.random.normal(jax.random.key(1), (4, 6, 12))
  kernel = jax.random.normal(jax.random.key(2), (12, 20))
  bias = jax.random.normal(jax.random.key(3), (20,))

  def grads(share, named):
    fam = glora.family(ranks=(4,), share_vectors=share)
    p = random_params(fam, jax.random.key(0), 12, 20)
    choice = jnp.asarray([fam.options(s).index(named[s]) for s in fam.supports])
    loss = lambda p: jnp.sum(jnp.sin(fam.activation(p, choice, x, jnp.zeros((4, 6, 20)), kernel, bias)))
    return jax.grad(loss)(p)

  named = dict(A='vector', B='vector', C='vector', D='constant', E='constant')
  g_shared, g_own = grads(True, named), grads(False, named)
  for s in 'ABC':
    assert float(jnp.abs(g_shared[f'{s}d'][:, 0]).max()) > 0, s
    assert float(jnp.abs(g_own[f'{s}d']).max()) == 0.0, s
    assert float(jnp.abs(g_own[f'{s}v']).max()) > 0, s
  for s in 'DE':
    assert float(jnp.abs(g_own[s]).max()) == 0.0 and float(jnp.abs(g_own[f'{s}c']).max()) > 0, s
  assert set(g_own) - set(g_shared) == {'Av', 'Bv', 'Cv', 'Ac', 'Bc', 'Dc', 'Ec'}


def test_unshared_vectors_keep_costs_and_the_fingerprinted_repr():
  shared, own = glora.family(), glora.family(share_vectors=False)
  assert shared.option_costs((16, 48)) == own.option_costs((16, 48))
  assert repr(shared) == repr(own) and shared != own  # trainable shapes differ instead
  p = own.init(jax.random.key(0), (16, 48))
  chex.assert_shape([p['Cv'], p['Bv'], p['Ec']], [(16,), (48,), (1,)])


def test_xavier_bounds_of_up_projections():
  fam = glora.family(ranks=(4,))
  p = fam.init(jax.random.key(0), (300, 200))
  # bound sqrt(6 / (fan_in + fan_out)) of the (R, in) / (R, 1) tensors
  assert float(jnp.abs(p['Au']).max()) <= np.sqrt(6 / (4 + 300))
  assert float(jnp.abs(p['Au']).max()) > 0.9 * np.sqrt(6 / (4 + 300))
  assert float(jnp.abs(p['Cu']).max()) <= np.sqrt(6 / (4 + 1))
  chex.assert_shape([p['Au'], p['Ad'], p['Cd']], [(4, 300), (200, 4), (300, 4)])


@pytest.mark.parametrize('make', [lambda: glora.family(ranks=(0,)), lambda: glora.family(ranks=())])
def test_bad_family_arguments(make):
  with pytest.raises(ValueError):
    make()


def test_unknown_support_name():
  with pytest.raises(ValueError, match="unknown GLoRA support 'F'"):
    glora.family().options('F')


@pytest.mark.parametrize('with_bias,share', [(True, True), (False, True), (True, False)])
def test_activation_gradients_equal_those_of_the_merged_layer(with_bias, share):
  """The training path (scaled_matmul's custom VJP: weight gradient only for a
  low-rank A, the rank-(r+2) product for B and the bias) gives the values and
  the gradients (adapter params, input, kernel) of x (K + dK) + (b + db) built
  from `delta`, differentiated by JAX, for every A option."""
  fam = glora.family(ranks=(2, 4), share_vectors=share)
  d_in, d_out = 12, 20
  p = random_params(fam, jax.random.key(0), d_in, d_out)
  x = jax.random.normal(jax.random.key(1), (3, 5, d_in))
  kernel = jax.random.normal(jax.random.key(2), (d_in, d_out))
  bias = jax.random.normal(jax.random.key(3), (d_out,)) if with_bias else None
  weights = jax.random.normal(jax.random.key(4), (3, 5, d_out))

  def via_activation(p, x, kernel, choice):
    out = fam.activation(p, choice, x, jnp.zeros(x.shape[:-1] + (d_out,)), kernel, bias)
    return jnp.sum(jnp.sin(out) * weights)

  def via_merge(p, x, kernel, choice):
    dk, db = fam.delta(p, choice, kernel, bias)
    out = x @ (kernel + dk) + ((0.0 if bias is None else bias) + db)
    return jnp.sum(jnp.sin(out) * weights)

  got_fn = jax.jit(jax.value_and_grad(via_activation, argnums=(0, 1, 2)))
  want_fn = jax.jit(jax.value_and_grad(via_merge, argnums=(0, 1, 2)))
  rng = np.random.default_rng(1)
  for a in range(len(fam.options('A'))):  # lora_2, lora_4, vector, constant, none
    for _ in range(3):
      choice = jnp.asarray([a] + [int(rng.integers(len(fam.options(s)))) for s in 'BCDE'], jnp.int32)
      (got, got_grads), (want, want_grads) = got_fn(p, x, kernel, choice), want_fn(p, x, kernel, choice)
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)  # a sum of 300 terms
      chex.assert_tree_all_finite(want_grads)  # allclose passes NaN against NaN
      # float32 error grows with a leaf's largest entries (sums over terms of
      # that size, reordered by XLA per CPU), so atol scales with them.
      jax.tree.map(lambda g, w: np.testing.assert_allclose(
          g, w, rtol=1e-4, atol=1e-4 * max(1.0, float(jnp.max(jnp.abs(w)))), err_msg=str(choice)),
          got_grads, want_grads)


def test_weight_gradient_only_where_a_is_low_rank():
  """The compiled backward of the frozen-kernel step computes the (in, out)
  weight gradient x^T g once, inside a branch of a conditional (the low-rank A
  branch), never unconditionally: layers with another A skip it."""
  fam = glora.family()
  tokens, d_in, d_out = 64, 24, 40
  p = random_params(fam, jax.random.key(0), d_in, d_out)
  x = jax.random.normal(jax.random.key(1), (tokens, d_in))
  kernel = jax.random.normal(jax.random.key(2), (d_in, d_out))

  def loss(p, x, kernel, choice):
    return jnp.sum(fam.activation(p, choice, x, jnp.zeros((tokens, d_out)), kernel, None) ** 2)

  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(
      p, x, kernel, jnp.zeros(5, jnp.int32)).compile().as_text()
  shapes = dict(re.findall(r'(%?[\w.\-]+) = (f32\[[\d,]*\])', hlo))
  shapes.update(re.findall(r'([\w.\-]+): (f32\[[\d,]*\])', hlo))
  computation, found = None, []
  for line in hlo.splitlines():
    header = re.match(r'^(ENTRY )?%([\w.\-]+) \(', line)
    if header:
      computation = 'ENTRY' if header.group(1) else header.group(2)
    dot = re.search(r'= f32\[%d,%d\]\S* dot\(([^)]*)\)' % (d_in, d_out), line)
    if dot:
      operands = [shapes.get(o.strip().lstrip('%'), shapes.get(o.strip())) for o in dot.group(1).split(',')]
      if f'f32[{tokens},{d_in}]' in operands:  # contracts over tokens: a weight gradient
        found.append(computation)
  branches = set(re.findall(r'branch_computations=\{([^}]*)\}', hlo))
  branch_names = {b.strip().lstrip('%') for group in branches for b in group.split(',')}
  assert len(found) == 1 and found[0] in branch_names, (found, branch_names)
