"""Reading and writing checkpoints in the Grok-1 release layout (SPEC §3), safely.

A checkpoint directory holds `ckpt-0/tensor{i:05d}_000`, one protocol-4 pickle per leaf (leaf i is
`grok.leaves.checkpoint_entries(config)[i]`), and optionally `config.json`. A pickle can run any
code when loaded, so files are unpickled with an allow-list: the only globals resolved are the
numpy array / dtype reconstructors, `ml_dtypes.bfloat16` and `__main__.QuantizedWeight8bit`, and
even those resolve to inert stand-ins that merely record what the pickle asked for. Real numpy
arrays are built afterwards from validated (shape, dtype, raw bytes) triples only.
"""
from __future__ import annotations

import copyreg
import logging
import math
import os
import pickle
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, BinaryIO, Mapping

import ml_dtypes
import numpy as np

from grok.config import GROK1, GrokConfig
from grok.errors import CheckpointError, one_line
from grok.leaves import Entry, checkpoint_entries, describe
from grok.progress import Progress
from grok.quant import QuantizedWeight8bit

log = logging.getLogger(__name__)

CKPT_DIR = "ckpt-0"
CONFIG_FILE = "config.json"
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
I8 = np.dtype(np.int8)
PathLike = str | os.PathLike


class _BadPickle(Exception):
    """Raised inside the unpickler's stand-ins; load_tensor adds the file name."""


def _kind(obj: Any) -> str:
    return f"a {type(obj).__name__}"


# --- inert stand-ins for the allowed globals ------------------------------------------------------
class _Stub:
    """Base of the stand-ins: a BUILD may only go through the explicit __setstate__ below."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        if self.state is not None:
            raise _BadPickle(f"{type(self).__name__.strip('_')} state set twice")
        self.state = state


class _ArrayStub(_Stub):
    """What numpy's `_reconstruct(ndarray, (0,), b'b')` + BUILD asked for."""


class _DtypeStub(_Stub):
    """What `numpy.dtype(spec, align, copy)` + BUILD asked for."""

    spec: Any = None

    def __init__(self, spec: Any = None, align: Any = False, copy: Any = True) -> None:
        self.spec = spec


class _QWStub(_Stub):
    """`__main__.QuantizedWeight8bit`: NEWOBJ + BUILD may only set `weight` and `scales`."""

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, dict) or set(state) != {"weight", "scales"}:
            keys = sorted(map(str, state)) if isinstance(state, dict) else None
            raise _BadPickle(f"QuantizedWeight8bit state must be a dict with exactly 'weight' and "
                             f"'scales', got {keys if keys is not None else _kind(state)}")
        super().__setstate__(dict(state))


