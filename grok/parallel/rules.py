"""Meshes, and the rules that place every leaf and activation on them.

Each leaf names its axes once, logically (grok.leaves: e.g. moe/linear is ("experts", "embed",
"ffn")); a layout is one `ShardingRules` object mapping each logical axis to a mesh axis ("data",
"model") or to None (not split). Every logical axis used must have a rule: an axis no layout
mentions is an error, never a silent replication. A mesh axis is dropped (that dimension
replicated) where it does not divide the dimension; q_heads / kv_heads dimensions (H*K columns)
are split only in whole heads; an int4 weight's packed rows (In/2) must divide too. Scales
follow their weight: the row-block axis S of
`scales [..., S, Out]` is split over the weight's rows' mesh axis only when S is divisible by it
(e.g. not S=8 on a 16-way model axis, nor S=1); the blocked matmul (grok.quant.qeinsum) reshapes
the rows [In] -> [S, In/S] and XLA inserts whatever collective that needs (tests check it).

Layouts:
- "tensor" (default; like the release): ffn, q_heads, kv_heads and vocab over "model", embed over
  "data": column-parallel matrices (q/k/v, moe linear/linear_v) split their output dimension over
  "model", row-parallel ones (attention output, moe linear_1) their input dimension; weights take
  1/(data*model) of their size per device, and XLA gathers one layer over "data" inside the scan.
- "expert": experts over "model" (every device holds whole experts), ffn whole; the rest as
  "tensor". See README ("Scale-out") for the trade-off.
Activations: batch over "data"; the KV cache [L, B, Hkv, S, K] also puts kv heads over "model".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from grok.config import GrokConfig
from grok.errors import ShardingError
from grok.leaves import LAYERS_AXIS, Entry, is_scanned, model_tree
from grok.quant import QuantizedWeight

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)
HEAD_AXES = frozenset({"q_heads", "kv_heads"})   # H*K columns: split in whole heads only


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """One layout: logical axis -> the mesh axis it is split over (None: not split)."""

    name: str
    axes: Mapping[str, str | None]

    def mesh_axes(self, logical: Sequence[str]) -> tuple[str | None, ...]:
        """The mesh axis of each logical axis; ShardingError for one without a rule."""
        missing = [a for a in logical if a not in self.axes]
        if missing:
            raise ShardingError(f"layout {self.name!r} has no rule for logical axis "
                                f"{missing[0]!r}")
        return tuple(self.axes[a] for a in logical)


_SHARED = {
    LAYERS_AXIS: None, "vocab": MODEL, "embed": DATA, "q_heads": MODEL, "kv_heads": MODEL,
    "norm": None, "router_in": None, "router_experts": None,
    # the dense MLP beside the experts (Grok-2): split like the tensor layout's experts in
    # both layouts (it is no expert: every device works on every token)
    "dense_ffn": MODEL,
    # activations and the KV cache
    "batch": DATA, "pages": None, "seq": None, "cache_slots": None, "head_dim": None,
    "logits_batch": None, "logits_vocab": None,   # replicated: every process can read them
}
TENSOR = ShardingRules("tensor", {**_SHARED, "experts": None, "ffn": MODEL})
EXPERT = ShardingRules("expert", {**_SHARED, "experts": MODEL, "ffn": None})
LAYOUTS: dict[str, ShardingRules] = {r.name: r for r in (TENSOR, EXPERT)}

# The activations' logical axes, by name.
ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "tokens": ("batch", "seq"),                                            # [B, T]
    "kv_cache": (LAYERS_AXIS, "batch", "kv_heads", "cache_slots", "head_dim"),  # [L, B, Hkv, S, K]
    "kv_cache_layer": ("batch", "kv_heads", "cache_slots", "head_dim"),    # unrolled model
    "valid": ("batch", "cache_slots"),                                     # [B, S]
    # The paged cache's pool is shared by every sequence: pages are not split over "data".
    "kv_pages": (LAYERS_AXIS, "pages", "cache_slots", "kv_heads", "head_dim"),  # [L, P, page, ..]
    "kv_pages_layer": ("pages", "cache_slots", "kv_heads", "head_dim"),
    "page_valid": ("pages", "cache_slots"),                                # [P, page]
    "logits": ("logits_batch", "logits_vocab"),
}


# --- meshes ---------------------------------------------------------------------------------------
def parse_mesh(text: str) -> tuple[int, int]:
    """'2,4' -> (2, 4) (data, model)."""
    try:
        parts = tuple(int(p) for p in str(text).replace("x", ",").split(","))
    except ValueError:
        parts = ()
    if len(parts) != 2 or min(parts) < 1:
        raise ShardingError(f"mesh must be DATA,MODEL with positive integers, got {text!r}")
    return parts  # type: ignore[return-value]


def make_mesh(mesh: Any = None, devices: Sequence[Any] | None = None) -> Any:
    """A jax Mesh with axes ("data", "model") from a Mesh, a (data, model) pair, 'D,M' or None
    (all devices on "model"). Uses every device of every process (jax.devices())."""
    if isinstance(mesh, Mesh):
        if tuple(mesh.axis_names) != AXES:
            raise ShardingError(f"mesh axes must be {AXES}, got {tuple(mesh.axis_names)}")
        return mesh
    devices = list(jax.devices() if devices is None else devices)
    if mesh is None:
        shape = (1, len(devices))
    elif isinstance(mesh, str):
        shape = parse_mesh(mesh)
    else:
        shape = tuple(int(n) for n in mesh)
        if len(shape) != 2 or min(shape) < 1:
            raise ShardingError(f"mesh must be (data, model), got {mesh!r}")
    if math.prod(shape) != len(devices):
        raise ShardingError(f"mesh {shape[0]}x{shape[1]} needs {math.prod(shape)} devices, "
                            f"{len(devices)} available")
    # jax.devices() lists each process's devices together, so "model" stays within a host when
    # model <= devices per host, and "data" spans hosts.
    grid = np.array(devices, dtype=object).reshape(shape)
    return Mesh(grid, AXES)


def mesh_shape(mesh: Any) -> dict[str, int]:
    """{"data": d, "model": m} of a Mesh, a (d, m) pair or such a dict."""
    if isinstance(mesh, Mapping):
        return {a: int(mesh.get(a, 1)) for a in AXES}
    if hasattr(mesh, "shape") and hasattr(mesh, "axis_names"):
        return {a: int(mesh.shape[a]) for a in AXES}
    d, m = mesh
    return {DATA: int(d), MODEL: int(m)}


# --- rules -> specs ----------------------------------------------------------------------------
def layout_rules(layout: str | ShardingRules) -> ShardingRules:
    if isinstance(layout, ShardingRules):
        return layout
    try:
        return LAYOUTS[layout]
    except (KeyError, TypeError):
        raise ShardingError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}") from None


def fit(spec: Sequence[Any], shape: Sequence[int], sizes: Mapping[str, int],
        heads: Sequence[bool] = (), head_size: int = 1) -> tuple[Any, ...]:
    """Drop the axes of `spec` that do not divide their dimension (in whole heads of `head_size`
    where `heads` says so). Returns one entry per dimension of `shape`."""
    out = []
    for dim, n in enumerate(shape):
        axis = spec[dim] if dim < len(spec) else None
        if axis is None:
            out.append(None)
            continue
        names = axis if isinstance(axis, tuple) else (axis,)
        size = math.prod(sizes.get(a, 1) for a in names)
        unit = head_size if dim < len(heads) and heads[dim] else 1
        count = n // unit if n % unit == 0 else 0
        out.append(axis if size > 1 and count and count % size == 0 else None)
    return tuple(out)


def leaf_specs(entry: Entry, sizes: Mapping[str, int], config: GrokConfig,
               layout: str | ShardingRules = "tensor", stacked: bool = False
               ) -> tuple[tuple[Any, ...], ...]:
    """The fitted spec of the leaf's array, or of (weight, scales) for a quantised leaf; with a
    leading None for the [L] axis of a `stacked` leaf (never split)."""
    rules = layout_rules(layout)
    heads = tuple(a in HEAD_AXES for a in entry.axes)
    weight = fit(rules.mesh_axes(entry.axes), entry.shape, sizes, heads, config.key_size)
    lead = rules.mesh_axes((LAYERS_AXIS,)) if stacked else ()
    if not entry.quantized:
        return (lead + weight,)
    weight = fit(weight, entry.weight_shape, sizes)   # a packed (int4) weight's rows split too
    # scales [..., S, Out]: every dim but S as the weight; S with the weight's rows' axis only
    rows_axis = weight[-2]
    size = sizes.get(rows_axis, 1) if rows_axis else 1
    scales = list(weight)
    scales[-2] = rows_axis if rows_axis and entry.scale_blocks % size == 0 else None
    return lead + weight, lead + fit(tuple(scales), entry.scales_shape, sizes)


def activation_spec(name: str, shape: Sequence[int], sizes: Mapping[str, int],
                    layout: str | ShardingRules = "tensor") -> tuple[Any, ...]:
    return fit(layout_rules(layout).mesh_axes(ACTIVATIONS[name]), shape, sizes)


def to_pspec(spec: Sequence[Any]) -> Any:
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return PartitionSpec(*spec)


def named(mesh: Any, spec: Sequence[Any]) -> Any:
    return NamedSharding(mesh, to_pspec(spec))


def check_layout(config: GrokConfig, sizes: Mapping[str, int], layout: str) -> None:
    if layout_rules(layout).axes.get("experts") == MODEL and config.num_experts % sizes[MODEL]:
        raise ShardingError(f"the expert layout needs num_experts={config.num_experts} to be a "
                            f"multiple of the model axis ({sizes[MODEL]}); use layout='tensor'")


def params_shardings(params: Any, mesh: Any, config: GrokConfig, layout: str = "tensor") -> Any:
    """NamedShardings for the model's params tree (stacked for the scan or not, as `params` is:
    arrays or ShapeDtypeStructs), from the leaf table and the layout's rules."""
    sizes = mesh_shape(mesh)
    check_layout(config, sizes, layout)

    def make(entry: Entry, stacked: bool) -> Any:
        shardings = [named(mesh, s) for s in leaf_specs(entry, sizes, config, layout, stacked)]
        return QuantizedWeight(*shardings, entry.fmt) if entry.quantized else shardings[0]
    return model_tree(config, make, is_scanned(params))


