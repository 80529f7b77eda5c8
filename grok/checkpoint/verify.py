"""`verify(path, config)`: check a downloaded checkpoint without loading it -- every file present,
its header parsed and validated as `load_tensor` would (the same allow-list and rules), shapes and
dtypes as the config says, scales finite and positive, float data sampled for non-finite values."""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from grok.checkpoint.arrays import ArrayRef, leaf_problem
from grok.checkpoint.directory import PathLike, checkpoint_dir
from grok.checkpoint.fileio import Mapped
from grok.checkpoint.header import read_header
from grok.config import GrokConfig
from grok.errors import CheckpointError
from grok.leaves import Entry, checkpoint_entries


@dataclasses.dataclass
class FileReport:
    """One file's verdict: `ok`, and what it holds or what is wrong with it."""

    file: str
    leaf: str
    ok: bool
    message: str


SAMPLE_BYTES = 1 << 16


def _values(mapped: Mapped, part: str, ref: ArrayRef, sample_bytes: int) -> np.ndarray:
    """A float32 copy of the part's values: all of them for scales and small parts, else the
    first, a middle and the last stretch. A copy, so no view into the map outlives this call
    (an open view makes closing the map raise BufferError)."""
    data = mapped.array(ref).reshape(-1)
    if part == "scales" or ref.nbytes <= sample_bytes:
        return data.astype(np.float32)
    k = max(1, sample_bytes // (3 * ref.dtype.itemsize))
    mid = data.size // 2
    return np.concatenate([data[:k], data[mid:mid + k], data[-k:]]).astype(np.float32)


def _data_problem(file: Path, parts: Mapping[str, ArrayRef], sample_bytes: int) -> str | None:
    mapped = Mapped(str(file))
    try:
        for part, ref in parts.items():
            values = _values(mapped, part, ref, sample_bytes)
            bad = int(np.count_nonzero(~np.isfinite(values)))
            if bad:
                return f"{part}: {bad} non-finite value(s)"
            if part == "scales" and (values <= 0).any():
                return f"scales: {int((values <= 0).sum())} value(s) <= 0"
        return None
    finally:
        mapped.close()


def _verify_file(file: Path, entry: Entry, sample_bytes: int) -> FileReport:
    try:
        header = read_header(file)
        problem = leaf_problem(header.parts, entry) or \
            _data_problem(file, header.parts, sample_bytes)
        if problem:
            return FileReport(file.name, entry.name, False, problem)
        notes = [f"{p} {r.dtype}{list(r.shape)}" for p, r in header.parts.items()]
        return FileReport(file.name, entry.name, True,
                          f"{', '.join(notes)}, {header.end / 1e9:.3f} GB")
    except CheckpointError as err:
        text = str(err)
        prefix = f"{file}: "
        return FileReport(file.name, entry.name, False,
                          text[len(prefix):] if text.startswith(prefix) else text)
    except OSError as err:   # the file changed under us (e.g. shrank between header and map)
        return FileReport(file.name, entry.name, False,
                          f"cannot read ({err.strerror or err})")


def verify(path: PathLike, config: GrokConfig, *, workers: int = 4,
           sample_bytes: int = SAMPLE_BYTES) -> Iterator[FileReport]:
    """Check every file of the checkpoint at `path` against `config` without loading it: present,
    header parses under the allow-list, shapes and dtypes as the config says, file size equal to
    the size the header implies, scales (read fully) finite and > 0, float samples finite.
    Yields one FileReport per expected file (in file order), then one per unexpected file."""
    ckpt = checkpoint_dir(path)
    entries = checkpoint_entries(config)
    present = set(os.listdir(ckpt))
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="verify") as pool:
        futures = []
        for entry in entries:
            file = ckpt / entry.filename
            if entry.filename not in present:
                futures.append(None)
            else:
                futures.append(pool.submit(_verify_file, file, entry, sample_bytes))
        for entry, future in zip(entries, futures):
            yield (FileReport(entry.filename, entry.name, False, "missing") if future is None
                   else future.result())
    expected = {e.filename for e in entries}
    for name in sorted(n for n in present if n.startswith("tensor") and n not in expected):
        yield FileReport(name, "-", False, f"unexpected file: the config has {len(entries)} "
                         "tensors (wrong config?)")
