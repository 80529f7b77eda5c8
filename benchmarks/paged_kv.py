"""The paged KV cache and its prefix cache against the contiguous cache they replaced, on the
demo model, in one run (so that the CPU ratios come from one machine state):

    python benchmarks/paged_kv.py [--repeats 3] [--json FILE] [--quick]
                                  [--before-commit 6573587 | --before-tree DIR | --no-before]

1. Shared prefix: `--prefix-requests` requests of (`--prefix-len` shared + `--own-len` own)
   prompt tokens, `--prefix-new` greedy tokens each, against their suffix-only twin (the same
   requests, own tokens only): the wall time of each on a fresh engine, the ratio with the
   prefix cache on and with it off (cold), and whether the two give the same tokens.
2. Concurrency at a fixed cache budget of `--budget-seqs` full-context sequences: the
   contiguous cache runs at most that many at once; the paged engine, with that many tokens of
   pool and `--batch` slots, runs as many short requests (`--short-len` prompt tokens,
   `--short-new` new) as their pages allow. Peak requests decoding at once (the most that drew a
   token in one step) and generated tokens/s.
3. Mixed-length load: `--load-requests` requests, prompts uniform in 16..(context - new),
   `--load-new` new tokens, `--clients` in flight (the next submitted as one finishes), at the
   same budget: tokens/s and time to first token (submit -> the end of the step that drew it)
   p50 / p99. Then the admission stall: a long prompt's time to first token submitted while 4
   short requests decode, against its time alone (goal: within 2x alone plus one step).
4. One decode step, paged against contiguous, at equal batch and attention span (jitted calls,
   block_until_ready, interleaved, median of `--calls`).

"Before" numbers (sections 1-3) come from the engine of `--before-commit` (the contiguous
cache; its files extracted with `git archive` into a temporary directory, or `--before-tree`, a
checkout of it) run as a subprocess of this script; its section 3 stall check uses that
engine's default for a model then (`grow=True`: the cache re-made, once every live request has
finished, when a longer prompt arrives). Every section runs its workload once untimed first,
so that compiles are excluded; timings are medians of `--repeats` runs, each on a fresh engine,
driven by `engine.step()` from this one thread. Prompts are random token ids (a fixed seed).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo"
BEFORE_COMMIT = "6573587"     # the last engine with the contiguous cache

# Each section's goal (the ratio it reports) from the issue.
GOALS = {"prefix": 1.3, "concurrency": 4.0, "stall": 2.0, "decode": 1.10}
STALL_SLOTS = 8   # the stall check's engine: the model's default (grok.load's max_batch)


# --- driving an engine (either tree's) -----------------------------------------------------------

def new_engine(runner: Any, batch: int, kv_tokens: int | None = None, prefix_cache: bool = True,
               grow: bool = False) -> Any:
    """A fresh engine of whichever grok is imported: the paged one with a pool of `kv_tokens`
    (default: batch x context) and the prefix cache on or off, or the contiguous one (batch x
    context, re-made as needed with `grow`)."""
    from grok.serving.engine import Engine
    if "kv_cache_tokens" in inspect.signature(Engine).parameters:
        return Engine(runner, batch_size=batch, kv_cache_tokens=kv_tokens,
                      prefix_cache=prefix_cache)
    return Engine(runner, batch_size=batch, grow=grow)


def drive(engine: Any, requests: list, clients: int | None = None) -> dict[str, Any]:
    """Submit `requests` (all at once, or `clients` at a time: the next one as one ends) and
    step `engine` until it is idle. Returns the wall time, each request's tokens and time to
    first token (submit -> the end of the step that drew it), the step times, the most requests
    that drew a token in one step ("running") and the most slots held after a step."""
    todo = list(enumerate(requests))
    live: dict[int, int] = {}                     # request id -> index in `requests`
    index, submitted, first = {}, {}, {}
    steps, running, held = [], 0, 0

    def top_up() -> None:
        while todo and (clients is None or len(live) < clients):
            i, request = todo.pop(0)
            rid = engine.submit(request)
            live[rid], index[rid], submitted[rid] = i, i, time.perf_counter()

    start = time.perf_counter()
    top_up()
    while not engine.idle:
        before = time.perf_counter()
        events = engine.step()
        end = time.perf_counter()
        steps.append(end - before)
        for rid, _ in events:
            first.setdefault(rid, end)
        running = max(running, len({rid for rid, _ in events}))
        held = max(held, sum(s is not None for s in engine.slots))
        for rid in [r for r in live if engine.results[r].done]:
            del live[rid]
        top_up()
    wall = time.perf_counter() - start
    tokens = [None] * len(requests)
    for rid, i in index.items():
        tokens[i] = list(engine.results[rid].tokens)
    ttft = [first[rid] - submitted[rid] for rid in index if rid in first]
    return {"wall": wall, "tokens": tokens, "generated": sum(len(t) for t in tokens),
            "ttft": ttft, "steps": steps, "running": running, "held": held,
            "cached": sum(getattr(engine.results[rid], "cached_tokens", 0) for rid in index),
            "preemptions": sum(getattr(engine.results[rid], "preemptions", 0) for rid in index)}


def timed(make: Callable[[], Any], requests: list, repeats: int, clients: int | None = None
          ) -> list[dict[str, Any]]:
    """`drive` on a fresh engine from `make()`: once untimed (the compiles), then `repeats`
    times."""
    drive(make(), requests, clients)
    return [drive(make(), requests, clients) for _ in range(repeats)]


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in runs]))


def prompt(rng: np.random.Generator, vocab: int, n: int) -> list[int]:
    """`n` random token ids (none of the special ids below 3: pad, bos, eos)."""
    return rng.integers(3, vocab, n).tolist()


def pct_ms(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q) * 1e3) if xs else float("nan")


# --- 1. shared prefix ----------------------------------------------------------------------------

def shared_prefix(model: Any, args: argparse.Namespace, paged: bool) -> dict[str, Any]:
    """Requests sharing a long prefix against their suffix-only twin: wall time of each on a
    fresh engine (prefix cache on and off), the ratios, and whether the cache changes tokens."""
    from grok import Request
    vocab = model.config.vocab_size
    rng = np.random.default_rng(1)
    prefix = prompt(rng, vocab, args.prefix_len)
    own = [prompt(rng, vocab, args.own_len) for _ in range(args.prefix_requests)]
    shared = [Request(prefix + o, args.prefix_new) for o in own]
    twin = [Request(o, args.prefix_new) for o in own]
    runner, batch = model.runner, args.prefix_batch
    if paged:
        cases = {"suffix only": (twin, True), "shared, prefix cache": (shared, True),
                 "shared, no prefix cache": (shared, False)}
    else:
        cases = {"suffix only": (twin, None), "shared (contiguous cache)": (shared, None)}
    out: dict[str, Any] = {"rows": []}
    runs = {}
    for name, (requests, cache) in cases.items():
        runs[name] = timed(lambda: new_engine(runner, batch, prefix_cache=bool(cache)),
                           requests, args.repeats)
    base = median(runs["suffix only"], "wall")
    for name, rs in runs.items():
        out["rows"].append({"case": name, "seconds": median(rs, "wall"),
                            "ratio": median(rs, "wall") / base,
                            "generated": rs[0]["generated"],
                            "cached_tokens": rs[0]["cached"]})
    if paged:
        hot = runs["shared, prefix cache"][0]["tokens"]
        cold = runs["shared, no prefix cache"][0]["tokens"]
        out["tokens_equal"] = hot == cold
        out["tokens_differing"] = sum(a != b for a, b in zip(hot, cold))
    return out


# --- 2. concurrency at a fixed cache budget ------------------------------------------------------

def concurrency(model: Any, args: argparse.Namespace, paged: bool) -> dict[str, Any]:
    """Many short requests at a cache budget of `budget_seqs` full-context sequences: the
    contiguous cache holds that many rows; the paged pool that many tokens, with `batch` slots,
    and (a second row) with as many slots as the pool has pages for whole requests (prompt and
    new tokens), none of which need preempting."""
    from grok import Request
    context = model.config.sequence_len
    rng = np.random.default_rng(2)
    requests = [Request(prompt(rng, model.config.vocab_size, args.short_len), args.short_new)
                for _ in range(args.short_requests)]
    budget = args.budget_seqs * context
    if paged:
        page = new_engine(model.runner, 1, kv_tokens=budget).page_size
        whole = budget // (-(-(args.short_len + args.short_new) // page) * page)
        slots = [args.batch] + ([whole] if 1 <= whole < args.batch else [])
    else:
        slots = [args.budget_seqs]
    rows = []
    for batch in slots:
        name = ("paged" if batch == args.batch else "paged, whole requests fit") if paged \
            else "contiguous"
        runs = timed(lambda: new_engine(model.runner, batch, kv_tokens=budget if paged else None),
                     requests, args.repeats)
        rows.append({"engine": name, "slots": batch, "budget_tokens": budget,
                     "running": max(r["running"] for r in runs),
                     "held": max(r["held"] for r in runs), "seconds": median(runs, "wall"),
                     "generated": runs[0]["generated"],
                     "tok_per_s": float(np.median([r["generated"] / r["wall"] for r in runs])),
                     "preemptions": runs[0]["preemptions"]})
    return {"rows": rows}


# --- 3. mixed-length load and the admission stall ------------------------------------------------

def mixed_load(model: Any, args: argparse.Namespace, paged: bool) -> dict[str, Any]:
    """Prompts of uniform lengths 16..(context - new) from `clients` at a time, at the same
    cache budget: throughput and time to first token."""
    from grok import Request
    context = model.config.sequence_len
    rng = np.random.default_rng(3)
    lengths = rng.integers(16, context - args.load_new + 1, args.load_requests)
    requests = [Request(prompt(rng, model.config.vocab_size, int(n)), args.load_new)
                for n in lengths]
    budget = args.budget_seqs * context
    if paged:
        make = lambda: new_engine(model.runner, args.batch, kv_tokens=budget)
    else:
        make = lambda: new_engine(model.runner, args.budget_seqs)
    runs = timed(make, requests, args.repeats, clients=args.clients)
    ttft = [t for r in runs for t in r["ttft"]]
    return {"engine": "paged" if paged else "contiguous",
            "slots": args.batch if paged else args.budget_seqs, "seconds": median(runs, "wall"),
            "tok_per_s": float(np.median([r["generated"] / r["wall"] for r in runs])),
            "ttft_p50_ms": pct_ms(ttft, 50), "ttft_p99_ms": pct_ms(ttft, 99),
            "running": max(r["running"] for r in runs), "preemptions": runs[0]["preemptions"]}


def stall(model: Any, args: argparse.Namespace, paged: bool) -> dict[str, Any]:
    """A long prompt's time to first token while 4 short requests decode, against alone. The
    step time is the median decode step of the 4 before the long one arrives."""
    from grok import Request
    context, vocab = model.config.sequence_len, model.config.vocab_size
    rng = np.random.default_rng(4)
    long = Request(prompt(rng, vocab, context - args.stall_new), args.stall_new)
    shorts = [Request(prompt(rng, vocab, args.short_len), args.stall_short_new)
              for _ in range(4)]
    make = lambda: new_engine(model.runner, STALL_SLOTS, grow=not paged)

    def alone() -> float:
        return drive(make(), [long])["ttft"][0]

    def busy() -> tuple[float, float, bool]:
        engine = make()
        ids = [engine.submit(r) for r in shorts]
        while not all(engine.results[i].tokens for i in ids):
            engine.step()
        decode = []
        for _ in range(3):
            before = time.perf_counter()
            engine.step()
            decode.append(time.perf_counter() - before)
        rid = engine.submit(long)
        submitted = time.perf_counter()
        while not engine.results[rid].tokens and not engine.results[rid].done:
            engine.step()
        ttft = time.perf_counter() - submitted
        overlapped = all(not engine.results[i].done for i in ids)
        for i in ids + [rid]:
            engine.cancel(i)
        while not engine.idle:
            engine.step()
        return ttft, float(np.median(decode)), overlapped

    alone(), busy()          # the compiles
    alone_s = float(np.median([alone() for _ in range(args.repeats)]))
    busy_runs = [busy() for _ in range(args.repeats)]
    busy_s = float(np.median([b[0] for b in busy_runs]))
    step_s = float(np.median([b[1] for b in busy_runs]))
    return {"engine": "paged" if paged else "contiguous, grow=True",
            "long_prompt": len(long.prompt),
            "alone_ms": alone_s * 1e3, "busy_ms": busy_s * 1e3, "step_ms": step_s * 1e3,
            "shorts_still_decoding": all(b[2] for b in busy_runs),
            "ratio": busy_s / alone_s,
            "within_goal": busy_s <= GOALS["stall"] * alone_s + step_s}


# --- 4. decode step, paged against contiguous ----------------------------------------------------

def decode_step(model: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """The jitted decode step on a contiguous cache of `batch` rows and on a pool holding the
    same sequences (each row its own pages), at attention spans `spans`: median seconds of
    `calls` calls of each, interleaved."""
    import jax
    import jax.numpy as jnp
    runner, config = model.runner, model.config
    context, batch, page = config.sequence_len, args.decode_batch, args.page_size
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(3, config.vocab_size, batch), jnp.int32)
    n = -(-context // page)
    table = jnp.asarray(np.arange(batch * n, dtype=np.int32).reshape(batch, n))
    rows = []
    for span in args.spans:
        positions = jnp.full((batch,), span - 1, jnp.int32)
        state = {"cache": runner.new_cache(batch, context),
                 "pool": runner.new_pool(batch * n, page)}

        def contiguous():
            logits, state["cache"] = runner.decode(runner.params, state["cache"], tokens,
                                                   positions, span)
            return logits

        def paged():
            logits, state["pool"] = runner.paged_decode(runner.params, state["pool"], tokens,
                                                        table, positions, span)
            return logits

        times: dict[str, list[float]] = {"contiguous": [], "paged": []}
        for fn in (contiguous, paged):         # the compiles
            jax.block_until_ready(fn())
        for _ in range(args.calls):
            for name, fn in (("contiguous", contiguous), ("paged", paged)):
                before = time.perf_counter()
                jax.block_until_ready(fn())
                times[name].append(time.perf_counter() - before)
        c, p = (float(np.median(times[k])) for k in ("contiguous", "paged"))
        rows.append({"batch": batch, "span": span, "contiguous_ms": c * 1e3, "paged_ms": p * 1e3,
                     "ratio": p / c})
    return rows


# --- the "before" side ----------------------------------------------------------------------------

SIZE_ARGS = ("repeats", "prefix_requests", "prefix_len", "own_len", "prefix_new",
             "prefix_batch", "budget_seqs", "batch", "short_requests", "short_len", "short_new",
             "load_requests", "load_new", "clients", "stall_new", "stall_short_new")


def before_tree(args: argparse.Namespace, scratch: Path) -> Path | None:
    """A directory holding the old `grok` package: `--before-tree`, or `--before-commit`'s
    files extracted (git archive) under `scratch`; None (with a note) when there is none."""
    if args.before_tree is not None:
        return args.before_tree
    tree = scratch / "before"
    tree.mkdir()
    try:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before_commit, "grok"],
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    except (OSError, subprocess.CalledProcessError) as err:
        print(f"no 'before' numbers: could not extract {args.before_commit} ({err})",
              file=sys.stderr)
        return None
    return tree


def run_before(args: argparse.Namespace) -> dict[str, Any] | None:
    """Sections 1-3 on the old engine, in a subprocess importing the old tree."""
    scratch = Path(tempfile.mkdtemp(prefix="paged_kv_"))
    try:
        tree = before_tree(args, scratch)
        if tree is None:
            return None
        out = scratch / "before.json"
        argv = [sys.executable, str(Path(__file__).resolve()), "--side", "before",
                "--tree", str(tree), "--json", str(out)]
        for name in SIZE_ARGS:
            argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        print(f"[before: {tree} ({args.before_tree or args.before_commit})]", flush=True)
        done = subprocess.run(argv, env=env, cwd=ROOT)
        if done.returncode != 0:
            print(f"no 'before' numbers: its run exited {done.returncode}", file=sys.stderr)
            return None
        return json.loads(out.read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- output ---------------------------------------------------------------------------------------

def markdown(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]) -> str:
    """A markdown table of `rows`: (header, key, format) per column."""
    head = "| " + " | ".join(h for h, _, _ in columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(format(r[k], f) if r.get(k) is not None else ""
                              for _, k, f in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def verdict(value: float, goal: float, at_most: bool = True) -> str:
    ok = value <= goal if at_most else value >= goal
    sign = "<=" if at_most else ">="
    return f"{value:.2f}x (goal {sign} {goal:g}x: {'met' if ok else 'NOT met'})"


def report(result: dict[str, Any]) -> None:
    after, before = result["after"], result.get("before") or {}
    a = result["args"]
    print(f"\n## 1. Shared prefix: {a['prefix_requests']} requests of {a['prefix_len']} shared + "
          f"{a['own_len']} own tokens, {a['prefix_new']} new, {a['prefix_batch']} slots")
    rows = after["prefix"]["rows"] + [{**r, "case": f"before: {r['case']}"}
                                      for r in before.get("prefix", {}).get("rows", [])]
    print(markdown(rows, [("case", "case", ""), ("seconds", "seconds", ".3f"),
                          ("/ suffix only", "ratio", ".2f"), ("tokens", "generated", "d"),
                          ("prompt tokens cached", "cached_tokens", "d")]))
    hot = next(r for r in after["prefix"]["rows"] if r["case"] == "shared, prefix cache")
    cold = next(r for r in after["prefix"]["rows"] if r["case"] == "shared, no prefix cache")
    print(f"prefix cache: {verdict(hot['ratio'], GOALS['prefix'])}; cold: {cold['ratio']:.2f}x")
    print(f"tokens with the prefix cache == without: {after['prefix']['tokens_equal']}"
          + ("" if after["prefix"]["tokens_equal"] else
             f" ({after['prefix']['tokens_differing']} requests differ)"))

    print(f"\n## 2. Concurrency at a budget of {a['budget_seqs']} x context tokens: "
          f"{a['short_requests']} requests of {a['short_len']} tokens, {a['short_new']} new")
    rows = before.get("concurrency", {}).get("rows", []) + after["concurrency"]["rows"]
    print(markdown(rows, [("engine", "engine", ""), ("slots", "slots", "d"),
                          ("peak running", "running", "d"), ("peak slots held", "held", "d"),
                          ("seconds", "seconds", ".3f"), ("tok/s", "tok_per_s", ".1f"),
                          ("preemptions", "preemptions", "d")]))
    paged = after["concurrency"]["rows"][0]
    if before.get("concurrency"):
        b = before["concurrency"]["rows"][0]
        print(f"peak running, paged / contiguous: "
              f"{verdict(paged['running'] / b['running'], GOALS['concurrency'], False)}; "
              f"tok/s: {paged['tok_per_s'] / b['tok_per_s']:.2f}x")
    else:
        print(f"peak running / {a['budget_seqs']} (the contiguous cache's rows): "
              f"{verdict(paged['running'] / a['budget_seqs'], GOALS['concurrency'], False)}")

    print(f"\n## 3. Mixed-length load: {a['load_requests']} requests of 16..(context - "
          f"{a['load_new']}) tokens, {a['load_new']} new, {a['clients']} clients")
    rows = [r for r in (before.get("load"), after["load"]) if r]
    print(markdown(rows, [("engine", "engine", ""), ("slots", "slots", "d"),
                          ("peak running", "running", "d"), ("seconds", "seconds", ".3f"),
                          ("tok/s", "tok_per_s", ".1f"), ("TTFT p50 ms", "ttft_p50_ms", ".1f"),
                          ("TTFT p99 ms", "ttft_p99_ms", ".1f"),
                          ("preemptions", "preemptions", "d")]))
    print("\nAdmission stall: a long prompt's TTFT while 4 short requests decode")
    rows = [r for r in (before.get("stall"), after["stall"]) if r]
    print(markdown(rows, [("engine", "engine", ""), ("prompt", "long_prompt", "d"),
                          ("alone ms", "alone_ms", ".1f"), ("busy ms", "busy_ms", ".1f"),
                          ("step ms", "step_ms", ".1f"), ("busy / alone", "ratio", ".2f"),
                          ("<= 2x alone + step", "within_goal", ""),
                          ("shorts still decoding", "shorts_still_decoding", "")]))

    print("\n## 4. Decode step, paged / contiguous (jitted, median of "
          f"{a['calls']} calls each)")
    print(markdown(after["decode"], [("batch", "batch", "d"), ("span", "span", "d"),
                                     ("contiguous ms", "contiguous_ms", ".3f"),
                                     ("paged ms", "paged_ms", ".3f"),
                                     ("paged / contiguous", "ratio", ".3f")]))
    worst = max(r["ratio"] for r in after["decode"])
    print(f"worst: {verdict(worst, GOALS['decode'])}")


# --- main -----------------------------------------------------------------------------------------

def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    p.add_argument("--repeats", type=positive, default=3, help="timed runs a case (median)")
    before = p.add_mutually_exclusive_group()
    before.add_argument("--before-commit", default=BEFORE_COMMIT,
                        help="the contiguous-cache engine's commit (default %(default)s)")
    before.add_argument("--before-tree", type=Path, default=None,
                        help="a checkout of the old engine (e.g. a git worktree) instead")
    before.add_argument("--no-before", action="store_true", help="skip the 'before' runs")
    sizes = p.add_argument_group("sizes")
    for name, default, text in (
            ("prefix-requests", 32, "section 1: requests"),
            ("prefix-len", 192, "section 1: shared prompt tokens"),
            ("own-len", 16, "section 1: each request's own prompt tokens"),
            ("prefix-new", 8, "section 1: new tokens"),
            ("prefix-batch", 8, "section 1: engine slots"),
            ("budget-seqs", 8, "sections 2, 3: the cache budget, in full-context sequences "
                               "(the contiguous engine's slots)"),
            ("batch", 64, "sections 2, 3: the paged engine's slots"),
            ("short-requests", 128, "section 2: requests"),
            ("short-len", 32, "sections 2, 3: a short prompt's tokens"),
            ("short-new", 16, "section 2: new tokens"),
            ("load-requests", 48, "section 3: requests"),
            ("load-new", 16, "section 3: new tokens"),
            ("clients", 16, "section 3: requests in flight"),
            ("stall-new", 8, "section 3: the long request's new tokens (its prompt: the rest "
                             "of the context)"),
            ("stall-short-new", 96, "section 3: the short requests' new tokens"),
            ("decode-batch", 8, "section 4: rows"),
            ("calls", 50, "section 4: timed calls of each step"),
            ("page-size", 16, "section 4: the pool's page size")):
        sizes.add_argument(f"--{name}", type=positive, default=default, help=text)
    sizes.add_argument("--spans", default=None,
                       help="section 4: attention spans, comma-separated (default: half the "
                            "context and the context)")
    p.add_argument("--side", choices=("after", "before"), default="after", help=argparse.SUPPRESS)
    p.add_argument("--tree", type=Path, default=None, help=argparse.SUPPRESS)
    return p


QUICK = {"repeats": 1, "prefix_requests": 4, "prefix_len": 32, "prefix_new": 2,
         "prefix_batch": 4, "budget_seqs": 2, "batch": 8, "short_requests": 8, "short_len": 16,
         "short_new": 4, "load_requests": 6, "load_new": 4, "clients": 4, "stall_new": 4,
         "stall_short_new": 24, "calls": 3}


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            if getattr(args, name) == p.get_default(name):
                setattr(args, name, value)
    sys.path.insert(0, str(args.tree or ROOT))
    import grok
    import jax
    model = grok.load(str(DEMO), progress=False)
    context = model.config.sequence_len
    if args.spans is None:
        args.spans = [context] if args.quick else [context // 2, context]
    else:
        try:
            args.spans = [int(s) for s in str(args.spans).split(",")]
        except ValueError:
            p.error(f"--spans: comma-separated integers, got {args.spans!r}")
    if not all(1 <= s <= context for s in args.spans):
        p.error(f"--spans: each in 1..{context} (the demo's context)")
    for total, what in ((args.prefix_len + args.own_len + args.prefix_new, "--prefix-len + "
                         "--own-len + --prefix-new"),
                        (args.short_len + max(args.short_new, args.stall_short_new),
                         "--short-len + --short-new (and --stall-short-new)"),
                        (args.load_new + 16, "16 + --load-new"),
                        (args.stall_new + 1, "--stall-new + 1")):
        if total > context:
            p.error(f"{what} must fit the demo's context of {context} tokens")
    paged = args.side == "after"
    print(f"[{args.side}: grok from {Path(grok.__file__).parent}, {jax.devices()[0].platform}]",
          flush=True)

    sections: dict[str, Callable[[], Any]] = {
        "prefix": lambda: shared_prefix(model, args, paged),
        "concurrency": lambda: concurrency(model, args, paged),
        "load": lambda: mixed_load(model, args, paged),
        "stall": lambda: stall(model, args, paged)}
    if paged:
        sections["decode"] = lambda: decode_step(model, args)
    out: dict[str, Any] = {}
    for name, run in sections.items():
        began = time.perf_counter()
        out[name] = run()
        print(f"[{args.side}: {name} in {time.perf_counter() - began:.1f} s]", flush=True)
    if not paged:
        args.json.write_text(json.dumps(out))
        return 0

    before = None if args.no_before else run_before(args)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "jax": jax.__version__, "backend": jax.devices()[0].platform},
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "before_source": None if before is None else
              str(args.before_tree or args.before_commit),
              "after": out, "before": before}
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
