"""Which MoE kernel "auto" takes: the measured results (measured.json beside this file) and the
one function that decides from them, `decide`.

Every entry is one measurement: the card, the JAX (and tokamax) version, the shape class
("decode": a step of at most DECODE_ASSIGNMENTS (token, expert) rows; "prefill": more; " int4"
appended for int4 weights), the date, and the step time in milliseconds of each evaluation run
side by side on the 8-layer Grok-1-width slice (`bash benchmarks/gpu.sh` writes such entries;
`python benchmarks/measured_entries.py --merge` adds them here). `decide` takes, per shape class:
- on the CPU, XLA's grouped path (the Pallas kernels only run interpreted there);
- on an NVIDIA GPU, the fastest evaluation this process can run of the newest entry for this
  card (an entry of the same JAX minor version first), else of the newest on any NVIDIA card:
  our Triton kernels ("pallas") only where this JAX still has the Pallas Triton backend,
  tokamax only where it is installed; nothing measured: XLA's grouped path;
- on a TPU or another GPU, XLA's grouped path until a measurement says otherwise.
A path no entry shows winning is never the default: `moe_impl="tokamax"` opts in to it.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any

# (token, expert) rows of a step up to which it counts as decoding (batch 32, top-2: 64 rows).
DECODE_ASSIGNMENTS = 256
INT4_SUFFIX = " int4"
SHAPE_CLASSES = ("decode", "prefill", "decode" + INT4_SUFFIX, "prefill" + INT4_SUFFIX)
# The evaluations "auto" may take ("dense" and "gather" are references, never defaults).
CANDIDATES = ("pallas", "tokamax", "grouped")
TABLE = Path(__file__).with_name("measured.json")


@dataclasses.dataclass(frozen=True)
class Measured:
    """One run's step times (ms) per evaluation for one (card, JAX, shape class)."""

    card: str        # the card's model, e.g. "H100" (a substring of jax's device_kind)
    jax: str         # the JAX version measured
    shape: str       # one of SHAPE_CLASSES
    date: str
    ms: tuple[tuple[str, float], ...]
    note: str = ""
    device: str = ""         # jax's full device_kind
    tokamax: str | None = None   # tokamax's version in that run (None: not installed)

    def fastest(self, usable: Any = lambda impl: True) -> tuple[str, float] | None:
        """The fastest of this run's candidate evaluations that `usable(impl)` allows."""
        times = [(impl, ms) for impl, ms in self.ms if impl in CANDIDATES and usable(impl)]
        return min(times, key=lambda kv: kv[1]) if times else None


@dataclasses.dataclass(frozen=True)
class Toolchain:
    """What "auto" decides for: the backend, the card, and what this Python has."""

    backend: str              # "cpu", "gpu" or "tpu"
    card: str = ""            # jax's device_kind of the first device
    jax: str = "0.0"
    tokamax: bool = False     # tokamax (and qwix) import here
    triton: bool = False      # this JAX still has the Pallas Triton backend

    def can_run(self, impl: str) -> bool:
        """Whether this process can run evaluation `impl` at all."""
        return {"tokamax": self.tokamax, "pallas": self.triton}.get(impl, True)


@dataclasses.dataclass(frozen=True)
class Choice:
    """"auto"'s kernel for one shape class, and why (logged at load)."""

    shape: str
    kernel: str
    reason: str


def card_name(device_kind: str) -> str:
    """The card's model in jax's device_kind: "NVIDIA H100 80GB HBM3" -> "H100",
    "NVIDIA A100-SXM4-80GB" -> "A100"; else the device_kind as it is."""
    words = device_kind.replace("NVIDIA", "").split()
    model = next((w for w in words if any(c.isdigit() for c in w)), device_kind.strip())
    return model.split("-")[0]


def is_nvidia(device_kind: str) -> bool:
    return "NVIDIA" in device_kind.upper()


def load_table(path: Path = TABLE) -> tuple[Measured, ...]:
    """The entries of a measured table file (measured.json's form)."""
    data = json.loads(Path(path).read_text())
    return tuple(entry_from_json(e) for e in data["entries"])


