"""The temporary directory a checkpoint is written into before it is renamed into place
(convert's, write_checkpoint's): a sibling of the destination, named
`<dst>.partial-<what>-pid<PID>-<random>` so that a user who finds one knows what it is, and
holding an owner file (host, process id, process start time) until it is renamed.

A run ended before its cleanup (SIGKILL, a power cut) leaves one behind. The next run writing
the same destination removes those whose owner is provably gone: made on this host, by a
process that no longer exists (or whose id a newer process now has). Anything else with a
similar name -- no owner file, another host's, a live process's, a link -- is left alone."""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import Any

from grok.files import read_limited

log = logging.getLogger(__name__)

OWNER_FILE = ".grok-partial-owner.json"


def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22), which tells
    a process from a later one given the same id; None where /proc does not say."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode("ascii", "replace")
        return stat.rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str | None) -> bool:
    """Whether the process `pid` that started at `started` still runs (when unsure: yes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # it exists, as another user's process
        pass
    except OSError:
        return True
    now = _start_time(pid)
    return started is None or now is None or now == started


def make_partial(target: Path, what: str) -> Path:
    """A new, empty partial directory for `target` (beside it), owned by this process."""
    tmp = target.parent / f"{target.name}.partial-{what}-pid{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "started": _start_time(os.getpid())}
        (tmp / OWNER_FILE).write_text(json.dumps(owner))
    except BaseException:   # (Ctrl-C included) no ownerless directory is left behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def disown(tmp: Path) -> None:
    """Remove the owner file of a finished partial directory, before it is renamed into place."""
    (tmp / OWNER_FILE).unlink()


def _owner(path: Path) -> dict[str, Any] | None:
    """The owner file's record of a partial directory; None if it has no valid one."""
    try:
        if path.is_symlink() or not path.is_dir():
            return None
        owner = json.loads(read_limited(path / OWNER_FILE, 4096))
    except (OSError, ValueError):
        return None
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if type(pid) is not int or pid <= 0 or not isinstance(owner.get("host"), str):
        return None
    return owner


def remove_stale_partials(target: Path) -> list[Path]:
    """Remove the partial directories of `target` left by processes of this host that are
    gone; returns them (each is also logged as a warning)."""
    prefix = f"{target.name}.partial-"
    try:
        names = sorted(n for n in os.listdir(target.parent) if n.startswith(prefix))
    except OSError:
        return []
    removed = []
    for name in names:
        path = target.parent / name
        owner = _owner(path)
        if owner is None or owner["host"] != socket.gethostname() \
                or _alive(owner["pid"], owner.get("started")):
            continue
        shutil.rmtree(path, ignore_errors=True)
        log.warning("removed %s, left by an earlier run (process %d, which is gone)", path,
                    owner["pid"])
        removed.append(path)
    return removed
