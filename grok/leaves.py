"""The leaf table: every weight of a Grok checkpoint described once.

Each `Entry` says where a leaf lives (checkpoint file index and SPEC §3 path, the model tree's
module and parameter), its shape, its storage (float32, or quantised with S row-block scales) and
the logical name of each of its axes. Everything else is derived from this table: the model's
params tree (`model_tree`, `to_model_params`), abstract and random leaves, the partition specs
(grok.parallel.rules maps logical axes to mesh axes per layout), the memory plan and the
streaming loader's targets.

The model holds `{"embed": {...}, "layers": ...}`: `embed` is the haiku tree of the embedding and
the final norm; `layers` is one haiku tree of a decoder layer whose leaves are stacked on a leading
[num_layers] axis (for the layer scan), or a tuple of per-layer trees (for the unrolled model).

Logical axes: vocab, embed (the model width D of a weight), q_heads / kv_heads (H*K columns, split
only in whole heads), experts, ffn (the expert width F), norm (a norm's scale), router_in /
router_experts (the router, small and replicated); a stacked leaf adds "layers" in front.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from grok.config import GrokConfig
from grok.quant import (FORMAT_BITS, QuantizedWeight, WeightFormat, group_size_for, is_quantized,
                        quantize, quantize_int4)

LAYER_MODULE = "decoder_layer"   # the haiku name of one layer inside the layer transform
EMBED_MODULE = "language_model/in_out_embed"
FINAL_NORM_MODULE = "language_model/rms_norm"
LM_HEAD_MODULE = "language_model/lm_head"   # a separate output matrix (config.tied_embedding off)
LAYERS_AXIS = "layers"           # the logical name of a stacked leaf's leading axis


@dataclasses.dataclass(frozen=True)
class Entry:
    """One leaf, and the checkpoint file `ckpt-0/tensor{index:05d}_000` that holds it."""

    index: int
    name: str                 # SPEC §3 path, e.g. transformer/decoder_layer_3/router/w
    shape: tuple[int, ...]
    fmt: WeightFormat | None  # a QuantizedWeight's storage (INT8: int8 + bfloat16 scales; INT4:
                              # packed uint8 + bfloat16 scales), or None for a float32 array
    scale_blocks: int = 0     # S of scales [..., S, out]; 0 for float32 leaves
    layer: int | None = None  # decoder layer index, None for the embedding / final norm
    module: str = ""          # haiku module path inside its tree (embed tree or layer tree)
    param: str = ""           # haiku parameter name
    axes: tuple[str, ...] = ()  # the logical name of each axis of `shape`
    bf16: bool = False        # a matrix held as bfloat16 (weight_bits=16: Grok-2's release)

    @property
    def quantized(self) -> bool:
        return self.fmt is not None

    @property
    def float_dtype(self) -> Any:
        """A float leaf's dtype as the model holds it: bfloat16 for the embedding tables and
        bf16 matrices, float32 for the rest (norms, the router)."""
        return jnp.bfloat16 if self.bf16 or self.param == "embeddings" else jnp.float32

    @property
    def filename(self) -> str:
        return f"tensor{self.index:05d}_000"

    @property
    def tree_path(self) -> str:
        """Where the leaf sits in the model's params tree: "embed/<module>/<param>" or
        "layers/decoder_layer/<module>/<param>" (the same path for every layer)."""
        return f"{'embed' if self.layer is None else 'layers'}/{self.module}/{self.param}"

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The stored weight's shape (int4: In halved by the packing)."""
        return self.fmt.storage_shape(self.shape) if self.fmt else self.shape

    @property
    def group_size(self) -> int:
        """Rows of In per scale (0 for float32 leaves)."""
        return self.shape[-2] // self.scale_blocks if self.scale_blocks else 0

    @property
    def scales_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-2], self.scale_blocks, self.shape[-1])

    @property
    def fan_in(self) -> int:
        """The inputs each output sums over (the embedding: its width), for random weights."""
        if self.param == "embeddings":
            return self.shape[-1]
        return self.shape[-2] if len(self.shape) > 1 else 1


