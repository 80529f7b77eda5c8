"""The checkpoint directory (SPEC §3): `ckpt-0/tensor{i:05d}_000`, one file per leaf (or
`tensor{i:05d}_000.safetensors`: a converted checkpoint), and an optional `config.json` beside
ckpt-0 (none: Grok-1)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from grok.config import GROK1, GrokConfig
from grok.errors import CheckpointError
from grok.leaves import Entry

log = logging.getLogger(__name__)

CKPT_DIR = "ckpt-0"
CONFIG_FILE = "config.json"
SAMPLING_FILE = "sampling.json"      # recommended sampling settings (grok.load reads it)
TOKENIZER_FILE = "tokenizer.model"
GROK2_TOKENIZER_FILE = "tokenizer.tok.json"   # a converted Grok-2's (grok.families)
PathLike = str | os.PathLike
RELEASE, SAFETENSORS = "release", "safetensors"
ST_SUFFIX = ".safetensors"


def checkpoint_dir(path: PathLike) -> Path:
    """The `ckpt-0` directory of a model directory (or the `ckpt-0` directory itself)."""
    p = Path(path)
    if (p / CKPT_DIR).is_dir():
        return p / CKPT_DIR
    if p.is_dir() and (p.name == CKPT_DIR or (p / "tensor00000_000").is_file()
                       or (p / f"tensor00000_000{ST_SUFFIX}").is_file()):
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    raise CheckpointError(f"{p}: not a checkpoint directory (no {CKPT_DIR}/ inside)")


def checkpoint_format(ckpt: Path) -> str:
    """RELEASE (pickles) or SAFETENSORS, from the file names in `ckpt`; a directory holding
    both kinds is a CheckpointError (which would be meant is unclear)."""
    names = [n for n in os.listdir(ckpt) if n.startswith("tensor")]
    converted = any(n.endswith(ST_SUFFIX) for n in names)
    if converted and any("." not in n for n in names):
        raise CheckpointError(f"{ckpt}: holds both release-format and safetensors tensor files")
    return SAFETENSORS if converted else RELEASE


def tensor_suffix(ckpt: Path, config: GrokConfig) -> str:
    """The suffix of `ckpt`'s tensor files: "" (release pickles) or ST_SUFFIX. Release files
    hold int8 only: a config asking for other weights there is a CheckpointError."""
    if checkpoint_format(ckpt) == SAFETENSORS:
        return ST_SUFFIX
    if config.weight_bits != 8:
        raise CheckpointError(f"{ckpt}: release-format files hold int8 weights, but the config "
                              f"says weight_bits={config.weight_bits} (int4 checkpoints are "
                              "safetensors: python -m grok.checkpoint convert)")
    return ""


def check_files(ckpt: Path, entries: list[Entry], suffix: str = "") -> None:
    """Exactly the tensor files `entries` expect (their names + `suffix`) must be in `ckpt`,
    else a CheckpointError naming the first missing (or unexpected) file."""
    present = set(os.listdir(ckpt))
    missing = [e.filename + suffix for e in entries if e.filename + suffix not in present]
    if missing:
        raise CheckpointError(f"{ckpt / missing[0]}: missing ({len(missing)} of {len(entries)} "
                              "tensor files the config expects are missing; wrong config?)")
    expected = {e.filename + suffix for e in entries}
    extra = sorted(n for n in present if n.startswith("tensor") and n not in expected)
    if extra:
        raise CheckpointError(f"{ckpt / extra[0]}: unexpected file ({len(extra)} tensor file(s) "
                              f"beyond the {len(entries)} the config expects; wrong config?)")


def load_inputs(ckpt: Path) -> list[Path]:
    """Every file a load of the checkpoint directory `ckpt` may read, wherever it is looked for:
    its tensor files, and config.json, sampling.json and the tokenizer in ckpt/ and (when it is
    a ckpt-0 directory) beside it. Only those present (a dangling link counts: a load fails on
    it). What a digest check must cover."""
    bases = [ckpt] + ([ckpt.parent] if ckpt.name == CKPT_DIR else [])
    files = [ckpt / n for n in sorted(os.listdir(ckpt)) if n.startswith("tensor")]
    names = (CONFIG_FILE, SAMPLING_FILE, TOKENIZER_FILE, GROK2_TOKENIZER_FILE)
    return files + [b / n for b in bases for n in names if os.path.lexists(b / n)]


def read_config(path: PathLike) -> GrokConfig:
    """`path/config.json` (or its parent's, when `path` is ckpt-0), else Grok-1 (SPEC §1).
    Only a config.json that is not there at all means Grok-1: one that is there but is no readable
    regular file (a directory, a dangling symlink, a FIFO) is a ConfigError naming it, as is any
    bad content (GrokConfig.from_json)."""
    p = Path(path)
    candidates = [p / CONFIG_FILE] + ([p.parent / CONFIG_FILE] if p.name == CKPT_DIR else [])
    for candidate in candidates:
        if os.path.lexists(candidate):   # lexists: a dangling symlink is there, and an error
            return GrokConfig.from_json(candidate)
    log.info("%s: no %s, assuming the Grok-1 configuration", p, CONFIG_FILE)
    return GROK1
