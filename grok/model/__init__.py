"""The Grok-1 transformer: haiku layers and the pure `forward` over a KV cache.

Knows no files, meshes or serving: weights arrive as a params tree (grok.leaves), and how each
step runs (which MoE path, kernels or XLA) arrives as a `grok.kernels.plan.ExecutionPlan`.
"""
from grok.model.cache import KVCache, init_cache
from grok.model.forward import forward

__all__ = ["KVCache", "forward", "init_cache"]