class _Marker:
    """Stands for a type that may appear only as an argument (numpy.ndarray, ml_dtypes.bfloat16).
    Markers cannot be built (a BUILD on a plain function would write to its __dict__)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __setstate__(self, state: Any) -> None:
        raise _BadPickle(f"{self.name} cannot be built")


class _Reconstruct(_Marker):
    """numpy's `_reconstruct(ndarray, (0,), b'b')`, the only call numpy's pickles make."""

    __slots__ = ()

    def __call__(self, subtype: Any, shape: Any, typecode: Any) -> _ArrayStub:
        if subtype is not _NDARRAY or type(shape) is not tuple or shape != (0,) \
                or typecode != b"b":
            raise _BadPickle("unexpected arguments to numpy's _reconstruct")
        return _ArrayStub()


_NDARRAY = _Marker("numpy.ndarray")
_BFLOAT16 = _Marker("ml_dtypes.bfloat16")
_RECONSTRUCT = _Reconstruct("numpy _reconstruct")
_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,    # numpy 1.x (the release)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,   # numpy 2.x
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DtypeStub,
    ("ml_dtypes", "bfloat16"): _BFLOAT16,
    ("__main__", "QuantizedWeight8bit"): _QWStub,
}
# Plain numeric dtypes are let through (and rejected later with a precise message if wrong).
_TYPECODES = frozenset("b1 i1 u1 i2 u2 i4 u4 i8 u8 f2 f4 f8 c8 c16".split())


class _SafeUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except (KeyError, TypeError):
            raise CheckpointError(f"{self.where}: disallowed global {module}.{name} (checkpoint "
                                  "files may only reference numpy arrays, ml_dtypes.bfloat16 and "
                                  "__main__.QuantizedWeight8bit)") from None

    def persistent_load(self, pid: Any) -> Any:
        raise CheckpointError(f"{self.where}: persistent id {one_line(repr(pid), 60)} "
                              "not allowed in a checkpoint file")


def _to_dtype(stub: Any) -> np.dtype:
    if not isinstance(stub, _DtypeStub):
        raise _BadPickle(f"array dtype is {_kind(stub)}, not a numpy dtype")
    if stub.spec is _BFLOAT16:
        base = BF16
    elif isinstance(stub.spec, str) and stub.spec in _TYPECODES:
        base = np.dtype(stub.spec)
    else:
        raise _BadPickle(f"dtype {one_line(repr(stub.spec), 60)} not allowed "
                         "(only plain numeric dtypes and bfloat16)")
    # numpy writes (3, byteorder, subarray, names, fields, elsize, alignment, flags).
    state = stub.state
    if not (type(state) is tuple and len(state) == 8 and type(state[0]) is int and state[0] == 3
            and state[1] in ("<", ">", "|", "=") and state[2:5] == (None, None, None)
            and type(state[5]) is int and state[5] in (-1, base.itemsize)):
        raise _BadPickle(f"malformed {base} dtype state")
    return base.newbyteorder(state[1]) if state[1] in "<>" else base


def _to_array(stub: Any, what: str = "array") -> np.ndarray:
    if not isinstance(stub, _ArrayStub):
        raise _BadPickle(f"{what} is {_kind(stub)}, not a numpy array")
    state = stub.state
    if not (type(state) is tuple and len(state) == 5 and type(state[0]) is int and state[0] == 1):
        raise _BadPickle(f"malformed numpy {what} state")
    _, shape, dtype_stub, fortran, raw = state
    if type(shape) is not tuple or not all(type(n) is int and n >= 0 for n in shape):
        raise _BadPickle(f"malformed {what} shape")
    dtype = _to_dtype(dtype_stub)
    if type(fortran) is not bool or not isinstance(raw, (bytes, bytearray)):
        raise _BadPickle(f"{what} data is not raw bytes")
    needed = math.prod(shape) * dtype.itemsize
    if len(raw) != needed:
        raise _BadPickle(f"{what} holds {len(raw)} bytes but {dtype}{list(shape)} needs {needed}")
    array = np.ndarray.__new__(np.ndarray, (0,), "b")
    array.__setstate__((1, shape, dtype, fortran, raw))   # numpy's own loader, vetted inputs
    return array


def _materialize(obj: Any) -> np.ndarray | QuantizedWeight8bit:
    """Stand-ins -> a float32 array or a QuantizedWeight8bit(int8, bfloat16), or _BadPickle."""
    if isinstance(obj, _QWStub):
        if obj.state is None:
            raise _BadPickle("QuantizedWeight8bit without weight and scales")
        weight = _to_array(obj.state["weight"], "weight")
        scales = _to_array(obj.state["scales"], "scales")
        if weight.dtype != I8:
            raise _BadPickle(f"QuantizedWeight8bit weight dtype {weight.dtype}, expected int8")
        if scales.dtype != BF16:
            raise _BadPickle(f"QuantizedWeight8bit scales dtype {scales.dtype}, expected bfloat16")
        if (weight.ndim < 2 or scales.ndim != weight.ndim or scales.shape[-2] < 1
                or scales.shape[:-2] != weight.shape[:-2] or scales.shape[-1] != weight.shape[-1]
                or weight.shape[-2] % scales.shape[-2]):
            raise _BadPickle(f"QuantizedWeight8bit scales shape {list(scales.shape)} does not fit "
                             f"weight shape {list(weight.shape)}")
        return QuantizedWeight8bit(weight, scales)
    if isinstance(obj, _ArrayStub):
        array = _to_array(obj)
        if array.dtype != F32:
            raise _BadPickle(f"dtype {array.dtype}, expected float32")
        return array
    raise _BadPickle(f"holds {_kind(obj)}, expected a float32 array or QuantizedWeight8bit")


def load_tensor(path: PathLike) -> np.ndarray | QuantizedWeight8bit:
    """Unpickle one checkpoint file through the allow-list; a float32 array or a
    QuantizedWeight8bit (int8 weight, bfloat16 scales). Any problem -> CheckpointError."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as f:
            obj = _SafeUnpickler(f, where).load()
            trailing = f.read(1)
        if trailing:
            raise _BadPickle("trailing bytes after the pickle")
        return _materialize(obj)
    except CheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{where}: missing") from None
    except OSError as err:
        raise CheckpointError(f"{where}: cannot read ({err.strerror or err})") from None
    except _BadPickle as err:
        raise CheckpointError(f"{where}: {err}") from None
    except EOFError:
        empty = os.path.getsize(where) == 0
        raise CheckpointError(f"{where}: {'empty file' if empty else 'truncated pickle'}") from None
    except Exception as err:   # UnpicklingError, ValueError, TypeError, MemoryError, ...
        raise CheckpointError(f"{where}: truncated or unreadable pickle "
                              f"({type(err).__name__}: {one_line(err, 120)})") from None


