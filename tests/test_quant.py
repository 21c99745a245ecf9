"""glora_jax.quant against an independent numpy quantizer: NF4 levels, int8 absmax / 127,
block scales, packed codes, the round-trip bound, double quantization and bad blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from glora_jax import quant

# REFERENCE.md section 6, written out again so that a typo in quant.NF4_LEVELS fails here.
LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)


def reference(x, kind, block):
  """(codes, absmax, dequantized) by numpy: blocks of the flattened (row-major) array,
  nearest NF4 level by argmin of the distances, or round(x / absmax x 127)."""
  x = np.asarray(x, np.float32)
  blocks = x.reshape(-1, block)
  absmax = np.abs(blocks).max(axis=1)
  safe = np.where(absmax > 0, absmax, np.float32(1))
  normalized = blocks / safe[:, None]
  if kind == 'nf4':
    dist = np.abs(normalized[..., None].astype(np.float64) - LEVELS.astype(np.float64))
    codes = dist.argmin(-1)
    deq = LEVELS[codes] * absmax[:, None]
  else:
    codes = np.clip(np.round(normalized * 127), -127, 127).astype(np.int8)
    deq = codes.astype(np.float32) / np.float32(127) * absmax[:, None]
  lead = x.shape[:-1]
  return (codes.reshape(x.shape), absmax.reshape(*lead, x.shape[-1] // block),
          deq.reshape(x.shape))


def codes_of(q):
  """The per-value codes of q, unpacked by numpy (high nibble first)."""
  c = np.asarray(q.codes)
  if q.kind == 'int8':
    return c
  return np.stack([c >> 4, c & 15], axis=-1).reshape(*c.shape[:-1], c.shape[-1] * 2)


def random(shape, seed=0, scale=1.0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def test_levels_are_the_reference_table():
  np.testing.assert_array_equal(quant.NF4_LEVELS, LEVELS)


@pytest.mark.parametrize('kind', quant.KINDS)
@pytest.mark.parametrize('shape,block', [((8, 128), 64), ((3, 5, 32), 16), ((256,), 64)])
def test_matches_numpy_quantizer(kind, shape, block):
  x = random(shape, seed=block)
  q = quant.quantize(x, kind, block)
  codes, absmax, deq = reference(x, kind, block)
  np.testing.assert_array_equal(codes_of(q), codes)
  np.testing.assert_array_equal(np.asarray(q.absmax), absmax)
  out = quant.dequantize(q)
  assert out.shape == shape and out.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(out), deq, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('kind', quant.KINDS)
def test_round_trip_within_half_the_widest_gap_times_block_absmax(kind):
  x = random((16, 192), seed=1, scale=3.0)
  x[0, :64] *= 100  # one block of large values: the bound is per block
  q = quant.quantize(x, kind, 64)
  _, absmax, _ = reference(x, kind, 64)
  bound = quant.max_error(kind) * np.repeat(absmax, 64, axis=-1)
  err = np.abs(x - np.asarray(quant.dequantize(q)))
  assert np.all(err <= bound * (1 + 1e-6) + 1e-7), float((err - bound).max())
  gap = np.max(np.diff(LEVELS.astype(np.float64))) / 2 if kind == 'nf4' else 0.5 / 127
  assert quant.max_error(kind) == pytest.approx(gap)


def test_nf4_exact_codes_on_the_levels_themselves():
  # One block holds every level x 3 (and its reverse): codes 0..15, values exact.
  x = np.concatenate([LEVELS * np.float32(3), LEVELS[::-1] * np.float32(3)])[None]
  q = quant.quantize(x, 'nf4', 32)
  np.testing.assert_array_equal(codes_of(q)[0], np.r_[np.arange(16), np.arange(16)[::-1]])
  assert np.asarray(q.codes)[0, 0] == (0 << 4) | 1  # the first value in the high nibble
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), x)


def test_nf4_value_on_a_midpoint_takes_the_lower_level():
  mid = (np.float64(LEVELS[8]) + LEVELS[9]) / 2
  x = np.zeros((1, 4), np.float32)
  x[0, :2] = [1.0, np.float32(mid)]
  assert codes_of(quant.quantize(x, 'nf4', 4))[0, 1] == reference(x, 'nf4', 4)[0][0, 1]


def test_int8_exact_codes_and_zero_blocks():
  x = np.arange(-127, 129, dtype=np.float32)[None]  # 256 values: the last block holds 128
  x[0, 128:] = 0  # an all-zero block
  q = quant.quantize(x, 'int8', 128)
  np.testing.assert_array_equal(codes_of(q)[0, :128], np.arange(-127, 1))
  np.testing.assert_array_equal(codes_of(q)[0, 128:], 0)
  np.testing.assert_array_equal(np.asarray(q.absmax), [[127, 0]])
  np.testing.assert_allclose(np.asarray(quant.dequantize(q)), x, atol=1e-5)
  zeros = quant.quantize(np.zeros((2, 8), np.float32), 'nf4', 8)
  np.testing.assert_array_equal(codes_of(zeros), 7)  # the level 0.0
  np.testing.assert_array_equal(np.asarray(quant.dequantize(zeros)), 0)


@pytest.mark.parametrize('kind', quant.KINDS)
def test_double_quantized_scales_within_their_own_bound(kind):
  x = random((40, 320), seed=2) * random((40, 1), seed=3)  # scales that vary by row
  single, double = quant.quantize(x, kind, 64), quant.quantize(x, kind, 64, double=True)
  assert double.absmax.dtype == jnp.int8 and double.absmax.shape == single.absmax.shape
  absmax = np.asarray(single.absmax).reshape(-1)
  offset = absmax.mean()
  np.testing.assert_allclose(float(double.absmax_offset), offset, rtol=1e-6)
  centred = np.pad(absmax - offset, (0, -absmax.size % 256)).reshape(-1, 256)
  scales = np.abs(centred).max(axis=1)
  np.testing.assert_allclose(np.asarray(double.absmax_scales), scales, rtol=1e-6)
  decoded = np.asarray(quant.block_absmax(double)).reshape(-1)
  bound = np.repeat(scales, 256)[:absmax.size] / 254
  scale_err = np.abs(decoded - absmax)
  assert np.all(scale_err <= bound * (1 + 1e-5) + 1e-7), float((scale_err - bound).max())
  # The value error adds the scale's error to the single quantization's bound.
  err = np.abs(x - np.asarray(quant.dequantize(double)))
  total = (quant.max_error(kind) * np.repeat(absmax, 64) + np.repeat(scale_err, 64)).reshape(x.shape)
  assert np.all(err <= total * (1 + 1e-5) + 1e-6)


def test_a_block_that_does_not_divide_is_an_error_unless_padding_is_asked():
  x = random((6, 40), seed=4)
  with pytest.raises(ValueError, match=r"block 64 does not divide .*shape \(6, 40\)"):
    quant.quantize(x, 'nf4', 64)
  with pytest.raises(ValueError, match="'layer_0/query/kernel'"):
    quant.quantize(x, 'int8', 64, name="'layer_0/query/kernel'")
  q = quant.quantize(x, 'nf4', 64, pad=True)
  assert q.shape == (6, 40) and q.codes.shape == (6, 32) and q.absmax.shape == (6, 1)
  out = np.asarray(quant.dequantize(q))
  _, absmax, deq = reference(np.pad(x, [(0, 0), (0, 24)]), 'nf4', 64)
  np.testing.assert_allclose(out, deq[:, :40], rtol=1e-6, atol=1e-7)


def test_bad_kind_and_block():
  with pytest.raises(ValueError, match="kind 'int4' is unknown"):
    quant.quantize(np.zeros((2, 4), np.float32), 'int4')
  with pytest.raises(ValueError, match='must be even'):
    quant.quantize(np.zeros((2, 6), np.float32), 'nf4', 3)
  with pytest.raises(ValueError, match='positive integer'):
    quant.quantize(np.zeros((2, 4), np.float32), 'int8', 0)
  with pytest.raises(ValueError, match='expects a float array'):
    quant.quantize(np.zeros((2, 4), np.int32), 'int8', 4)


def test_a_pytree_of_plain_arrays_under_jit_and_device_put():
  x = random((8, 64), seed=5).astype(jnp.bfloat16)
  q = quant.quantize(x, 'nf4', 32, double=True)
  assert q.dtype == jnp.bfloat16 and q.size == 512 and np.shape(q) == (8, 64)
  leaves = jax.tree.leaves(q)
  assert [l.dtype for l in leaves] == [jnp.uint8, jnp.int8, jnp.float32, jnp.float32]
  assert q.nbytes == 8 * 32 + 8 * 2 + 4 + 4
  moved = jax.device_put(q, jax.devices()[0])
  out = jax.jit(quant.dequantize)(moved)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(out, np.float32),
                                np.asarray(quant.dequantize(q), np.float32))
  shapes = jax.eval_shape(lambda a: quant.quantize(a, 'int8', 16), x)
  assert quant.is_quantized(shapes) and shapes.codes.shape == (8, 64)
  assert shapes.absmax.shape == (8, 4)
  tree = quant.dequantize_tree({'a': {'kernel': q}, 'b': jnp.ones(3)})
  assert tree['a']['kernel'].shape == (8, 64) and tree['b'].shape == (3,)
