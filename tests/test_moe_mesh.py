"""The MoE kernels per device on a mesh (8 virtual CPU devices): our Pallas kernels (interpreted)
and tokamax's ragged dot (its XLA implementation), int8 and int4, in the tensor and expert
layouts, give the one-device results, through shard_map."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import cpu_devices_env
from precision import (assert_rows_within, flat_route_bound, greedy_gap, near_tie_rows,
                       trusted_steps)

ROOT = Path(__file__).resolve().parents[1]
# F = 176: split 8 ways, 22 rows per device lie inside one of w2's 4 scale blocks of 44
CONFIG = dict(emb_size=64, num_experts=8, widening_factor=4.0, scale_blocks=4)
TOKENS = [[5, 9, 17, 33, 40, 2, 7, 11], [3, 4, 8, 0, 0, 0, 0, 0]]
SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np, jax, jax.numpy as jnp
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    from precision import top2_gaps
    import grok.parallel.mesh_kernels
    from grok.parallel import rules as sh
    from grok.api import Grok, device_params
    from grok.serving.engine import ModelRunner
    from grok.leaves import random_flat

    calls = []
    real = grok.parallel.mesh_kernels.grouped_mlp
    grok.parallel.mesh_kernels.grouped_mlp = lambda *a, **k: calls.append(1) or real(*a, **k)
    config = tiny_config(**json.loads(sys.argv[2]))
    params = device_params(random_flat(config, seed=1, weight_scale=1.5), config, True)
    tokens = np.array(json.loads(sys.argv[3]))
    prompts = [[5, 9, 17, 33], [3, 4, 8]]
    one = Grok(params, config, None, "pallas", 2)
    out = {"ref": one.runner.logits(tokens).tolist(),
           "ref_greedy": one.generate(prompts, max_new_tokens=3)}
    # each greedy step's top-2 logit gap (full recompute): near-ties may legitimately differ
    seqs = [p + g for p, g in zip(prompts, out["ref_greedy"])]
    full = one.logits(seqs)
    out["ref_gaps"] = [top2_gaps(full[i, len(p) - 1:len(p) - 1 + len(g)]).tolist()
                       for i, (p, g) in enumerate(zip(prompts, out["ref_greedy"]))]
    for shape, layout in [((1, 8), "tensor"), ((1, 4), "tensor"), ((1, 8), "expert"),
                          ((2, 4), "tensor")]:
        mesh = sh.make_mesh(shape, jax.devices()[: shape[0] * shape[1]])
        p = jax.device_put(params, sh.params_shardings(params, mesh, config, layout))
        calls.clear()
        m = Grok(p, config, None, "pallas", 2, mesh=mesh)
        plan = m.runner.plan.mesh_kernel
        out[f"{shape} {layout}"] = {
            "plan": plan and [plan.layout, plan.slice_w2_scales],
            "logits": m.runner.logits(tokens).tolist(),
            "greedy": m.generate(prompts, max_new_tokens=3),
            "calls": len(calls)}
    # the unrolled model's per-layer (unstacked) weights
    flat_params = device_params(random_flat(config, seed=1, weight_scale=1.5), config, False)
    mesh = sh.make_mesh((1, 4), jax.devices()[:4])
    p = jax.device_put(flat_params, sh.params_shardings(flat_params, mesh, config, "tensor"))
    calls.clear()
    runner = ModelRunner(p, config, moe_impl="pallas", mesh=mesh)
    out["unstacked"] = {"logits": runner.logits(tokens).tolist(), "calls": len(calls),
                        "plan": runner.plan.mesh_kernel.layout}
    # a planted bug: device 3's partial product left out of the psum over "model"
    def dropped(plan, mlp, *a, **k):
        def partial(*b, **kw):
            return jnp.where(jax.lax.axis_index("model") == 3, 0.0, mlp(*b, **kw))
        return real(plan, partial, *a, **k)
    grok.parallel.mesh_kernels.grouped_mlp = dropped
    mesh = sh.make_mesh((1, 8), jax.devices()[:8])
    p = jax.device_put(params, sh.params_shardings(params, mesh, config, "tensor"))
    out["dropped_partial"] = Grok(p, config, None, "pallas", 2, mesh=mesh).runner.logits(
        tokens).tolist()
    json.dump(out, open(sys.argv[1], "w"))
""")


