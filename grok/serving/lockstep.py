"""One engine over several hosts: process 0 schedules (and serves); every device call it makes
is first sent to the other processes, which run the same call on their part of the model and
KV cache, so that all of them enter the same programs in the same order.

The calls travel through JAX's own multi-host collectives
(`jax.experimental.multihost_utils.broadcast_one_to_all`): first a fixed-size header naming the
method and the shapes of its arguments (JSON), then the arguments' arrays. There is no other
transport. A call that fails on process 0 fails on the others alike (same inputs, same
programs); the others log it and wait for the next one.
"""
from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from grok.serving.batching import Draw
from grok.serving.runner import ModelRunner
from grok.serving.sampling import Penalties
from grok.serving.steps import DeviceSteps

log = logging.getLogger(__name__)

HEADER_BYTES = 4096    # a call's description: its largest (a prefill with copies) takes ~1 KB
STOP = "stop"
_TUPLES = {"Draw": Draw, "Penalties": Penalties}


def _describe(value: Any, arrays: list[np.ndarray]) -> Any:
    """A JSON description of an argument; its arrays appended to `arrays`."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else {"bool": bool(value)}
    if isinstance(value, (int, np.integer)):
        return {"int": int(value)}
    if isinstance(value, np.ndarray):
        arrays.append(value)
        return {"array": [value.dtype.str, list(value.shape)]}
    if type(value).__name__ in _TUPLES and isinstance(value, tuple):
        return {"tuple": type(value).__name__, "fields": [_describe(v, arrays) for v in value]}
    raise TypeError(f"a replayed call cannot carry a {type(value).__name__}")


def _build(spec: Any, arrays: list[np.ndarray]) -> Any:
    """The argument `spec` describes, taking its arrays from the front of `arrays`."""
    if spec is None:
        return None
    if "bool" in spec:
        return spec["bool"]
    if "int" in spec:
        return spec["int"]
    if "array" in spec:
        return arrays.pop(0)
    return _TUPLES[spec["tuple"]](*(_build(f, arrays) for f in spec["fields"]))


def _empty(spec: Any) -> list[np.ndarray]:
    """Zero arrays of the shapes `spec` describes (what the receiving processes contribute)."""
    if spec is None or "bool" in spec or "int" in spec:
        return []
    if "array" in spec:
        dtype, shape = spec["array"]
        return [np.zeros(shape, np.dtype(dtype))]
    return [a for f in spec["fields"] for a in _empty(f)]


def _broadcast(tree: Any) -> Any:
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(tree)


def send(name: str, args: tuple) -> None:
    """Process 0: announce a call `name(*args)` to the others."""
    arrays: list[np.ndarray] = []
    text = json.dumps({"name": name, "args": [_describe(a, arrays) for a in args]}).encode()
    if len(text) > HEADER_BYTES - 4:
        raise ValueError(f"a replayed call's description takes {len(text)} bytes, more than "
                         f"{HEADER_BYTES - 4}")
    header = np.zeros(HEADER_BYTES, np.uint8)
    header[:4] = np.frombuffer(len(text).to_bytes(4, "little"), np.uint8)
    header[4:4 + len(text)] = np.frombuffer(text, np.uint8)
    _broadcast(header)
    if arrays:
        _broadcast(arrays)


def receive() -> tuple[str, tuple]:
    """The other processes: the next call process 0 announced, as (name, args)."""
    header = np.asarray(_broadcast(np.zeros(HEADER_BYTES, np.uint8)))
    size = int.from_bytes(header[:4].tobytes(), "little")
    call = json.loads(header[4:4 + size].tobytes())
    specs = call["args"]
    empty = [a for spec in specs for a in _empty(spec)]
    arrays = [np.asarray(a) for a in _broadcast(empty)] if empty else []
    return call["name"], tuple(_build(spec, arrays) for spec in specs)


class Leader(DeviceSteps):
    """Process 0's device side: each call (`DeviceSteps.REPLAYED`) is announced to the other
    processes, then run. `close()` tells them to stop following."""

    def __init__(self, runner: ModelRunner):
        super().__init__(runner)
        self.closed = False

    def __getattribute__(self, name: str) -> Any:
        method = super().__getattribute__(name)
        if name not in DeviceSteps.REPLAYED:
            return method

        def announced(*args: Any) -> Any:
            if self.closed:
                raise RuntimeError("the other processes were told to stop: no more device calls")
            send(name, args)
            return method(*args)
        return announced

    def close(self) -> None:
        """Release the other processes (`follow` returns); no device call may follow."""
        if not self.closed:
            self.closed = True
            send(STOP, ())


def follow(runner: ModelRunner) -> int:
    """The other processes: run each call process 0 announces, on this process's part of the
    model and cache, until it says stop. Returns the number of calls run."""
    steps, calls = DeviceSteps(runner), 0
    while True:
        name, args = receive()
        if name == STOP:
            return calls
        if name not in DeviceSteps.REPLAYED:
            raise RuntimeError(f"process 0 announced an unknown call {name!r}")
        calls += 1
        try:
            getattr(steps, name)(*args)
        except Exception:       # process 0 met the same failure and reports it
            log.exception("replayed call %s failed", name)
