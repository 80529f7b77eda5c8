"""Pallas kernels (GPU via Triton; `interpret=True` runs the same kernels on any backend)."""
from grok.kernels.moe import block_matmul, kernel_applies

__all__ = ["block_matmul", "kernel_applies"]
