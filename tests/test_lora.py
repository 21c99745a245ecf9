"""LoRA: the update (alpha / r) B A against numpy in PyTorch layout, weight and activation
modes agreeing, PEFT's initialisation, and rank checks."""
import math

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax.adapters import lora


def normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_lora_delta_matches_reference_and_activation_mode():
  fam = lora.family(rank=4, alpha=8.0)
  p = {'A': jax.random.normal(jax.random.key(0), (4, 16)),
       'B': jax.random.normal(jax.random.key(1), (48, 4))}
  kernel = jax.random.normal(jax.random.key(2), (16, 48))
  dk, db = fam.delta(p, None, kernel, None)
  assert db is None
  ref = 2.0 * np.asarray(p['B']) @ np.asarray(p['A'])  # (out, in), scale alpha/r
  np.testing.assert_allclose(np.asarray(dk).T, ref, rtol=1e-5, atol=1e-5)
  x = jax.random.normal(jax.random.key(3), (5, 16))
  y = x @ kernel
  np.testing.assert_allclose(fam.activation(p, None, x, y, kernel, None), x @ (kernel + dk),
                             rtol=1e-5, atol=1e-4)
  assert fam.fixed_cost((16, 48)) == 4 * 64


class AgainstNumpyTest(chex.TestCase):
  """The family's pure functions, compiled and run op by op: jit must not change the answer."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters((1, 1.0, 5, 7), (3, 16.0, 12, 6), (8, 8.0, 8, 8))
  def test_weight_and_activation_modes_equal_the_numpy_layer(self, rank, alpha, d_in, d_out):
    """y = x (W0 + (alpha / r) B A)^T + b0 with W0 (out, in), A (r, in), B (out, r)."""
    w0, b0 = normal((d_out, d_in), 0), normal((d_out,), 1)
    p = {'A': normal((rank, d_in), 2), 'B': normal((d_out, rank), 3)}
    x = normal((2, 3, d_in), 4)
    w = w0.astype(np.float64) + (alpha / rank) * (p['B'].astype(np.float64) @ p['A'])
    want = x.astype(np.float64) @ w.T + b0

    kernel, bias = jnp.asarray(w0.T), jnp.asarray(b0)
    weight = lora.family(rank=rank, alpha=alpha, mode='weight')
    dk, db = self.variant(weight.delta)(p, None, kernel, bias)
    assert db is None
    chex.assert_shape(dk, (d_in, d_out))
    got_weight = x @ (kernel + dk) + bias
    activation = lora.family(rank=rank, alpha=alpha, mode='activation')
    got_activation = self.variant(activation.activation)(p, None, jnp.asarray(x), x @ kernel + bias,
                                                         kernel, bias)
    chex.assert_trees_all_close((got_weight, got_activation), (want, want),
                                rtol=1e-5, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(got_weight, got_activation, rtol=1e-5, atol=1e-5)

  @chex.variants(with_jit=True, without_jit=True)
  def test_init_is_peft_kaiming_uniform_a_and_zero_b(self):
    d_in, d_out, rank = 400, 30, 16
    fam = lora.family(rank=rank)
    p = self.variant(fam.init, static_argnums=1)(jax.random.key(0), (d_in, d_out))
    chex.assert_shape([p['A'], p['B']], [(rank, d_in), (d_out, rank)])
    assert not np.any(p['B'])  # the model starts at the pretrained one
    # torch.nn.init.kaiming_uniform_(A, a=sqrt(5)): gain sqrt(2 / (1 + a^2)), fan_in = in,
    # bound = sqrt(3) * gain / sqrt(fan_in).
    bound = math.sqrt(3.0) * math.sqrt(2.0 / (1.0 + 5.0)) / math.sqrt(d_in)
    a = np.asarray(p['A'], np.float64)
    assert np.abs(a).max() <= bound
    assert np.abs(a).max() > 0.99 * bound
    # Uniform on [-bound, bound]: mean 0, variance bound^2 / 3 (6,400 draws: within a few %).
    assert abs(a.mean()) < 0.05 * bound
    assert abs(a.var() / (bound ** 2 / 3) - 1) < 0.05
    dk, _ = self.variant(fam.delta)(p, None, jnp.zeros((d_in, d_out)), None)
    assert not np.any(dk)
    assert fam.fixed_cost((d_in, d_out)) == sum(np.size(v) for v in p.values())


def test_rank_above_layer_width_names_the_layer():
  fam = lora.family(rank=8)
  fam.check('fc', (8, 32))  # rank == min(in, out) fits
  with pytest.raises(ValueError, match=r"lora: rank 8 is above min\(in, out\) = 6 for 'fc1' "
                                       r'\(kernel 16x6\)'):
    fam.check('fc1', (16, 6))
  with pytest.raises(ValueError, match=r"'fc2/kernel' has shape \(3, 3, 8\); expected a 2-D"):
    fam.check('fc2', (3, 3, 8))


@pytest.mark.parametrize('make,message', [
    (lambda: lora.family(rank=0), 'LoRA rank must be a positive integer, got 0'),
    (lambda: lora.family(rank=-2), 'LoRA rank must be a positive integer, got -2'),
    (lambda: lora.family(mode='fast'), "LoRA mode must be 'weight' or 'activation', got 'fast'")])
def test_bad_family_arguments(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_no_searchable_supports():
  fam = lora.family()
  assert fam.supports == () and fam.option_costs((8, 8)) == []
  with pytest.raises(ValueError, match="LoRA has no searchable supports"):
    fam.options('A')
