"""Which MoE kernel "auto" takes on a GPU: a small table of measured results, and the rules that
apply it per (card, JAX version, shape class).

Every entry is one measurement: the card, the JAX version, the shape class ("decode": a step of
at most DECODE_ASSIGNMENTS (token, expert) rows; "prefill": more; " int4" appended for int4
weights), the date, and the step time in milliseconds of each evaluation run side by side on the
8-layer Grok-1-width slice (`bash benchmarks/gpu.sh`; BENCHMARKS.md has the full tables).
`choose` takes, in order:
1. the fastest evaluation of an entry for this card, JAX minor version and shape class that
   measured tokamax beside our kernels: the numbers decide;
2. int4 weights: "grouped" (XLA: two int8 matmuls over the chosen experts' packed nibbles).
   tokamax takes int4 as jax's int4 type, so the chosen experts are converted each step: read
   packed, written at a byte a value where jnp.int4 is not packed, read again by the kernel,
   more bytes than the int8 step reads: not the default until a measurement says so; our
   kernels take int8 only;
3. else, with JAX >= 0.11 (whose Pallas Triton lowering is deprecated) and tokamax installed,
   "tokamax" (Mosaic GPU): no DeprecationWarning from the default path while no measurement
   says Triton is worth keeping (tokamax on a GPU: pending a GPU, see PENDING);
4. else "pallas" (our Triton kernels), measured 2.4-2.9x faster than XLA's grouped path below,
   or "grouped" where this JAX no longer has the Triton backend.
"""
from __future__ import annotations

import dataclasses
import importlib.util

# (token, expert) rows of a step up to which it counts as decoding (batch 32, top-2: 64 rows).
DECODE_ASSIGNMENTS = 256


@dataclasses.dataclass(frozen=True)
class Measured:
    """One run's step times (ms) per evaluation for one (card, JAX, shape class)."""

    card: str        # a substring of jax's device_kind, e.g. "H100"
    jax: str         # the JAX version measured; entries apply to the same minor version
    shape: str       # "decode" or "prefill"
    date: str
    ms: tuple[tuple[str, float], ...]
    note: str = ""

    @property
    def winner(self) -> str:
        """The fastest evaluation of this run."""
        return min(self.ms, key=lambda kv: kv[1])[0]


MEASURED: tuple[Measured, ...] = (
    # BENCHMARKS.md, "GPU: one H100": decode batch 1 and prefill 512, int8, our kernels vs XLA.
    Measured("H100", "0.11.2", "decode", "2026-11-26", (("pallas", 7.04), ("grouped", 20.1)),
             "batch 1; batch 32: pallas 20.7, grouped 91.1; tokamax not measured"),
    Measured("H100", "0.11.2", "prefill", "2026-11-26", (("pallas", 49.4), ("grouped", 117.3)),
             "512 tokens; tokamax not measured"),
)
# What the next GPU run (benchmarks/gpu.sh) measures, for int8 and int4: until then rule 2 holds.
PENDING = ("tokamax vs pallas vs grouped, decode batch 1/8/32 and prefill 512, int8 and int4, "
           "on an H100/H200: pending a GPU")


INT4_SUFFIX = " int4"
SHAPE_CLASSES = ("decode", "prefill", "decode" + INT4_SUFFIX, "prefill" + INT4_SUFFIX)


def shape_class(assignments: int, bits: int = 8) -> str:
    """"decode" for a step of few (token, expert) rows, else "prefill"; " int4" appended for
    int4 weights."""
    shape = "decode" if assignments <= DECODE_ASSIGNMENTS else "prefill"
    return shape + (INT4_SUFFIX if bits == 4 else "")


def _minor(version: str) -> tuple[int, int]:
    parts = (version.split(".") + ["0", "0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def tokamax_installed() -> bool:
    """Whether the tokamax package can be imported here (without importing it: it is slow)."""
    return importlib.util.find_spec("tokamax") is not None


def has_triton() -> bool:
    """Whether this JAX still ships the Pallas Triton backend our kernels lower through."""
    try:
        return importlib.util.find_spec("jax.experimental.pallas.triton") is not None
    except ImportError:
        return False


def choose(card: str, jax_version: str, shape: str, tokamax: bool,
           triton: bool = True) -> str:
    """The MoE kernel for "auto" on a GPU `card` (jax's device_kind) under `jax_version`, for
    `shape` (one of SHAPE_CLASSES), with tokamax installed or not (the module docstring's
    rules)."""
    for entry in MEASURED:
        if (entry.card in card and _minor(entry.jax) == _minor(jax_version)
                and entry.shape == shape and "tokamax" in dict(entry.ms)):
            winner = entry.winner
            if (winner != "tokamax" or tokamax) and (winner != "pallas" or triton):
                return winner
    if shape.endswith(INT4_SUFFIX):
        return "grouped"
    if tokamax and _minor(jax_version) >= (0, 11):
        return "tokamax"
    return "pallas" if triton else "grouped"