# tokamax per device, (config changes, meshes): int8 (w2's 4 scale blocks taken per device when
# its rows split 8 ways) and int4 with groups that split with the rows (F = 176: 8 groups of 22)
# or are taken per device (2 groups of 88); expert layout with 2 and 1 experts per device.
TOKAMAX_CASES = {
    "int8": ({}, [((1, 8), "tensor"), ((1, 4), "expert")]),
    "int4 g22": (dict(weight_bits=4, group_size=22), [((1, 4), "tensor"), ((1, 8), "expert")]),
    "int4 g88": (dict(weight_bits=4, group_size=88), [((1, 8), "tensor")])}
TOKAMAX_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np, jax
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    import grok.parallel.mesh_kernels as mesh_kernels
    from grok.parallel import rules as sh
    from grok.api import Grok, device_params
    from grok.leaves import random_flat

    calls = []
    real = mesh_kernels.ragged_mlp
    mesh_kernels.ragged_mlp = lambda *a, **k: calls.append(1) or real(*a, **k)
    tokens = np.array(json.loads(sys.argv[3]))
    out = {}
    for name, (extra, meshes) in json.loads(sys.argv[4]).items():
        config = tiny_config(**json.loads(sys.argv[2]), **extra)
        params = device_params(random_flat(config, seed=1, weight_scale=1.5), config, True)
        out[name] = {"ref": Grok(params, config, None, "grouped", 2).runner.logits(tokens).tolist()}
        for shape, layout in meshes:
            mesh = sh.make_mesh(shape, jax.devices()[: shape[0] * shape[1]])
            p = jax.device_put(params, sh.params_shardings(params, mesh, config, layout))
            calls.clear()
            m = Grok(p, config, None, "tokamax", 2, mesh=mesh)
            plan = m.runner.plan.mesh_kernel
            out[name][f"{tuple(shape)} {layout}"] = {
                "plan": plan and [plan.layout, plan.slice_w2_scales],
                "logits": m.runner.logits(tokens).tolist(), "calls": len(calls)}
    json.dump(out, open(sys.argv[1], "w"))
