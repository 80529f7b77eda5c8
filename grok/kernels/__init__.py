"""Pallas kernels (GPU via Triton; `interpret=True` runs the same kernels on any backend) and the
execution plan that decides, once per model, which of them run."""
from grok.kernels.block_matmul import (block_matmul, gated_block_matmul, kernel_applies,
                                       multi_block_matmul)

__all__ = ["block_matmul", "gated_block_matmul", "kernel_applies", "multi_block_matmul"]