def _layer_leaves(c: GrokConfig) -> list[tuple[str, tuple[int, ...], int, tuple[str, ...]]]:
    """(sub-path, shape, scale blocks or 0, logical axes) of one layer, in file order (paths sorted
    as strings)."""
    d, e, f, s = c.emb_size, c.num_experts, c.ffn_size, c.scale_blocks
    return [
        ("moe/linear/w", (e, d, f), 1, ("experts", "embed", "ffn")),
        ("moe/linear_1/w", (e, f, d), s, ("experts", "ffn", "embed")),
        ("moe/linear_v/w", (e, d, f), 1, ("experts", "embed", "ffn")),
        ("multi_head_attention/key/w", (d, c.kv_size), 1, ("embed", "kv_heads")),
        ("multi_head_attention/linear/w", (c.q_size, d), s, ("q_heads", "embed")),
        ("multi_head_attention/query/w", (d, c.q_size), 1, ("embed", "q_heads")),
        ("multi_head_attention/value/w", (d, c.kv_size), 1, ("embed", "kv_heads")),
        ("rms_norm/scale", (d,), 0, ("norm",)),
        ("rms_norm_1/scale", (d,), 0, ("norm",)),
        ("rms_norm_2/scale", (d,), 0, ("norm",)),
        ("rms_norm_3/scale", (d,), 0, ("norm",)),
        ("router/w", (d, e), 0, ("router_in", "router_experts")),
    ] + ([
        ("dense_mlp/linear/w", (d, c.dense_ffn_size), 1, ("embed", "dense_ffn")),
        ("dense_mlp/linear_1/w", (c.dense_ffn_size, d), s, ("dense_ffn", "embed")),
        ("dense_mlp/linear_v/w", (d, c.dense_ffn_size), 1, ("embed", "dense_ffn")),
    ] if c.dense_ffn_size else [])


def checkpoint_entries(config: GrokConfig) -> list[Entry]:
    """Every leaf of the checkpoint, in file order (the order jax flattens the release's dict)."""
    named: list[tuple[str, tuple[int, ...], int, int | None, str, str, tuple[str, ...]]] = [
        (f"{EMBED_MODULE}/embeddings", (config.vocab_size, config.emb_size), 0, None,
         EMBED_MODULE, "embeddings", ("vocab", "embed")),
        (f"{FINAL_NORM_MODULE}/scale", (config.emb_size,), 0, None, FINAL_NORM_MODULE, "scale",
         ("norm",)),
    ]
    if not config.tied_embedding:   # a separate output matrix, [vocab, embed] like the table
        named.append((f"{LM_HEAD_MODULE}/embeddings", (config.vocab_size, config.emb_size), 0,
                      None, LM_HEAD_MODULE, "embeddings", ("vocab", "embed")))
    for layer in range(config.num_layers):
        for sub, shape, blocks, axes in _layer_leaves(config):
            module, param = sub.rsplit("/", 1)
            named.append((f"transformer/decoder_layer_{layer}/{sub}", shape, blocks, layer,
                          f"{LAYER_MODULE}/{module}", param, axes))
    named.sort(key=lambda item: item[0])
    fmt = FORMAT_BITS.get(config.weight_bits)   # (None: bfloat16 matrices, unquantised)
    return [Entry(i, name, shape, fmt if blocks else None,
                  _blocks(config, shape, blocks) if fmt else 0, layer, module, param, axes,
                  bf16=bool(blocks) and fmt is None)
            for i, (name, shape, blocks, layer, module, param, axes) in enumerate(named)]


def _blocks(config: GrokConfig, shape: tuple[int, ...], release_blocks: int) -> int:
    """S of a leaf's scales: the release's row blocks for int8; for int4 one scale per group of
    the largest divisor of In not above the config's group_size."""
    if not release_blocks or config.weight_bits == 8:
        return release_blocks
    return shape[-2] // group_size_for(shape[-2], config.group_size)


def model_tree(config: GrokConfig, make: Callable[[Entry, bool], Any],
               scan: bool = True) -> dict[str, Any]:
    """The model's params tree with `make(entry, stacked)` at every leaf. Scanned, the layer tree
    is made once from layer 0's entries with stacked=True (its leaves stand for all layers, with a
    leading [num_layers] axis); unrolled, `layers` is a tuple of per-layer trees."""
    embed: dict[str, dict[str, Any]] = {}
    layers: list[dict[str, dict[str, Any]]] = [{} for _ in range(1 if scan else config.num_layers)]
    for entry in checkpoint_entries(config):
        if entry.layer is None:
            embed.setdefault(entry.module, {})[entry.param] = make(entry, False)
        elif not scan or entry.layer == 0:
            tree = layers[0 if scan else entry.layer]
            tree.setdefault(entry.module, {})[entry.param] = make(entry, scan)
    return {"embed": embed, "layers": layers[0] if scan else tuple(layers)}


Flat = Mapping[str, Any]   # SPEC §3 path -> numpy array or QuantizedWeight


