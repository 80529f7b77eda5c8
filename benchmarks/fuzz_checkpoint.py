"""A fuzzing campaign against the checkpoint reader (issue 14): coverage-guided with atheris
(libFuzzer) when it is installed, else random mutations; seeds are the fixture checkpoints' files.

Each input goes through `grok.tools.fuzz_checkpoint.check`: a clean one-line refusal, or values
equal to Python's own unpickler's. A crash, an escaped exception, a disagreement, a hang (over
--timeout seconds) or memory over --rss-mb is a finding. Prints executions, seconds and findings.

    pip install atheris          # (the "fuzz" extra)
    python benchmarks/fuzz_checkpoint.py --runs 1000000 [--engine atheris|random] [--jobs N]
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def seeds(limit: int = 100_000) -> list[Path]:
    """The fixture checkpoints' files (and the demo model's), up to `limit` bytes each."""
    patterns = [ROOT.parent / "shared" / "fixtures" / "*" / "ckpt-0" / "tensor*",
                ROOT / "checkpoints" / "demo" / "ckpt-0" / "tensor*"]
    files = sorted(Path(p) for pattern in patterns for p in glob.glob(str(pattern)))
    return [f for f in files if f.stat().st_size <= limit]


def run_random(runs: int, seed: int, timeout: float) -> dict:
    from grok.tools.fuzz_checkpoint import Finding, check, mutate
    data = [f.read_bytes() for f in seeds()]
    rng = random.Random(seed)
    findings, slowest, counts = [], 0.0, {"refused": 0, "accepted": 0}
    start = time.perf_counter()
    for _ in range(runs):
        sample = mutate(rng.choice(data), rng)
        t = time.perf_counter()
        try:
            counts[check(sample)] += 1
        except Finding as err:
            findings.append(str(err)[:200])
        took = time.perf_counter() - t
        slowest = max(slowest, took)
        if took > timeout:
            findings.append(f"hang: {took:.1f} s")
    return {"engine": "random", "executions": runs, "seconds": time.perf_counter() - start,
            "findings": findings, "slowest_ms": slowest * 1e3,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **counts}


def run_atheris(runs: int, timeout: float, rss_mb: int, corpus: Path) -> None:
    """The libFuzzer driver (in this process; libFuzzer prints its own statistics)."""
    import atheris
    with atheris.instrument_imports(include=["grok.checkpoint", "grok.tools.fuzz_checkpoint"]):
        from grok.tools.fuzz_checkpoint import check

    def one(data: bytes) -> None:
        check(data)   # a Finding propagates: libFuzzer records the input as a crash

    atheris.Setup([sys.argv[0], f"-runs={runs}", f"-timeout={int(max(1, timeout))}",
                   f"-rss_limit_mb={rss_mb}", "-max_len=4096", "-print_final_stats=1",
                   f"-artifact_prefix={corpus.parent}/", str(corpus)], one)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="executions (per job)")
    parser.add_argument("--engine", choices=("atheris", "random"), default=None,
                        help="default: atheris when installed")
    parser.add_argument("--jobs", type=int, default=1, help="parallel campaigns (processes)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds one input may take")
    parser.add_argument("--rss-mb", type=int, default=2048, help="memory one campaign may use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.jobs < 1 or args.timeout <= 0 or args.rss_mb < 64:
        parser.error("--runs, --jobs, --timeout and --rss-mb must be positive")
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "random":
        result = run_random(args.runs, args.seed, args.timeout)
        print(f"engine random: {result['executions']} executions in {result['seconds']:.0f} s "
              f"({result['refused']} refused, {result['accepted']} accepted), slowest input "
              f"{result['slowest_ms']:.1f} ms, peak RSS {result['peak_rss_mb']:.0f} MB, "
              f"{len(result['findings'])} findings")
        for finding in result["findings"][:20]:
            print("  finding:", finding)
        return 1 if result["findings"] else 0
    if args.worker:
        run_atheris(args.runs, args.timeout, args.rss_mb, Path(os.environ["FUZZ_CORPUS"]))
        return 0
    work = Path(tempfile.mkdtemp(prefix="grok-fuzz-"))
    corpus = work / "corpus"
    corpus.mkdir()
    for i, f in enumerate(seeds()):
        shutil.copy(f, corpus / f"seed{i:04d}")
    print(f"atheris: {len(list(corpus.iterdir()))} seeds, {args.jobs} job(s) x {args.runs} runs; "
          f"artifacts in {work}", flush=True)
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--engine", "atheris",
                               f"--runs={args.runs}", f"--timeout={args.timeout}",
                               f"--rss-mb={args.rss_mb}"],
                              env={**os.environ, "FUZZ_CORPUS": str(corpus)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(args.jobs)]
    executions, failed = 0, 0
    for proc in procs:
        out, _ = proc.communicate()
        done = [line for line in out.splitlines() if line.startswith("stat::number_of_executed_units")]
        executions += int(done[-1].split(":")[-1]) if done else 0
        failed += proc.returncode != 0
        if proc.returncode != 0:
            print(out[-3000:])
    artifacts = sorted(p.name for p in work.iterdir() if p.name != "corpus")
    print(f"engine atheris: {executions} executions in {time.perf_counter() - start:.0f} s, "
          f"{failed} job(s) failed, findings: {artifacts or 'none'}")
    return 1 if failed or artifacts else 0


if __name__ == "__main__":
    sys.exit(main())
