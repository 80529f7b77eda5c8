"""The small haiku building blocks: RMSNorm and the int8 linear layer."""
from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from grok.quant import BF16, qlinear


class RMSNorm(hk.Module):
    """x / sqrt(mean(x^2) + eps) * scale, in float32, returned as bfloat16."""

    def __init__(self, eps: float, name: str):
        super().__init__(name=name)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = hk.get_parameter("scale", [x.shape[-1]], jnp.float32, init=jnp.ones)
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return (x * scale.astype(jnp.float32)).astype(BF16)


class Linear8(hk.Module):
    """A bias-free linear layer over a QuantizedWeight8bit parameter `w` [In, Out] (a LayerSlice
    in the scanned model; `kernel` as in grok.quant.qlinear)."""

    def __init__(self, out_size: int, name: str, kernel: str = "off"):
        super().__init__(name=name)
        self.out_size = out_size
        self.kernel = kernel

    def weight(self, in_size: int) -> Any:
        """The parameter `w` [In, Out] (for several weights multiplied together: qlinears)."""
        return hk.get_parameter("w", [in_size, self.out_size], jnp.int8, init=no_init)

    def __call__(self, x: jax.Array, out_dtype: Any = BF16) -> jax.Array:
        return qlinear(x, self.weight(x.shape[-1]), out_dtype, self.kernel)


def no_init(shape: Any, dtype: Any) -> Any:
    raise ValueError("grok parameters come from a checkpoint or grok.leaves.random_flat; "
                     "the haiku modules do not initialise them")