def _stack(trees: list[Any]) -> Any:
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def to_model_params(flat: Flat, config: GrokConfig, scan: bool = True) -> dict[str, Any]:
    """Checkpoint leaves (by SPEC path) -> the model's tree. Layer leaves are stacked for the scan."""
    embed: dict[str, dict[str, Any]] = {}
    layers: list[dict[str, dict[str, Any]]] = [{} for _ in range(config.num_layers)]
    for entry in checkpoint_entries(config):
        target = embed if entry.layer is None else layers[entry.layer]
        target.setdefault(entry.module, {})[entry.param] = flat[entry.name]
    return {"embed": embed, "layers": _stack(layers) if scan else tuple(layers)}


def layer_list(params: dict[str, Any]) -> list[Any]:
    """Per-layer trees, whichever way `params["layers"]` is laid out."""
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return list(layers)
    count = jax.tree.leaves(layers)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(count)]


def is_scanned(params: dict[str, Any]) -> bool:
    return not isinstance(params["layers"], (tuple, list))


def from_model_params(params: dict[str, Any], config: GrokConfig) -> dict[str, Any]:
    """The model's tree -> checkpoint leaves by SPEC path (numpy), the inverse of to_model_params."""
    layers = layer_list(params)
    flat = {}
    for entry in checkpoint_entries(config):
        tree = params["embed"] if entry.layer is None else layers[entry.layer]
        flat[entry.name] = jax.tree.map(np.asarray, tree[entry.module][entry.param])
    return flat


def map_entries(config: GrokConfig,
                make: Callable[[Entry], Any]) -> dict[str, Any]:
    """{SPEC path: make(entry)} over all entries, e.g. to build abstract or random leaves."""
    return {entry.name: make(entry) for entry in checkpoint_entries(config)}


def abstract_flat(config: GrokConfig, embed_dtype: Any = jnp.bfloat16) -> dict[str, Any]:
    """ShapeDtypeStructs of every leaf as the model holds them (nothing allocated)."""
    def make(entry: Entry) -> Any:
        if entry.quantized:
            return QuantizedWeight(jax.ShapeDtypeStruct(entry.weight_shape, entry.fmt.dtype),
                                   jax.ShapeDtypeStruct(entry.scales_shape, jnp.bfloat16),
                                   entry.fmt)
        dtype = embed_dtype if entry.param == "embeddings" else entry.float_dtype
        return jax.ShapeDtypeStruct(entry.shape, dtype)
    return map_entries(config, make)


def abstract_params(config: GrokConfig, scan: bool = True) -> dict[str, Any]:
    """The model's tree as ShapeDtypeStructs: lower and compile Grok-1 with no weights in memory."""
    def make(entry: Entry, stacked: bool) -> Any:
        lead = (config.num_layers,) if stacked else ()
        if entry.quantized:
            return QuantizedWeight(
                jax.ShapeDtypeStruct((*lead, *entry.weight_shape), entry.fmt.dtype),
                jax.ShapeDtypeStruct((*lead, *entry.scales_shape), jnp.bfloat16), entry.fmt)
        return jax.ShapeDtypeStruct((*lead, *entry.shape), entry.float_dtype)
    return model_tree(config, make, scan)


def random_flat(config: GrokConfig, seed: int = 0, weight_scale: float = 1.0) -> dict[str, Any]:
    """Random float weights quantized like a release checkpoint (numpy; for tests and benchmarks).

    Matrices get fan-in scaled normals (times `weight_scale`); norm scales are near 1.
    """
    rng = np.random.default_rng(seed)

    def make(entry: Entry) -> Any:
        if entry.param == "scale":
            return (1.0 + 0.1 * rng.standard_normal(entry.shape)).astype(np.float32)
        w = (weight_scale / np.sqrt(entry.fan_in)) * rng.standard_normal(entry.shape, np.float32)
        if not entry.quantized:
            return w.astype(ml_dtypes.bfloat16 if entry.bf16 else np.float32)
        if entry.fmt.bits == 4:
            return quantize_int4(w, entry.group_size)
        return quantize(w, entry.scale_blocks)
    return map_entries(config, make)


def describe(leaf: Any) -> str:
    """Shape and dtype of a leaf for error messages."""
    if is_quantized(leaf):
        return (f"QuantizedWeight(weight {leaf.weight.dtype}{list(leaf.weight.shape)}, "
                f"scales {leaf.scales.dtype}{list(leaf.scales.shape)})")
    return f"{getattr(leaf, 'dtype', type(leaf).__name__)}{list(getattr(leaf, 'shape', ()))}"
