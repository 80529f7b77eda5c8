"""`verify(path, config)`: check a downloaded checkpoint without loading it -- every file present,
its header parsed under the allow-list, shapes, dtypes and sizes as the config says, scales finite
and positive, float data sampled for non-finite values."""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np

from grok import checkpoint as ck
from grok.config import GrokConfig
from grok.checkpoint.fileio import Mapped
from grok.checkpoint.header import header_problem, read_header
from grok.leaves import Entry, checkpoint_entries


@dataclasses.dataclass
class FileReport:
    file: str
    leaf: str
    ok: bool
    message: str


SAMPLE_BYTES = 1 << 16


def _verify_file(file: Path, entry: Entry, sample_bytes: int) -> FileReport:
    try:
        header = read_header(file)
        problem = header_problem(header, entry)
        if problem:
            return FileReport(file.name, entry.name, False, problem)
        mapped = Mapped(str(file))
        try:
            notes = []
            for part, ref in header.parts.items():
                data = mapped.array(ref).reshape(-1, order="A")
                if part == "scales" or ref.nbytes <= sample_bytes:
                    values = np.asarray(data, np.float32)
                else:   # samples: the first, a middle and the last stretch of the data
                    k = max(1, sample_bytes // (3 * ref.dtype.itemsize))
                    mid = data.size // 2
                    values = np.concatenate([data[:k], data[mid:mid + k], data[-k:]]
                                            ).astype(np.float32)
                bad = ~np.isfinite(values)
                if bad.any():
                    return FileReport(file.name, entry.name, False,
                                      f"{part}: {int(bad.sum())} non-finite value(s)")
                if part == "scales" and (values <= 0).any():
                    return FileReport(file.name, entry.name, False,
                                      f"scales: {int((values <= 0).sum())} value(s) <= 0")
                del data, values
            notes = [f"{p} {r.dtype}{list(r.shape)}" for p, r in header.parts.items()]
        finally:
            mapped.close()
        return FileReport(file.name, entry.name, True,
                          f"{', '.join(notes)}, {header.end / 1e9:.3f} GB")
    except ck.CheckpointError as err:
        text = str(err)
        prefix = f"{file}: "
        return FileReport(file.name, entry.name, False,
                          text[len(prefix):] if text.startswith(prefix) else text)


def verify(path: ck.PathLike, config: GrokConfig, *, workers: int = 4,
           sample_bytes: int = SAMPLE_BYTES) -> Iterator[FileReport]:
    """Check every file of the checkpoint at `path` against `config` without loading it: present,
    header parses under the allow-list, shapes and dtypes as the config says, file size equal to
    the size the header implies, scales (read fully) finite and > 0, float samples finite.
    Yields one FileReport per expected file (in file order), then one per unexpected file."""
    ckpt = ck._ckpt_dir(path)
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
