"""Grok-2's release as published (`xai-org/grok-2`): safetensors files named
`pytorch_model-000NN-TP-common.safetensors` (whole tensors, one kind for all layers per file) and
`pytorch_model-000NN-TP-{rank:03d}.safetensors` (the experts, split by tensor-parallel rank: w1
and w3 along their rows, w2 along its columns), PyTorch layout ([out, in]), bfloat16.

`RELEASE_MAP` is the declarative release-name -> leaf map: for each leaf of the leaf table (by
its path below the layer, or its full path), the release tensor it comes from and how (as it
is, transposed to [in, out], or the experts stacked [E, in, out] with the ranks' pieces joined).
`Grok2Release` indexes a directory's files (each header read once and checked by
grok.checkpoint.safetensors_io) and builds one leaf at a time (`leaf`), so a caller holds at most
one leaf beyond what it keeps. It knows no model: the leaf table (grok.leaves) says the shapes.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from grok.checkpoint.arrays import ArrayRef
from grok.checkpoint.fileio import Mapped
from grok.checkpoint.safetensors_io import read_st_header
from grok.config import GrokConfig
from grok.errors import CheckpointError, one_line
from grok.leaves import EMBED_MODULE, FINAL_NORM_MODULE, LM_HEAD_MODULE, Entry, checkpoint_entries

FILE_PATTERN = re.compile(r"pytorch_model-(\d{5})-TP-(common|\d{3})\.safetensors")
BF16 = np.dtype(ml_dtypes.bfloat16)
RELEASE_DTYPES = (BF16, np.dtype(np.float32))


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one leaf comes from: the release tensor's name ({layer} and, for experts,
    {expert} filled in) and how: "as is", "transpose" ([out, in] -> [in, out]), or "experts"
    (each expert's matrix transposed and stacked; `split` the release axis its ranks divide)."""

    tensor: str
    how: str = "transpose"
    split: int = 0


_LAYER = "model.layers.{layer}."
RELEASE_MAP: dict[str, Source] = {
    f"{EMBED_MODULE}/embeddings": Source("model.embed_tokens.weight", "as is"),
    f"{LM_HEAD_MODULE}/embeddings": Source("lm_head.weight", "as is"),
    f"{FINAL_NORM_MODULE}/scale": Source("model.norm.weight", "as is"),
    "multi_head_attention/query/w": Source(_LAYER + "self_attn.q_proj.weight"),
    "multi_head_attention/key/w": Source(_LAYER + "self_attn.k_proj.weight"),
    "multi_head_attention/value/w": Source(_LAYER + "self_attn.v_proj.weight"),
    "multi_head_attention/linear/w": Source(_LAYER + "self_attn.o_proj.weight"),
    "rms_norm/scale": Source(_LAYER + "pre_attn_norm.weight", "as is"),
    "rms_norm_1/scale": Source(_LAYER + "post_attn_norm.weight", "as is"),
    "rms_norm_2/scale": Source(_LAYER + "pre_moe_norm.weight", "as is"),
    "rms_norm_3/scale": Source(_LAYER + "post_moe_norm.weight", "as is"),
    "router/w": Source(_LAYER + "block_sparse_moe.gate.weight"),
    "moe/linear/w": Source(_LAYER + "block_sparse_moe.experts.{expert}.w1.weight", "experts", 0),
    "moe/linear_v/w": Source(_LAYER + "block_sparse_moe.experts.{expert}.w3.weight", "experts", 0),
    "moe/linear_1/w": Source(_LAYER + "block_sparse_moe.experts.{expert}.w2.weight", "experts", 1),
    "dense_mlp/linear/w": Source(_LAYER + "mlp.gate_proj.weight"),
    "dense_mlp/linear_v/w": Source(_LAYER + "mlp.up_proj.weight"),
    "dense_mlp/linear_1/w": Source(_LAYER + "mlp.down_proj.weight"),
}


def source_of(entry: Entry) -> Source:
    """The release source of a leaf of the table (by its path below the layer, or whole)."""
    key = entry.name if entry.layer is None else entry.name.split("/", 2)[2]
    try:
        return RELEASE_MAP[key]
    except KeyError:
        raise CheckpointError(f"the Grok-2 release has no tensor for leaf {entry.name}") from None


