"""`verify_digests(path, manifest)`: every byte of a checkpoint's files against a `sha256sum`-style
manifest (`cd DIR/ckpt-0 && sha256sum tensor* > ../SHA256SUMS`, or the list a download site
publishes), hashed in parallel with a progress bar; one `FileReport` per file."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterator

from grok.checkpoint.directory import CKPT_DIR, PathLike, checkpoint_dir
from grok.checkpoint.verify import CHUNK_BYTES, ByteBar, FileReport, stop_pool
from grok.errors import CheckpointError
from grok.files import NotRegularFile, TooLarge, read_limited

MANIFEST_LIMIT = 8 << 20       # a checksum list larger than this is not one


@dataclasses.dataclass(frozen=True)
class Checksum:
    """One manifest line: `path` (relative, normalized), its SHA-256 `digest` (64 lowercase hex
    digits) and the `line` it is on."""

    path: str
    digest: str
    line: int


_GNU = re.compile(r"(?P<digest>\S+) (?P<mode>[ *])(?P<path>.+)", re.DOTALL)
_TAG = re.compile(r"SHA256 \((?P<path>.+)\) = (?P<digest>\S+)", re.DOTALL)
_HEX = re.compile(r"[0-9a-fA-F]+")


def _unescape(path: str) -> str | None:
    """sha256sum's escaped file name (a line starting with a backslash): \\\\, \\n and \\r;
    None if another escape appears."""
    out, i = [], 0
    while i < len(path):
        c = path[i]
        if c == "\\":
            nxt = path[i + 1:i + 2]
            if nxt not in ("\\", "n", "r"):
                return None
            out.append({"\\": "\\", "n": "\n", "r": "\r"}[nxt])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_manifest(manifest: PathLike) -> list[Checksum]:
    """The checksums of a `sha256sum`-style manifest: lines `<64 hex digits>  <path>` (text mode)
    or `<64 hex digits> *<path>` (binary mode), `SHA256 (<path>) = <64 hex digits>` (--tag), and
    sha256sum's backslash-escaped names; blank lines and lines starting with # are skipped, CRLF
    line ends allowed. Anything else -- not UTF-8, over 8 MiB, a line in no such form, a digest
    that is not 64 hex digits, an absolute path or one with a '..' component, one path with two
    digests, no checksum at all -- is a CheckpointError naming the manifest and line."""
    name = os.fspath(manifest)
    try:
        data = read_limited(name, MANIFEST_LIMIT)
    except TooLarge:
        raise CheckpointError(f"{name}: larger than {MANIFEST_LIMIT >> 20} MiB, not a checksum "
                              "list") from None
    except NotRegularFile as err:
        raise CheckpointError(f"{name}: {err}") from None
    except OSError as err:
        raise CheckpointError(f"{name}: cannot read ({err.strerror or err})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CheckpointError(f"{name}: not UTF-8 text (byte {err.start})") from None
    checksums: dict[str, Checksum] = {}
    for number, line in enumerate(text.split("\n"), 1):
        line = line.removesuffix("\r")
        if not line.strip() or line.startswith("#"):
            continue
        where = f"{name}:{number}"
        escaped = line.startswith("\\")
        body = line[1:] if escaped else line
        match = _TAG.fullmatch(body) or _GNU.fullmatch(body)
        if match is None:
            raise CheckpointError(f"{where}: expected '<sha256 hex>  <file>' as sha256sum writes "
                                  f"it, got {line[:80]!r}")
        digest, path = match["digest"], match["path"]
        if not _HEX.fullmatch(digest):
            raise CheckpointError(f"{where}: digest {digest[:80]!r} is not hexadecimal")
        if len(digest) != 64:
            raise CheckpointError(f"{where}: a SHA-256 digest has 64 hex digits, this one "
                                  f"{len(digest)}")
        if escaped:
            unescaped = _unescape(path)
            if unescaped is None:
                raise CheckpointError(f"{where}: bad escape in file name {path[:80]!r}")
            path = unescaped
        pure = PurePosixPath(path)
        if "\0" in path or pure.is_absolute() or ".." in pure.parts:
            raise CheckpointError(f"{where}: file {path[:80]!r} is outside the checkpoint "
                                  "(absolute, or with '..')")
        path = os.path.normpath(path)
        if path == ".":
            raise CheckpointError(f"{where}: {match['path'][:80]!r} names no file")
        seen = checksums.get(path)
        if seen is not None and seen.digest != digest.lower():
            raise CheckpointError(f"{where}: {path!r} has a different digest on line {seen.line}")
        if seen is None:
            checksums[path] = Checksum(path, digest.lower(), number)
    if not checksums:
        raise CheckpointError(f"{name}: no checksums in it")
    return list(checksums.values())


def _sha256(file: Path, chunk_bytes: int, bar: ByteBar) -> tuple[str, int]:
    """(hex digest, bytes read) of the whole file, read in chunks (hashlib releases the GIL)."""
    digest = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    size = 0
    with open(file, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
            size += n
            bar.add(n)
    return digest.hexdigest(), size


def _check_digest(file: Path, name: str, want: Checksum, chunk_bytes: int,
                  bar: ByteBar) -> FileReport:
    try:
        got, size = _sha256(file, chunk_bytes, bar)
    except OSError as err:
        return FileReport(name, "-", False, f"cannot read ({err.strerror or err})")
    if got != want.digest:
        return FileReport(name, "-", False, f"digest differs: expected {want.digest[:16]}..., "
                          f"got {got[:16]}...")
    return FileReport(name, "-", True, f"digest {got[:16]}... matches, {size / 1e9:.3f} GB")


def verify_digests(path: PathLike, manifest: PathLike, *, workers: int = 4,
                   progress: bool = True, chunk_bytes: int = CHUNK_BYTES
                   ) -> Iterator[FileReport]:
    """Check the checkpoint at `path` byte for byte against `manifest`, a `sha256sum`-style list
    (see `read_manifest`). A path in the manifest is looked up in the checkpoint's ckpt-0/
    directory, and, if there is no such file there, in the directory holding ckpt-0: so both
    `cd DIR/ckpt-0 && sha256sum tensor* > ../SHA256SUMS` and `cd DIR && sha256sum ckpt-0/tensor*`
    make manifests that work.

    The manifest is read, and a malformed one raises CheckpointError, when this is called; the
    reports come as the files are hashed (`workers` files at a time, in `chunk_bytes` steps,
    with a progress bar in bytes unless `progress=False`). Yields, in manifest order, one
    FileReport per entry -- ok, the digest differs (expected vs actual prefix), missing, or
    unreadable -- then one failing report per tensor file in ckpt-0/ that the manifest does not
    list. A report's `file` is the name relative to ckpt-0/ (as the manifest writes it for a
    file outside ckpt-0/ and for a missing one)."""
    checksums = read_manifest(manifest)
    ckpt = checkpoint_dir(path).absolute()
    bases = [ckpt] + ([ckpt.parent] if ckpt.name == CKPT_DIR else [])
    located: list[tuple[Checksum, Path | None, str]] = []
    for checksum in checksums:
        file = next((b / checksum.path for b in bases if os.path.lexists(b / checksum.path)),
                    None)
        name = checksum.path
        if file is not None and file.is_relative_to(ckpt):
            name = file.relative_to(ckpt).as_posix()
        located.append((checksum, file, name))
    return _digest_reports(ckpt, located, Path(manifest).name, workers, progress, chunk_bytes)


def _digest_reports(ckpt: Path, located: list[tuple[Checksum, Path | None, str]],
                    manifest_name: str, workers: int, progress: bool,
                    chunk_bytes: int) -> Iterator[FileReport]:
    def size(file: Path) -> int:
        try:
            return file.stat().st_size
        except OSError:
            return 0

    total = sum(size(file) for _, file, _ in located if file is not None)
    bar = ByteBar(total, f"sha256 {ckpt}", progress)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sha256") as pool:
            try:
                futures = [None if file is None else
                           pool.submit(_check_digest, file, name, checksum, chunk_bytes, bar)
                           for checksum, file, name in located]
                for (checksum, _, name), future in zip(located, futures):
                    yield (FileReport(name, "-", False, f"missing (listed on line "
                                      f"{checksum.line} of {manifest_name})")
                           if future is None else future.result())
            finally:   # on an early exit (Ctrl-C), stop hashing instead of finishing every file
                stop_pool(pool, bar)
    finally:
        bar.close()
    listed = {file for _, file, _ in located if file is not None}
    for name in sorted(os.listdir(ckpt)):
        if name.startswith("tensor") and ckpt / name not in listed:
            yield FileReport(name, "-", False, f"not in {manifest_name}: no digest to check "
                             "it against")
