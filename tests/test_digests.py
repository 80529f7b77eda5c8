"""`verify --sha256 MANIFEST` against hostile input (issue 24): a manifest's paths resolve by one
rule (no fallback an attacker can plant a copy for), every file a load reads must be listed,
special files fail instead of hanging, Ctrl-C stops at once, a file that changes size is its
own report, and the manifest parser is fuzzed."""
from __future__ import annotations

import hashlib
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import tiny_config
from grok.checkpoint import write_checkpoint
from grok.checkpoint.__main__ import main as checkpoint_main
from grok.checkpoint.convert import convert
from grok.checkpoint.digests import parse_manifest, plan_digests, verify_digests
from grok.config import DEMO_DIR
from grok.errors import CheckpointError
from grok.leaves import checkpoint_entries, random_flat
from grok.tools.fuzz_checkpoint import FUZZ_NAME, check_manifest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tiny_config(vocab_size=256, emb_size=32)
TIMEOUT = 120   # seconds any subprocess may take: a hang is a failure, not a stuck suite


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def sums(base: Path, names: list[str]) -> str:
    """A manifest of `names`, relative to `base`, as sha256sum writes it."""
    return "".join(f"{sha256(base / n)}  {n}\n" for n in names)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "ckpt"
    write_checkpoint(path, random_flat(CONFIG, seed=3), CONFIG, progress=False)
    return path


@pytest.fixture
def copy(tiny, tmp_path):
    """A copy of the tiny checkpoint and a manifest of its tensors written from inside ckpt-0."""
    path = tmp_path / "tiny"
    shutil.copytree(tiny, path)
    names = sorted(p.name for p in (path / "ckpt-0").iterdir())
    (path / "SHA256SUMS").write_text(sums(path / "ckpt-0", names))
    return path


def run_cli(capsys, *args):
    code = checkpoint_main(["verify", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def sha_fails(out: str) -> dict[str, str]:
    return {line.split()[1]: line for line in out.splitlines()
            if line.startswith("FAIL ") and line.split()[2] == "sha256:"}


# --- one rule places a manifest's files ---------------------------------------------------------

def test_a_tampered_config_is_caught_beside_untouched_copies(tmp_path, capsys):
    """The attack: convert's root-relative SHA256SUMS lists config.json; untouched copies put in
    ckpt-0/ were hashed instead of the tampered real one. Now the real one is hashed, and the
    copies (files a load could read, not in the manifest) fail too."""
    dst = tmp_path / "int8"
    convert(DEMO_DIR, dst, 8, progress=False)
    for name in ("config.json", "sampling.json", "tokenizer.model"):
        shutil.copy(dst / name, dst / "ckpt-0" / name)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "output_multiplier_scale": 2.0}))
    code, out, err = run_cli(capsys, dst, "-q", "--sha256", dst / "SHA256SUMS")
    assert code == 1 and not err
    fails = sha_fails(out)
    assert set(fails) == {"config.json", "ckpt-0/config.json", "ckpt-0/sampling.json",
                          "ckpt-0/tokenizer.model"}
    assert "digest differs" in fails["config.json"]
    assert "not in SHA256SUMS" in fails["ckpt-0/config.json"]
    # and a file a load reads that the manifest leaves out fails, though it is untouched
    for name in ("config.json", "sampling.json", "tokenizer.model"):
        (dst / "ckpt-0" / name).unlink()
    shutil.copy(DEMO_DIR / "config.json", dst / "config.json")   # (an honest int8 config)
    listed = (dst / "SHA256SUMS").read_text().splitlines(keepends=True)
    lines = [line for line in listed if not line.endswith(" config.json\n")]
    (dst / "SHA256SUMS").write_text("".join(lines))
    code, out, _ = run_cli(capsys, dst, "-q", "--sha256", dst / "SHA256SUMS")
    assert code == 1 and list(sha_fails(out)) == ["config.json"]


def test_there_is_no_fallback_between_the_two_directories(copy, capsys):
    """A manifest relative to ckpt-0/ that names config.json means ckpt-0/config.json: the one
    beside ckpt-0/ is not hashed in its place (it is reported as not covered instead)."""
    manifest = copy / "SHA256SUMS"
    manifest.write_text(manifest.read_text() + f"{sha256(copy / 'config.json')}  config.json\n")
    code, out, _ = run_cli(capsys, copy, "-q", "--sha256", manifest)
    assert code == 1 and list(sha_fails(out)) == ["config.json"]
    assert "missing (listed on line" in sha_fails(out)["config.json"]
    assert "not covered by SHA256SUMS" in out and ": config.json beside it" in out


