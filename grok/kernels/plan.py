"""The execution plan: how one model's steps run, decided once per runner and passed down.

`resolve_plan(moe_impl, params=..., mesh=...)` looks at the backend (the only place in grok that
does), the mesh and the layout of the weights on it, and the weights' storage format, and fixes:
- which MoE evaluation runs (`moe`: "dense", "gather", "grouped" in XLA, "pallas" kernels,
  "tokamax" (`tokamax.ragged_dot`, grok.kernels.tokamax_moe), or "auto": on a GPU the kernel the
  table of measured results (grok.kernels.measured) names for the card, JAX version and shape
  class, where a call's weights and shapes fit it, else "grouped");
- whether the decode-time attention projections go through the kernel (`projections`);
- whether Pallas kernels are compiled (GPU) or interpreted (elsewhere; tests);
- whether dots widen their operands to float32 first (XLA's CPU runtime takes no int8 or
  bfloat16 operands in some layouts), and so the embedding's compute dtype;
- on a multi-device mesh, the per-device kernel layout (`mesh_kernel`, grok.parallel.mesh_kernels);
- how many layers run per step of the layer loop (`unroll`).
The model asks the plan at its two kernel-or-reference branches (`moe_path`, `linear_kernel`)
and never looks at the backend itself. A new kernel (TPU, tokamax, int4) is one new entry here
and one kernel module.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from grok.config import MOE_IMPLS
from grok.errors import GrokError
from grok.kernels import measured, moe_mlp, tokamax_moe
from grok.kernels.pallas_int8 import kernel_applies
from grok.parallel import mesh_kernels
from grok.quant import INT4, INT8, LayerSlice, QuantizedWeight

# Matmuls of at most this many rows (decoding) run through the kernel when allowed: they read
# the weight once, in place. Larger ones are compute-bound, where XLA's GEMMs do better.
KERNEL_ROWS = 64


@dataclasses.dataclass(frozen=True)
class ExecutionPlan:
    """How a model's steps run (see the module docstring). Frozen and hashable: jitted functions
    close over it."""

    backend: str = "cpu"
    moe: str = "grouped"
    projections: bool = False
    mesh_kernel: Any = None
    unroll: int | bool = 1
    # Quantised weights converted inside the dot and scaled per row block after it (None: on
    # accelerators; the CPU dequantises in float32 first, see grok.quant._dequantize_f32).
    scale_after_dot: bool | None = None
    # "auto"'s kernel per shape class, from grok.kernels.measured.decide (resolve_plan fills it
    # in, with the reasons); a class left out takes "grouped".
    auto_kernels: tuple[tuple[str, str], ...] = (("decode", "pallas"), ("prefill", "pallas"))
    auto_reasons: tuple[tuple[str, str], ...] = ()
    # The model's GELU is erf's (Grok-2): our Pallas kernels compute the tanh form, so its MoE
    # takes XLA's grouped path where they would run.
    exact_gelu: bool = False

    def __post_init__(self) -> None:
        if self.moe not in MOE_IMPLS:
            raise GrokError(f"moe_impl must be one of {MOE_IMPLS}, got {self.moe!r}")
        if self.unroll is not True and (isinstance(self.unroll, bool)
                                        or not isinstance(self.unroll, int) or self.unroll < 1):
            raise GrokError(f"unroll must be True or a layer count >= 1, got {self.unroll!r}")

    @property
    def interpret(self) -> bool:
        """Pallas kernels run through the interpreter: they compile (Triton) on GPUs only."""
        return self.backend != "gpu"

    @property
    def tokamax_impls(self) -> tuple[str, ...]:
        """tokamax's implementation for the platform, named (not "mosaic", which tokamax resolves
        from the default device, a CPU's to its TPU kernel): Mosaic GPU or Mosaic TPU (never
        its Triton one: deprecated in JAX 0.11), its XLA reference on CPU."""
        return {"gpu": ("mosaic_gpu",), "tpu": ("mosaic_tpu",)}.get(self.backend, ("xla",))

    def describe(self) -> list[str]:
        """What this plan runs and, for "auto", why: a line each (grok.load logs them)."""
        lines = [f"moe_impl {self.moe} on {self.backend}"
                 + (f", per device ({self.mesh_kernel.layout} layout)" if self.mesh_kernel else "")
                 + (", decode projections through the kernel" if self.projections else "")
                 + (", erf GELU: the MoE never on our (tanh GELU) Pallas kernels"
                    if self.exact_gelu and self.moe in ("auto", "pallas") else "")]
        reasons = dict(self.auto_reasons)   # (only where "auto" was asked for)
        if len(set(reasons.values())) == 1:
            lines.append(f"auto: {next(iter(reasons.values()))}")
        elif reasons:
            lines += [f"auto, {shape}: {reason}" for shape, reason in reasons.items()]
        return lines

    @property
    def projection_kernel(self) -> str:
        """Which kernel takes the decode-time projections (with `projections`): tokamax's where
        the MoE uses it while decoding, else ours."""
        decode = dict(self.auto_kernels)["decode"] if self.moe == "auto" else self.moe
        return "tokamax" if decode == "tokamax" else "pallas"

    @property
    def widen_dots(self) -> bool:
        """XLA's CPU runtime lacks some bf16 x bf16 -> f32 and int8 dots: widen operands first."""
        return self.backend == "cpu"

    @property
    def scales_after_dot(self) -> bool:
        """Whether quantised matmuls scale each row block's product after the dot (else the
        weight is dequantised in float32 first)."""
        return self.backend != "cpu" if self.scale_after_dot is None else self.scale_after_dot

    @property
    def embedding_dtype(self) -> Any:
        """The embedding's compute dtype: bfloat16, or where dots widen their operands its values
        in float32 (held so once, not widened by every logits dot)."""
        return jnp.float32 if self.widen_dots else jnp.bfloat16

    # --- the model's two kernel-or-reference branches -------------------------------------------
    def moe_path(self, assignments: int, w1: Any, wv: Any, w2: Any) -> str:
        """The MoE evaluation for `assignments` (token, choice) rows: "dense", "gather",
        "grouped", "pallas" or "tokamax". "auto" takes the table's kernel for the shape class
        and weight format (grok.kernels.measured.shape_class): tokamax where every weight is
        quantised (int8 or int4; on a mesh, per device where mesh_kernels has a layout for
        them), ours where every weight is int8 and each device's shard has a shape they
        handle."""
        weights = (w1, wv, w2)
        quantized = all(takes_kernel(w) for w in weights) and not self.exact_gelu
        if self.moe != "auto":   # our kernels take int8 weights and tanh GELU only (else XLA)
            return "grouped" if self.moe == "pallas" and not quantized else self.moe
        bits = 4 if any(getattr(w, "fmt", None) is INT4 for w in weights) else 8
        kernel = dict(self.auto_kernels).get(measured.shape_class(assignments, bits), "grouped")
        if kernel == "tokamax" and self.backend == "gpu":
            return "tokamax" if all(isinstance(w, QuantizedWeight) for w in weights) \
                else "grouped"
        if self.backend != "gpu" or not quantized or kernel != "pallas":
            return "grouped"
        bm = block_rows_for(assignments, w1.shape[-3], "pallas")
        shapes = [w.shape[-3:] for w in weights]
        if self.mesh_kernel is not None:   # each device's shard is what the kernel sees
            shapes = [self.mesh_kernel.local_shape(shape, spec)
                      for shape, (spec, _) in zip(shapes, self.mesh_kernel.specs)]
        layers = math.prod(w1.shape[:-3])
        fits = all(kernel_applies(s[-2], s[-1], w.scale_blocks, bm,
                                  weight_bytes=layers * math.prod(s))
                   for w, s in zip(weights, shapes))
        return "pallas" if fits else "grouped"

    def expert_kernels(self, xb: jax.Array, block_expert: jax.Array, block_rows: jax.Array,
                       w1: Any, wv: Any, w2: Any, layer: Any = None) -> jax.Array:
        """The grouped MoE's blocks through the Pallas kernels (float32 [G, bm, D]): per device
        under shard_map on a mesh, else on the one device."""
        if self.mesh_kernel is not None:
            return mesh_kernels.grouped_mlp(self.mesh_kernel, self._mlp, xb, block_expert,
                                            block_rows, w1, wv, w2, layer)
        return self._mlp(xb, block_expert, block_rows, w1, wv, w2, layer)

    def ragged_mlp(self, xs: jax.Array, counts: jax.Array, w1: Any, wv: Any, w2: Any,
                   layer: Any = None, exact_gelu: bool = False) -> jax.Array:
        """The MoE's rows xs [A, D], sorted by expert (counts [E]), through tokamax's ragged dot
        (grok.kernels.tokamax_moe) -> float32 [A, D]: per device under shard_map on a mesh."""
        mlp = functools.partial(tokamax_moe.gated_mlp, implementation=self.tokamax_impls,
                                widen=self.widen_dots, exact_gelu=exact_gelu)
        if self.mesh_kernel is not None:
            return mesh_kernels.ragged_mlp(self.mesh_kernel, mlp, xs, counts, w1, wv, w2, layer)
        return mlp(xs, counts, w1, wv, w2, layer)

    def _mlp(self, xb, block_expert, block_rows, w1, wv, w2, layer=None):
        return moe_mlp.gated_mlp(xb, block_expert, block_rows, w1, wv, w2, layer,
                                 interpret=self.interpret)

    def linear_kernel(self, x: jax.Array, ws: Sequence[Any], out_dtype: Any
                      ) -> list[jax.Array] | None:
        """x [..., In] times layer slices of int8 stacks through one kernel launch, or None
        where the plan, the format (int4) or the shapes leave it to XLA (then the caller's
        reference path runs)."""
        if not self.projections or not all(
                isinstance(w, LayerSlice) and takes_kernel(w.stack) for w in ws):
            return None
        rows = math.prod(x.shape[:-1])
        if rows > KERNEL_ROWS:
            return None
        if self.projection_kernel == "tokamax":
            return tokamax_moe.stacked_linears(x, ws, out_dtype, implementation=self.tokamax_impls,
                                               widen=self.widen_dots)
        return moe_mlp.stacked_linears(x, ws, out_dtype, interpret=self.interpret)


