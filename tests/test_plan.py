"""The execution plan (grok.kernels.plan): resolved once from backend, mesh, weights and moe_impl;
the model's kernel-or-reference branches ask it and nothing else."""
from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest

from grok.errors import GrokError
from grok.kernels.plan import ExecutionPlan, backend_report, block_rows_for, resolve_plan
from grok.quant import LayerSlice, QuantizedWeight, quantize


def _stack(rows=64, cols=128, layers=2, blocks=1):
    q = quantize(np.random.default_rng(0).standard_normal((layers, rows, cols)), blocks)
    return QuantizedWeight(jnp.asarray(q.weight), jnp.asarray(q.scales))


def test_backends_resolve_to_their_paths():
    cpu, gpu, tpu = (resolve_plan("auto", backend=b) for b in ("cpu", "gpu", "tpu"))
    assert (cpu.moe, cpu.projections, cpu.interpret, cpu.widen_dots) == \
        ("grouped", False, True, True)
    assert (gpu.moe, gpu.projections, gpu.interpret, gpu.widen_dots) == ("auto", True, False, False)
    assert (tpu.moe, tpu.projections, tpu.interpret) == ("grouped", False, True)
    assert cpu.embedding_dtype == jnp.float32 and gpu.embedding_dtype == jnp.bfloat16
    assert not cpu.scales_after_dot and gpu.scales_after_dot and tpu.scales_after_dot
    forced = resolve_plan("pallas", backend="cpu")       # the kernels, interpreted (tests)
    assert (forced.moe, forced.projections, forced.interpret) == ("pallas", True, True)


def test_a_multi_device_mesh_keeps_the_projections_off_the_kernel():
    """GSPMD would gather sharded weights for a custom call; without a per-device layout the
    MoE falls back to XLA's grouped path too."""
    mesh = types.SimpleNamespace(devices=np.empty(8))
    plan = resolve_plan("auto", backend="gpu", mesh=mesh)     # no params: no per-device plan
    assert plan.projections is False and plan.moe == "auto"
    one = types.SimpleNamespace(devices=np.empty(1))
    assert resolve_plan("auto", backend="gpu", mesh=one).projections is True


def test_bad_settings_are_refused_in_one_line():
    with pytest.raises(GrokError, match="moe_impl must be one of"):
        resolve_plan("fast")
    for bad in (0, -1, False, 1.5):
        with pytest.raises(GrokError, match="unroll must be"):
            resolve_plan(unroll=bad)
    assert resolve_plan(unroll=True).unroll is True


def test_linear_kernel_is_taken_for_few_rows_of_layer_slices_only():
    stack = _stack()
    sliced = [LayerSlice(stack, jnp.int32(1))]
    plan = ExecutionPlan(moe="pallas", projections=True)
    assert plan.linear_kernel(jnp.zeros((1, 64), jnp.bfloat16), sliced, jnp.float32) is not None
    assert plan.linear_kernel(jnp.zeros((65, 64), jnp.bfloat16), sliced, jnp.float32) is None
    assert plan.linear_kernel(jnp.zeros((1, 64), jnp.bfloat16), [stack[1]], jnp.float32) is None
    assert ExecutionPlan().linear_kernel(jnp.zeros((1, 64), jnp.bfloat16), sliced,
                                         jnp.float32) is None


def test_block_rows_follow_the_rows_per_expert():
    assert block_rows_for(2, 8) == 8 and block_rows_for(2, 8, "pallas") == 16   # decoding floor
    assert block_rows_for(4096, 8) == 128 and block_rows_for(4096, 8, "pallas") == 64   # caps
    assert block_rows_for(8 * 40, 8) == 64                   # 40 rows an expert -> 64


def test_backend_report_names_devices_and_an_unused_accelerator(tmp_path):
    """The line -v logs names JAX's backend and devices; a machine with an accelerator's device
    file (faked here) whose JAX runs on the CPU gets a warning saying how to install the
    accelerator's JAX; without one, none."""
    line, warning = backend_report(device_files=())
    assert "backend cpu" in line and "1 process(es)" in line and warning is None
    fake = tmp_path / "nvidia0"
    fake.touch()
    _, warning = backend_report(device_files=((str(fake), "an NVIDIA GPU", "pip install X"),))
    assert warning and "an NVIDIA GPU is present" in warning and "pip install X" in warning
    assert str(fake) in warning and "\n" not in warning


def test_load_logs_the_backend_and_why_auto_chose(caplog):
    """grok.load logs (at INFO: run.py -v) JAX's backend and devices once a process, and the
    execution plan with the reason for "auto"'s choice."""
    import logging

    import grok
    from grok import api
    api._report_backend.cache_clear()
    with caplog.at_level(logging.INFO, logger="grok.api"):
        grok.load("demo", progress=False)
    text = caplog.text
    assert "backend cpu:" in text and "execution plan: moe_impl grouped on cpu" in text
    assert "execution plan: auto: CPU: XLA's grouped path" in text


def test_erf_gelu_keeps_the_moe_off_the_tanh_gelu_kernels():
    """Our Pallas kernels compute tanh GELU: a model with erf GELU (Grok-2) runs its MoE on
    XLA's grouped path even where the kernels are asked for, and the plan says so."""
    w = _stack(layers=4)
    tanh = ExecutionPlan(backend="gpu", moe="pallas")
    erf = ExecutionPlan(backend="gpu", moe="pallas", exact_gelu=True)
    assert tanh.moe_path(2, w, w, w) == "pallas" and erf.moe_path(2, w, w, w) == "grouped"
    assert "erf GELU" in erf.describe()[0] and "erf GELU" not in tanh.describe()[0]
