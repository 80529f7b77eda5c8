"""The "tokamax" MoE evaluation (grok.kernels.tokamax_moe: `tokamax.ragged_dot` over qwix QArrays
made from our int8 and int4 weights) on CPU, where tokamax's XLA implementation runs: pinned to
the dense reference on fixed routing, and the execution plan's choice of it (explicit, "auto"
from the table of measured results, and a clear error without the package)."""
from __future__ import annotations

import dataclasses
import json
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from grok.errors import GrokError
from grok.kernels import measured, tokamax_moe
from grok.kernels.plan import ExecutionPlan, resolve_plan
from grok.model.moe import moe
from grok.parallel.mesh_kernels import MeshKernel
from grok.quant import (INT4, LayerSlice, QuantizedWeight, dequantize, qeinsum, quantize,
                        quantize_int4)

from conftest import tiny_config
from precision import (assert_within, dot_bound, flat_route_bound, gamma, greedy_gap,
                       moe_route_bound, top2_gaps, trusted_steps)

needs_tokamax = pytest.mark.skipif(not measured.tokamax_installed(),
                                   reason="tokamax not installed (pip install 'grok[kernels]')")


def _weights(rng, layers, experts, d, f, fmt):
    """Stacked [L, E, In, Out] weights for w1, wv (one scale block) and w2 (four; int4: groups
    of 8 rows), quantised to `fmt`."""
    def one(shape, blocks):
        w = rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[-2])
        q = quantize(w, blocks) if fmt == "int8" else quantize_int4(w, shape[-2] // blocks)
        return QuantizedWeight(jnp.asarray(q.weight), jnp.asarray(q.scales), q.fmt)
    return (one((layers, experts, d, f), 1), one((layers, experts, d, f), 2),
            one((layers, experts, f, d), 4))


def _routing(rng, n, experts, k):
    probs = jax.nn.softmax(jnp.asarray(rng.standard_normal((n, experts)), jnp.float32))
    return jax.lax.top_k(probs, k)


@needs_tokamax
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_tokamax_moe_equals_dense(fmt):
    """A decode step of batch 1 and a prefill of 40 tokens: layer 1 of a 2-layer stack, traced
    (int8: read in place as L*E groups; int4: its slice converted), and the same layer's
    unstacked weights, against the dense reference on the same routing. On CPU both paths
    dequantise the weights exactly in float32 and take float32 dots of the same bfloat16 inputs:
    they differ only in float32 summation order and, where a rounding point is that close, the
    hidden layer's bfloat16 rounding; precision.moe_route_bound bounds exactly that."""
    experts, k, d, f, layer = 4, 2, 32, 48, 1
    w1, wv, w2 = _weights(np.random.default_rng(0), 2, experts, d, f, fmt)
    f64 = [dequantize(w[layer], np.float64) for w in (w1, wv, w2)]
    stacked = jax.jit(lambda x, g, c, a, b, e, i: moe(x, g, c, a, b, e, resolve_plan("tokamax"),
                                                      layer=i))
    alone = jax.jit(lambda x, g, c, a, b, e: moe(x, g, c, a, b, e, resolve_plan("tokamax")))
    dense = jax.jit(lambda x, g, c, a, b, e: moe(x, g, c, a, b, e, resolve_plan("dense")))
    for n in (1, 40):
        rng = np.random.default_rng(n)
        x = jnp.asarray(rng.standard_normal((n, d)), jnp.bfloat16)
        gates, chosen = _routing(rng, n, experts, k)
        sliced = (w1[layer], wv[layer], w2[layer])
        ref = dense(x, gates, chosen, *sliced)
        bound = moe_route_bound(np.asarray(x, np.float64), gates, chosen, *f64,
                                blocks=w2.scale_blocks)
        assert_within(stacked(x, gates, chosen, w1, wv, w2, jnp.int32(layer)), ref, bound,
                      f"moe tokamax {fmt} stacked vs dense (n={n})")
        assert_within(alone(x, gates, chosen, *sliced), ref, bound,
                      f"moe tokamax {fmt} unstacked vs dense (n={n})")


@needs_tokamax
def test_int4_converts_only_the_experts_with_rows():
    """A decode step of one token (2 of 4 experts chosen) converts 2 experts of each int4 weight
    to jax's int4 type, not the layer's 4: the program holds int4 arrays of 2 experts only."""
    experts, d, f = 4, 32, 48
    w1, wv, w2 = _weights(np.random.default_rng(5), 2, experts, d, f, "int4")
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.standard_normal((1, d)), jnp.bfloat16)
    gates, chosen = _routing(rng, 1, experts, 2)
    step = jax.jit(lambda x, g, c, a, b, e: moe(x, g, c, a, b, e, resolve_plan("tokamax"),
                                                layer=jnp.int32(1)))
    text = step.lower(x, gates, chosen, w1, wv, w2).as_text()
    converted = set(re.findall(r"tensor<(\d+)x(?:32x48|48x32)xi4>", text))
    assert converted == {"2"}, converted


