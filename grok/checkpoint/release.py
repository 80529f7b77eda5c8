"""The release format, whole files at a time: `load_tensor` / `save_tensor` of one leaf, and
`read_checkpoint` / `write_checkpoint` of a directory (SPEC §3). Leaf i is in
`ckpt-0/tensor{i:05d}_000`, a protocol-4 pickle of a float32 numpy array or of
`__main__.QuantizedWeight8bit` (int8 weight, bfloat16 scales); `checkpoint_entries(config)[i]`
says which. Reading goes through the allow-list unpickler and its validator (unpickle.py)."""
from __future__ import annotations

import copyreg
import logging
import os
import pickle
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from grok.checkpoint.arrays import leaf_parts, leaf_problem
from grok.checkpoint import safetensors_io
from grok.checkpoint.directory import (CKPT_DIR, CONFIG_FILE, ST_SUFFIX, PathLike, check_files,
                                       checkpoint_dir, tensor_suffix)
from grok.checkpoint.header import read_header
from grok.checkpoint.partial import disown, make_partial, remove_stale_partials
from grok.checkpoint.unpickle import read_array, reading
from grok.checkpoint.values import scales_problem
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.files import open_regular
from grok.leaves import Entry, checkpoint_entries
from grok.progress import Progress
from grok.quant import QuantizedWeight8bit

log = logging.getLogger(__name__)


# --- one file -------------------------------------------------------------------------------------
def load_tensor(path: PathLike, entry: Entry | None = None) -> np.ndarray | QuantizedWeight8bit:
    """One checkpoint file: a float32 array or a QuantizedWeight8bit (int8 weight, bfloat16
    scales), read where `read_header` says its bytes are. With `entry`, the header is checked
    against that leaf of the leaf table before anything is allocated. Any problem (scales that
    are not finite and > 0 included) -> CheckpointError naming the file."""
    where = os.fspath(path)
    header = read_header(where)
    problem = entry is not None and leaf_problem(header.parts, entry)
    if problem:
        raise CheckpointError(f"{where}: {problem} (leaf {entry.name})")
    with reading(where), open_regular(where) as f:
        if os.fstat(f.fileno()).st_size != header.end:
            raise CheckpointError(f"{where}: changed size while read")
        parts = {name: read_array(f, ref) for name, ref in header.parts.items()}
    if "array" in parts:
        return parts["array"]
    problem = scales_problem(parts["scales"])
    if problem:
        raise CheckpointError(f"{where}: {problem}" + (f" (leaf {entry.name})" if entry else ""))
    return QuantizedWeight8bit(parts["weight"], parts["scales"])


class ReleasePickler(pickle._Pickler):  # the pure-Python pickler lets us write the class global
    """Pickles QuantizedWeight8bit exactly as the release did: the global
    `__main__.QuantizedWeight8bit`, NEWOBJ with no arguments, then BUILD with the state dict
    {'weight': ..., 'scales': ...}."""

    # The standard library's own type dispatch only: dill (which lm-eval's `datasets` imports)
    # adds entries to pickle._Pickler.dispatch in place, and its `type` entry writes a class's
    # global itself, past save_global below (the file would then name grok.quant's class).
    dispatch = {t: f for t, f in pickle._Pickler.dispatch.items()
                if getattr(f, "__module__", None) == "pickle"}

    def save(self, obj: Any, save_persistent_id: bool = True) -> None:
        if obj is QuantizedWeight8bit and id(obj) not in self.memo:
            self.save_global(obj)   # (never through a dispatch entry another library added)
            return
        super().save(obj, save_persistent_id)

    def reducer_override(self, obj: Any) -> Any:
        if type(obj) is QuantizedWeight8bit:
            return copyreg.__newobj__, (QuantizedWeight8bit,), \
                {"weight": obj.weight, "scales": obj.scales}
        return NotImplemented

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is QuantizedWeight8bit:
            self.save("__main__")
            self.save("QuantizedWeight8bit")
            self.write(pickle.STACK_GLOBAL)
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def save_tensor(path: PathLike, leaf: np.ndarray | QuantizedWeight8bit) -> None:
    """Write one leaf as a release-format pickle (protocol 4), arrays in C order (numpy would
    pickle a transposed view Fortran-ordered, which readers refuse). No other validation: see
    write_checkpoint."""
    if isinstance(leaf, QuantizedWeight8bit):
        leaf = QuantizedWeight8bit(np.ascontiguousarray(leaf.weight),
                                   np.ascontiguousarray(leaf.scales))
    elif isinstance(leaf, np.ndarray):
        leaf = np.ascontiguousarray(leaf)
    with open(path, "wb") as f:
        ReleasePickler(f, protocol=4).dump(leaf)


# --- a directory ----------------------------------------------------------------------------------
def _load_entry(path: Path, entry: Entry) -> tuple[Any, int]:
    if path.name.endswith(ST_SUFFIX):
        return safetensors_io.read_leaf(path, entry), path.stat().st_size
    return load_tensor(path, entry), path.stat().st_size


