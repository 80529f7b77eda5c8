"""Where a checkpoint's bytes are, independent of its file format: the streaming loader plans and
copies slices through a `CheckpointReader` only.

A reader answers, for each leaf of the leaf table (a `grok.leaves.Entry`), the leaf's parts
({"array"} or {"weight", "scales"}) as `Part`s: the file holding the bytes and an `ArrayRef`
(shape, dtype, and an offset + length in that file, or the bytes inline). `ReleaseReader` reads
the release's pickles (their headers only, through the allow-list); a reader for another format
(e.g. safetensors: one JSON header per file naming each tensor's dtype, shape and byte range)
is `SafetensorsReader`; `as_reader` picks by the files in ckpt-0/.
"""
from __future__ import annotations

import abc
import dataclasses
from pathlib import Path

from grok.checkpoint.arrays import ArrayRef, leaf_problem
from grok.checkpoint import safetensors_io
from grok.checkpoint.directory import (SAFETENSORS, ST_SUFFIX, PathLike, check_files,
                                       checkpoint_dir, checkpoint_format, tensor_suffix)
from grok.checkpoint.header import read_header
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.leaves import Entry, checkpoint_entries


@dataclasses.dataclass(frozen=True)
class Part:
    """One array of a leaf: `file` holds its bytes where `array.raw` says (or they are inline)."""

    file: str
    array: ArrayRef


class CheckpointReader(abc.ABC):
    """A checkpoint's leaves located in its files. `name` names the checkpoint in messages."""

    name: str = "checkpoint"

    @abc.abstractmethod
    def locate(self, entry: Entry) -> dict[str, Part]:
        """The parts of `entry`'s leaf ({"array": ...} of a float32 leaf, {"weight": ...,
        "scales": ...} of a quantised one), already checked against `entry` (shapes, dtypes).
        Problems -> CheckpointError naming the file."""

    def __str__(self) -> str:
        return self.name


class ReleaseReader(CheckpointReader):
    """The release format (SPEC §3): one pickle per leaf in `ckpt-0/`, located by parsing each
    file's header under the allow-list (a few hundred bytes read per file)."""

    def __init__(self, path: PathLike, config: GrokConfig) -> None:
        self.directory: Path = checkpoint_dir(path)
        self.name = str(self.directory)
        tensor_suffix(self.directory, config)   # fail before any reading: int8 only,
        check_files(self.directory, checkpoint_entries(config))   # every file there

    def locate(self, entry: Entry) -> dict[str, Part]:
        file = self.directory / entry.filename
        header = read_header(file)
        problem = leaf_problem(header.parts, entry)
        if problem:
            raise CheckpointError(f"{file}: {problem} (leaf {entry.name})")
        return {part: Part(str(file), ref) for part, ref in header.parts.items()}


class SafetensorsReader(CheckpointReader):
    """A converted checkpoint: one safetensors file per leaf in `ckpt-0/`, located by parsing
    each file's JSON header (bounded, checked against the file's size and the leaf table)."""

    def __init__(self, path: PathLike, config: GrokConfig) -> None:
        self.directory: Path = checkpoint_dir(path)
        self.name = str(self.directory)
        check_files(self.directory, checkpoint_entries(config), ST_SUFFIX)

    def locate(self, entry: Entry) -> dict[str, Part]:
        header = safetensors_io.read_st_header(self.directory / safetensors_io.filename(entry))
        parts = safetensors_io.leaf_parts(header, entry)
        return {part: Part(header.path, ref) for part, ref in parts.items()}


def as_reader(source: CheckpointReader | PathLike, config: GrokConfig) -> CheckpointReader:
    """`source` itself when it is a reader, else the reader of the directory `source`'s format
    (SafetensorsReader or ReleaseReader)."""
    if isinstance(source, CheckpointReader):
        return source
    if checkpoint_format(checkpoint_dir(source)) == SAFETENSORS:
        return SafetensorsReader(source, config)
    return ReleaseReader(source, config)
