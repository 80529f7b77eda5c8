"""`convert`: a checkpoint -> a safetensors checkpoint of int8 or int4 weights (`python -m
grok.checkpoint convert SRC DST --bits {4,8} [--group-size G]`). SRC is the release (int8
pickles) or a checkpoint convert wrote; `read_source_leaf` reads either, so the conversion itself
does not depend on the source's format.

Files are converted one at a time (host memory: one leaf, and one expert's float32 copy while
requantising), into a temporary sibling of DST (`DST.partial-convert-pid<PID>-<random>`, removed
on any error, Ctrl-C or SIGTERM; one a killed run left is removed by the next run to DST, see
partial.py) that is renamed to DST at the end: DST is never half-written, an existing DST is
never touched, and a DST inside SRC is refused. The tokenizer (tokenizer.model, Grok-2's
tokenizer.tok.json) and sampling.json are copied (a link's target, named in a warning). SRC may
also be Grok-2's release as published (grok.checkpoint.grok2_release): its bfloat16 matrices are
quantised, its config given by the caller (grok.convert and the command line read it). DST/SHA256SUMS lists every file's SHA-256
(`verify DST --sha256 DST/SHA256SUMS` checks a copy). DST/config.json records the format
(`weight_bits`, `group_size`); each int4 file's metadata records its tensor's own group (the
largest divisor of its input width not above the group size asked for), which the reader checks.
`--bits 8` keeps the int8 numbers exactly (the same values and scales); `--bits 4` from int8 gives
the same weights whichever int8 format SRC is in. An int4 SRC is only copied, to the same groups
(its own group size by default): requantising 4-bit weights would add a second rounding.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from grok.checkpoint import safetensors_io
from grok.checkpoint.directory import (CKPT_DIR, CONFIG_FILE, GROK2_TOKENIZER_FILE,
                                       SAMPLING_FILE, TOKENIZER_FILE, PathLike, check_files,
                                       checkpoint_dir, read_config, tensor_suffix)
from grok.checkpoint.grok2_release import is_release, open_release
from grok.checkpoint.partial import disown, make_partial, remove_stale_partials
from grok.checkpoint.release import load_tensor
from grok.config import DEFAULT_GROUP_SIZE, GrokConfig
from grok.errors import CheckpointError, ConfigError
from grok.files import describe, open_regular
from grok.leaves import Entry, checkpoint_entries
from grok.progress import Progress
from grok.quant import QuantizedWeight, dequantize, quantize, quantize_int4

log = logging.getLogger(__name__)

# Beside ckpt-0, so the result loads as the source: Grok-1's tokenizer, Grok-2's, the sampling.
COPIED = (TOKENIZER_FILE, GROK2_TOKENIZER_FILE, SAMPLING_FILE)
MANIFEST = "SHA256SUMS"   # every file's digest: `python -m grok.checkpoint verify DST --sha256 ...`


def target_config(config: GrokConfig, bits: int, group_size: int | None = None,
                  exact: bool = False) -> GrokConfig:
    """The converted checkpoint's config. With `exact`, `group_size` must divide every quantised
    matrix's input width (ConfigError naming the first that it does not), else each matrix takes
    the largest divisor of its width not above it."""
    if bits not in (4, 8):
        raise ConfigError(f"--bits must be 4 or 8, got {bits}")
    if bits == 8:
        if group_size is not None:
            raise ConfigError("--group-size applies to --bits 4 only (int8 keeps the release's "
                              "row-block scales)")
        return config.replace(weight_bits=8, group_size=0)
    group = DEFAULT_GROUP_SIZE if group_size is None else group_size
    out = config.replace(weight_bits=4, group_size=group)   # validates the bounds
    if exact:
        for entry in checkpoint_entries(out):
            if entry.quantized and entry.shape[-2] % group:
                raise ConfigError(f"--group-size {group} does not divide the {entry.shape[-2]} "
                                  f"input rows of {entry.filename} ({entry.name})")
    return out


def read_source_leaf(ckpt: Path, entry: Entry, suffix: str) -> Any:
    """One leaf of the checkpoint directory `ckpt` (its ckpt-0/) whose tensor files have
    `suffix` (directory.tensor_suffix: "" for release pickles, else safetensors): a float32
    array or a QuantizedWeight of `entry`'s format, checked against `entry`."""
    if not suffix:
        return load_tensor(ckpt / entry.filename, entry)
    return safetensors_io.read_leaf(ckpt / safetensors_io.filename(entry), entry)


