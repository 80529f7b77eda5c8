"""The MoE kernels on a device mesh: each device runs them on its own shard of the experts.

GSPMD cannot partition a kernel's custom call (it would gather the sharded weights onto every
device), so on a multi-device mesh the kernels (our Pallas ones over expert blocks, tokamax's
ragged dot over expert-sorted rows) run under `jax.shard_map`, following the weights' own
layout (grok.parallel.rules), read from the params' shardings:
- "tensor": w1, wv [L, E, D, F] split on F over "model" and w2 [L, E, F, D] on F: each device
  computes its F-slice of the hidden layer and a partial product through w2; a psum over "model"
  adds the partials.
- "expert": whole experts per device (E over "model"): a device runs the rows of its own
  experts (the others' blocks get 0 rows, which the Pallas kernel skips; for the ragged dot, the
  contiguous run of sorted rows that are its experts') and the psum adds the disjoint results.
The routing, the gather of the rows and the gated sum stay outside, partitioned by XLA.
Weights split over "data" too (the tensor layout on a mesh with data > 1) are left to the XLA
grouped path: the kernel would need the layer gathered over "data" first, a copy per layer.
int8 and int4 weights both get a MeshKernel; which kernel takes which format is the execution
plan's choice (ours take int8 only).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from grok.quant import QuantizedWeight
from grok.parallel.rules import MODEL, local_shape, mesh_shape

MOE_LEAVES = ("linear", "linear_v", "linear_1")   # w1, wv, w2 under decoder_layer/moe/


@dataclasses.dataclass(frozen=True)
class MeshKernel:
    """How the MoE kernels run on `mesh`: the layout ("tensor" or "expert"), the per-layer
    PartitionSpecs of (weight, scales) of w1, wv and w2 (no layer axis), and whether w2's row-block
    scales are whole on every device while its rows are split (each device then takes the one
    block its rows lie in)."""

    mesh: Any
    layout: str
    specs: tuple[tuple[P, P], ...]
    slice_w2_scales: bool

    @property
    def model(self) -> int:
        return int(self.mesh.shape[MODEL])

    def local_shape(self, shape: tuple[int, ...], spec: P) -> tuple[int, ...]:
        """A per-layer [E, In, Out] shape as one device holds it."""
        return local_shape(shape, tuple(spec), mesh_shape(self.mesh))


def _dims(mesh: Any, spec: P, ndim: int) -> tuple[Any, ...]:
    """The spec per dimension, each a mesh axis name or None (axes of size 1 dropped)."""
    out = []
    for entry in tuple(spec) + (None,) * (ndim - len(spec)):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        axes = tuple(a for a in axes if int(mesh.shape[a]) > 1)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return tuple(out)


def kernel_plan(params: dict[str, Any], mesh: Any) -> MeshKernel | None:
    """The MeshKernel for a model's sharded params (stacked for the scan, or a list of layers),
    or None where their layout is not one the kernels can run per device."""
    if mesh is None or mesh.size == 1 or MODEL not in mesh.shape:
        return None
    layers = params["layers"]
    layer = layers[0] if isinstance(layers, (list, tuple)) else layers
    weights = [layer.get(f"decoder_layer/moe/{name}", {}).get("w") for name in MOE_LEAVES]
    if not all(isinstance(w, QuantizedWeight) for w in weights):
        return None   # float weights: XLA's partitioned matmuls
    stacked = not isinstance(layers, (list, tuple))
    specs, dims = [], []
    for w in weights:
        pair = []
        for a in (w.weight, w.scales):
            sharding = getattr(a, "sharding", None)
            if not isinstance(sharding, jax.sharding.NamedSharding) or sharding.mesh != mesh:
                return None
            d = _dims(mesh, sharding.spec, a.ndim)
            if stacked:
                if d[0] is not None:      # the layer axis is never split
                    return None
                d = d[1:]
            pair.append(d)
        dims.append(pair)
        specs.append(tuple(P(*d) for d in pair))
    (w1, s1), (wv, sv), (w2, s2) = dims
    m = int(mesh.shape[MODEL])
    if w1 == wv == (None, None, MODEL) and s1 == sv == (None, None, MODEL) \
            and w2 == (None, MODEL, None) and s2[0] is None and s2[2] is None:
        blocks = weights[2].scales.shape[-2]
        if s2[1] == MODEL or blocks == 1:
            slice_w2 = False
        elif s2[1] is None and m % blocks == 0:
            slice_w2 = True
        else:
            return None
        return MeshKernel(mesh, "tensor", tuple(specs), slice_w2)
    whole = (MODEL, None, None)
    if w1 == wv == w2 == s1 == sv == s2 == whole:
        return MeshKernel(mesh, "expert", tuple(specs), False)
    return None


def _per_device(plan: MeshKernel, local: Any, replicated: tuple[jax.Array, ...],
                weights: tuple[QuantizedWeight, ...], layer: Any) -> jax.Array:
    """`local(shard, *replicated, w1, wv, w2, layer)` on each device with its shards of the three
    weights (w2's scale block taken where the plan says), its results summed over "model".
    `replicated` arrays go to every device whole; the result is replicated too."""
    stacked = layer is not None
    lead = (None,) if stacked else ()
    weight_specs = [QuantizedWeight(P(*lead, *ws), P(*lead, *ss), w.fmt)
                    for (ws, ss), w in zip(plan.specs, weights)]

    def run(replicated, layer_index, w1, wv, w2):
        shard = jax.lax.axis_index(MODEL)
        if plan.slice_w2_scales:      # rows split finer than the scale blocks: take this one's
            devices_per_block = plan.model // w2.scale_blocks
            w2 = QuantizedWeight(w2.weight, jax.lax.dynamic_slice_in_dim(
                w2.scales, shard // devices_per_block, 1, axis=-2), w2.fmt)
        y = local(shard, *replicated, w1, wv, w2, layer_index if stacked else None)
        return jax.lax.psum(y, MODEL)

    mapped = jax.shard_map(run, mesh=plan.mesh, in_specs=(P(), P(), *weight_specs),
                           out_specs=P(), check_vma=False)
    return mapped(replicated, jnp.int32(0) if layer is None else layer, *weights)


def grouped_mlp(plan: MeshKernel, mlp: Any, xb: jax.Array, block_expert: jax.Array,
                block_rows: jax.Array, w1: QuantizedWeight, wv: QuantizedWeight,
                w2: QuantizedWeight, layer: Any = None) -> jax.Array:
    """`mlp` (grok.model.moe's kernel MLP over expert blocks: xb [G, bm, D], ids and rows [G],
    the three weights, the layer -> float32 [G, bm, D]) run per device on its shard, the partial
    results summed over "model". Blocks, ids and rows are replicated; the result is too."""
    def local(shard, xb, ids, rows, w1, wv, w2, layer):
        if plan.layout == "expert":   # this device's experts only; the others' blocks skipped
            per_device = w1.shape[-3]
            ids = ids - shard * per_device
            rows = jnp.where((ids >= 0) & (ids < per_device), rows, 0)
            ids = jnp.clip(ids, 0, per_device - 1)
        return mlp(xb, ids, rows, w1, wv, w2, layer)

    return _per_device(plan, local, (xb, block_expert, block_rows), (w1, wv, w2), layer)


def ragged_mlp(plan: MeshKernel, mlp: Any, xs: jax.Array, counts: jax.Array,
               w1: QuantizedWeight, wv: QuantizedWeight, w2: QuantizedWeight,
               layer: Any = None) -> jax.Array:
    """`mlp` (a ragged-dot MLP: rows xs [A, D] sorted by expert, counts [E], the three weights,
    the layer -> float32 [A, D]) run per device on its shard, summed over "model". In the expert
    layout a device's experts own one contiguous run of the sorted rows: it is rotated to the
    front, run with the device's own counts, masked (rows past the run belong to no expert of
    this device) and rotated back."""
    def local(shard, xs, counts, w1, wv, w2, layer):
        if plan.layout != "expert":
            return mlp(xs, counts, w1, wv, w2, layer)
        per_device = w1.shape[-3]
        first = shard * per_device
        start = jnp.sum(jnp.where(jnp.arange(counts.shape[0]) < first, counts, 0))
        mine = jax.lax.dynamic_slice_in_dim(counts, first, per_device)
        y = mlp(jnp.roll(xs, -start, axis=0), mine, w1, wv, w2, layer)
        y = jnp.where((jnp.arange(xs.shape[0]) < jnp.sum(mine))[:, None], y, 0.0)
        return jnp.roll(y, start, axis=0)

    return _per_device(plan, local, (xs, counts), (w1, wv, w2), layer)