@needs_tokamax
def test_tokamax_projections_read_the_layer_in_place():
    """Decode-time projections through tokamax (the stack [L, In, Out] as L groups, the layer's
    the only one with rows) against qeinsum on the slice: exact float32 weights both, so only
    float32 order differs (gamma_In |x| |w|, two evaluations)."""
    rng = np.random.default_rng(2)
    q = quantize(rng.standard_normal((3, 64, 40)).astype(np.float32), 4)
    stack = QuantizedWeight(jnp.asarray(q.weight), jnp.asarray(q.scales))
    x = jnp.asarray(rng.standard_normal((2, 1, 64)), jnp.bfloat16)
    plan = resolve_plan("tokamax")
    assert plan.projections and plan.projection_kernel == "tokamax"
    got = plan.linear_kernel(x, [LayerSlice(stack, jnp.int32(2))], jnp.float32)[0]
    want = qeinsum("...i,io->...o", x, stack[2], plan)
    bound = dot_bound(np.abs(np.asarray(x, np.float64)), np.abs(dequantize(stack[2], np.float64)),
                      64, routes=2)
    assert_within(got, want, bound, "tokamax projection vs qeinsum")
    int4 = quantize_int4(np.asarray(dequantize(stack)), 16)
    assert plan.linear_kernel(x, [LayerSlice(int4, jnp.int32(0))], jnp.float32) is None


def _refusal_case():
    rng = np.random.default_rng(3)
    q = quantize(rng.standard_normal((2, 4, 32, 16)).astype(np.float32), 2)
    w = QuantizedWeight(jnp.asarray(q.weight), jnp.asarray(q.scales))
    x = jnp.asarray(rng.standard_normal((3, 32)), jnp.bfloat16)
    counts, layer = jnp.array([1, 0, 2, 0]), jnp.int32(1)
    want = tokamax_moe.ragged_dot(x, w, counts, layer, implementation=("xla",), widen=True)
    experts = np.repeat(np.arange(4), np.asarray(counts))
    w_abs = np.abs(dequantize(w[1], np.float64))[experts]                 # [3, 32, 16]
    # two float32 sums of the same 32 exact products: each within gamma_32 of their |terms|
    bound = 2 * gamma(32) * np.einsum("nk,nko->no", np.abs(np.asarray(x, np.float64)), w_abs)
    return x, w, counts, layer, want, bound


@needs_tokamax
@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_a_kernel_that_refuses_the_device_falls_back_to_xla_with_a_warning(backend):
    """A forced moe_impl="tokamax" planned for a GPU (Mosaic GPU) or a TPU (Mosaic TPU) and run
    where that kernel does not exist (this CPU): tokamax's device check, kept on, refuses; the
    call warns once and runs tokamax's XLA implementation on the layer's slice, giving what the
    XLA path gives on the stack in place (float32 order apart). No crash, whatever tokamax's
    version says the refusal with."""
    impls = resolve_plan("tokamax", backend=backend).tokamax_impls
    assert impls == (f"mosaic_{backend}",)
    x, w, counts, layer, want, bound = _refusal_case()
    with pytest.warns(RuntimeWarning, match="its XLA path runs instead") as caught:
        got = tokamax_moe.ragged_dot(x, w, counts, layer, implementation=impls, widen=True)
    assert len([c for c in caught if "XLA path" in str(c.message)]) == 1
    assert_within(got, want, bound, f"tokamax {impls} fallback vs xla")


@needs_tokamax
@pytest.mark.parametrize("error", [NotImplementedError, ValueError])
def test_a_kernel_refusal_of_either_kind_falls_back(monkeypatch, error):
    """tokamax 0.0.12 refuses with NotImplementedError; 0.0.17's TPU heuristics raise
    ValueError ("Unsupported TPU device kind: NVIDIA H100 ..."): both warn and run XLA."""
    tokamax = tokamax_moe.load()
    real = tokamax.ragged_dot

    def refusing(*args, implementation, **kwargs):
        if implementation not in ("xla", ("xla",)):
            raise error("Unsupported TPU device kind: NVIDIA H100 80GB HBM3")
        return real(*args, implementation=implementation, **kwargs)
    monkeypatch.setattr(tokamax, "ragged_dot", refusing)
    x, w, counts, layer, want, bound = _refusal_case()
    with pytest.warns(RuntimeWarning, match=f"{error.__name__}: Unsupported TPU device kind"):
        got = tokamax_moe.ragged_dot(x, w, counts, layer, implementation=("mosaic_gpu",),
                                     widen=True)
    assert_within(got, want, bound, "tokamax fallback vs xla")