def _check_requantise(src: PathLike, source: GrokConfig, out: GrokConfig) -> None:
    """Refuse (ConfigError) to requantise int4 weights: their values are already rounded to their
    groups' steps, so rounding them again (to other groups, or to int8's row-block scales, which
    int4's group scales do not fit) adds a second error to the first; only a copy to the same
    groups is allowed."""
    if source.weight_bits != 4:
        return
    pairs = zip(checkpoint_entries(source), checkpoint_entries(out))
    if out.weight_bits == 4 and all(a.scale_blocks == b.scale_blocks for a, b in pairs):
        return
    asked = f"int{out.weight_bits}" + (f" group size {out.group_size}" if out.weight_bits == 4
                                       else "")
    raise ConfigError(f"{src}: its weights are already int4 (group size {source.group_size}); "
                      f"requantising them to {asked} would compound the rounding error: convert "
                      "from the release (or an int8) checkpoint instead")


def _convert_leaf(leaf: Any, src_entry: Entry, entry: Entry) -> Any:
    """A source leaf (`src_entry`'s format) in `entry`'s: unchanged when the formats and groups
    agree; a float leaf of a quantised entry (Grok-2's bfloat16 matrices) quantised; else (int8
    -> int4) requantised from the exact dequantised values. One leading index (an expert) at a
    time, to bound the float copy."""
    if not entry.quantized:
        return np.asarray(leaf, np.float32)   # (norms, router, embeddings: float32 files)
    if src_entry.fmt is entry.fmt and src_entry.scale_blocks == entry.scale_blocks:
        return leaf

    def one(w: Any) -> QuantizedWeight:
        w = dequantize(w) if isinstance(w, QuantizedWeight) else np.asarray(w, np.float32)
        return quantize_int4(w, entry.group_size) if entry.fmt.bits == 4 \
            else quantize(w, entry.scale_blocks)
    ndim = leaf.weight.ndim if isinstance(leaf, QuantizedWeight) else leaf.ndim
    if ndim == 2:
        return one(leaf)
    pieces = [one(leaf[i]) for i in range(len(leaf.weight if isinstance(leaf, QuantizedWeight)
                                              else leaf))]
    return QuantizedWeight(np.stack([p.weight for p in pieces]),
                           np.stack([p.scales for p in pieces]), entry.fmt)


def _write_manifest(root: Path, digests: dict[str, str]) -> None:
    """root/SHA256SUMS in sha256sum's format: the tensor files' digests as written, and those of
    config.json and the copied files (read back: they are small)."""
    small = {name: hashlib.sha256((root / name).read_bytes()).hexdigest()
             for name in (CONFIG_FILE, *COPIED) if (root / name).is_file()}
    with open(root / MANIFEST, "w") as f:
        f.writelines(f"{digest}  {name}\n" for name, digest in sorted({**digests, **small}.items()))


