"""Meshes, partition rules and per-device memory estimates.

Everything here is driven by one table per layout: a regex over a leaf's *path* in the model's
params tree -> the PartitionSpec of the leaf as one layer holds it (the scanned model stacks layers
on a leading [L] axis, which is never sharded). Paths look like

    embed/language_model/in_out_embed/embeddings
    layers/decoder_layer/multi_head_attention/query/w/weight      (QuantizedWeight8bit int8 part)
    layers/decoder_layer/multi_head_attention/query/w/scales      (its bfloat16 row-block scales)

A mesh axis named in a rule is dropped (that dimension replicated) when it does not divide the
dimension; for the attention projections it must divide whole heads (num heads, not columns), so
a head is never split across devices. Scales follow their weight: the row-block axis S of
`scales [..., S, Out]` is sharded over "model" only when the weight's rows are and S is divisible
by the model axis; otherwise the scales are replicated along S (e.g. S=8 on a 16-way model axis,
or S=1). The blocked matmul in grok/quant.py reshapes the rows [In] -> [S, In/S]; XLA inserts
whatever collective that reshape needs, so the result is right on any mesh (tests check it).

Layouts:
- "tensor" (default; like the release): column-parallel matrices (q/k/v, moe linear/linear_v) are
  split on their output dimension over "model", row-parallel ones (attention output, moe
  linear_1) on their input dimension; the other dimension is split over "data" (so weights take
  1/(data*model) of their size per device, and XLA gathers one layer's weights over "data" inside
  the layer scan). The embedding [V, D] is vocabulary-parallel over "model", D over "data".
- "expert": the expert weights [E, ...] are split by expert over "model" (every device holds
  whole experts), attention as in "tensor". See README ("Scale-out") for the trade-off.
Activations: batch over "data" (when it divides the batch); the KV cache [L, B, Hkv, S, K] puts
batch over "data" and kv heads over "model" (when they divide).
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from grok.config import GrokConfig
from grok.errors import ShardingError

DATA, MODEL = "data", "model"
AXES = (DATA, MODEL)
GB = 1e9

# Per-dimension mesh axes, as tuples (a jax PartitionSpec is built from them at the end, so the
# planner can run without jax devices). `HEAD` marks a dimension sharded in whole heads.
HEAD = "head"

# (path regex, spec of the per-layer leaf, units per dimension or None)
Rule = tuple[str, tuple[Any, ...], tuple[Any, ...] | None]

TENSOR_RULES: tuple[Rule, ...] = (
    (r"in_out_embed/embeddings$", (MODEL, DATA), None),                       # [V, D]
    (r"rms_norm[^/]*/scale$", (), None),                                       # [D]
    (r"router/w$", (), None),                                                  # [D, E]
    (r"multi_head_attention/(query|key|value)/w/(weight|scales)$",             # [D, H*K]
     (DATA, MODEL), (None, HEAD)),
    (r"multi_head_attention/linear/w/(weight|scales)$", (MODEL, DATA), (HEAD, None)),  # [H*K, D]
    (r"moe/linear(_v)?/w/(weight|scales)$", (None, DATA, MODEL), None),      # [E, D, F]
    (r"moe/linear_1/w/(weight|scales)$", (None, MODEL, DATA), None),         # [E, F, D]
)
EXPERT_RULES: tuple[Rule, ...] = (
    (r"moe/linear(_v)?/w/(weight|scales)$", (MODEL, DATA, None), None),      # [E, D, F]
    (r"moe/linear_1/w/(weight|scales)$", (MODEL, None, DATA), None),         # [E, F, D]
) + TENSOR_RULES
LAYOUTS: dict[str, tuple[Rule, ...]] = {"tensor": TENSOR_RULES, "expert": EXPERT_RULES}

# Activations and cache (not matched by path): logical name -> spec.
ACTIVATION_RULES: dict[str, tuple[Any, ...]] = {
    "tokens": (DATA, None),                      # [B, T]
    "kv_cache": (None, DATA, MODEL, None, None),  # [L, B, Hkv, S, K]
    "kv_cache_layer": (DATA, MODEL, None, None),  # [B, Hkv, S, K] (unrolled model)
    "valid": (DATA, None),                       # [B, S]
    "logits": (),                                # replicated: every process can read them
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
    import jax
    from jax.sharding import Mesh

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
def _rules(layout: str | Sequence[Rule]) -> Sequence[Rule]:
    if isinstance(layout, str):
        try:
            return LAYOUTS[layout]
        except KeyError:
            raise ShardingError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}") from None
    return layout


def rule_for(path: str, layout: str | Sequence[Rule] = "tensor") -> tuple[tuple, tuple | None]:
    """(spec, units) of the first rule whose regex matches `path` (replicated if none)."""
    for pattern, spec, units in _rules(layout):
        if re.search(pattern, path):
            return spec, units
    return (), None


def fit(spec: Sequence[Any], shape: Sequence[int], sizes: Mapping[str, int],
        units: Sequence[Any] | None = None, head_size: int = 1) -> tuple[Any, ...]:
    """Drop the axes of `spec` that do not divide their dimension (in whole heads for HEAD
    dimensions). Returns one entry per dimension of `shape`."""
    out = []
    for dim, n in enumerate(shape):
        axis = spec[dim] if dim < len(spec) else None
        if axis is None:
            out.append(None)
            continue
        names = axis if isinstance(axis, tuple) else (axis,)
        size = math.prod(sizes.get(a, 1) for a in names)
        unit = head_size if units is not None and dim < len(units) and units[dim] == HEAD else 1
        count = n // unit if n % unit == 0 else 0
        out.append(axis if size > 1 and count and count % size == 0 else None)
    return tuple(out)


def param_spec(path: str, shape: Sequence[int], sizes: Mapping[str, int], config: GrokConfig,
               layout: str | Sequence[Rule] = "tensor", stacked: bool = False,
               weight_shape: Sequence[int] | None = None) -> tuple[Any, ...]:
    """The fitted spec of the params leaf at `path` (shape includes [L] when `stacked`).

    For a `.../scales` leaf pass `weight_shape` (its weight's shape, same stacking): the scales'
    row-block axis is sharded over "model" only if the weight's rows are and S divides evenly."""
    lead = 1 if stacked else 0
    spec, units = rule_for(path, layout)
    if path.endswith("/scales") and weight_shape is not None:
        wspec = fit(spec, weight_shape[lead:], sizes, units, config.key_size)
        # scales [..., S, Out]: every dim but S as the weight; S only with the weight's rows' axis.
        spec = list(wspec)
        rows_axis = wspec[-2]
        s = shape[-2]
        size = sizes.get(rows_axis, 1) if rows_axis else 1
        spec[-2] = rows_axis if rows_axis and s % size == 0 else None
        fitted = fit(tuple(spec), shape[lead:], sizes)
    else:
        fitted = fit(spec, shape[lead:], sizes, units, config.key_size)
    return ((None,) * lead) + fitted


def activation_spec(name: str, shape: Sequence[int], sizes: Mapping[str, int]) -> tuple[Any, ...]:
    return fit(ACTIVATION_RULES[name], shape, sizes)


def to_pspec(spec: Sequence[Any]) -> Any:
    from jax.sharding import PartitionSpec
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return PartitionSpec(*spec)


def named(mesh: Any, spec: Sequence[Any]) -> Any:
    from jax.sharding import NamedSharding
    return NamedSharding(mesh, to_pspec(spec))


def check_layout(config: GrokConfig, sizes: Mapping[str, int], layout: str) -> None:
    if layout == "expert" and config.num_experts % sizes[MODEL]:
        raise ShardingError(f"the expert layout needs num_experts={config.num_experts} to be a "
                            f"multiple of the model axis ({sizes[MODEL]}); use layout='tensor'")


# --- paths of the params tree ----------------------------------------------------------------
def tree_paths(params: Any) -> Any:
    """A tree like `params` whose leaves are their rule paths (str); QuantizedWeight8bit leaves
    become (weight path, scales path) pairs inside the same pytree node."""
    from grok.quant import QuantizedWeight8bit

    def walk(node: Any, prefix: str) -> Any:
        if isinstance(node, QuantizedWeight8bit):
            return QuantizedWeight8bit(f"{prefix}/weight", f"{prefix}/scales")
        if isinstance(node, Mapping):
            return {k: walk(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in node.items()}
        if isinstance(node, (tuple, list)):   # unrolled layers: the index is not part of the path
            return type(node)(walk(v, prefix) for v in node)
        return prefix
    return walk(params, "")


def params_shardings(params: Any, mesh: Any, config: GrokConfig, layout: str = "tensor") -> Any:
    """NamedShardings for a params tree (arrays or ShapeDtypeStructs), by the layout's rules."""
    from grok.leaves import is_scanned
    from grok.quant import QuantizedWeight8bit

    sizes = mesh_shape(mesh)
    check_layout(config, sizes, layout)
    stacked_layers = is_scanned(params)

    def one(path: str, leaf: Any, stacked: bool, weight_shape=None) -> Any:
        return named(mesh, param_spec(path, leaf.shape, sizes, config, layout, stacked,
                                      weight_shape))

    def walk(node: Any, prefix: str, stacked: bool) -> Any:
        if isinstance(node, QuantizedWeight8bit):
            return QuantizedWeight8bit(
                one(f"{prefix}/weight", node.weight, stacked),
                one(f"{prefix}/scales", node.scales, stacked, node.weight.shape))
        if isinstance(node, Mapping):
            return {k: walk(v, f"{prefix}/{k}" if prefix else str(k),
                            stacked or (prefix == "" and k == "layers" and stacked_layers))
                    for k, v in node.items()}
        if isinstance(node, (tuple, list)):
            return type(node)(walk(v, prefix, stacked) for v in node)
        return one(prefix, node, stacked)
    return walk(params, "", False)


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
        import jax
        return jax.lax.with_sharding_constraint(x, self.sharding(name, x.shape))

    def cache(self, cache: Any) -> Any:
        """Constrain a KVCache (inside jit) to the cache layout."""
        if self.mesh is None:
            return cache
        import jax
        layer = "kv_cache" if not isinstance(cache.k, tuple) else "kv_cache_layer"
        fix = lambda x: self.constrain(layer, x)
        return type(cache)(jax.tree.map(fix, cache.k), jax.tree.map(fix, cache.v),
                           self.constrain("valid", cache.valid))

    def put(self, name: str, x: Any) -> Any:
        """Host data -> a global array with the named layout (every process passes the same x)."""
        if self.mesh is None:
            return x
        import jax
        x = np.asarray(x)
        return jax.device_put(x, self.sharding(name, x.shape))

    def new_cache(self, make: Any, *args: Any) -> Any:
        """Run `make(*args)` (e.g. model.init_cache) so its result lands sharded, never whole."""
        if self.mesh is None:
            return make(*args)
        import jax
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