@needs_tokamax
def test_model_through_the_api_with_tokamax_matches_grouped():
    """The whole tiny model (scanned layers: the MoE reads each layer in place; the decode
    step's projections through tokamax) gives grouped's logits within the bound between two
    correct evaluations of the model, and its greedy tokens up to a step whose top-2 gap that
    bound could close."""
    import grok
    from grok.leaves import random_flat
    config = tiny_config(num_layers=2)
    flat = random_flat(config, seed=3)
    ref_model = grok.from_flat(flat, config, moe_impl="grouped")
    model = grok.from_flat(flat, config, moe_impl="tokamax")
    assert model.runner.plan.moe == "tokamax"
    tokens = [[5, 9, 3, 17, 22, 8, 1, 30]]
    bound = flat_route_bound(flat, config)
    assert_within(model.logits(tokens), ref_model.logits(tokens), bound,
                  "model tokamax vs grouped logits")
    got = model.generate([[5, 9, 3]], max_new_tokens=2)[0]
    seq = ([5, 9, 3] + got + tokens[0])[:len(tokens[0])]   # causal: the tail changes nothing
    ref = ref_model.logits([seq])[0, 2:2 + len(got)]         # (same shape: no new compile)
    steps = trusted_steps(top2_gaps(ref), min_gap=greedy_gap(bound))
    assert got[:steps] == list(np.argmax(ref, axis=-1)[:steps]) and steps >= 1


def test_plan_resolves_tokamax_and_auto_keeps_cpu_on_xla():
    ws = [QuantizedWeight(jnp.zeros((4, 32, 16), jnp.int8), jnp.ones((4, 1, 16), jnp.bfloat16))]
    int4 = [QuantizedWeight(jnp.zeros((4, 16, 16), jnp.uint8), jnp.ones((4, 2, 16)), INT4)]
    if measured.tokamax_installed():
        plan = resolve_plan("tokamax")
        assert (plan.moe, plan.projections, plan.tokamax_impls) == ("tokamax", True, ("xla",))
        assert plan.moe_path(2, *ws * 3) == "tokamax" and plan.moe_path(2, *int4 * 3) == "tokamax"
        assert resolve_plan("tokamax", backend="gpu").tokamax_impls == ("mosaic_gpu",)
        assert resolve_plan("tokamax", backend="tpu").tokamax_impls == ("mosaic_tpu",)
    cpu = resolve_plan("auto", backend="cpu")            # the CPU default does not change
    assert cpu.moe == "grouped" and cpu.moe_path(2, *ws * 3) == "grouped"
    # "auto" on a GPU: the table's kernel per shape class; tokamax needs quantised weights
    gpu = ExecutionPlan(backend="gpu", moe="auto", auto_kernels=(
        ("decode", "tokamax"), ("prefill", "pallas"), ("decode int4", "tokamax")))
    assert gpu.moe_path(2, *ws * 3) == "tokamax" and gpu.projection_kernel == "tokamax"
    assert gpu.moe_path(2, *int4 * 3) == "tokamax"          # int4's own class
    assert gpu.moe_path(4096, *int4 * 3) == "grouped"       # a class the table leaves out
    assert gpu.moe_path(2, *[jnp.zeros((4, 32, 16))] * 3) == "grouped"
    assert gpu.moe_path(4096, *ws * 3) == "pallas"
    assert ExecutionPlan(backend="gpu", moe="auto").projection_kernel == "pallas"
    # on a mesh too (per device, grok.parallel.mesh_kernels), never falling back to Triton
    meshed = dataclasses.replace(gpu, mesh_kernel=MeshKernel(None, "expert", ((P(), P()),) * 3,
                                                             False))
    assert meshed.moe_path(2, *ws * 3) == "tokamax" and meshed.moe_path(2, *int4 * 3) == "tokamax"


H100 = "NVIDIA H100 80GB HBM3"


def _kernels(toolchain, table=None):
    return {c.shape: c.kernel for c in measured.decide(toolchain, table)}


@pytest.mark.parametrize("jax_version,triton", [("0.10.2", True), ("0.11.2", True),
                                                ("0.12.0.1", True), ("0.13.0", False)])
@pytest.mark.parametrize("tokamax", [False, True])
def test_auto_takes_the_measured_winner_on_every_jax(jax_version, triton, tokamax):
    """The shipped table (an H100, jax 0.11.2: our Triton kernels 2.4-2.9x faster than XLA;
    tokamax never measured): on an H100, before and after JAX 0.11, with tokamax installed or
    not, "auto" takes our kernels where this JAX has the Triton backend and XLA's grouped path
    where it has not; never the unmeasured tokamax; int4 (unmeasured) takes XLA."""
    choices = measured.decide(measured.Toolchain("gpu", H100, jax_version, tokamax, triton))
    kernels = {c.shape: c.kernel for c in choices}
    want = "pallas" if triton else "grouped"
    assert kernels == {"decode": want, "prefill": want, "decode int4": "grouped",
                       "prefill int4": "grouped"}
    reasons = {c.shape: c.reason for c in choices}
    assert "7.04" in reasons["decode"] and "2026-11-26" in reasons["decode"]
    assert "tokamax not measured" in reasons["decode"]
    if not triton:
        assert "no Pallas Triton backend" in reasons["decode"]


