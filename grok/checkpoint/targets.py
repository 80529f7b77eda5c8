"""The streaming loader's plan: one Target per leaf of the params tree (its shape, dtype and
sharding, the per-layer piece sharding of a stacked leaf), which targets each checkpoint file
feeds, and the params tree assembled from the filled targets at the end."""
from __future__ import annotations

import dataclasses
from concurrent.futures import Future
from typing import Any

import numpy as np

from grok.checkpoint import fileio, transfer
from grok.config import GrokConfig
from grok.errors import ShardingError
from grok.leaves import Entry, checkpoint_entries, model_tree
from grok.quant import QuantizedWeight8bit


@dataclasses.dataclass
class Target:
    """One leaf of the params tree (a whole array or one part of a QuantizedWeight8bit)."""

    path: str                    # tree path, e.g. layers/decoder_layer/moe/linear/w/weight
    part: str                    # "array", "weight" or "scales"
    layer_shape: tuple[int, ...]  # shape of one file's part
    dtype: np.dtype              # dtype on device
    stacked: bool                # has a leading [L] axis filled layer by layer
    sharding: Any = None         # of the whole leaf
    piece_sharding: Any = None   # of one layer's piece (stacked leaves)
    array: Any = None            # the global jax.Array being filled
    buffers: dict[tuple, np.ndarray] | None = None   # aliasing path: the final host arrays
    layers_done: int = 0


def shardings_of(shardings: Any, entry: Entry, scan: bool) -> dict[str, Any]:
    """{part: sharding} of `entry`'s leaf in the shardings tree."""
    where = entry.tree_path + ("" if entry.layer is None or scan else f" (layer {entry.layer})")
    try:
        tree = shardings["embed"] if entry.layer is None else \
            shardings["layers"] if scan else shardings["layers"][entry.layer]
        node = tree[entry.module][entry.param]
    except (KeyError, IndexError, TypeError):
        raise ShardingError(f"shardings: no sharding for {where}") from None
    if isinstance(node, QuantizedWeight8bit) != entry.quantized:
        want = "a QuantizedWeight8bit of two shardings" if entry.quantized else "one sharding"
        raise ShardingError(f"shardings: {where} needs {want}")
    return {"weight": node.weight, "scales": node.scales} if entry.quantized else {"array": node}


def part_path(entry: Entry, part: str) -> str:
    """The tree path of one part of a leaf: the leaf's own, or ".../weight", ".../scales"."""
    return entry.tree_path if part == "array" else f"{entry.tree_path}/{part}"


def target_key(entry: Entry, part: str, scan: bool) -> str:
    """The target a part of `entry` fills: one per tree leaf (stacked layers share one), or per
    layer in the unrolled model."""
    path = part_path(entry, part)
    return path if entry.layer is None or scan else f"{path}@{entry.layer}"


def plan_targets(config: GrokConfig, shardings: Any, scan: bool, embed_dtype: np.dtype
                 ) -> tuple[dict[str, Target], list[tuple[Entry, list[Target]]]]:
    """The leaves to build, and for each checkpoint file (in file order) the targets it feeds."""
    targets: dict[str, Target] = {}
    per_file = []
    for entry in checkpoint_entries(config):
        parts = ({"weight": (entry.weight_shape, np.dtype(entry.fmt.dtype)),
                  "scales": (entry.scales_shape, np.dtype(entry.fmt.scales_dtype))}
                 if entry.quantized else
                 {"array": (entry.shape, embed_dtype if entry.param == "embeddings"
                            else np.dtype(entry.float_dtype))})
        placed = shardings_of(shardings, entry, scan)
        feeds = []
        for part, (shape, dtype) in parts.items():
            path = part_path(entry, part)
            stacked = entry.layer is not None and scan
            key = target_key(entry, part, scan)
            if key not in targets:
                sharding = placed[part]
                piece = transfer.layer_piece_sharding(sharding, path) if stacked else None
                targets[key] = Target(path, part, tuple(shape), np.dtype(dtype), stacked,
                                      sharding, piece)
            feeds.append(targets[key])
        per_file.append((entry, feeds))
    return targets, per_file


@dataclasses.dataclass
class Piece:
    """This process's slice `index` of one part of a file, to be copied into `host`."""

    target: Target
    key: tuple        # of the slice, as the device map of the piece's sharding says it
    index: fileio.Index
    host: np.ndarray


@dataclasses.dataclass
class FileWork:
    """One file being loaded: its slices, their copies in flight, the files they read from."""

    entry: Entry
    feeds: list[Target]
    sources: dict[str, fileio.Source]            # by file name: the files the parts are in
    pieces: list[Piece]
    futures: list[Future]
    held: int                                   # bytes of slices, for LoadStats
    raws: list[np.ndarray] = dataclasses.field(default_factory=list)   # pool buffers taken
    files: dict[str, str] = dataclasses.field(default_factory=dict)    # part -> file it is in

    def close(self) -> None:
        """Close the files (a view a worker still holds keeps its memory map alive)."""
        for source in self.sources.values():
            source.close()


def assemble(config: GrokConfig, targets: dict[str, Target], scan: bool) -> dict[str, Any]:
    """The params tree from the filled targets."""
    def leaf(entry: Entry, stacked: bool) -> Any:
        if entry.quantized:
            return QuantizedWeight8bit(targets[target_key(entry, "weight", scan)].array,
                                       targets[target_key(entry, "scales", scan)].array,
                                       entry.fmt)
        return targets[target_key(entry, "array", scan)].array
    return model_tree(config, leaf, scan)
