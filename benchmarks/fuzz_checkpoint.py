"""A fuzzing campaign against the checkpoint readers (issues 14, 24): coverage-guided with atheris
(libFuzzer) when it is installed, else random mutations. `--target` picks the parser:

- pickle (default): release checkpoint files; seeds are the fixture checkpoints' files.
- safetensors: the safetensors header parser; seeds are files convert writes (int8 and int4
  leaves of the demo model, written here).
- manifest: the SHA256SUMS parser; seeds are manifests in each form it reads (written here).

Each input goes through that target's check in `grok.tools.fuzz_checkpoint` (`check`,
`check_safetensors`, `check_manifest`): a clean one-line refusal, or a result an independent
reader agrees with. A crash, an escaped exception, a disagreement, a hang (over --timeout seconds)
or memory over --rss-mb is a finding. Prints executions, seconds and findings.

    pip install atheris          # (the "fuzz" extra)
    python benchmarks/fuzz_checkpoint.py --runs 1000000 [--target pickle|safetensors|manifest]
                                         [--engine atheris|random] [--jobs N]
"""
from __future__ import annotations

import argparse
import glob
import os
import random
import resource
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


def safetensors_seeds(limit: int = 4096) -> list[bytes]:
    """Files as convert writes them, up to `limit` bytes (libFuzzer's -max_len): the leaves of a
    tiny Grok-shaped model, int8 and int4."""
    from grok.checkpoint.convert import target_config
    from grok.checkpoint.safetensors_io import write_leaf
    from grok.config import GrokConfig
    from grok.leaves import checkpoint_entries, random_flat

    tiny = GrokConfig(vocab_size=64, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=2,
                      num_layers=1, widening_factor=2.0, num_experts=4, num_selected_experts=2,
                      sequence_len=64, scale_blocks=4)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "leaf.safetensors"
        for config in (target_config(tiny, 8), target_config(tiny, 4, 8)):
            flat = random_flat(config)
            for entry in checkpoint_entries(config):
                write_leaf(path, entry, flat[entry.name])
                if path.stat().st_size <= limit:
                    out.append(path.read_bytes())
    return out


def manifest_seeds() -> list[bytes]:
    """SHA256SUMS lists in each form the parser reads: convert's, sha256sum's text and binary
    modes, --tag, escaped names, comments and CRLF ends."""
    digest = "0123456789abcdef" * 4
    convert_style = "".join(f"{digest}  {name}\n" for name in (
        "ckpt-0/tensor00000_000.safetensors", "ckpt-0/tensor00001_000.safetensors",
        "config.json", "sampling.json", "tokenizer.model"))
    return [convert_style.encode(),
            f"{digest}  tensor00000_000\n{digest.upper()} *tensor00001_000\n".encode(),
            f"# list\r\nSHA256 (config.json) = {digest}\r\n\\{digest}  a\\\\b\\nc\n".encode(),
            f"{digest}  ./x/../y\n\n{digest}  /abs\n".encode()]


TARGETS = ("pickle", "safetensors", "manifest")


def target_check(target: str):
    """The check one input of `target` goes through (grok.tools.fuzz_checkpoint)."""
    from grok.tools import fuzz_checkpoint as fuzz
    return {"pickle": fuzz.check, "safetensors": fuzz.check_safetensors,
            "manifest": fuzz.check_manifest}[target]


def target_seeds(target: str) -> list[bytes]:
    if target == "pickle":
        return [f.read_bytes() for f in seeds()]
    return safetensors_seeds() if target == "safetensors" else manifest_seeds()


def run_random(runs: int, seed: int, timeout: float, target: str, seconds: float) -> dict:
    from grok.tools.fuzz_checkpoint import Finding, mutate
    check = target_check(target)
    data = target_seeds(target)
    rng = random.Random(seed)
    findings, slowest, counts = [], 0.0, {"refused": 0, "accepted": 0}
    start = time.perf_counter()
    done = 0
    while done < runs and time.perf_counter() - start < seconds:
        done += 1
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
    return {"engine": "random", "target": target, "executions": done,
            "seconds": time.perf_counter() - start, "findings": findings,
            "slowest_ms": slowest * 1e3,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **counts}