def convert(src: PathLike, dst: PathLike, bits: int, group_size: int | None = None, *,
            exact: bool = False, config: GrokConfig | None = None,
            progress: bool = True) -> GrokConfig:
    """Convert the checkpoint at `src` (release pickles or convert's safetensors; its
    config.json, else Grok-1, unless `config`) into a safetensors checkpoint at `dst`, which must
    not exist. Returns dst's config. `group_size` defaults to DEFAULT_GROUP_SIZE, or an int4
    source's own. Errors (a bad source file, a bad group size, an int4 source asked for other
    groups or int8, an existing dst, a dst inside src) are GrokErrors; nothing is left at `dst`
    after one, nor beside it."""
    release = is_release(src)   # Grok-2's release: its safetensors files, not a ckpt-0/
    if release and config is None:
        raise CheckpointError(f"{src}: a Grok-2 release; its config comes with its tokenizer's "
                              "ids: convert it with grok.convert or python -m grok.checkpoint")
    source = config or read_config(src)
    ckpt = Path(src) if release else checkpoint_dir(src)
    suffix = "" if release else tensor_suffix(ckpt, source)   # release files: int8 only
    if source.weight_bits == bits == 4 and group_size is None:
        group_size = source.group_size     # int4 -> int4 asks for a copy unless told otherwise
    out = target_config(source, bits, group_size, exact)
    _check_requantise(src, source, out)
    target = Path(dst)
    if os.path.lexists(target):
        raise CheckpointError(f"{target}: already exists (convert writes a new directory)")
    _check_outside(target, Path(src), ckpt)
    src_entries, dst_entries = checkpoint_entries(source), checkpoint_entries(out)
    if release:
        grok2 = open_release(src, source)
        read = lambda entry: grok2.leaf(entry)   # noqa: E731
    else:
        check_files(ckpt, src_entries, suffix)
        read = lambda entry: read_source_leaf(ckpt, entry, suffix)   # noqa: E731
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = make_partial(target, "convert")
    try:
        (tmp / CKPT_DIR).mkdir()
        with Progress(len(src_entries), f"converting {ckpt} to int{bits}", enabled=progress,
                      logger=log) as bar:
            digests = {}
            for src_entry, entry in zip(src_entries, dst_entries):
                leaf = read(src_entry)
                name = safetensors_io.filename(entry)
                file = tmp / CKPT_DIR / name
                digests[f"{CKPT_DIR}/{name}"] = safetensors_io.write_leaf(
                    file, entry, _convert_leaf(leaf, src_entry, entry))
                del leaf
                # read back the header as a load would: what was written is what loads
                safetensors_io.leaf_parts(safetensors_io.read_st_header(file), entry)
                bar.update(1, file.stat().st_size)
        with open(tmp / CONFIG_FILE, "w") as f:   # the format is always recorded, even Grok-1's
            json.dump({**out.to_dict(), "weight_bits": bits, "group_size": out.group_size},
                      f, indent=1)
            f.write("\n")
        for name in COPIED:   # (a release's own directory only: its parent is not the model's)
            found = next((w / name for w in ((Path(src),) if release else (Path(src), ckpt.parent))
                          if os.path.lexists(w / name)), None)
            if found is not None:
                _copy_regular(found, tmp / name)
        _write_manifest(tmp, digests)
        disown(tmp)
        tmp.rename(target)
    finally:   # (also on Ctrl-C, and SIGTERM as the command line raises it)
        if release:
            grok2.close()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _check_outside(target: Path, src: Path, ckpt: Path) -> None:
    """Refuse (CheckpointError) a destination inside the source: it would add files to the
    checkpoint being read (links followed, as the writes would follow them)."""
    where = target.resolve()
    for inside in (src.resolve(), ckpt.resolve()):
        if where.is_relative_to(inside):
            raise CheckpointError(f"{target}: inside the source checkpoint {src} (convert "
                                  "writes a new directory; put it beside the source)")


def _copy_regular(file: Path, out: Path) -> None:
    """Copy `file` (a regular file, or a link to one: its target's bytes, said in a warning that
    names the target) to `out`; anything else is a CheckpointError naming it."""
    try:
        with open_regular(file) as f, open(out, "wb") as g:
            shutil.copyfileobj(f, g)
    except OSError as err:
        reason = getattr(err, "strerror", None) or err
        raise CheckpointError(f"{describe(file)}: cannot copy ({reason})") from None
    if os.path.islink(file):
        log.warning("copied %s", describe(file))
