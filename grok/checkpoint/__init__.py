"""Checkpoints in the Grok-1 release layout (SPEC §3), read and written safely.

A checkpoint directory holds `ckpt-0/tensor{i:05d}_000`, one protocol-4 pickle per leaf (leaf i is
`grok.leaves.checkpoint_entries(config)[i]`), and optionally `config.json`. The modules:

- arrays.py     format-neutral array descriptions (ArrayRef) and `leaf_problem`, the one check of
                a leaf's shapes and dtypes against the leaf table
- opcodes.py    the strict, bounded pickle opcode reader: the only code that reads a pickle
- unpickle.py   the allow-list (inert stand-ins for the few globals) and the one validator of the
                release's two file shapes (C order, little-endian, data where the header says);
                `parse_file`, shared by every reader
- directory.py  the directory layout: `checkpoint_dir`, `check_files`, `read_config`,
                `load_inputs` (every file a load may read)
- values.py     what values may be: `scales_problem` (every load's check of the scales it reads),
                `scan_part` (verify's reading of floats, scales and int4 values)
- partial.py    the temporary directories writers rename into place, and the removal of those
                a killed run left
- release.py    whole files: `load_tensor`, `save_tensor`, `read_checkpoint`, `write_checkpoint`
- header.py     `read_header`: a file's arrays located by offset without reading their data
- safetensors_io.py  converted checkpoints (`ckpt-0/tensor{i:05d}_000.safetensors`, int8 or
                int4): the bounded header parser, checked against the file and the leaf table;
                whole-leaf reads and writes
- convert.py    `convert`: release -> safetensors, int8 or int4, never a half-written destination
- reader.py     `CheckpointReader` (leaf -> files and byte ranges), `ReleaseReader`,
                `SafetensorsReader`
- fileio.py     byte copies of array slices into host arrays (pread / memory map)
- loader.py     `load_params`: streaming, sharded loading through a CheckpointReader
- verify.py     `verify`: check a downloaded checkpoint without loading it
- digests.py    `verify_digests`: every file's SHA-256 against a sha256sum manifest, placed by
                one rule (`manifest_base`)
- __main__.py   `python -m grok.checkpoint verify|convert|plan`

This package imports grok.config, grok.errors, grok.files, grok.leaves, grok.quant and
grok.progress only.
"""
from __future__ import annotations

from grok.checkpoint.directory import (CKPT_DIR, CONFIG_FILE, PathLike, check_files,
                                       checkpoint_dir, read_config)
from grok.checkpoint.header import Header, read_header
from grok.checkpoint.reader import CheckpointReader, Part, ReleaseReader, SafetensorsReader
from grok.checkpoint.release import (load_tensor, read_checkpoint, save_tensor,
                                     write_checkpoint)
from grok.errors import CheckpointError

__all__ = ["CKPT_DIR", "CONFIG_FILE", "CheckpointError", "CheckpointReader", "Header", "Part",
           "PathLike", "ReleaseReader", "SafetensorsReader", "check_files", "checkpoint_dir",
           "load_tensor", "read_checkpoint", "read_config", "read_header", "save_tensor", "write_checkpoint"]