def release_files(path: str | os.PathLike) -> dict[str, list[Path]]:
    """{"common": [...], "000": [...], ...}: the directory's release files by rank."""
    found: dict[str, list[Path]] = {}
    for p in sorted(Path(path).iterdir()):
        match = FILE_PATTERN.fullmatch(p.name)
        if match:
            found.setdefault(match.group(2), []).append(p)
    return found


def is_release(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory holding Grok-2 release files."""
    p = Path(path)
    return p.is_dir() and "common" in release_files(p)


class Grok2Release:
    """The tensors of a Grok-2 release directory, indexed by name (and rank, for experts)."""

    def __init__(self, path: str | os.PathLike, config: GrokConfig):
        self.path = Path(path)
        self.config = config
        files = release_files(self.path)
        if "common" not in files:
            raise CheckpointError(f"{self.path}: no pytorch_model-*-TP-common.safetensors files "
                                  "(not a Grok-2 release directory)")
        ranks = sorted(r for r in files if r != "common")
        if not ranks or ranks != [f"{i:03d}" for i in range(len(ranks))]:
            raise CheckpointError(f"{self.path}: expert files of ranks {', '.join(ranks) or 'none'}"
                                  f"; expected TP-000 to TP-{max(len(ranks), 1) - 1:03d} without "
                                  "a gap (a partial download?)")
        self.ranks = len(ranks)
        # name -> {rank ("common" or "000"...): (file, ref)}
        self.index: dict[str, dict[str, tuple[str, ArrayRef]]] = {}
        for rank, paths in files.items():
            for p in paths:
                header = read_st_header(p)
                for name, ref in header.tensors.items():
                    if ref.dtype not in RELEASE_DTYPES:
                        raise CheckpointError(f"{p}: tensor {one_line(repr(name), 120)} is "
                                              f"{ref.dtype}, expected bfloat16 or float32")
                    seen = self.index.setdefault(name, {})
                    if rank in seen:
                        raise CheckpointError(f"{p}: tensor {one_line(repr(name), 120)} is also "
                                              f"in {seen[rank][0]}")
                    seen[rank] = (str(p), ref)
        self._maps: dict[str, Mapped] = {}

    def __str__(self) -> str:
        return f"{self.path} (Grok-2 release, {self.ranks} expert ranks)"

    def files(self) -> list[str]:
        return sorted({f for ranks in self.index.values() for f, _ in ranks.values()})

    def _array(self, name: str, rank: str, shape: tuple[int, ...]) -> np.ndarray:
        """Release tensor `name` of `rank`, checked against `shape` (a view of the file)."""
        file, ref = self._ref(name, rank, shape)
        if file not in self._maps:
            self._maps[file] = Mapped(file)
        return self._maps[file].array(ref)

    def check(self) -> int:
        """Every tensor the config's leaves need is there, in its file's header, of the shape
        the config gives (views of the files made, no data read): the number of files, or a
        one-line CheckpointError."""
        for entry in checkpoint_entries(self.config):
            self.lazy_leaf(entry)
        self.close()
        return len(self.files())

    def _ref(self, name: str, rank: str, shape: tuple[int, ...]) -> tuple[str, ArrayRef]:
        """Release tensor `name` of `rank`: (file, ref), checked against `shape`."""
        found = self.index.get(name, {})
        if rank not in found:
            where = "the common files" if rank == "common" else f"the TP-{rank} files"
            raise CheckpointError(f"{self.path}: tensor {name} is not in {where}")
        file, ref = found[rank]
        if ref.shape != shape:
            raise CheckpointError(f"{file}: tensor {name} is {list(ref.shape)}, the config "
                                  f"needs {list(shape)}")
        return file, ref

    def leaf(self, entry: Entry) -> np.ndarray:
        """Leaf `entry` in the table's layout and dtype (bfloat16 matrices, float32 norms and
        router; the embedding tables as stored), a new array (no view of a file)."""
        return self.lazy_leaf(entry)[tuple(slice(None) for _ in entry.shape)]

    def leaves(self) -> Iterator[tuple[Entry, np.ndarray]]:
        """Every leaf of the config's table, one at a time, in file order."""
        try:
            for entry in checkpoint_entries(self.config):
                yield entry, self.leaf(entry)
        finally:
            self.close()

    def lazy_leaves(self) -> Iterator[tuple[Entry, "LazyLeaf"]]:
        """Every leaf as a LazyLeaf, in file order: an indexed slice reads only its rows (each
        device's slices, for grok.checkpoint.placement; with the model axis as the ranks, a
        device's expert slices come from its own rank's files)."""
        try:
            for entry in checkpoint_entries(self.config):
                yield entry, self.lazy_leaf(entry)
        finally:
            self.close()

    def lazy_leaf(self, entry: Entry) -> "LazyLeaf":
        """Leaf `entry` as views of the files' memory maps, read when indexed."""
        src = source_of(entry)
        name = src.tensor.format(layer=entry.layer, expert="{expert}")
        if src.how == "as is":
            return LazyLeaf(entry, [[self._array(name, "common", entry.shape)]], None)
        if src.how == "transpose":
            view = self._array(name, "common", entry.shape[::-1]).T
            return LazyLeaf(entry, [[view]], None)
        experts, inp, out = entry.shape
        piece = [out, inp]
        if piece[src.split] % self.ranks:
            raise CheckpointError(f"{self.path}: {self.ranks} ranks do not divide {entry.name}'s "
                                  f"{['rows', 'columns'][src.split]} ({piece[src.split]})")
        piece[src.split] //= self.ranks
        views = [[self._array(name.format(expert=e), f"{r:03d}", tuple(piece)).T
                  for r in range(self.ranks)] for e in range(experts)]
        return LazyLeaf(entry, views, 1 - src.split)   # (the split axis, in [in, out] terms)

    def unused(self) -> list[str]:
        """Release tensors no leaf reads (a release of another shape would leave some)."""
        used = set()
        for entry in checkpoint_entries(self.config):
            src = source_of(entry)
            experts = range(self.config.num_experts) if src.how == "experts" else [0]
            used |= {src.tensor.format(layer=entry.layer, expert=e) for e in experts}
        return sorted(set(self.index) - used)

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()


