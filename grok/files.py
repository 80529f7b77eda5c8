"""Opening the files a user or a download names (config.json, tensor files, checksum lists):
only regular files, or links to them wherever they point. A FIFO would block a reader forever and
a device could be read without end, so anything else is refused before it is opened, and the
opened file is checked again (it could have been swapped in between)."""
from __future__ import annotations

import os
import stat
from typing import Any, BinaryIO

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


class NotRegularFile(OSError):
    """A path that names a directory, FIFO, socket or device; `kind` says which."""

    def __init__(self, kind: str, swapped: bool = False) -> None:
        super().__init__(f"not a regular file ({kind}{', swapped in while opened' if swapped else ''})")
        self.kind = kind


class TooLarge(OSError):
    """A file larger than its reader allows."""


def file_kind(mode: int) -> str:
    """"" for a regular file, else what it is ("a directory", "a FIFO", ...)."""
    if stat.S_ISREG(mode):
        return ""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading if it is a regular file (following links); else
    NotRegularFile, or the OSError of the failed stat / open (FileNotFoundError, ...)."""
    kind = file_kind(os.stat(path).st_mode)
    if kind:
        raise NotRegularFile(kind)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    kind = file_kind(os.fstat(fd).st_mode)
    if kind:
        os.close(fd)
        raise NotRegularFile(kind, swapped=True)
    return os.fdopen(fd, "rb")


def read_limited(path: str | os.PathLike, limit: int) -> bytes:
    """The whole of a regular file of at most `limit` bytes (TooLarge otherwise, even if it grows
    while read)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise TooLarge(f"{size} bytes, more than the {limit} allowed")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLarge(f"more than the {limit} bytes allowed")
    return data


def describe(path: str | os.PathLike) -> str:
    """`path`, and where it points when it is a symbolic link (errors name both)."""
    where = os.fspath(path)
    try:
        if os.path.islink(where):
            return f"{where} (a link to {os.path.realpath(where)})"
    except (OSError, ValueError):
        pass
    return where


class DuplicateKey(ValueError):
    """A JSON object names a key twice (`unique_keys`)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json.loads`'s object_pairs_hook for files we must not guess about (configs, tensor
    headers): a key given twice is DuplicateKey, not the last one silently winning."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            shown = repr(key) if len(key) <= 60 else repr(key[:60]) + "..."
            raise DuplicateKey(f"duplicate key {shown}")
        out[key] = value
    return out
