"""Pallas kernels (GPU via Triton; `interpret=True` runs the same kernels on any backend)."""
from grok.kernels.moe import block_matmul, gated_block_matmul, kernel_applies, multi_block_matmul

__all__ = ["block_matmul", "gated_block_matmul", "kernel_applies", "multi_block_matmul"]