def takes_kernel(w: Any) -> bool:
    """Whether the Pallas kernels can take weight `w`: int8 QuantizedWeights only. Every other
    weight (float, int4) takes XLA's reference path (grok.quant.qeinsum unpacks int4 there)."""
    return isinstance(w, QuantizedWeight) and w.fmt is INT8


def block_rows_for(assignments: int, experts: int, impl: str = "grouped") -> int:
    """Rows per block: about the mean rows per expert as a power of two, at least 16 for the
    kernel (Triton's dot minimum) or 8 for XLA, at most 64 for the kernel (on an H100 its 64-row
    blocks ran as fast per FLOP as 128-row ones, and round each expert's rows up less) or 128."""
    floor, cap = (16, 64) if impl == "pallas" else (8, 128)
    mean = max(1, math.ceil(assignments / experts))
    return min(cap, max(floor, 1 << (mean - 1).bit_length()))


def current_backend() -> str:
    """jax's default backend: "cpu", "gpu" or "tpu"."""
    return jax.default_backend()


# Device files an accelerator's driver makes, and how to install a JAX that uses it.
ACCELERATOR_FILES = (
    ("/dev/nvidia0", "an NVIDIA GPU",
     'pip install -e ".[cuda13]" (".[cuda12]" for a CUDA 12 driver)'),
    ("/dev/accel0", "a TPU", 'pip install -e ".[tpu]"'),
    ("/dev/kfd", "an AMD GPU", "JAX's ROCm plugin (pip install 'jax[rocm7-local]')"))


