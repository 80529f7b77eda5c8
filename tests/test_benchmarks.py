"""Every benchmark entry point, run as a user runs it (a subprocess from the repository root, on
the CPU) on tiny shapes: it must exit 0 and print the numbers it is for. Benchmarks rot when
the library changes under them (compile_time.py still built the old KV-cache layout); these
tests make the next such change fail here instead of on a scarce GPU run.

benchmarks/gpu.sh, which runs most of these in one go, is tested in tests/test_bench.py.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def bench_env(**extra: str) -> dict[str, str]:
    """The environment of a benchmark run: the CPU, this checkout's grok first on the path, and
    XLA's CPU backend at optimisation level 0 (these check the scripts, not their speed: it
    halves the compile times that dominate them)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        flags = f"{flags} --xla_backend_optimization_level=0".strip()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": path, "XLA_FLAGS": flags,
            "PYTHONUNBUFFERED": "1", **extra}


def run(*args: str, timeout: float = 120, ok: bool = True, **env: str
        ) -> subprocess.CompletedProcess:
    """Run `args` (a command line) from the repository root; with `ok`, require exit 0."""
    done = subprocess.run(list(args), cwd=ROOT, env=bench_env(**env), capture_output=True,
                          text=True, timeout=timeout)
    if ok:
        assert done.returncode == 0, (f"{args} exited {done.returncode}\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def script(name: str, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return run(sys.executable, str(BENCH / name), *args, **kwargs)


def table(text: str, header_start: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header line starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = [h.strip() for h in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def load_module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- compile_time.py ------------------------------------------------------------------------------

def test_compile_time_times_each_step_of_each_layout():
    """Lowers and compiles the engine's steps from abstract weights and an init_cache-shaped
    cache, in both layouts (the unrolled one holds a tuple of per-layer caches)."""
    done = script("compile_time.py", "--preset", "tiny", "--layers", "2", "--prefill", "16",
                  "--unrolled")
    rows = table(done.stdout, "| layers |")
    assert {(r["layers"], r["layout"], r["step"]) for r in rows} == {
        ("2", layout, step) for layout in ("scan", "unrolled") for step in ("prefill 16", "decode")}
    assert len(rows) == 4
    assert all(float(r["lower (s)"]) > 0 and float(r["compile (s)"]) > 0 for r in rows), rows


def rejected(main, argv: list[str], capsys) -> str:
    """What `main(argv)` (a script's entry point, in this process) says as it refuses `argv`
    with argparse's exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2, argv
    return capsys.readouterr().err


def test_compile_time_rejects_bad_sizes(capsys):
    main = load_module("compile_time").main
    assert "must be >= 1" in rejected(main, ["--layers", "0"], capsys)
    assert "--preset" in rejected(main, ["--preset", "huge"], capsys)


# --- load.py --------------------------------------------------------------------------------------

def test_load_reports_rates_and_loads_what_was_written(tmp_path):
    from grok.tools.bench import PRESETS
    from grok.leaves import checkpoint_entries

    target = tmp_path / "ckpt"
    done = script("load.py", "--preset", "tiny", "--layers", "2", "--dir", str(target),
                  "--loads", "1", "--verify")
    rates = {m.group(1).strip(): (float(m.group(2)), float(m.group(3))) for m in re.finditer(
        r"^(\S.*?)\s+(\d+\.\d+) GB/s\s+(\d+\.\d+) s", done.stdout, re.M)}
    assert {"cat (after write)", "grok.checkpoint.loader (after cat)", "cat (after load)"} <= set(rates), \
        done.stdout
    assert all(rate > 0 for rate, _ in rates.values()), rates
    assert re.search(r"grok\.checkpoint\.loader \(after cat\).*peak RSS \d+\.\d+ GB", done.stdout)
    count = len(checkpoint_entries(PRESETS["tiny"].replace(num_layers=2)))
    assert f"verified: {count} tensors match what was written" in done.stdout
    assert not target.exists()      # removed afterwards (no --keep)


def test_load_arguments_are_checked(tmp_path, capsys):
    main = load_module("load").main
    assert "--verify" in rejected(main, ["--reuse", "--verify", "--dir", str(tmp_path)], capsys)
    assert "mesh" in rejected(main, ["--mesh", "2"], capsys)
    assert "--reuse: no checkpoint" in rejected(main, ["--reuse", "--dir", str(tmp_path)], capsys)
    precious = tmp_path / "notes.txt"        # a directory of other files is never written over
    precious.write_text("keep me")           # (nor deleted afterwards)
    with pytest.raises(SystemExit, match="holds other files"):
        main(["--preset", "tiny", "--dir", str(tmp_path)])
    assert precious.read_text() == "keep me"


# --- moe_layer.py ---------------------------------------------------------------------------------

def test_moe_layer_table_has_a_row_per_evaluation(tmp_path):
    out = tmp_path / "moe.json"
    done = script("moe_layer.py", "--dims", "64,128", "--layers", "2", "--tokens", "1",
                  "--repeats", "1", "--max-configs", "1", "--json", str(out))
    rows = table(done.stdout, "| tokens |")
    assert sorted(r["moe_impl"] for r in rows) == ["dense", "gather", "grouped", "pallas"]
    for r in rows:
        assert r["error"] == "" and float(r["median ms"]) > 0, r
        assert float(r["rel. error vs dense"]) < 2e-2, r
    result = json.loads(out.read_text())
    assert {r["impl"] for r in result["layer"]} == {r["moe_impl"] for r in rows}
    assert all(r["ms"] > 0 for r in result["layer"])
    sweep = table(done.stdout, "| weight | In x Out |")
    assert {r["weight"] for r in sweep} == {"w1+wv", "w2"}
    assert all(r["error"] == "" and float(r["median us"]) > 0 for r in sweep), sweep


def test_moe_layer_arguments_are_checked(capsys):
    main = load_module("moe_layer").main
    assert "--dims" in rejected(main, ["--dims", "64"], capsys)
    assert "--layers" in rejected(main, ["--layers", "1"], capsys)
    assert "--tokens" in rejected(main, ["--tokens", "1,x"], capsys)


# --- profile_step.py ------------------------------------------------------------------------------

def _write_trace(path: Path, events: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)


def _meta(kind: str, pid: int, name: str, tid: int | None = None) -> dict:
    event = {"ph": "M", "name": kind, "pid": pid, "args": {"name": name}}
    return event if tid is None else {**event, "tid": tid}


def test_profile_step_sums_the_device_kernels_of_a_trace(tmp_path):
    """kernel_times on a small synthetic Perfetto trace: with a GPU process, only its events
    count, by (thread, name); without one (a CPU run), the runtime threads' events count but
    not the Python tracer's."""
    kernel_times = load_module("profile_step").kernel_times
    assert kernel_times(str(tmp_path)) == {}          # no trace written
    gpu = [_meta("process_name", 1, "/device:GPU:0"), _meta("process_name", 2, "/host:CPU"),
           _meta("thread_name", 1, "Stream #13(Compute)", tid=7),
           _meta("thread_name", 2, "python", tid=3),
           {"ph": "X", "pid": 1, "tid": 7, "name": "gemm_fusion", "dur": 10.0},
           {"ph": "X", "pid": 1, "tid": 7, "name": "gemm_fusion", "dur": 12.5},
           {"ph": "X", "pid": 1, "tid": 7, "name": "rope_fusion", "dur": 1.0},
           {"ph": "X", "pid": 2, "tid": 3, "name": "$api.py jit", "dur": 99.0},
           {"ph": "i", "pid": 1, "tid": 7, "name": "marker"}]
    _write_trace(tmp_path / "gpu" / "plugins" / "profile" / "run" / "host.trace.json.gz", gpu)
    assert kernel_times(str(tmp_path / "gpu")) == {
        ("Stream #13(Compute)", "gemm_fusion"): [10.0, 12.5],
        ("Stream #13(Compute)", "rope_fusion"): [1.0]}
    cpu = [_meta("process_name", 2, "/host:CPU"), _meta("thread_name", 2, "python", tid=3),
           _meta("thread_name", 2, "tf_XLAEigen", tid=4),
           {"ph": "X", "pid": 2, "tid": 3, "name": "$api.py jit", "dur": 99.0},
           {"ph": "X", "pid": 2, "tid": 4, "name": "dot_fusion", "dur": 4.0}]
    _write_trace(tmp_path / "cpu" / "host.trace.json.gz", cpu)
    assert kernel_times(str(tmp_path / "cpu")) == {("tf_XLAEigen", "dot_fusion"): [4.0]}


def test_profile_step_profiles_each_step_on_the_cpu(tmp_path):
    out = tmp_path / "profile.json"
    done = script("profile_step.py", "--preset", "tiny", "--prefill-len", "16", "--batches", "1",
                  "--calls", "1", "--json", str(out))
    assert re.search(r"^## prefill 16: wall \d+\.\d+ ms per call", done.stdout, re.M)
    assert re.search(r"^## decode batch 1: wall \d+\.\d+ ms per call", done.stdout, re.M)
    steps = json.loads(out.read_text())["steps"]
    assert [s["step"] for s in steps] == ["prefill 16", "decode batch 1"]
    for step in steps:
        assert step["wall_ms"] > 0 and step["threads"], step
        assert max(t["busy_ms"] for t in step["threads"]) > 0
        assert all(t["thread"] != "python" for t in step["threads"])


def test_profile_step_arguments_are_checked(capsys):
    main = load_module("profile_step").main
    assert "--batches" in rejected(main, ["--batches", "1,x"], capsys)
    assert "--moe-impl" in rejected(main, ["--moe-impl", "fast"], capsys)
    assert "--calls" in rejected(main, ["--calls", "0"], capsys)


# --- gpu_profile.sh -------------------------------------------------------------------------------

def test_gpu_profile_script_smoke(tmp_path):
    """benchmarks/gpu_profile.sh in its SMOKE mode (the tiny preset) on this machine."""
    run("bash", str(BENCH / "gpu_profile.sh"), SMOKE="1", OUT=str(tmp_path),
        PYTHON=sys.executable)
    text = (tmp_path / "profile.md").read_text()
    assert "## prefill 16: wall" in text and "## decode batch 1: wall" in text
    steps = json.loads((tmp_path / "profile.json").read_text())["steps"]
    assert [s["step"] for s in steps] == ["prefill 16", "decode batch 1"]


# --- python -m grok.tools.bench -------------------------------------------------------------------------

def test_grok_bench_module_prints_engine_and_step_tables(tmp_path):
    """`python -m grok.tools.bench` on the tiny preset: the logits check against dense, the engine's
    throughput and the step times against the roofline, as tables and as JSON."""
    out = tmp_path / "bench.json"
    done = run(sys.executable, "-m", "grok.tools.bench", "--preset", "tiny", "--batches", "1",
               "--prompt-len", "16", "--new-tokens", "3", "--steps", "--prefill-len", "16",
               "--repeats", "1", "--check", "--json", str(out))
    check = table(done.stdout, "| check |")
    assert {r["check"] for r in check} == {"prefill 16", "decode batch 1"}
    assert all(float(r["max rel. error vs dense"]) < 1e-2 for r in check), check
    engine = table(done.stdout, "| moe_impl | batch | prefill tok/s")
    assert [r["batch"] for r in engine] == ["1"]
    assert float(engine[0]["prefill tok/s"]) > 0 and float(engine[0]["decode tok/s"]) > 0
    steps = table(done.stdout, "| phase |")
    assert [r["phase"] for r in steps] == ["prefill 16", "decode"]
    result = json.loads(out.read_text())
    # the JSON's unrounded values: the table's two decimals round a loaded machine's to 0.00;
    # fraction is roofline/ms of the same float64 values in another order (approx's 1e-6 >> ulps)
    assert all(r["ms"] > 0 and r["roofline_ms"] > 0 and 0 < r["fraction"] == pytest.approx(
        r["roofline_ms"] / r["ms"]) for r in result["steps"]), result["steps"]
    assert result["machine"]["auto"] == {shape: "grouped" for shape in (
        "decode", "prefill", "decode int4", "prefill int4")}
    assert result["config"] == "tiny" and result["failed"] == []
    assert [r["batch"] for r in result["engine"]] == [1]
    assert {r["phase"] for r in result["steps"]} == {"prefill 16", "decode"}
    assert all(r["rel_err"] < 1e-2 for r in result["check"])


def test_grok_bench_arguments_are_checked(capsys):
    from grok.tools.bench import main
    for args, words in ((["--new-tokens", "2"], "--new-tokens"), (["--batches", "0"], "--batches"),
                        (["--batches", "1,x"], "--batches"), (["--moe-impl", "fast"], "--moe-impl"),
                        (["--grok1-slice", "0"], "--grok1-slice")):
        assert words in rejected(main, args, capsys), args


@pytest.mark.parametrize("name", ["tiny", "mid", "grok1-slice-2", "tiny-int4",
                                  "grok1-slice-2-int4"])
def test_bench_random_params_have_the_library_layout(name):
    """grok.tools.bench's random weights (every preset, and the Grok-1 slice no CPU can hold; int8
    and, with --bits 4, int4 with per-group scales) are the tree grok.leaves.abstract_params
    describes: the same leaves, shapes and dtypes (traced only, nothing allocated)."""
    from grok.tools import bench
    from grok.leaves import abstract_params

    base = name.removesuffix("-int4")
    config = bench.grok1_slice(2) if base.startswith("grok1") else bench.PRESETS[base]
    if name.endswith("-int4"):
        config = config.replace(weight_bits=4, group_size=32)
    shapes = lambda tree: [(jax.tree_util.keystr(path), tuple(x.shape), str(x.dtype))
                           for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]]
    made = jax.eval_shape(lambda: bench.random_params(config))
    assert shapes(made) == shapes(abstract_params(config, scan=True))


def test_int4_matmul_times_each_evaluation_against_int8():
    done = run(sys.executable, "benchmarks/int4_matmul.py", "--dims", "64,128", "--experts", "4",
               "--tokens", "1,8", "--repeats", "1")
    for tokens in (1, 8):
        for name in ("int8", "int4 halves", "int4 interleaved"):
            assert re.search(rf"^\| {tokens} \| {name} \| [0-9.]+ \| [0-9.]+ \|$", done.stdout,
                             re.M), done.stdout


def test_int4_matmul_arguments_are_checked(capsys):
    main = load_module("int4_matmul").main
    assert "--dims" in rejected(main, ["--dims", "64"], capsys)
    assert "--dims" in rejected(main, ["--dims", "60,128"], capsys)
    assert "--tokens" in rejected(main, ["--tokens", "0"], capsys)


def test_measured_entries_rebuild_the_shipped_table_from_the_gpu_run(tmp_path):
    """benchmarks/measured_entries.py turns gpu.sh's bench JSON into "auto"'s table entries: from
    the H100 run's files it gives exactly the shipped grok/kernels/measured.json entries (its
    "auto" rows counted as the kernel they ran, two processes' results united), and --merge
    replaces the entry of the same card, JAX and shape class."""
    from grok.kernels import measured
    run_dir = BENCH / "results" / "h100-2026-11-26-final"
    out = tmp_path / "entries.json"
    done = script("measured_entries.py", str(run_dir / "grok1_slice.json"),
                  str(run_dir / "grok1_slice_b.json"), "--out", str(out), "--date", "2026-11-26")
    assert "H100 jax 0.11.2 decode" in done.stdout and "-> pallas" in done.stdout
    made = json.loads(out.read_text())["entries"]
    assert made == [measured.entry_to_json(e) for e in measured.MEASURED]
    table = tmp_path / "table.json"
    newer = dict(made[0], ms={"tokamax": 5.0, "pallas": 7.0})
    table.write_text(json.dumps({"entries": made}))
    (tmp_path / "new.json").write_text(json.dumps({"entries": [newer]}))
    script("measured_entries.py", "--merge", str(tmp_path / "new.json"), "--table", str(table))
    merged = measured.load_table(table)
    assert len(merged) == 2 and dict(merged[-1].ms) == {"tokamax": 5.0, "pallas": 7.0}


# --- paged_kv.py ----------------------------------------------------------------------------------

def test_paged_kv_prints_each_section(tmp_path):
    """benchmarks/paged_kv.py --quick on the demo model (without the old engine's subprocess,
    which only doubles the time): a table per section, the prefix cache's token check, the JSON."""
    out = tmp_path / "paged.json"
    done = script("paged_kv.py", "--quick", "--no-before", "--json", str(out), timeout=300)
    prefix = table(done.stdout, "| case |")
    assert [r["case"] for r in prefix] == ["suffix only", "shared, prefix cache",
                                           "shared, no prefix cache"]
    assert all(float(r["seconds"]) > 0 for r in prefix), prefix
    assert int(prefix[1]["prompt tokens cached"]) > 0 and prefix[2]["prompt tokens cached"] == "0"
    assert re.search(r"^tokens with the prefix cache == without: (True|False)", done.stdout, re.M)
    busy = table(done.stdout, "| engine | slots | peak running | peak slots held |")
    assert busy[0]["engine"] == "paged" and int(busy[0]["peak running"]) > 0
    load = table(done.stdout, "| engine | slots | peak running | seconds | tok/s | TTFT p50")
    assert float(load[0]["TTFT p50 ms"]) > 0, load
    stall = table(done.stdout, "| engine | prompt | alone ms |")
    assert float(stall[0]["alone ms"]) > 0 and float(stall[0]["busy ms"]) > 0, stall
    decode = table(done.stdout, "| batch | span |")
    assert all(float(r["paged / contiguous"]) > 0 for r in decode), decode
    result = json.loads(out.read_text())
    assert result["before"] is None
    assert set(result["after"]) == {"prefix", "concurrency", "load", "stall", "decode"}
    assert isinstance(result["after"]["prefix"]["tokens_equal"], bool)


def test_paged_kv_arguments_are_checked(capsys):
    main = load_module("paged_kv").main
    assert "--repeats" in rejected(main, ["--repeats", "0"], capsys)
    assert "not allowed with" in rejected(main, ["--no-before", "--before-tree", "x"], capsys)