def entry_from_json(e: dict[str, Any]) -> Measured:
    if e["shape"] not in SHAPE_CLASSES or not e["ms"]:
        raise ValueError(f"measured entry {e!r}: unknown shape class or no times")
    return Measured(card=e["card"], jax=e["jax"], shape=e["shape"], date=e["date"],
                    ms=tuple((k, float(v)) for k, v in e["ms"].items()), note=e.get("note", ""),
                    device=e.get("device", ""), tokamax=e.get("tokamax"))


def entry_to_json(m: Measured) -> dict[str, Any]:
    return dict(card=m.card, device=m.device, jax=m.jax, tokamax=m.tokamax, shape=m.shape,
                date=m.date, ms=dict(m.ms), note=m.note)


MEASURED: tuple[Measured, ...] = load_table()


def shape_class(assignments: int, bits: int = 8) -> str:
    """"decode" for a step of few (token, expert) rows, else "prefill"; " int4" appended for
    int4 weights."""
    shape = "decode" if assignments <= DECODE_ASSIGNMENTS else "prefill"
    return shape + (INT4_SUFFIX if bits == 4 else "")


def minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version string: "0.12.0.1" -> (0, 12)."""
    parts = (version.split(".") + ["0", "0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def tokamax_installed() -> bool:
    """Whether the tokamax package can be found here (without importing it: it is slow)."""
    return importlib.util.find_spec("tokamax") is not None


def has_triton() -> bool:
    """Whether this JAX still ships the Pallas Triton backend our kernels lower through."""
    try:
        return importlib.util.find_spec("jax.experimental.pallas.triton") is not None
    except ImportError:
        return False


def decide(toolchain: Toolchain, table: tuple[Measured, ...] | None = None
           ) -> tuple[Choice, ...]:
    """"auto"'s kernel for each of SHAPE_CLASSES on `toolchain`, with the reason (the module
    docstring's rules; `table` defaults to measured.json's entries)."""
    table = MEASURED if table is None else table
    return tuple(_decide(shape, toolchain, table) for shape in SHAPE_CLASSES)


def _decide(shape: str, tc: Toolchain, table: tuple[Measured, ...]) -> Choice:
    if tc.backend == "cpu":
        return Choice(shape, "grouped", "CPU: XLA's grouped path (Pallas kernels run only "
                                        "interpreted on a CPU)")
    where = f"{tc.card or 'a ' + tc.backend.upper()} (jax {tc.jax})"
    # (a GPU of unknown kind, as when lowering for CUDA on a CPU, counts as an NVIDIA one)
    if tc.backend != "gpu" or (tc.card and not is_nvidia(tc.card)):
        return Choice(shape, "grouped", f"{where}: nothing measured on this kind of device; "
                                        "XLA's grouped path until a run of benchmarks/gpu.sh "
                                        "measures the kernels (moe_impl='tokamax' opts in)")
    runs = [e for e in table if e.shape == shape and is_nvidia(e.device or "NVIDIA")]
    same_card = [e for e in runs if tc.card and e.card and e.card in tc.card]
    pool = same_card or runs
    if not pool:
        return Choice(shape, "grouped", f"{where}: no {shape} measurement on an NVIDIA GPU; "
                                        "XLA's grouped path (moe_impl='tokamax' opts in)")
    entry = max(pool, key=lambda e: (minor(e.jax) == minor(tc.jax), e.date, minor(e.jax)))
    best = entry.fastest(tc.can_run)
    if best is None:
        return Choice(shape, "grouped", f"{where}: none of {dict(entry.ms)} runs here; XLA")
    kernel, ms = best
    others = ", ".join(f"{k} {v:g}" for k, v in entry.ms if k != kernel)
    reason = (f"{where}: {kernel}, {ms:g} ms against {others or 'nothing else'} on "
              f"{entry.card}, jax {entry.jax}, {entry.date}")
    overall = entry.fastest()
    if overall and overall[0] != kernel:
        missing = "Pallas Triton backend" if overall[0] == "pallas" else "tokamax package"
        reason += f" ({overall[0]} was faster, but this Python has no {missing})"
    if not same_card:
        reason += f"; measured on {entry.card}, not on this card"
    if "tokamax" not in dict(entry.ms):
        reason += "; tokamax not measured (moe_impl='tokamax' opts in)"
    return Choice(shape, kernel, reason)