@pytest.mark.parametrize("content, verify_path, match", [
    ("{a}  ckpt-0/tensor00000_000\n{b}  tensor00001_000\n", ".",
     "SUMS:2: 'tensor00001_000' is relative to ckpt-0/, but line 1's 'ckpt-0/tensor00000_000' "
     "to the directory holding it"),
    ("{a}  ckpt-0/tensor00000_000\n", "flat",
     "SUMS:1: 'ckpt-0/tensor00000_000' is relative to the directory holding ckpt-0/, but"),
], ids=["both-ways", "no-ckpt-0"])
def test_an_ambiguous_manifest_is_refused_in_one_line(copy, capsys, content, verify_path, match):
    flat = copy / "flat"   # a checkpoint directory whose tensor files are not in a ckpt-0/
    shutil.copytree(copy / "ckpt-0", flat)
    (copy / "SUMS").write_text(content.format(a="a" * 64, b="b" * 64))
    with pytest.raises(CheckpointError, match=match.replace("(", r"\(").replace(")", r"\)")):
        plan_digests(copy / verify_path, copy / "SUMS")
    code, out, err = run_cli(capsys, copy / verify_path, "--sha256", copy / "SUMS")
    assert code == 2 and out == "" and err.count("\n") == 1 and "SUMS:" in err


# --- special files, Ctrl-C, files that change ---------------------------------------------------

