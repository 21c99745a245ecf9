"""The small interface every adapter family implements.

A family is a frozen (hashable) dataclass: it can sit in static jit arguments and in
the static part of a pytree. All array work is pure functions of (params, choice).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Array = Any
LayerParams = Mapping[str, Array]


class AdapterFamily:
  """Base class. Subclasses are `@dataclasses.dataclass(frozen=True)`.

  Attributes a family defines:
    name: short family name ('glora', 'lora', 'surm').
    supports: names of the searchable supports, e.g. ('A', 'B', 'C', 'D', 'E');
      () for a family without choices (LoRA, SURM).
    mode: 'weight' (the adapter changes kernel and bias, the plain model runs on
      them) or 'activation' (the adapter acts on activations at the interception
      point; see `peft.AdapterHooks`).
    mergeable: whether `delta` exists (a linear update that folds into weights).
  """

  name: str = 'base'
  supports: tuple[str, ...] = ()
  mode: str = 'weight'
  mergeable: bool = True

  # --- static description -------------------------------------------------
  def options(self, support: str) -> tuple[str, ...]:
    """Names of the options of one support."""
    raise NotImplementedError

  def check(self, path: str, kernel_shape: tuple[int, ...]) -> None:
    """Raises ValueError naming `path` when this family cannot adapt the kernel."""
    if len(kernel_shape) != 2:
      raise ValueError(
          f"{self.name}: '{path}/kernel' has shape {tuple(kernel_shape)}; "
          'expected a 2-D (in, out) Dense kernel')

  def option_costs(self, kernel_shape: tuple[int, int]) -> list[list[int]]:
    """Trainable parameter count of each option of each support (head excluded)."""
    return [[0] * len(self.options(s)) for s in self.supports]

  def fixed_cost(self, kernel_shape: tuple[int, int]) -> int:
    """Parameters that are always active, whatever the choice."""
    return 0

  def param_axes(self, kernel_shape: tuple[int, int]) -> dict[str, tuple[str | None, ...]]:
    """For each parameter leaf ('/'-joined name inside the layer), which kernel
    dimension each of its dimensions runs along: 'in', 'out' or None. Sharding
    gives such a dimension the kernel's axis; unnamed leaves are replicated."""
    return {}

  def param_shapes(self, kernel_shape: tuple[int, int]) -> dict[str, Any]:
    """Shapes and dtypes of `init`'s parameters (nothing allocated)."""
    return jax.eval_shape(lambda k: self.init(k, kernel_shape), jax.random.key(0))

  # --- arrays ---------------------------------------------------------------
  def init(self, key: Array, kernel_shape: tuple[int, int],
           dtype=jnp.float32) -> dict[str, Array]:
    raise NotImplementedError

  def delta(self, params: LayerParams, choice: Array, kernel: Array,
            bias: Array | None) -> tuple[Array, Array | None]:
    """Dense (d_kernel, d_bias) in float32 such that the adapted layer is the plain
    Dense layer with kernel + d_kernel and bias + d_bias. `choice` is an int32
    vector, one entry per support (traced: no recompilation when it changes)."""
    raise NotImplementedError

  def activation(self, params: LayerParams, choice: Array, x: Array, y: Array,
                 kernel: Array, bias: Array | None) -> Array:
    """Activation mode: the adapted output given the input `x` and the plain
    layer's output `y`. The default folds `delta` on the fly."""
    dk, db = self.delta(params, choice, kernel, bias)
    out = y + jnp.einsum('...i,io->...o', x.astype(jnp.float32), dk).astype(y.dtype)
    if db is not None:
      out = out + db.astype(y.dtype)
    return out