# --- placement of activations / cache (used by engine.ModelRunner) ------------------------------
class Placement:
    """Shardings of a model's inputs and outputs on a mesh; every method is the identity when
    `mesh` is None, so single-device code paths stay untouched."""

    def __init__(self, mesh: Any, config: GrokConfig):
        self.mesh = mesh
        self.config = config
        self.sizes = mesh_shape(mesh) if mesh is not None else None

    def sharding(self, name: str, shape: Sequence[int]) -> Any:
        return named(self.mesh, activation_spec(name, shape, self.sizes))

    def constrain(self, name: str, x: Any) -> Any:
        if self.mesh is None:
            return x
        return jax.lax.with_sharding_constraint(x, self.sharding(name, x.shape))

    def cache(self, cache: Any) -> Any:
        """Constrain a KVCache or a paged cache's pool (inside jit) to its layout: kv heads over
        "model" (a pool's pages are whole on every device: any sequence may use any page)."""
        if self.mesh is None:
            return cache
        names = (("kv_pages", "kv_pages_layer", "page_valid") if hasattr(type(cache), "page_size")
                 else ("kv_cache", "kv_cache_layer", "valid"))
        fix = lambda x: self.constrain(names[isinstance(cache.k, tuple)], x)
        return type(cache)(jax.tree.map(fix, cache.k), jax.tree.map(fix, cache.v),
                           self.constrain(names[2], cache.valid))

    def put(self, name: str, x: Any) -> Any:
        """Host data -> a global array with the named layout (every process passes the same x)."""
        if self.mesh is None:
            return x
        x = np.asarray(x)
        return jax.device_put(x, self.sharding(name, x.shape))

    def new_cache(self, make: Any, *args: Any) -> Any:
        """Run `make(*args)` (model.init_cache, or paged.init_pool) so its result lands sharded,
        never whole."""
        if self.mesh is None:
            return make(*args)
        return jax.jit(lambda: self.cache(make(*args)))()


def local_shape(shape: Sequence[int], spec: Sequence[Any],
                sizes: Mapping[str, int]) -> tuple[int, ...]:
    """The shape of one device's shard of an array of `shape` under `spec` (axis sizes `sizes`)."""
    out = []
    for dim, size in enumerate(shape):
        axis = spec[dim] if dim < len(spec) else None
        names = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
        out.append(size // math.prod(sizes[a] for a in names))
    return tuple(out)