def test_special_files_in_listed_places_fail_without_hanging(copy):
    """A FIFO where a listed file should be (it blocked the reader forever), and a link to
    /dev/zero (read forever): each a FAIL line naming what it is, exit 1, promptly."""
    entries = checkpoint_entries(CONFIG)
    fifo, zero = (copy / "ckpt-0" / entries[i].filename for i in (1, 2))
    fifo.unlink()
    os.mkfifo(fifo)
    zero.unlink()
    zero.symlink_to("/dev/zero")
    done = subprocess.run([sys.executable, "-m", "grok.checkpoint", "verify", str(copy),
                           "--sha256", str(copy / "SHA256SUMS"), "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    fails = sha_fails(done.stdout)
    assert set(fails) == {fifo.name, zero.name}
    assert "not a regular file (a FIFO)" in fails[fifo.name]
    assert "not a regular file (a character device)" in fails[zero.name]
    assert "a link to /dev/zero" in fails[zero.name]


def test_ctrl_c_stops_a_digest_check_at_once(copy):
    """Ctrl-C while a 1 TiB (sparse) listed file is being hashed: one line, status 130, no
    traceback, and within seconds (not at the end of the file, nor never)."""
    big = copy / "ckpt-0" / "big"
    with open(big, "wb") as f:
        f.truncate(1 << 40)
    manifest = copy / "SHA256SUMS"
    manifest.write_text(manifest.read_text() + f"{'0' * 64}  big\n")
    proc = subprocess.Popen([sys.executable, "-m", "grok.checkpoint", "verify", str(copy),
                             "--sha256", str(manifest), "-q"], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + TIMEOUT
        out = ""
        while "files ok" not in out:   # verify's summary: the hashing starts after it
            assert time.monotonic() < deadline and proc.poll() is None, out
            if select.select([proc.stdout], [], [], 1.0)[0]:
                out += proc.stdout.readline()
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=TIMEOUT)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        proc.wait()
        big.unlink()   # (sparse, but no tool walking tmp dirs should meet 1 TiB)
    assert proc.returncode == 130 and err == "python -m grok.checkpoint: interrupted\n", err
    assert took < 10, took   # (the workers stop at their next 8 MiB chunk)


class ShrinkingBar:
    """A progress bar that, after the first chunk of `victim` is hashed, cuts the file short."""

    victim: Path | None = None

    def __init__(self, total_bytes, desc, enabled):
        self.done = False

    def add(self, nbytes):
        if not self.done and ShrinkingBar.victim is not None:
            self.done = True
            os.truncate(ShrinkingBar.victim, 100)

    def stop(self):
        pass

    def close(self):
        pass


def test_a_file_that_shrinks_while_hashed_is_its_own_report(copy, monkeypatch):
    from grok.checkpoint import digests
    entry = checkpoint_entries(CONFIG)[0]          # the embedding: several 4 KiB chunks
    ShrinkingBar.victim = copy / "ckpt-0" / entry.filename
    size = ShrinkingBar.victim.stat().st_size
    monkeypatch.setattr(digests, "ByteBar", ShrinkingBar)
    reports = list(verify_digests(copy, copy / "SHA256SUMS", workers=1, progress=False,
                                  chunk_bytes=4096))
    assert [(r.file, r.message) for r in reports if not r.ok] == \
        [(entry.filename, f"changed size while read ({size} bytes when opened)")]


# --- the manifest parser, fuzzed ----------------------------------------------------------------

_DIGESTS = st.sampled_from(["a" * 64, "B" * 64, "a" * 63, "g" * 64, "", "a" * 64 + "\0",
                            "a" * 100_000])
_PATHS = st.one_of(
    st.sampled_from(["ckpt-0/tensor00000_000", "tensor00001_000", "./config.json", "a//b/",
                     "../x", "ckpt-0/../../x", "/etc/passwd", ".", "ckpt-0/", "a\0b", "\\\\",
                     "x\\n", "\\q", " ", "(x) = y", "é", "\ud800", "a" * 100_000]),
    st.text(max_size=40))
_SEPARATORS = st.sampled_from(["  ", " *", " ", "\t", "", "   "])


@st.composite
def manifests(draw) -> bytes:
    """Lines in the forms sha256sum writes, and damaged versions of them, as bytes (with NULs,
    bytes that are not UTF-8, CR and CRLF ends, comments, and very long lines)."""
    lines = []
    for _ in range(draw(st.integers(0, 6))):
        digest, path = draw(_DIGESTS), draw(_PATHS)
        form = draw(st.sampled_from(["gnu", "tag", "escaped", "comment", "raw"]))
        if form == "gnu":
            line = f"{digest}{draw(_SEPARATORS)}{path}"
        elif form == "tag":
            line = f"SHA256 ({path}) = {digest}"
        elif form == "escaped":
            line = f"\\{digest}  {path}"
        elif form == "comment":
            line = f"# {path}"
        else:
            line = draw(st.text(max_size=80))
        lines.append(line.encode("utf-8", "surrogatepass")
                     + draw(st.sampled_from([b"\n", b"\r\n", b"\r", b""])))
    data = b"".join(lines)
    if data and draw(st.booleans()):   # a byte anywhere (0xff is never UTF-8)
        where = draw(st.integers(0, len(data)))
        data = data[:where] + draw(st.sampled_from([b"\xff", b"\0", b"\xc3", b"\n"])) + data[where:]
    return data


@settings(max_examples=400, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=manifests())
def test_fuzzed_manifests_are_refused_in_one_line_or_hold_only_safe_paths(data, copy):
    """check_manifest (the atheris campaign's check too): a one-line CheckpointError naming the
    manifest, or checksums whose paths are relative, normalized, without '..' or NUL, with
    64-digit lowercase digests. An accepted manifest places every file inside the checkpoint."""
    verdict = check_manifest(data)
    if verdict == "refused":
        return
    checksums = parse_manifest(FUZZ_NAME, data)
    manifest = copy / "fuzzed-sums"
    manifest.write_bytes(data)
    try:
        plan = plan_digests(copy, manifest)
    except CheckpointError as err:   # (both kinds of path in one manifest)
        assert "\n" not in str(err) and "relative to" in str(err)
        return
    assert len(plan.listed) == len(checksums)
    for _, file, _ in plan.listed:
        assert file.is_relative_to(copy)


@pytest.mark.parametrize("target", ["pickle", "safetensors", "manifest"])
def test_the_campaign_script_fuzzes_each_parser(target):
    """benchmarks/fuzz_checkpoint.py (random engine here; atheris where installed) runs each
    parser's check on mutated seeds and finds nothing."""
    done = subprocess.run([sys.executable, "benchmarks/fuzz_checkpoint.py", "--engine", "random",
                           "--target", target, "--runs", "300"], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"engine random, target {target}: 300 executions" in done.stdout
    assert done.stdout.rstrip().endswith("0 findings")
