"""Quantized frozen kernels (int8, NF4 as QLoRA defines it): a pytree of packed codes and
blockwise absmax scales that jit, device_put and sharding rules see as plain arrays.

Blocks run along the kernel's last dimension (the flattened kernel's consecutive
values, since the block divides that dimension), so codes and scales keep the kernel's
leading dimensions and can be sharded like it. `dequantize` gives the float kernel back;
peft's interception point calls it inside each Dense layer's own call (glora_jax.peft).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ('int8', 'nf4')
# bitsandbytes' NF4 table (QLoRA): 16 normal quantiles scaled to [-1, 1], 0 exact.
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
# A value goes to the nearest level: the one below the first midpoint it does not pass
# (a value exactly on a midpoint takes the lower level, as argmin of the distances).
_NF4_MIDPOINTS = ((NF4_LEVELS[1:].astype(np.float64) + NF4_LEVELS[:-1]) / 2).astype(np.float32)
INT8_MAX = 127
DOUBLE_BLOCK = 256  # QLoRA's block of the second quantization (of the absmax scales)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=('codes', 'absmax', 'absmax_scales', 'absmax_offset'),
                   meta_fields=('kind', 'shape', 'dtype_name', 'block', 'double'))
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
  """A kernel of `shape` and dtype `dtype_name` stored as `kind` codes per block of
  `block` values along its last dimension (padded to a multiple of it if asked).

  codes: int8 (value = code / 127 x absmax) or, for nf4, uint8 with two 4-bit indices
    into NF4_LEVELS (the first of a pair in the high nibble, as bitsandbytes packs);
    shape (*shape[:-1], padded last) or (*shape[:-1], padded last / 2).
  absmax: float32 (*shape[:-1], blocks) per-block absmax; with `double`, their int8 codes
    after subtracting absmax_offset (the mean), in blocks of DOUBLE_BLOCK over the
    flattened scales, each block's own absmax in absmax_scales (None otherwise).
  Children may be any leaves (tracers, ShapeDtypeStructs, PartitionSpecs), so nothing
  here checks them."""
  codes: Any
  absmax: Any
  absmax_scales: Any
  absmax_offset: Any
  kind: str
  shape: tuple[int, ...]
  dtype_name: str
  block: int
  double: bool

  @property
  def dtype(self):
    return jnp.dtype(self.dtype_name)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return int(np.prod(self.shape))

  @property
  def nbytes(self) -> int:
    """Bytes stored: codes and every scale."""
    return int(sum(np.prod(np.shape(x)) * jnp.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(self)))

  def map_children(self, fn, *, scales=None):
    """The same array with `fn(child)` for codes and absmax (the dimensions that follow
    the kernel's) and `scales(child)` (default fn) for the second-level scales."""
    scales = fn if scales is None else scales
    return dataclasses.replace(
        self, codes=fn(self.codes), absmax=fn(self.absmax),
        absmax_scales=None if self.absmax_scales is None else scales(self.absmax_scales),
        absmax_offset=None if self.absmax_offset is None else scales(self.absmax_offset))


def is_quantized(x) -> bool:
  return isinstance(x, QuantizedArray)


def check_kind(kind: str) -> str:
  if kind not in KINDS:
    raise ValueError(f"quantization kind '{kind}' is unknown; expected one of {list(KINDS)}")
  return kind


def check_block(shape, block: int, kind: str, pad: bool = False, name: str = 'kernel') -> None:
  """A ValueError naming `name`, its shape and the block unless `block` can quantize it:
  a positive (for nf4 even) block that divides the last dimension, or any with `pad`."""
  shape = tuple(int(d) for d in shape)
  if not isinstance(block, (int, np.integer)) or isinstance(block, bool) or block <= 0:
    raise ValueError(f'quantization block must be a positive integer, got {block!r}')
  if kind == 'nf4' and block % 2:
    raise ValueError(f'nf4 packs two 4-bit codes per byte: its block must be even, got {block}')
  if not shape:
    raise ValueError(f'{name} is a scalar; quantization needs at least one dimension')
  if shape[-1] % block and not pad:
    raise ValueError(f'block {block} does not divide the last dimension of {name} of shape '
                     f'{shape}; use a block that divides {shape[-1]}, or pad each row to a '
                     f'multiple of {block} (pad=True)')


def _blocks(x, block: int):
  """x (*lead, n) -> (*lead, n / block, block)."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def _absmax(xb):
  absmax = jnp.max(jnp.abs(xb), axis=-1)
  # An all-zero block: any scale gives zero codes; 1 avoids dividing by zero.
  return absmax, jnp.where(absmax > 0, absmax, 1.0)


def _int8_codes(normalized):
  return jnp.clip(jnp.round(normalized * INT8_MAX), -INT8_MAX, INT8_MAX).astype(jnp.int8)


def _nf4_codes(normalized):
  return jnp.sum(normalized[..., None] > jnp.asarray(_NF4_MIDPOINTS), axis=-1).astype(jnp.uint8)


def _pack_nibbles(codes):
  pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
  return (pairs[..., 0] << 4) | pairs[..., 1]


def _unpack_nibbles(packed):
  pairs = jnp.stack([packed >> 4, packed & 0xF], axis=-1)
  return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _double_quantize(absmax):
  """(int8 codes shaped like absmax, per-DOUBLE_BLOCK scales, mean offset): symmetric
  int8 of the centred scales. bitsandbytes codes them with its 8-bit dynamic map; a
  linear int8 code has a simple bound (half a step, absmax_scale / 254) and is ours."""
  flat = absmax.reshape(-1)
  offset = jnp.mean(flat)
  centred = flat - offset
  n = flat.shape[0]
  padded = jnp.pad(centred, (0, -n % DOUBLE_BLOCK))  # zeros: codes 0 whatever the scale
  scales, safe = _absmax(padded.reshape(-1, DOUBLE_BLOCK))
  codes = _int8_codes(padded.reshape(-1, DOUBLE_BLOCK) / safe[:, None])
  return codes.reshape(-1)[:n].reshape(absmax.shape), scales, offset


def _double_dequantize(codes, scales, offset):
  flat = codes.reshape(-1).astype(jnp.float32)
  n = flat.shape[0]
  padded = jnp.pad(flat, (0, -n % DOUBLE_BLOCK)).reshape(-1, DOUBLE_BLOCK)
  values = padded * (scales[:, None] / INT8_MAX)
  return (values.reshape(-1)[:n] + offset).reshape(codes.shape)


def quantize(x, kind: str, block: int = 64, double: bool = False, *, pad: bool = False,
             name: str = 'kernel') -> QuantizedArray:
  """x quantized in blocks of `block` along its last dimension: 'int8' (symmetric,
  absmax / 127) or 'nf4' (nearest of NF4_LEVELS x absmax). double: the absmax scales
  stored in 8 bits too (QLoRA's double quantization, blocks of 256). A block that does
  not divide the last dimension is a ValueError naming `name`, unless `pad`."""
  check_kind(kind)
  check_block(np.shape(x), block, kind, pad, name)
  dtype = jnp.dtype(x.dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'{name} has dtype {dtype.name}; quantization expects a float array')
  return _quantize(x, kind, block, double)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _quantize(x, kind: str, block: int, double: bool) -> QuantizedArray:
  shape = tuple(x.shape)
  xf = jnp.asarray(x, jnp.float32)
  xf = jnp.pad(xf, [(0, 0)] * (xf.ndim - 1) + [(0, -shape[-1] % block)])
  xb = _blocks(xf, block)
  absmax, safe = _absmax(xb)
  normalized = xb / safe[..., None]
  if kind == 'int8':
    codes = _int8_codes(normalized).reshape(xf.shape)
  else:
    codes = _pack_nibbles(_nf4_codes(normalized).reshape(xf.shape))
  scales = offset = None
  if double:
    absmax, scales, offset = _double_quantize(absmax)
  return QuantizedArray(codes, absmax, scales, offset, kind=kind, shape=shape,
                        dtype_name=jnp.dtype(x.dtype).name, block=block, double=double)


def block_absmax(q: QuantizedArray):
  """The float32 per-block absmax scales (double-quantized ones decoded)."""
  if q.double:
    return _double_dequantize(q.absmax, q.absmax_scales, q.absmax_offset)
  return jnp.asarray(q.absmax, jnp.float32)


def dequantize(q: QuantizedArray, dtype=None):
  """The float kernel (shape q.shape, dtype q.dtype unless `dtype`): code value x absmax
  of its block, computed in float32."""
  if q.kind == 'int8':
    values = q.codes.astype(jnp.float32) / INT8_MAX
  else:
    values = jnp.asarray(NF4_LEVELS)[_unpack_nibbles(q.codes).astype(jnp.int32)]
  out = (_blocks(values, q.block) * block_absmax(q)[..., None]).reshape(values.shape)
  out = out[..., :q.shape[-1]]
  return out.astype(q.dtype if dtype is None else dtype)


def has_quantized(tree) -> bool:
  return any(is_quantized(x) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def dequantize_tree(tree):
  """`tree` with every QuantizedArray replaced by its float kernel."""
  return jax.tree.map(lambda x: dequantize(x) if is_quantized(x) else x, tree,
                      is_leaf=is_quantized)


def max_error(kind: str) -> float:
  """The largest |x - dequantize(quantize(x))| / absmax of x's block (without double
  quantization; float rounding aside): half the widest gap between levels."""
  if check_kind(kind) == 'int8':
    return 0.5 / INT8_MAX
  return float(np.max(np.diff(NF4_LEVELS.astype(np.float64)))) / 2
