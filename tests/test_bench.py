"""`python -m grok.bench` end to end on a tiny config."""
from __future__ import annotations

import json

from grok import bench


def test_bench_tiny_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench.json"
    rc = bench.main(["--preset", "tiny", "--batches", "1", "--prompt-len", "8",
                     "--new-tokens", "3", "--prefill-len", "16", "--repeats", "1", "--steps",
                     "--check", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| moe_impl | batch | prefill tok/s" in text and "of roofline" in text
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["engine"]] == [1]
    assert all(r["rel_err"] < 1e-2 for r in result["check"])
    assert {r["phase"] for r in result["steps"]} == {"prefill 16", "decode"}


def test_roofline_bytes_count_chosen_experts():
    config = bench.PRESETS["tiny"]
    assert bench.expected_experts(config, 1) == config.num_selected_experts
    assert bench.expected_experts(config, 1000) > config.num_experts - 1e-6