def open_release(path: str | os.PathLike, config: GrokConfig) -> Grok2Release:
    """A Grok-2 release directory's index, checked against the config before any data is read:
    a tensor the config's leaves do not read means the config and files disagree (refused)."""
    release = Grok2Release(path, config)
    extra = release.unused()
    if extra:
        raise CheckpointError(f"{path}: {len(extra)} release tensor(s) the config has no leaf "
                              f"for, e.g. {extra[0]} (config.json and the files disagree)")
    return release


class LazyLeaf:
    """One leaf in the table's layout over views of the release files (nothing read yet):
    `leaf[index]` (a tuple of step-1 slices) reads only the rows that slice needs and returns
    them as a new array in the leaf's dtype. Experts are a list of rank pieces per expert,
    joined along `axis` of each expert's [in, out] matrix."""

    def __init__(self, entry: Entry, views: list[list[np.ndarray]], axis: int | None):
        self.entry, self.views, self.axis = entry, views, axis
        self.shape, self.dtype = tuple(entry.shape), np.dtype(entry.float_dtype)

    def __getitem__(self, index: tuple[slice, ...]) -> np.ndarray:
        if self.axis is None:
            return np.array(self.views[0][0][index], dtype=self.dtype)
        experts, *inner = (range(*s.indices(n)) for s, n in zip(index, self.shape))
        out = np.empty((len(experts), *(len(r) for r in inner)), self.dtype)
        for i, e in enumerate(experts):
            want = inner[self.axis]
            start = 0
            for piece in self.views[e]:   # the ranks' pieces along the split axis, in order
                size = piece.shape[self.axis]
                lo, hi = max(want.start, start), min(want.stop, start + size)
                if lo < hi:
                    take = [slice(r.start, r.stop) for r in inner]
                    take[self.axis] = slice(lo - start, hi - start)
                    put = [slice(None)] * 2
                    put[self.axis] = slice(lo - want.start, hi - want.start)
                    out[(i, *put)] = piece[tuple(take)]
                start += size
        return out
