"""Plain LoRA (Hu et al. 2021), the baseline, behind the same interface as GLoRA.

W' = W0 + (alpha / r) * B A with A: (r, in) Kaiming-uniform (as PEFT), B: (out, r) zero.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from glora_jax.adapters import base


@dataclasses.dataclass(frozen=True)
class LoRA(base.AdapterFamily):
  """LoRA with rank `rank` and scale alpha / rank. No choices: supports = ().

  mode='activation' (the default, as PEFT) computes y + x A^T B^T beside the frozen
  matmul: training needs no full-size kernel gradient (measured 0.81x the weight
  mode's MiniLM train step on CPU, and 18.0 against 21.6 GiB for LLaMA-7B's).
  mode='weight' builds W0 + BA inside the layer on every call: cheaper only for
  unmerged inference on many tokens (more than in*out/(in+out) per call, 192 for
  MiniLM's 384x384 layers), where x A^T B^T costs more FLOPs than adding BA to W0;
  merge (peft.merge) is the zero-cost way to serve either. Both give the same
  outputs (tested)."""

  rank: int = 8
  alpha: float = 16.0
  name: str = 'lora'
  supports: tuple[str, ...] = ()
  mode: str = 'activation'
  mergeable: bool = True

  def __post_init__(self):
    if int(self.rank) <= 0:
      raise ValueError(f'LoRA rank must be a positive integer, got {self.rank}')
    if self.mode not in ('weight', 'activation'):
      raise ValueError(f"LoRA mode must be 'weight' or 'activation', got '{self.mode}'")

  @property
  def scale(self) -> float:
    return float(self.alpha) / float(self.rank)

  def options(self, support):
    raise ValueError(f"LoRA has no searchable supports (asked for '{support}')")

  def check(self, path, kernel_shape):
    super().check(path, kernel_shape)
    if self.rank > min(kernel_shape):
      raise ValueError(
          f"lora: rank {self.rank} is above min(in, out) = {min(kernel_shape)} for "
          f"'{path}' (kernel {kernel_shape[0]}x{kernel_shape[1]})")

  def fixed_cost(self, kernel_shape):
    d_in, d_out = kernel_shape
    return self.rank * (d_in + d_out)

  def param_axes(self, kernel_shape):
    return {'A': (None, 'in'), 'B': ('out', None)}

  def init(self, key, kernel_shape, dtype=jnp.float32):
    d_in, d_out = kernel_shape
    bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=sqrt(5)) as in PEFT
    return {'A': jax.random.uniform(key, (self.rank, d_in), dtype, -bound, bound),
            'B': jnp.zeros((d_out, self.rank), dtype)}

  def delta(self, params, choice, kernel, bias):
    del choice, bias
    a = params['A'].astype(jnp.float32)
    b = params['B'].astype(jnp.float32)
    return self.scale * (a.T @ b.T), None

  def activation(self, params, choice, x, y, kernel, bias):
    del choice, kernel, bias
    h = jnp.einsum('...i,ri->...r', x, params['A'].astype(x.dtype))
    return y + self.scale * jnp.einsum('...r,or->...o', h, params['B'].astype(x.dtype)).astype(y.dtype)


def family(rank: int = 8, alpha: float = 16.0, mode: str = 'activation') -> LoRA:
  """The LoRA family of rank `rank`, scale alpha / rank, in `mode`."""
  return LoRA(rank=rank, alpha=alpha, mode=mode)
