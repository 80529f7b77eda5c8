"""`python -m grok.checkpoint convert` under hostile conditions (issue 24): signals mid-run, the
partial directories a killed run leaves, a destination inside the source, links and special
files where the copied files should be. The source is the shipped demo model (4.8 MB)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grok.checkpoint.__main__ import main as checkpoint_main
from grok.checkpoint.convert import convert
from grok.checkpoint.partial import OWNER_FILE, make_partial
from grok.config import DEMO_DIR
from grok.errors import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120   # seconds any subprocess may take: a hang is a failure, not a stuck suite


@pytest.fixture
def src(tmp_path):
    """A private copy of the demo model (tests change its files)."""
    path = tmp_path / "src"
    shutil.copytree(DEMO_DIR, path)
    return path


# Runs `python -m grok.checkpoint ARGS...` and sends itself SIGNAL while the third tensor file is
# being written: exactly what a signal from outside does at that moment, without a race.
SIGNALLED = textwrap.dedent("""
    import os, signal, sys
    from grok.checkpoint import safetensors_io
    from grok.checkpoint.__main__ import main
    real, calls = safetensors_io.write_leaf, []
    def write_leaf(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        return real(*args, **kwargs)
    safetensors_io.write_leaf = write_leaf
    # As a launcher may leave it (a background job of a script): the command must still stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(main(sys.argv[2:]))
""")


def run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=TIMEOUT)


def convert_signalled(sig: str, src: Path, dst: Path) -> subprocess.CompletedProcess:
    return run("-c", SIGNALLED, sig, "convert", str(src), str(dst), "--bits", "4")


def partials(dst: Path) -> list[Path]:
    return sorted(dst.parent.glob(f"{dst.name}.partial-*"))


@pytest.mark.parametrize("sig, code, word", [("SIGINT", 130, "interrupted"),
                                             ("SIGTERM", 143, "terminated")])
def test_a_signal_mid_conversion_removes_the_partial_directory(src, tmp_path, sig, code, word):
    dst = tmp_path / "out"
    done = convert_signalled(sig, src, dst)
    assert done.returncode == code, done.stderr[-2000:]
    assert done.stderr == f"python -m grok.checkpoint: {word}\n"   # one line, no traceback
    assert not dst.exists() and partials(dst) == []


def test_a_killed_runs_partial_directory_is_removed_by_the_next_run(src, tmp_path):
    dst = tmp_path / "out"
    killed = convert_signalled("SIGKILL", src, dst)
    assert killed.returncode == -signal.SIGKILL
    [left] = partials(dst)   # named for what it is, visible (no leading dot)
    assert left.name.startswith("out.partial-convert-pid") and (left / OWNER_FILE).is_file()
    # Beside it: one whose owner runs (this process), which must survive, as must one that is
    # not ours (no owner file); one naming this process's id with another start time is a
    # dead process's whose id was reused, and goes.
    alive = make_partial(dst, "convert")
    foreign = tmp_path / "out.partial-something"
    foreign.mkdir()
    reused = tmp_path / "out.partial-convert-reused"
    reused.mkdir()
    owner = json.loads((alive / OWNER_FILE).read_text())
    (reused / OWNER_FILE).write_text(json.dumps({**owner, "started": "0"}))
    again = run("-m", "grok.checkpoint", "convert", str(src), str(dst), "--bits", "4")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"removed {left}, left by an earlier run (process {killed_pid(left)}, which is " \
           "gone)" in again.stderr
    if owner["started"] is not None:   # (where /proc gives start times)
        assert f"removed {reused}" in again.stderr
        assert partials(dst) == sorted([alive, foreign])
    assert alive in partials(dst) and foreign in partials(dst) and (dst / "ckpt-0").is_dir()
    assert not (dst / OWNER_FILE).exists()   # the owner file never reaches the result


def killed_pid(partial: Path) -> int:
    return int(partial.name.split("-pid")[1].split("-")[0])


@pytest.mark.parametrize("inside", ["ckpt-0/out", "out", "link/out"])
def test_a_destination_inside_the_source_is_refused(src, tmp_path, inside, capsys):
    (tmp_path / "link").symlink_to(src)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    dst = (tmp_path if inside.startswith("link") else src) / inside
    with pytest.raises(CheckpointError, match="inside the source checkpoint"):
        convert(src, dst, 8, progress=False)
    assert checkpoint_main(["convert", str(src), str(dst), "--bits", "8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "inside the source checkpoint" in err and str(dst) in err
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before   # source untouched


def test_a_linked_tokenizer_is_copied_and_named(src, tmp_path, caplog):
    real = tmp_path / "elsewhere" / "tok.model"
    real.parent.mkdir()
    shutil.move(src / "tokenizer.model", real)
    (src / "tokenizer.model").symlink_to(real)
    with caplog.at_level(logging.WARNING, logger="grok.checkpoint.convert"):
        convert(src, tmp_path / "out", 8, progress=False)
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == real.read_bytes()
    assert not (tmp_path / "out" / "tokenizer.model").is_symlink()
    assert [r.getMessage() for r in caplog.records] == \
        [f"copied {src / 'tokenizer.model'} (a link to {real})"]


SPECIAL = textwrap.dedent("""
    import os, sys
    from grok.checkpoint.convert import convert
    from grok.errors import CheckpointError
    src, out = sys.argv[1], sys.argv[2]
    for name, make in (("tokenizer.model", lambda p: os.mkfifo(p)),
                       ("sampling.json", lambda p: os.symlink("/dev/zero", p))):
        path = os.path.join(src, name)
        os.replace(path, path + ".real")
        make(path)
        try:
            convert(src, os.path.join(out, name), 8, progress=False)
            print("accepted", name)
        except CheckpointError as err:
            print(err)
        os.replace(path + ".real", path)
""")


def test_special_files_where_copied_files_should_be_are_refused(src, tmp_path):
    """A FIFO would block the copy forever, /dev/zero fill the disk: one line each, naming the
    file (and the link's target), and nothing left behind."""
    out = tmp_path / "out"
    out.mkdir()
    done = run("-c", SPECIAL, str(src), str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    fifo, zero = done.stdout.splitlines()
    assert fifo.startswith(f"{src / 'tokenizer.model'}: cannot copy (not a regular file (a FIFO")
    assert zero.startswith(f"{src / 'sampling.json'} (a link to /dev/zero): cannot copy (not a "
                           "regular file (a character device")
    assert list(out.iterdir()) == []   # no destination, no partial directory
