"""Turn `grok.tools.bench --json` results (benchmarks/gpu.sh's grok1_slice*.json) into entries of
"auto"'s measured table (grok/kernels/measured.json), and merge them into it.

    python benchmarks/measured_entries.py OUT/grok1_slice.json OUT/grok1_slice_int4.json \
        --out OUT/measured.json                       # gpu.sh does this on the GPU
    python benchmarks/measured_entries.py --merge OUT/measured.json   # here, after the run

One entry per (card, JAX version, shape class): "decode" from the decode steps at batch 1 (the
other batches' times go in its note), "prefill" from the prefill step, " int4" appended for an
int4 run; the step time of every evaluation the run timed except "auto" (which is one of them).
A merged entry replaces the table's entry for the same card, JAX version and shape class.
Results from a CPU are skipped unless --include-cpu (nothing is measured there for "auto").
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Any

from grok.kernels import measured


def entries(result: dict[str, Any], date: str) -> list[measured.Measured]:
    """The table entries of one bench JSON result."""
    machine = result["machine"]
    bits = result.get("config_fields", {}).get("weight_bits", 8)
    suffix = measured.INT4_SUFFIX if bits == 4 else ""
    # "auto" rows count as the evaluation they ran, where no row times that one by name
    named = {s["moe_impl"] for s in result.get("steps", [])}
    steps = [s if s["moe_impl"] != "auto" else {**s, "moe_impl": s["impl"]}
             for s in result.get("steps", [])
             if s["moe_impl"] != "auto" or (s["impl"] in measured.CANDIDATES
                                            and s["impl"] not in named)]
    out = []
    for shape, picked in (("decode", lambda s: s["phase"] == "decode" and s["batch"] == 1),
                          ("prefill", lambda s: s["phase"].startswith("prefill"))):
        ms = {s["moe_impl"]: round(s["ms"], 3) for s in steps if picked(s)}
        if not ms:
            continue
        phase = next(s["phase"] for s in steps if picked(s))
        others = sorted({s["batch"] for s in steps if s["phase"] == "decode"} - {1})
        note = ("batch 1" + "".join(
            f"; batch {b}: " + ", ".join(f"{s['moe_impl']} {s['ms']:.2f}" for s in steps
                                         if s["phase"] == "decode" and s["batch"] == b)
            for b in others)) if shape == "decode" else phase
        out.append(measured.Measured(
            card=measured.card_name(machine["device"]), jax=machine["jax"],
            shape=shape + suffix, date=date, ms=tuple(sorted(ms.items())),
            note=f"{note}; {result['config']}", device=machine["device"],
            tokamax=machine.get("tokamax") if isinstance(machine.get("tokamax"), str) else None))
    return out


def combine(found: list[measured.Measured]) -> list[measured.Measured]:
    """Entries of the same card, JAX and shape class (one run's several bench processes) as
    one, their times united."""
    out: dict[tuple[str, str, str], measured.Measured] = {}
    for e in found:
        key = (e.card, e.jax, e.shape)
        if key in out:
            old = out[key]
            ms = {**dict(e.ms), **dict(old.ms)}
            e = dataclasses.replace(old, ms=tuple(sorted(ms.items())),
                                    note=f"{old.note} | {e.note}")
        out[key] = e
    return list(out.values())


def merge(table: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`table` with each of `new` replacing the entry of the same card, JAX and shape class."""
    key = lambda e: (e["card"], e["jax"], e["shape"])
    replaced = {key(e) for e in new}
    return [e for e in table if key(e) not in replaced] + new


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="*", help="grok.tools.bench --json files")
    ap.add_argument("--out", help="write the entries here (default: print them)")
    ap.add_argument("--merge", metavar="FILE", help="merge FILE's entries into the table")
    ap.add_argument("--table", default=str(measured.TABLE), help="the table (for --merge)")
    ap.add_argument("--date", default=datetime.date.today().isoformat())
    ap.add_argument("--include-cpu", action="store_true")
    args = ap.parse_args(argv)
    if args.merge:
        new = json.loads(Path(args.merge).read_text())["entries"]
        for e in new:   # refuse a malformed entry before writing anything
            measured.entry_from_json(e)
        path = Path(args.table)
        table = json.loads(path.read_text())
        table["entries"] = merge(table["entries"], new)
        path.write_text(json.dumps(table, indent=1) + "\n")
        print(f"{path}: {len(new)} entries merged, {len(table['entries'])} in all")
        return 0
    found = []
    for name in args.results:
        try:
            result = json.loads(Path(name).read_text())
        except (OSError, ValueError) as err:
            print(f"{name}: skipped ({err})", file=sys.stderr)
            continue
        if result["machine"]["backend"] == "cpu" and not args.include_cpu:
            print(f"{name}: a CPU run, skipped (nothing is measured there)", file=sys.stderr)
            continue
        found += entries(result, args.date)
    found = combine(found)
    text = json.dumps({"entries": [measured.entry_to_json(e) for e in found]}, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    for e in found:
        print(f"{e.card} jax {e.jax} {e.shape}: {dict(e.ms)} -> "
              f"{(e.fastest() or ('-',))[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