def read_checkpoint(path: PathLike, config: GrokConfig, *, workers: int = 4,
                    progress: bool = True) -> dict[str, Any]:
    """Load every leaf of the checkpoint at `path` (a model dir holding ckpt-0/, or ckpt-0 itself).

    Returns {SPEC path: float32 array or QuantizedWeight}, in file order; every file is checked
    against `checkpoint_entries(config)` (shape and dtype). A converted checkpoint (safetensors
    files, int8 or int4) is read the same way. Errors are CheckpointErrors.
    """
    ckpt = checkpoint_dir(path)
    entries = checkpoint_entries(config)
    suffix = tensor_suffix(ckpt, config)
    check_files(ckpt, entries, suffix)
    leaves: dict[str, Any] = {}
    with Progress(len(entries), f"reading {ckpt}", enabled=progress, logger=log) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ckpt") as pool:
        futures = {pool.submit(_load_entry, ckpt / (e.filename + suffix), e): e for e in entries}
        try:
            for future in as_completed(futures):
                leaf, nbytes = future.result()
                leaves[futures[future].name] = leaf
                bar.update(1, nbytes)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return {e.name: leaves[e.name] for e in entries}


def _as_numpy(leaf: Any) -> Any:
    if isinstance(leaf, QuantizedWeight8bit):
        return QuantizedWeight8bit(np.asarray(leaf.weight), np.asarray(leaf.scales))
    return leaf if isinstance(leaf, np.ndarray) else np.asarray(leaf)


def _prepare(flat: Mapping[str, Any], config: GrokConfig) -> list[tuple[Entry, Any]]:
    """Validate `flat` against the config's entries; (entry, numpy leaf) in file order."""
    entries = checkpoint_entries(config)
    missing = [e.name for e in entries if e.name not in flat]
    if missing:
        raise CheckpointError(f"leaf {missing[0]}: missing ({len(missing)} of {len(entries)} "
                              "leaves the config expects are missing)")
    names = {e.name for e in entries}
    extra = sorted(str(k) for k in flat if k not in names)
    if extra:
        raise CheckpointError(f"leaf {extra[0]}: not a leaf of this config "
                              f"({len(extra)} unexpected leaves)")
    prepared = []
    for entry in entries:
        leaf = _as_numpy(flat[entry.name])
        problem = leaf_problem(leaf_parts(leaf), entry)
        if problem:
            raise CheckpointError(f"leaf {entry.name} ({entry.filename}): {problem}")
        prepared.append((entry, leaf))
    return prepared


def write_checkpoint(path: PathLike, flat: Mapping[str, Any], config: GrokConfig, *,
                     write_config: bool = True, overwrite: bool = False,
                     progress: bool = True) -> None:
    """Write `flat` ({SPEC path: leaf}, numpy or jax) as `path/ckpt-0/tensor*_000` in the release
    format, plus `path/config.json` (unless the config is Grok-1 or write_config is False).

    Every leaf is validated before anything is written; files go to a temporary sibling directory
    (`PATH.partial-write-pid<PID>-<random>`; see partial.py) that is renamed into place at the
    end. An existing non-empty ckpt-0 is only replaced when `overwrite` is True.
    """
    prepared = _prepare(flat, config)
    target = Path(path)
    ckpt = target / CKPT_DIR
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target}: exists and is not a directory")
    if ckpt.exists() and not overwrite and (not ckpt.is_dir() or any(ckpt.iterdir())):
        raise CheckpointError(f"{ckpt}: already exists and is not empty "
                              "(pass overwrite=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = make_partial(target, "write")
    try:
        (tmp / CKPT_DIR).mkdir()
        with Progress(len(prepared), f"writing {ckpt}", enabled=progress, logger=log) as bar:
            for entry, leaf in prepared:
                file = tmp / CKPT_DIR / entry.filename
                save_tensor(file, leaf)
                bar.update(1, file.stat().st_size)
        if write_config and not config.is_grok1:
            config.to_json(tmp / CONFIG_FILE)
        disown(tmp)
        _commit(tmp, target, stale_config=write_config and config.is_grok1)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, target: Path, stale_config: bool) -> None:
    """Move the finished temporary directory's contents into `target`."""
    if not target.exists():
        tmp.rename(target)
        return
    ckpt = target / CKPT_DIR
    old = target / f".{CKPT_DIR}.old-{uuid.uuid4().hex[:12]}"
    if ckpt.exists():
        ckpt.rename(old)
    (tmp / CKPT_DIR).rename(ckpt)
    if old.exists():
        shutil.rmtree(old)
    if (tmp / CONFIG_FILE).exists():
        (tmp / CONFIG_FILE).replace(target / CONFIG_FILE)
    elif stale_config and (target / CONFIG_FILE).exists():
        log.warning("%s: removed, the checkpoint written is Grok-1 (no config.json)",
                    target / CONFIG_FILE)
        (target / CONFIG_FILE).unlink()