def run_atheris(runs: int, timeout: float, rss_mb: int, corpus: Path, target: str,
                seconds: float) -> None:
    """The libFuzzer driver (in this process; libFuzzer prints its own statistics)."""
    import atheris
    with atheris.instrument_imports(include=["grok.checkpoint", "grok.tools.fuzz_checkpoint"]):
        check = target_check(target)

    def one(data: bytes) -> None:
        check(data)   # a Finding propagates: libFuzzer records the input as a crash

    limit = [f"-max_total_time={int(seconds)}"] if seconds < float("inf") else []
    atheris.Setup([sys.argv[0], f"-runs={runs}", *limit, f"-timeout={int(max(1, timeout))}",
                   f"-rss_limit_mb={rss_mb}", "-max_len=4096", "-print_final_stats=1",
                   f"-artifact_prefix={corpus.parent}/", str(corpus)], one)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000, help="executions (per job)")
    parser.add_argument("--seconds", type=float, default=float("inf"),
                        help="stop after this long (per job), whatever --runs says")
    parser.add_argument("--target", choices=TARGETS, default="pickle", help="the parser fuzzed")
    parser.add_argument("--engine", choices=("atheris", "random"), default=None,
                        help="default: atheris when installed")
    parser.add_argument("--jobs", type=int, default=1, help="parallel campaigns (processes)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds one input may take")
    parser.add_argument("--rss-mb", type=int, default=2048, help="memory one campaign may use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.runs < 1 or args.jobs < 1 or args.timeout <= 0 or args.rss_mb < 64 \
            or args.seconds <= 0:
        parser.error("--runs, --seconds, --jobs, --timeout and --rss-mb must be positive")
    engine = args.engine
    if engine is None:
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "random":
        result = run_random(args.runs, args.seed, args.timeout, args.target, args.seconds)
        print(f"engine random, target {args.target}: {result['executions']} executions in "
              f"{result['seconds']:.0f} s "
              f"({result['refused']} refused, {result['accepted']} accepted), slowest input "
              f"{result['slowest_ms']:.1f} ms, peak RSS {result['peak_rss_mb']:.0f} MB, "
              f"{len(result['findings'])} findings")
        for finding in result["findings"][:20]:
            print("  finding:", finding)
        return 1 if result["findings"] else 0
    if args.worker:
        run_atheris(args.runs, args.timeout, args.rss_mb, Path(os.environ["FUZZ_CORPUS"]),
                    args.target, args.seconds)
        return 0
    work = Path(tempfile.mkdtemp(prefix="grok-fuzz-"))
    corpus = work / "corpus"
    corpus.mkdir()
    for i, data in enumerate(target_seeds(args.target)):
        (corpus / f"seed{i:04d}").write_bytes(data)
    print(f"atheris, target {args.target}: {len(list(corpus.iterdir()))} seeds, {args.jobs} "
          f"job(s) x {args.runs} runs; artifacts in {work}", flush=True)
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--engine", "atheris",
                               f"--target={args.target}",
                               f"--runs={args.runs}", f"--seconds={args.seconds}",
                               f"--timeout={args.timeout}",
                               f"--rss-mb={args.rss_mb}"],
                              env={**os.environ, "FUZZ_CORPUS": str(corpus)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(args.jobs)]
    executions, failed, coverage = 0, 0, []
    for proc in procs:
        out, _ = proc.communicate()
        lines = out.splitlines()
        done = [line for line in lines if line.startswith("stat::number_of_executed_units")]
        executions += int(done[-1].split(":")[-1]) if done else 0
        # libFuzzer's last status line: "#N DONE cov: C ft: F corp: K/..." (edges, features)
        status = [line for line in lines if " cov: " in line]
        coverage += [" ".join(status[-1].split()[2:8])] if status else []
        failed += proc.returncode != 0
        if proc.returncode != 0:
            print(out[-3000:])
    artifacts = sorted(p.name for p in work.iterdir() if p.name != "corpus")
    print(f"engine atheris, target {args.target}: {executions} executions in "
          f"{time.perf_counter() - start:.0f} s ({'; '.join(coverage) or 'no status'}), "
          f"{failed} job(s) failed, findings: {artifacts or 'none'}")
    return 1 if failed or artifacts else 0


if __name__ == "__main__":
    sys.exit(main())
