"""grok.tools.bench in this process: its roofline arithmetic, its failure isolation, and gpu.sh in its
SMOKE mode. (`python -m grok.tools.bench` end to end, as a subprocess: tests/test_benchmarks.py.)"""
from __future__ import annotations

import json

from grok.tools import bench


def test_roofline_bytes_count_chosen_experts():
    config = bench.PRESETS["tiny"]
    assert bench.expected_experts(config, 1) == config.num_selected_experts
    assert bench.expected_experts(config, 1000) > config.num_experts - 1e-6


def test_step_logits_compared_and_a_failing_evaluation_spares_the_others(tmp_path, capsys,
                                                                         monkeypatch):
    real = bench.step_times

    def step_times(params, config, moe_impl, *args, **kwargs):
        if moe_impl == "gather":
            raise RuntimeError("kernel does not build here\nsecond line")
        return real(params, config, moe_impl, *args, **kwargs)
    monkeypatch.setattr(bench, "step_times", step_times)
    out = tmp_path / "steps.json"
    rc = bench.main(["--preset", "tiny", "--batches", "1,4", "--prefill-len", "16",
                     "--repeats", "1", "--steps", "--no-engine", "--moe-impl",
                     "gather,grouped,dense", "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 1 and "moe_impl=gather FAILED: RuntimeError: kernel does not build here" in text
    result = json.loads(out.read_text())
    assert result["failed"] == ["gather"]
    assert {r["moe_impl"] for r in result["steps"]} == {"grouped", "dense"}
    checks = {(r["check"], r["moe_impl"]): r["rel_err"] for r in result["steps_check"]}
    assert set(checks) == {("prefill 16", "grouped"), ("decode batch 1", "grouped"),
                           ("decode batch 4", "grouped")}
    assert all(err < 1e-2 for err in checks.values())


def test_gpu_script_runs_every_section_on_tiny_shapes(tmp_path):
    """benchmarks/gpu.sh (what a lent GPU runs, once) in its SMOKE mode on this machine: every
    section runs and exits 0, and its files are the at most 8 the device tool brings back.
    (Five Python processes: the slowest of the benchmark smoke tests, about a minute.)"""
    import pathlib
    import subprocess
    import sys

    from tests.test_benchmarks import bench_env
    root = pathlib.Path(__file__).resolve().parents[1]
    env = bench_env(SMOKE="1", OUT=str(tmp_path), PYTHON=sys.executable)
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "2", "600"], env=env,
                          cwd=root, capture_output=True, text=True, timeout=600)
    summary = (tmp_path / "summary.md").read_text()
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    statuses = [line for line in summary.splitlines() if "exit status" in line]
    assert len(statuses) == 6 and all("exit status 0" in s for s in statuses), statuses
    for section in ("1. ", "2. ", "2d. ", "2b. ", "3. ", "5. ", "done"):
        assert f"== {section}" in summary, section
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8 and {"moe_layer.json", "grok1_slice.json", "profile.md",
                                "grok1_slice_int4.json", "measured.json"} <= set(files), files
    # the int8 slice checked against dense; the int4 one through tokamax where installed
    from grok.kernels.measured import tokamax_installed
    slices = {name: json.loads((tmp_path / name).read_text())
              for name in ("grok1_slice.json", "grok1_slice_int4.json")}
    assert {r["moe_impl"] for r in slices["grok1_slice.json"]["steps_check"]} == {"auto"}
    assert {r["moe_impl"] for r in slices["grok1_slice_int4.json"]["steps"]} == \
        ({"tokamax"} if tokamax_installed() else set())
    assert all(s["copy_gb_s"] > 0 and s["matmul_tflop_s"] > 0 for s in slices.values())
    assert slices["grok1_slice_int4.json"]["config"].endswith("-int4-g32")
    if not tokamax_installed():
        assert "moe_impl=tokamax skipped" in summary
    assert "layers unrolled" in summary and "| w1+wv |" in summary
    # the versions it ran, and the slices as entries of "auto"'s table (int8 and int4 classes)
    assert "jax " in summary and "jaxlib " in summary
    from grok.kernels import measured
    entries = measured.load_table(tmp_path / "measured.json")
    assert {e.shape for e in entries} >= {"decode", "prefill"}
    assert all(e.device == "cpu" and dict(e.ms) for e in entries)
