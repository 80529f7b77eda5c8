"""grok: JAX inference for Grok-1 and Grok-shaped Mixture-of-Experts checkpoints."""
from grok.api import Grok, from_flat, load
from grok.config import GROK1, ConfigError, GrokConfig
from grok.engine import Engine, Request, Result
from grok.quant import QuantizedWeight8bit, dequantize, quantize
from grok.sampling import SamplingParams

__all__ = ["GROK1", "ConfigError", "Engine", "Grok", "GrokConfig", "QuantizedWeight8bit",
           "Request", "Result", "SamplingParams", "dequantize", "from_flat", "load", "quantize"]
