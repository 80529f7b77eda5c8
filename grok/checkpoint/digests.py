"""`verify_digests(path, manifest)`: every byte of a checkpoint's files against a `sha256sum`-style
manifest (convert's DST/SHA256SUMS, `cd DIR/ckpt-0 && sha256sum tensor* > ../SHA256SUMS`, or the
list a download site publishes), hashed in parallel with a progress bar; one `FileReport` per file.

One rule places a manifest's files, decided for the whole manifest (`manifest_base`): its paths
are relative to the directory holding ckpt-0/ when any of them starts with `ckpt-0/`, else to
ckpt-0/ itself. Every file a load reads there (tensors, config.json, sampling.json,
tokenizer.model) must be listed; those a ckpt-0-relative manifest cannot name are said to be
uncovered."""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Iterator

from grok.checkpoint.directory import CKPT_DIR, PathLike, checkpoint_dir, load_inputs
from grok.checkpoint.verify import CHUNK_BYTES, ByteBar, FileReport, stop_pool
from grok.errors import CheckpointError
from grok.files import NotRegularFile, TooLarge, open_regular, read_limited

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
    """The checksums of the `sha256sum`-style manifest file `manifest` (see `parse_manifest`);
    one that is no readable regular file of at most 8 MiB is a CheckpointError naming it."""
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
    return parse_manifest(name, data)


def parse_manifest(name: str, data: bytes) -> list[Checksum]:
    """The checksums in `data`, the manifest `name`: lines `<64 hex digits>  <path>` (text mode)
    or `<64 hex digits> *<path>` (binary mode), `SHA256 (<path>) = <64 hex digits>` (--tag), and
    sha256sum's backslash-escaped names; blank lines and lines starting with # are skipped, CRLF
    line ends allowed. Anything else -- not UTF-8, a line in no such form, a digest that is not
    64 hex digits, an absolute path, one with a '..' component or a NUL, one path with two
    digests, no checksum at all -- is a CheckpointError naming the manifest and line."""
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
        if "\0" in path:
            raise CheckpointError(f"{where}: file name {path[:80]!r} holds a NUL byte")
        pure = PurePosixPath(path)
        if pure.is_absolute() or ".." in pure.parts:
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


def manifest_base(checksums: list[Checksum], ckpt: Path, name: str) -> Path:
    """The one directory all of a manifest's paths are relative to: the one holding ckpt-0/ when
    any path starts with `ckpt-0/` (as convert writes them), else ckpt-0/ itself (`cd ckpt-0 &&
    sha256sum tensor*`). A manifest that has it both ways (a `ckpt-0/...` path and a bare
    `tensor...` one), or names ckpt-0/ beside a directory that is not one, is a CheckpointError:
    a path must resolve to one file, not whichever of two happens to exist."""
    rooted = [c for c in checksums if PurePosixPath(c.path).parts[0] == CKPT_DIR]
    bare = [c for c in checksums if "/" not in c.path and c.path.startswith("tensor")]
    if rooted and bare:
        raise CheckpointError(
            f"{name}:{bare[0].line}: {bare[0].path[:80]!r} is relative to {CKPT_DIR}/, but line "
            f"{rooted[0].line}'s {rooted[0].path[:80]!r} to the directory holding it; a "
            "manifest's paths must all be relative to one directory")
    if not rooted:
        return ckpt
    if ckpt.name != CKPT_DIR:
        raise CheckpointError(f"{name}:{rooted[0].line}: {rooted[0].path[:80]!r} is relative to "
                              f"the directory holding {CKPT_DIR}/, but {ckpt} is not a "
                              f"{CKPT_DIR} directory")
    return ckpt.parent


def _shown(file: Path, base: Path) -> str:
    """A file's name in reports: as the manifest writes it (relative to `base`); one outside
    `base` (beside ckpt-0/, for a manifest relative to ckpt-0/) by its name."""
    return file.relative_to(base).as_posix() if file.is_relative_to(base) else file.name


@dataclasses.dataclass(frozen=True)
class DigestPlan:
    """What a digest check reads: each manifest entry's file (`listed`: its checksum, the file
    and its name in reports, the manifest's path), relative to `base`; the files a load reads
    under `base` that the manifest lacks (`unlisted`, each a failure); and those outside
    `base`, which it cannot name (`uncovered`: config.json or tokenizer.model beside ckpt-0/
    for a manifest relative to ckpt-0/)."""

    manifest: str
    ckpt: Path
    base: Path
    listed: tuple[tuple[Checksum, Path, str], ...]
    unlisted: tuple[str, ...]
    uncovered: tuple[str, ...]


