"""The small haiku building blocks: RMSNorm and the int8 linear layer."""
from __future__ import annotations

from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp

from grok.kernels.plan import ExecutionPlan
from grok.quant import BF16, linears


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


class Linear(hk.Module):
    """A bias-free linear layer over a quantised (or float) parameter `w` [In, Out]; a LayerSlice
    of the layer stack in the scanned model. How it runs is the plan's (grok.quant.linears)."""

    def __init__(self, out_size: int, name: str, plan: ExecutionPlan):
        super().__init__(name=name)
        self.out_size = out_size
        self.plan = plan

    def weight(self, in_size: int) -> Any:
        """The parameter `w` [In, Out] (for several weights multiplied together: quant.linears)."""
        return hk.get_parameter("w", [in_size, self.out_size], jnp.int8, init=no_init)

    def __call__(self, x: jax.Array, out_dtype: Any = BF16) -> jax.Array:
        return linears(x, [self.weight(x.shape[-1])], self.plan, out_dtype)[0]


def no_init(shape: Any, dtype: Any) -> Any:
    raise ValueError("grok parameters come from a checkpoint or grok.leaves.random_flat; "
                     "the haiku modules do not initialise them")
