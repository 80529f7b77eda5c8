"""grok: JAX inference for Grok-1, Grok-2 and Grok-shaped Mixture-of-Experts checkpoints.

The public names below are imported on first use (PEP 562), so `import grok` and the command
lines (`run.py`, `python -m grok.checkpoint`) start without importing jax until they need it,
and `python -m grok.<module>` finds its module not yet imported.
"""
from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "Grok": "grok.api", "from_flat": "grok.api", "load": "grok.api",
    "GROK1": "grok.config", "ConfigError": "grok.config", "GrokConfig": "grok.config",
    "Engine": "grok.serving.engine", "Request": "grok.serving.request",
    "Result": "grok.serving.request", "Event": "grok.serving.request",
    "Detokenizer": "grok.serving.detokenizer",
    "GrokError": "grok.errors", "RequestError": "grok.errors",
    "QuantizedWeight8bit": "grok.quant", "dequantize": "grok.quant", "quantize": "grok.quant",
    "SamplingParams": "grok.serving.sampling",
    "Routing": "grok.model.routing",
    "convert": "grok.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'grok' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value     # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
