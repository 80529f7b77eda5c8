"""The MoE kernels per device on a mesh (8 virtual CPU devices, kernels interpreted): the
tensor and expert layouts give the one-device results, through shard_map."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np, jax
    sys.path.insert(0, "tests")
    from conftest import tiny_config
    import grok.moe_mesh
    from grok import sharding as sh
    from grok.api import Grok, device_params
    from grok.engine import ModelRunner
    from grok.params import random_flat

    calls = []
    real = grok.moe_mesh.grouped_mlp
    grok.moe_mesh.grouped_mlp = lambda *a, **k: calls.append(1) or real(*a, **k)
    # F = 176: split 8 ways, 22 rows per device lie inside one of w2's 4 scale blocks of 44
    config = tiny_config(emb_size=64, num_experts=8, widening_factor=4.0, scale_blocks=4)
    params = device_params(random_flat(config, seed=1, weight_scale=1.5), config, True)
    tokens = np.array([[5, 9, 17, 33, 40, 2, 7, 11], [3, 4, 8, 0, 0, 0, 0, 0]])
    prompts = [[5, 9, 17, 33], [3, 4, 8]]
    one = Grok(params, config, None, "pallas", 2)
    out = {"ref": one.runner.logits(tokens).tolist(),
           "ref_greedy": one.generate(prompts, max_new_tokens=3)}
    for shape, layout in [((1, 8), "tensor"), ((1, 4), "tensor"), ((1, 8), "expert"),
                          ((2, 4), "tensor")]:
        mesh = sh.make_mesh(shape, jax.devices()[: shape[0] * shape[1]])
        p = jax.device_put(params, sh.params_shardings(params, mesh, config, layout))
        calls.clear()
        m = Grok(p, config, None, "pallas", 2, mesh=mesh)
        plan = m.runner.mesh_kernel
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
                        "plan": runner.mesh_kernel.layout}
    json.dump(out, open(sys.argv[1], "w"))
""")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe_mesh") / "out.json"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(path.read_text())


@pytest.mark.parametrize("case,plan", [("(1, 8) tensor", ["tensor", True]),
                                       ("(1, 4) tensor", ["tensor", False]),
                                       ("(1, 8) expert", ["expert", False])])
def test_kernels_run_per_device_and_match_one_device(results, case, plan):
    """Each layout's plan (8-way tensor: w2's scale blocks taken per device), the kernels traced
    through shard_map, and logits and greedy tokens as on one device."""
    import numpy as np
    got = results[case]
    assert got["plan"] == plan and got["calls"] > 0
    ref = np.asarray(results["ref"])
    np.testing.assert_allclose(np.asarray(got["logits"]), ref, rtol=0,
                               atol=1e-4 * np.abs(ref).max())
    assert got["greedy"] == results["ref_greedy"]


def test_weights_split_over_data_stay_with_xla(results):
    """The tensor layout on a (2, 4) mesh splits the experts' rows over "data" too: no plan,
    the XLA-partitioned evaluation, the same logits up to bfloat16 rounding."""
    import numpy as np
    got = results["(2, 4) tensor"]
    assert got["plan"] is None and got["calls"] == 0
    ref = np.asarray(results["ref"])   # XLA partitions the sums differently: bf16-level changes
    np.testing.assert_allclose(np.asarray(got["logits"]), ref, rtol=0,
                               atol=2e-3 * np.abs(ref).max())


def test_unstacked_layers_too(results):
    import numpy as np
    got = results["unstacked"]
    assert got["plan"] == "tensor" and got["calls"] > 0
    ref = np.asarray(results["ref"])
    np.testing.assert_allclose(np.asarray(got["logits"]), ref, rtol=0,
                               atol=1e-4 * np.abs(ref).max())