""")


def _run(script, tmp_path_factory, *args):
    path = tmp_path_factory.mktemp("moe_mesh") / "out.json"
    done = subprocess.run([sys.executable, "-c", script, str(path), json.dumps(CONFIG),
                           json.dumps(TOKENS), *map(json.dumps, args)], cwd=ROOT,
                          env=cpu_devices_env(8),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return _run(SCRIPT, tmp_path_factory)


@pytest.fixture(scope="module")
def tokamax_results(tmp_path_factory):
    pytest.importorskip("tokamax", reason="tokamax not installed (pip install 'grok[kernels]')")
    return _run(TOKAMAX_SCRIPT, tmp_path_factory, TOKAMAX_CASES)


@pytest.fixture(scope="module")
def bound():
    """Per-logit bound for two correct evaluations (precision.logits_route_bound) and the rows
    whose routing is near a tie in the float64 oracle (they may move as a whole)."""
    from conftest import tiny_config
    from grok.leaves import random_flat
    from oracle import oracle_forward
    config = tiny_config(**CONFIG)
    flat = random_flat(config, seed=1, weight_scale=1.5)
    _, routing = oracle_forward(flat, config, np.asarray(TOKENS))
    return flat_route_bound(flat, config), near_tie_rows(routing.margin)


def _check(results, bound, case, what):
    """Logits as on one device within the route bound (rows with a routing near-tie excepted)."""
    per_logit, near_tie = bound
    got, ref = np.asarray(results[case]["logits"]), np.asarray(results["ref"])
    real = np.asarray(TOKENS) > 0
    ratio = np.max(np.abs(got - ref)[real] / per_logit, axis=-1)     # per row, in bounds
    assert_rows_within(ratio, 1.0, near_tie[real], what)


@pytest.mark.parametrize("case,plan", [("(1, 8) tensor", ["tensor", True]),
                                       ("(1, 4) tensor", ["tensor", False]),
                                       ("(1, 8) expert", ["expert", False])])
def test_kernels_run_per_device_and_match_one_device(results, bound, case, plan):
    """Each layout's plan (8-way tensor: w2's scale blocks taken per device), the kernels traced
    through shard_map, and logits and greedy tokens as on one device."""
    got = results[case]
    assert got["plan"] == plan and got["calls"] > 0
    # partial products summed in another order by the psum: bfloat16 flips, within the bound
    _check(results, bound, case, f"moe_mesh {case} vs one device")
    # greedy tokens equal up to a step whose top-2 gap the bound could close
    min_gap, checked = greedy_gap(bound[0]), 0
    for ours, ref, gaps in zip(got["greedy"], results["ref_greedy"], results["ref_gaps"]):
        steps = trusted_steps(gaps, min_gap=min_gap)
        assert ours[:steps] == ref[:steps], (ours, ref, gaps, min_gap)
        checked += steps
    assert checked >= 3, results["ref_gaps"]


def test_weights_split_over_data_stay_with_xla(results, bound):
    """The tensor layout on a (2, 4) mesh splits the experts' rows over "data" too: no plan,
    the XLA-partitioned evaluation, the same logits up to bfloat16 rounding."""
    got = results["(2, 4) tensor"]
    assert got["plan"] is None and got["calls"] == 0
    _check(results, bound, "(2, 4) tensor", "moe_mesh (2, 4) tensor (XLA) vs one device")


def test_unstacked_layers_too(results, bound):
    got = results["unstacked"]
    assert got["plan"] == "tensor" and got["calls"] > 0
    _check(results, bound, "unstacked", "moe_mesh unstacked vs one device")


def test_planted_bug_dropped_partial_sum_is_caught(results, bound):
    """The same check fails when one device's partial product is left out of the psum."""
    with pytest.raises(AssertionError):
        _check({**results, "bug": {"logits": results["dropped_partial"]}}, bound, "bug",
               "moe_mesh planted bug: device 3's partial dropped")


@pytest.mark.parametrize("case", list(TOKAMAX_CASES))
def test_tokamax_runs_per_device_and_matches_one_device(tokamax_results, case):
    """moe_impl="tokamax" on a mesh: a per-device plan for int8 and int4 weights alike (w2's
    scales taken per device where its rows split finer than its scale groups), tokamax's ragged
    dot under shard_map, and the logits of XLA's grouped path on one device within the route
    bound (the partial products are summed in another order by the psum)."""
    from conftest import tiny_config
    from grok.leaves import random_flat
    from oracle import oracle_forward
    changes, meshes = TOKAMAX_CASES[case]
    config = tiny_config(**CONFIG, **changes)
    flat = random_flat(config, seed=1, weight_scale=1.5)
    _, routing = oracle_forward(flat, config, np.asarray(TOKENS))
    bound = (flat_route_bound(flat, config), near_tie_rows(routing.margin))
    got = tokamax_results[case]
    w2_blocks = {"int8": 4, "int4 g22": 8, "int4 g88": 2}[case]   # F = 176 rows of w2
    for shape, layout in meshes:
        name = f"{tuple(shape)} {layout}"
        # split with the rows when each device gets whole blocks, else one taken per device
        expect = [layout, layout == "tensor" and w2_blocks < shape[1]]
        assert got[name]["plan"] == expect and got[name]["calls"] > 0, (name, got[name]["plan"])
        _check({**got, "ref": got["ref"]}, bound, name, f"tokamax {case} {name} vs one device")