def plan_digests(path: PathLike, manifest: PathLike) -> DigestPlan:
    """Read `manifest` and place its files in the checkpoint at `path` by `manifest_base`'s one
    rule (a malformed or ambiguous manifest is a CheckpointError, before any file is read)."""
    checksums = read_manifest(manifest)
    ckpt = checkpoint_dir(path).absolute()
    base = manifest_base(checksums, ckpt, os.fspath(manifest))
    listed = tuple((c, base / c.path, c.path) for c in checksums)
    files = {file for _, file, _ in listed}
    unlisted, uncovered = [], []
    for file in load_inputs(ckpt):
        if file not in files:
            (unlisted if file.is_relative_to(base) else uncovered).append(_shown(file, base))
    return DigestPlan(Path(manifest).name, ckpt, base, listed, tuple(unlisted), tuple(uncovered))


def _sha256(file: Path, chunk_bytes: int, bar: ByteBar) -> tuple[str, int]:
    """(hex digest, bytes read) of a regular file (NotRegularFile otherwise: a FIFO would block
    and a device read forever), read in chunks (hashlib releases the GIL) up to the size it had
    when opened; a file that shrinks or grows meanwhile is a CheckpointError."""
    digest = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    size = 0
    with open_regular(file) as f:
        expected = os.fstat(f.fileno()).st_size
        while size < expected and (n := f.readinto(view[:min(chunk_bytes, expected - size)])):
            digest.update(view[:n])
            size += n
            bar.add(n)
        if size != expected or f.read(1):
            raise CheckpointError(f"changed size while read ({expected} bytes when opened)")
    return digest.hexdigest(), size


def _check_digest(file: Path, name: str, want: Checksum, chunk_bytes: int,
                  bar: ByteBar) -> FileReport:
    try:
        got, size = _sha256(file, chunk_bytes, bar)
    except CheckpointError as err:
        return FileReport(name, "-", False, str(err))
    except OSError as err:
        link = f"; a link to {os.path.realpath(file)}" if os.path.islink(file) else ""
        return FileReport(name, "-", False, f"cannot read ({err.strerror or err}){link}")
    if got != want.digest:
        return FileReport(name, "-", False, f"digest differs: expected {want.digest[:16]}..., "
                          f"got {got[:16]}...")
    return FileReport(name, "-", True, f"digest {got[:16]}... matches, {size / 1e9:.3f} GB")


def check_digests(plan: DigestPlan, *, workers: int = 4, progress: bool = True,
                  chunk_bytes: int = CHUNK_BYTES) -> Iterator[FileReport]:
    """Hash the files of `plan` (`workers` at a time, in `chunk_bytes` steps, with a progress
    bar in bytes unless `progress=False`). Yields, in manifest order, one FileReport per entry
    -- ok, the digest differs (expected vs actual prefix), missing, unreadable or not a regular
    file -- then one failing report per file of `plan.unlisted`. Closing the iterator (or
    Ctrl-C) stops the hashing at the workers' next chunk without waiting for them."""
    def size(file: Path) -> int:
        try:
            return file.stat().st_size
        except OSError:
            return 0

    present = [os.path.lexists(file) for _, file, _ in plan.listed]
    total = sum(size(file) for (_, file, _), there in zip(plan.listed, present) if there)
    bar = ByteBar(total, f"sha256 {plan.ckpt}", progress)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sha256")
    try:
        futures = [pool.submit(_check_digest, file, name, checksum, chunk_bytes, bar)
                   if there else None
                   for (checksum, file, name), there in zip(plan.listed, present)]
        for (checksum, _, name), future in zip(plan.listed, futures):
            yield (FileReport(name, "-", False, f"missing (listed on line {checksum.line} of "
                              f"{plan.manifest})") if future is None else future.result())
    finally:   # on an early exit (Ctrl-C), stop hashing instead of finishing every file
        stop_pool(pool, bar)
        bar.close()
    for name in plan.unlisted:
        yield FileReport(name, "-", False, f"not in {plan.manifest}: no digest to check it "
                         "against")


def verify_digests(path: PathLike, manifest: PathLike, *, workers: int = 4,
                   progress: bool = True, chunk_bytes: int = CHUNK_BYTES
                   ) -> Iterator[FileReport]:
    """Check the checkpoint at `path` byte for byte against `manifest`, a `sha256sum`-style list:
    `check_digests(plan_digests(path, manifest), ...)`. The manifest is read, and a malformed
    or ambiguous one raises CheckpointError, when this is called; the reports come as the files
    are hashed. A report's `file` is the path as the manifest writes it (for a file it lacks:
    relative to the directory its paths are relative to)."""
    plan = plan_digests(path, manifest)
    return check_digests(plan, workers=workers, progress=progress, chunk_bytes=chunk_bytes)
