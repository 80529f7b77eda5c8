"""The parameter layout, in one place: checkpoint file index <-> SPEC §3 path <-> model leaf.

The model holds `{"embed": {...}, "layers": ...}`: `embed` is the haiku tree of the embedding and
the final norm; `layers` is one haiku tree of a decoder layer whose leaves are stacked on a leading
[num_layers] axis (for the layer scan), or a tuple of per-layer trees (for the unrolled model).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from grok.config import GrokConfig
from grok.quant import QuantizedWeight8bit, is_quantized, quantize

LAYER_MODULE = "decoder_layer"   # the haiku name of one layer inside the layer transform
EMBED_MODULE = "language_model/in_out_embed"
FINAL_NORM_MODULE = "language_model/rms_norm"
_LAYER_NAME = re.compile(r"^transformer/decoder_layer_(\d+)/(.+)/([^/]+)$")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint file: `ckpt-0/tensor{index:05d}_000` holds the leaf `name`."""

    index: int
    name: str                 # SPEC §3 path, e.g. transformer/decoder_layer_3/router/w
    shape: tuple[int, ...]
    quantized: bool           # QuantizedWeight8bit (int8 + bfloat16 scales) or float32 array
    scale_blocks: int = 0     # S of scales [..., S, out]; 0 for float32 leaves
    layer: int | None = None  # decoder layer index, None for the embedding / final norm
    module: str = ""          # haiku module path inside its tree (embed tree or layer tree)
    param: str = ""           # haiku parameter name

    @property
    def filename(self) -> str:
        return f"tensor{self.index:05d}_000"

    @property
    def tree_path(self) -> str:
        """Where the leaf sits in the model's params tree: "embed/<module>/<param>" or
        "layers/decoder_layer/<module>/<param>" (the same path for every layer)."""
        return f"{'embed' if self.layer is None else 'layers'}/{self.module}/{self.param}"

    @property
    def scales_shape(self) -> tuple[int, ...]:
        return (*self.shape[:-2], self.scale_blocks, self.shape[-1])


def _layer_leaves(c: GrokConfig) -> list[tuple[str, tuple[int, ...], int]]:
    """(sub-path, shape, scale blocks or 0) of one layer, in file order (paths sorted as strings)."""
    d, e, f, s = c.emb_size, c.num_experts, c.ffn_size, c.scale_blocks
    return [
        ("moe/linear/w", (e, d, f), 1),
        ("moe/linear_1/w", (e, f, d), s),
        ("moe/linear_v/w", (e, d, f), 1),
        ("multi_head_attention/key/w", (d, c.kv_size), 1),
        ("multi_head_attention/linear/w", (c.q_size, d), s),
        ("multi_head_attention/query/w", (d, c.q_size), 1),
        ("multi_head_attention/value/w", (d, c.kv_size), 1),
        ("rms_norm/scale", (d,), 0),
        ("rms_norm_1/scale", (d,), 0),
        ("rms_norm_2/scale", (d,), 0),
        ("rms_norm_3/scale", (d,), 0),
        ("router/w", (d, e), 0),
    ]


def checkpoint_entries(config: GrokConfig) -> list[Entry]:
    """Every leaf of the checkpoint, in file order (the order jax flattens the release's dict)."""
    named: list[tuple[str, tuple[int, ...], int, int | None, str, str]] = [
        (f"{EMBED_MODULE}/embeddings", (config.vocab_size, config.emb_size), 0, None,
         EMBED_MODULE, "embeddings"),
        (f"{FINAL_NORM_MODULE}/scale", (config.emb_size,), 0, None, FINAL_NORM_MODULE, "scale"),
    ]
    for layer in range(config.num_layers):
        for sub, shape, blocks in _layer_leaves(config):
            module, param = sub.rsplit("/", 1)
            named.append((f"transformer/decoder_layer_{layer}/{sub}", shape, blocks, layer,
                          f"{LAYER_MODULE}/{module}", param))
    named.sort(key=lambda item: item[0])
    return [Entry(i, name, shape, blocks > 0, blocks, layer, module, param)
            for i, (name, shape, blocks, layer, module, param) in enumerate(named)]


Flat = Mapping[str, Any]   # SPEC §3 path -> numpy array or QuantizedWeight8bit


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
            return QuantizedWeight8bit(jax.ShapeDtypeStruct(entry.shape, jnp.int8),
                                       jax.ShapeDtypeStruct(entry.scales_shape, jnp.bfloat16))
        dtype = embed_dtype if entry.param == "embeddings" else jnp.float32
        return jax.ShapeDtypeStruct(entry.shape, dtype)
    return map_entries(config, make)


def abstract_params(config: GrokConfig, scan: bool = True) -> dict[str, Any]:
    """The model's tree as ShapeDtypeStructs: lower and compile Grok-1 with no weights in memory."""
    tree = to_model_params(abstract_flat(config), config, scan=False)
    if scan:
        stack = lambda x: jax.ShapeDtypeStruct((config.num_layers, *x.shape), x.dtype)
        tree["layers"] = jax.tree.map(stack, tree["layers"][0])
    return tree


def random_flat(config: GrokConfig, seed: int = 0, weight_scale: float = 1.0) -> dict[str, Any]:
    """Random float weights quantized like a release checkpoint (numpy; for tests and benchmarks).

    Matrices get fan-in scaled normals (times `weight_scale`); norm scales are near 1.
    """
    rng = np.random.default_rng(seed)

    def make(entry: Entry) -> Any:
        if entry.param == "scale":
            return (1.0 + 0.1 * rng.standard_normal(entry.shape)).astype(np.float32)
        fan_in = entry.shape[-1] if entry.param == "embeddings" else entry.shape[-2]
        w = (weight_scale / np.sqrt(fan_in)) * rng.standard_normal(entry.shape, np.float32)
        return quantize(w, entry.scale_blocks) if entry.quantized else w.astype(np.float32)
    return map_entries(config, make)


def describe(leaf: Any) -> str:
    """Shape and dtype of a leaf for error messages."""
    if is_quantized(leaf):
        return (f"QuantizedWeight8bit(weight {leaf.weight.dtype}{list(leaf.weight.shape)}, "
                f"scales {leaf.scales.dtype}{list(leaf.scales.shape)})")
    return f"{getattr(leaf, 'dtype', type(leaf).__name__)}{list(getattr(leaf, 'shape', ()))}"