# --- validation against the config ----------------------------------------------------------------
def _leaf_problem(leaf: Any, entry: Entry) -> str | None:
    """Why `leaf` cannot be `entry` (shape / dtype / type), or None when it fits."""
    if entry.quantized:
        if not isinstance(leaf, QuantizedWeight8bit):
            return (f"expected QuantizedWeight8bit (int8 weight {list(entry.shape)}, bfloat16 "
                    f"scales {list(entry.scales_shape)}), got {describe(leaf)}")
        parts = (("weight", leaf.weight, I8, entry.shape),
                 ("scales", leaf.scales, BF16, entry.scales_shape))
    else:
        if isinstance(leaf, QuantizedWeight8bit) or not isinstance(leaf, np.ndarray):
            return f"expected a float32 array {list(entry.shape)}, got {describe(leaf)}"
        parts = (("array", leaf, F32, entry.shape),)
    for part, array, dtype, shape in parts:
        if not isinstance(array, np.ndarray):
            return f"{part} is {_kind(array)}, not a numpy array"
        if array.dtype != dtype:
            return f"{part} dtype {array.dtype}, expected {dtype}"
        if array.shape != tuple(shape):
            return f"{part} shape {list(array.shape)}, expected {list(shape)}"
    return None


# --- reading --------------------------------------------------------------------------------------
def _ckpt_dir(path: PathLike) -> Path:
    """The `ckpt-0` directory of a model directory (or the `ckpt-0` directory itself)."""
    p = Path(path)
    if (p / CKPT_DIR).is_dir():
        return p / CKPT_DIR
    if p.is_dir() and (p.name == CKPT_DIR or (p / "tensor00000_000").is_file()):
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    raise CheckpointError(f"{p}: not a checkpoint directory (no {CKPT_DIR}/ inside)")


def _check_files(ckpt: Path, entries: list[Entry]) -> None:
    """Exactly the expected tensor files must be present."""
    present = set(os.listdir(ckpt))
    missing = [e.filename for e in entries if e.filename not in present]
    if missing:
        raise CheckpointError(f"{ckpt / missing[0]}: missing ({len(missing)} of {len(entries)} "
                              "tensor files the config expects are missing; wrong config?)")
    expected = {e.filename for e in entries}
    extra = sorted(n for n in present if n.startswith("tensor") and n not in expected)
    if extra:
        raise CheckpointError(f"{ckpt / extra[0]}: unexpected file ({len(extra)} tensor file(s) "
                              f"beyond the {len(entries)} the config expects; wrong config?)")