def backend_report(device_files: Sequence[tuple[str, str, str]] = ACCELERATOR_FILES
                   ) -> tuple[str, str | None]:
    """A line naming JAX's backend and devices, and a warning where this machine has an
    accelerator (its driver's device file exists) that this JAX does not use (a CPU-only
    jaxlib on a GPU box runs everything on the CPU, 100x slower, saying nothing)."""
    devices = jax.devices()
    kinds = sorted({getattr(d, "device_kind", d.platform) for d in devices})
    line = (f"jax {jax.__version__}, backend {current_backend()}: {len(devices)} device(s) "
            f"({', '.join(kinds)}), {jax.process_count()} process(es)")
    if current_backend() != "cpu":
        return line, None
    for path, what, install in device_files:
        if os.path.exists(path):
            return line, (f"{what} is present ({path}) but this JAX has no backend for it: "
                          f"running on the CPU; {install} (README: Install)")
    return line, None


def toolchain_here(backend: str) -> measured.Toolchain:
    """What "auto" decides for in this process: the backend, the first device's kind (on a
    GPU), the JAX version, whether tokamax imports and whether JAX has the Pallas Triton
    backend."""
    card = jax.devices()[0].device_kind if backend == current_backend() != "cpu" else ""
    gpu = backend == "gpu"   # (elsewhere nothing is measured: no slow tokamax import)
    return measured.Toolchain(backend, card, jax.__version__, gpu and _tokamax_loads(),
                              gpu and measured.has_triton())