def test_auto_elsewhere_takes_xla_until_measured():
    """CPU, TPU and a GPU that is not NVIDIA's: XLA's grouped path (nothing measured there),
    whatever is installed; another NVIDIA card takes the H100's measured winner and says so."""
    for tc in (measured.Toolchain("cpu", "cpu", "0.12.0.1", True, True),
               measured.Toolchain("tpu", "TPU v5 lite", "0.12.0.1", True, False),
               measured.Toolchain("gpu", "AMD Instinct MI300X", "0.12.0.1", True, True)):
        assert set(_kernels(tc).values()) == {"grouped"}, tc
    a100 = measured.decide(measured.Toolchain("gpu", "NVIDIA A100-SXM4-80GB", "0.12.0.1",
                                              True, True))
    assert a100[0].kernel == "pallas" and "measured on H100, not on this card" in a100[0].reason
    assert measured.card_name(H100) == "H100"
    assert measured.card_name("NVIDIA A100-SXM4-80GB") == "A100"


def test_resolve_plan_on_jax_012_with_tokamax_picks_the_measured_winner():
    """The issue's case: jax 0.12, tokamax installed, an H100: "auto" is our kernels (MoE and
    decode projections), with the reason in the plan's description (logged at load)."""
    tc = measured.Toolchain("gpu", H100, "0.12.0.1", tokamax=True, triton=True)
    plan = resolve_plan("auto", backend="gpu", toolchain=tc)
    assert dict(plan.auto_kernels)["decode"] == "pallas" and plan.projection_kernel == "pallas"
    assert plan.projections
    text = "\n".join(plan.describe())
    assert "auto, decode: NVIDIA H100 80GB HBM3 (jax 0.12.0.1): pallas, 7.041 ms" in text
    assert "mosaic" not in text


def test_shape_classes_and_the_table_file():
    assert measured.shape_class(64) == "decode" and measured.shape_class(1024) == "prefill"
    assert measured.shape_class(64, bits=4) == "decode int4"
    for entry in measured.MEASURED:   # every entry says where, when and on what it was measured
        assert entry.card and entry.date and entry.jax and entry.shape in measured.SHAPE_CLASSES
        assert measured.entry_from_json(measured.entry_to_json(entry)) == entry


def test_a_measurement_with_tokamax_decides(tmp_path):
    """A run that measured tokamax decides for its card, shape class and the JAX minor version
    closest to it; tokamax only where installed, else that run's next fastest."""
    old = measured.Measured("H200", "0.11.1", "decode", "2027-01-01",
                            (("tokamax", 5.0), ("pallas", 4.0), ("grouped", 9.0)))
    new = measured.Measured("H200", "0.12.0", "decode", "2027-02-01",
                            (("tokamax", 3.0), ("pallas", 4.0), ("grouped", 9.0)))
    int4 = measured.Measured("H200", "0.12.0", "decode int4", "2027-02-01",
                             (("tokamax", 3.0), ("grouped", 4.0)))
    file = tmp_path / "measured.json"
    file.write_text(json.dumps({"entries": [measured.entry_to_json(e)
                                            for e in (old, new, int4)]}))
    table = measured.load_table(file)
    h200 = lambda version, tokamax: measured.Toolchain("gpu", "NVIDIA H200", version, tokamax,
                                                       True)
    assert _kernels(h200("0.11.3", True), table)["decode"] == "pallas"     # same minor: old
    assert _kernels(h200("0.12.0.1", True), table)["decode"] == "tokamax"  # same minor: new
    assert _kernels(h200("0.13.0", True), table)["decode"] == "tokamax"    # newest
    assert _kernels(h200("0.12.0.1", False), table)["decode"] == "pallas"
    assert _kernels(h200("0.12.0.1", True), table)["decode int4"] == "tokamax"
    assert _kernels(h200("0.12.0.1", False), table)["decode int4"] == "grouped"
    assert _kernels(h200("0.12.0.1", True), table)["prefill"] == "grouped"  # not measured


def test_missing_tokamax_is_one_line_naming_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "tokamax", None)     # `import tokamax` now fails
    tokamax_moe.load.cache_clear()
    try:
        with pytest.raises(GrokError, match="needs the tokamax package") as err:
            resolve_plan("tokamax")
        assert "\n" not in str(err.value) and "grok[kernels]" in str(err.value)
    finally:
        tokamax_moe.load.cache_clear()