def _load_entry(path: Path, entry: Entry) -> tuple[Any, int]:
    leaf = load_tensor(path)
    problem = _leaf_problem(leaf, entry)
    if problem:
        raise CheckpointError(f"{path}: {problem} (leaf {entry.name})")
    return leaf, path.stat().st_size


def read_checkpoint(path: PathLike, config: GrokConfig, *, workers: int = 4,
                    progress: bool = True) -> dict[str, Any]:
    """Load every leaf of the checkpoint at `path` (a model dir holding ckpt-0/, or ckpt-0 itself).

    Returns {SPEC path: float32 array or QuantizedWeight8bit}, in file order; every file is checked
    against `checkpoint_entries(config)` (shape and dtype). Errors are CheckpointErrors.
    """
    ckpt = _ckpt_dir(path)
    entries = checkpoint_entries(config)
    _check_files(ckpt, entries)
    leaves: dict[str, Any] = {}
    with Progress(len(entries), f"reading {ckpt}", enabled=progress, logger=log) as bar, \
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="ckpt") as pool:
        futures = {pool.submit(_load_entry, ckpt / e.filename, e): e for e in entries}
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


def read_config(path: PathLike) -> GrokConfig:
    """`path/config.json` (or its parent's, when `path` is ckpt-0), else Grok-1 (SPEC §1)."""
    p = Path(path)
    candidates = [p / CONFIG_FILE] + ([p.parent / CONFIG_FILE] if p.name == CKPT_DIR else [])
    for candidate in candidates:
        if candidate.is_file():
            try:
                return GrokConfig.from_json(candidate)
            except OSError as err:
                raise CheckpointError(f"{candidate}: cannot read ({err.strerror or err})") from None
    log.info("%s: no %s, assuming the Grok-1 configuration", p, CONFIG_FILE)
    return GROK1


# --- writing --------------------------------------------------------------------------------------
class _ReleasePickler(pickle._Pickler):  # the pure-Python pickler lets us write the class global
    """Pickles QuantizedWeight8bit exactly as the release did: global `__main__.QuantizedWeight8bit`,
    NEWOBJ with no arguments, then BUILD with the state dict {'weight': ..., 'scales': ...}."""

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
    """Write one leaf as a release-format pickle (protocol 4). No validation: see write_checkpoint."""
    with open(path, "wb") as f:
        _ReleasePickler(f, protocol=4).dump(leaf)


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
        problem = _leaf_problem(leaf, entry)
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
    that is renamed into place at the end. An existing non-empty ckpt-0 is only replaced when
    `overwrite` is True.
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
    tmp = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:12]}"
    (tmp / CKPT_DIR).mkdir(parents=True)
    try:
        with Progress(len(prepared), f"writing {ckpt}", enabled=progress, logger=log) as bar:
            for entry, leaf in prepared:
                file = tmp / CKPT_DIR / entry.filename
                save_tensor(file, leaf)
                bar.update(1, file.stat().st_size)
        if write_config and not config.is_grok1:
            config.to_json(tmp / CONFIG_FILE)
        _commit(tmp, target, stale_config=write_config and config.is_grok1)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _commit(tmp: Path, target: Path, stale_config: bool) -> None:
    """Move the finished temporary directory's contents into `target`."""
    if not target.exists():
        os.rename(tmp, target)
        return
    ckpt = target / CKPT_DIR
    old = target / f".{CKPT_DIR}.old-{uuid.uuid4().hex[:12]}"
    if ckpt.exists():
        os.rename(ckpt, old)
    os.rename(tmp / CKPT_DIR, ckpt)
    if old.exists():
        shutil.rmtree(old)
    if (tmp / CONFIG_FILE).exists():
        os.replace(tmp / CONFIG_FILE, target / CONFIG_FILE)
    elif stale_config and (target / CONFIG_FILE).exists():
        log.warning("%s: removed, the checkpoint written is Grok-1 (no config.json)",
                    target / CONFIG_FILE)
        (target / CONFIG_FILE).unlink()