def _tokamax_loads() -> bool:
    """Whether tokamax is installed and imports (an install missing a dependency leaves "auto"
    on the other kernels, not failing)."""
    if not measured.tokamax_installed():
        return False
    try:
        tokamax_moe.load()
    except GrokError:
        return False
    return True


def resolve_plan(moe_impl: str = "auto", *, params: Any = None, mesh: Any = None,
                 backend: str | None = None, unroll: int | bool = 1,
                 toolchain: measured.Toolchain | None = None,
                 exact_gelu: bool = False) -> ExecutionPlan:
    """The plan for a model's `params` (sharded on `mesh`, if any) on `backend` (default: jax's).
    moe_impl="tokamax" needs the tokamax package (else a one-line GrokError naming it).
    "auto" takes grok.kernels.measured.decide's kernels for `toolchain` (default: this
    process's, on `backend`).

    On a multi-device mesh the MoE kernels run per device where the weights' layout lets each
    device compute from its own shard (mesh_kernels.kernel_plan); elsewhere "auto" means the XLA
    grouped path there, and the attention projections never take the kernel (GSPMD would gather
    their sharded weights for the custom call)."""
    backend = backend or current_backend()   # (ExecutionPlan refuses a bad moe_impl)
    asked_auto = moe_impl == "auto"
    if moe_impl == "tokamax":
        tokamax_moe.load()
    multi = mesh is not None and mesh.devices.size > 1
    mesh_kernel = None
    if multi and moe_impl in ("auto", "pallas", "tokamax") and params is not None:
        mesh_kernel = mesh_kernels.kernel_plan(params, mesh)
        if mesh_kernel is None and moe_impl == "auto":
            moe_impl = "grouped"
    choices = measured.decide(toolchain or toolchain_here(backend))
    if asked_auto and moe_impl == "grouped":   # (the mesh left the kernels no layout)
        choices = tuple(measured.Choice(c.shape, "grouped", "this mesh and layout give the "
                                        "kernels no per-device shard: XLA's partitioned matmuls")
                        for c in choices)
    kernels = tuple((c.shape, c.kernel) for c in choices)
    projections = not multi and (moe_impl in ("pallas", "tokamax") or (
        moe_impl == "auto" and backend == "gpu" and dict(kernels)["decode"] != "grouped"))
    if moe_impl == "auto" and backend != "gpu":
        moe_impl = "grouped"
    return ExecutionPlan(backend, moe_impl, projections, mesh_kernel, unroll,
                         auto_kernels=kernels,
                         auto_reasons=tuple((c.shape, c.reason) for c in choices if asked_auto),
                         exact_gelu=exact_gelu)
