"""`python -m grok.checkpoint verify` (grok.checkpoint.verify) on a good and a broken checkpoint."""
from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import tiny_config
from grok.checkpoint import load_tensor, save_tensor, write_checkpoint
from grok.errors import CheckpointError
from grok.leaves import checkpoint_entries, random_flat
from grok.quant import QuantizedWeight8bit

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tiny_config(vocab_size=2048, emb_size=64)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_checkpoint(path, random_flat(CONFIG, seed=1), CONFIG, progress=False)
    return path


def verify(path):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "grok.checkpoint", "verify", str(path)],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_verify(ckpt, tmp_path):
    good = verify(ckpt)
    assert good.returncode == 0, good.stdout + good.stderr
    n = len(checkpoint_entries(CONFIG))
    assert f"{n} of {n} files ok" in good.stdout

    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    files = bad / "ckpt-0"
    entries = checkpoint_entries(CONFIG)
    quantized = [e for e in entries if e.quantized]
    (files / entries[0].filename).unlink()                                    # missing
    data = (files / quantized[0].filename).read_bytes()                       # truncated
    (files / quantized[0].filename).write_bytes(data[: len(data) // 2])
    with open(files / quantized[1].filename, "wb") as f:                      # hostile
        pickle.dump(Evil(), f, protocol=4)
    leaf = load_tensor(files / quantized[2].filename)                         # mis-shaped
    save_tensor(files / quantized[2].filename,
                QuantizedWeight8bit(leaf.weight[..., :-1], leaf.scales[..., :-1]))
    leaf = load_tensor(files / quantized[3].filename)                         # NaN scale
    scales = leaf.scales.copy()
    scales.flat[3] = np.nan
    save_tensor(files / quantized[3].filename, QuantizedWeight8bit(leaf.weight, scales))
    with open(files / quantized[4].filename, "ab") as f:                      # trailing bytes
        f.write(b"\0" * 10)
    out = verify(bad)
    assert out.returncode == 1
    lines = {line.split()[1]: line for line in out.stdout.splitlines() if line.startswith("FAIL")}
    assert "missing" in lines[entries[0].filename]
    assert "truncated" in lines[quantized[0].filename]
    assert "disallowed global" in lines[quantized[1].filename]
    assert "shape" in lines[quantized[2].filename]
    assert "non-finite" in lines[quantized[3].filename]
    assert "trailing" in lines[quantized[4].filename]
    assert len(lines) == 6 and not (tmp_path / "pwned").exists()
    assert f"{n - 6} of {n} files ok, 6 with problems" in out.stdout


@pytest.mark.parametrize("index, where", [(0, "first"), (0, "middle"), (1, "first")],
                         ids=["embedding-start", "embedding-middle", "small-norm"])
def test_a_nan_in_float_data_is_reported_not_raised(ckpt, tmp_path, index, where):
    """A NaN in the (sampled) embedding or in a small float leaf is a FAIL line, not a
    BufferError from closing the memory map under a live view (as it once was)."""
    from grok.checkpoint.verify import verify as verify_files
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    entry = checkpoint_entries(CONFIG)[index]
    file = bad / "ckpt-0" / entry.filename
    array = load_tensor(file).copy()
    array.reshape(-1)[0 if where == "first" else array.size // 2] = np.nan
    save_tensor(file, array)
    reports = {r.file: r for r in verify_files(bad, CONFIG)}
    assert not reports[entry.filename].ok
    assert "non-finite" in reports[entry.filename].message
    assert sum(not r.ok for r in reports.values()) == 1
    if where == "middle":   # and the command line says so (one subprocess is enough)
        out = verify(bad)
        assert out.returncode == 1 and "Traceback" not in out.stderr
        assert f"FAIL {entry.filename}" in out.stdout


# --- --sha256 MANIFEST and --full -------------------------------------------------------------

def sha256_lines(files: Path, prefix: str = "", mode: str = " ") -> str:
    """What `sha256sum [-b] tensor*` writes (run in `files`, or in its parent with a prefix)."""
    return "".join(f"{hashlib.sha256(f.read_bytes()).hexdigest()} {mode}{prefix}{f.name}\n"
                   for f in sorted(files.glob("tensor*")))


@pytest.fixture
def copy(ckpt, tmp_path):
    """A copy of the tiny checkpoint, with `SHA256SUMS` beside ckpt-0 written from inside it."""
    path = tmp_path / "tiny"
    shutil.copytree(ckpt, path)
    (path / "SHA256SUMS").write_text(sha256_lines(path / "ckpt-0"))
    return path


def run_cli(capsys, *args):
    from grok.checkpoint.__main__ import main
    code = main(["verify", *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


def fails(out: str, check: str = "sha256") -> dict[str, str]:
    """{file: line} of the FAIL lines of one check ('sha256', or 'leaf' for the header checks)."""
    lines = [line for line in out.splitlines() if line.startswith("FAIL ")]
    return {line.split()[1]: line for line in lines
            if (line.split()[2] == "sha256:") == (check == "sha256")}


def test_sha256_manifest_passes_in_both_layouts(copy, capsys):
    n = len(checkpoint_entries(CONFIG))
    code, out, err = run_cli(capsys, copy, "--sha256", copy / "SHA256SUMS")
    assert code == 0, out + err
    assert f"{n} of {n} files ok" in out and f"sha256: {n} of {n} files ok" in out
    assert "matches" in out and "FAIL" not in out
    assert "not covered by SHA256SUMS, whose paths are relative to ckpt-0/: config.json " \
        "beside it" in out
    # written from DIR (`sha256sum -b ckpt-0/tensor* config.json`), checked with DIR/ckpt-0 as
    # the directory: config.json is in its reach, so it must be listed
    tensors = sha256_lines(copy / "ckpt-0", "ckpt-0/", mode="*")
    (copy / "from-dir").write_text(tensors)
    code, out, _ = run_cli(capsys, copy / "ckpt-0", "--sha256", copy / "from-dir", "-q")
    assert code == 1 and list(fails(out)) == ["config.json"]
    config = hashlib.sha256((copy / "config.json").read_bytes()).hexdigest()
    (copy / "from-dir").write_text(tensors + f"{config} *config.json\n")
    code, out, _ = run_cli(capsys, copy / "ckpt-0", "--sha256", copy / "from-dir", "-q")
    assert code == 0 and out.count("FAIL") == 0 and f"sha256: {n + 1} of {n + 1} files ok" in out
    assert "not covered" not in out


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum")
def test_a_manifest_that_sha256sum_writes(copy, capsys):
    subprocess.run("sha256sum tensor* > ../SUMS", shell=True, cwd=copy / "ckpt-0", check=True)
    assert run_cli(capsys, copy, "--sha256", copy / "SUMS", "-q")[0] == 0


def test_one_flipped_byte_fails_exactly_that_file(copy, capsys):
    from grok.checkpoint import read_header
    from grok.checkpoint.digests import verify_digests
    entry = [e for e in checkpoint_entries(CONFIG) if e.quantized][2]
    file = copy / "ckpt-0" / entry.filename
    weight = read_header(file).parts["weight"]          # an int8 byte: the header checks pass
    data = bytearray(file.read_bytes())
    data[weight.raw.offset + weight.nbytes // 2] ^= 0x01
    file.write_bytes(bytes(data))
    reports = list(verify_digests(copy, copy / "SHA256SUMS", progress=False))
    assert [r.file for r in reports if not r.ok] == [entry.filename]
    bad = next(r for r in reports if not r.ok)
    want = (copy / "SHA256SUMS").read_text().split(entry.filename)[0].split()[-1]
    got = hashlib.sha256(bytes(data)).hexdigest()
    assert want[:16] in bad.message and got[:16] in bad.message
    code, out, err = run_cli(capsys, copy, "--sha256", copy / "SHA256SUMS")
    assert code == 1 and "Traceback" not in err
    assert list(fails(out)) == [entry.filename] and not fails(out, "leaf")
    assert "digest differs" in fails(out)[entry.filename]


def test_missing_and_unlisted_files_fail(copy, capsys):
    entries = checkpoint_entries(CONFIG)
    manifest = (copy / "SHA256SUMS").read_text().splitlines(keepends=True)
    (copy / "SHA256SUMS").write_text("".join(manifest[:3] + manifest[4:]))   # entry 3 unlisted
    (copy / "ckpt-0" / entries[5].filename).unlink()                          # entry 5 missing
    code, out, err = run_cli(capsys, copy, "--sha256", copy / "SHA256SUMS", "-q")
    assert code == 1 and not err
    lines = fails(out)
    assert set(lines) == {entries[3].filename, entries[5].filename}
    assert "not in SHA256SUMS" in lines[entries[3].filename]
    assert "missing (listed on line 5 of SHA256SUMS)" in lines[entries[5].filename]
    assert "missing" in fails(out, "leaf")[entries[5].filename]


@pytest.mark.parametrize("content, match", [
    (b"zz" * 32 + b"  tensor00000_000\n", "not hexadecimal"),
    (b"ab" * 20 + b"  tensor00000_000\n", "64 hex digits, this one 40"),
    (b"ab" * 32 + b"tensor00000_000\n", "expected '<sha256 hex>  <file>'"),
    (b"ab" * 32 + b"  tensor\xff\n", "not UTF-8"),
    (b"ab" * 32 + b"  ../tiny/ckpt-0/tensor00000_000\n", "outside the checkpoint"),
    (b"ab" * 32 + b"  ckpt-0/../../x\n", "outside the checkpoint"),
    (b"ab" * 32 + b"  /etc/passwd\n", "outside the checkpoint"),
    (b"ab" * 32 + b"  a\n" + b"cd" * 32 + b" *./a\n", "different digest on line 1"),
    (b"# nothing\n\n", "no checksums"),
    (None, "larger than 8 MiB"),
], ids=["hex", "length", "separator", "utf8", "dotdot", "inner-dotdot", "absolute", "twice",
        "empty", "huge"])
def test_a_malformed_manifest_is_one_line_exit_2(copy, capsys, content, match):
    from grok.checkpoint.digests import MANIFEST_LIMIT, read_manifest
    manifest = copy / "bad-sums"
    if content is None:
        with open(manifest, "wb") as f:   # sparse: nothing written, yet one byte too many
            f.truncate(MANIFEST_LIMIT + 1)
    else:
        manifest.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        read_manifest(manifest)
    code, out, err = run_cli(capsys, copy, "--sha256", manifest)
    assert code == 2 and out == ""   # refused before any file is read
    assert err.count("\n") == 1 and match in err and "bad-sums" in err


def test_manifest_forms():
    """--tag lines, CRLF ends, comments, binary mode and sha256sum's escaped names."""
    import tempfile
    from grok.checkpoint.digests import read_manifest
    a, b, c = "a" * 64, "B" * 64, "c" * 64
    text = (f"# published\r\nSHA256 (ckpt-0/x) = {a}\r\n{b} *./y\n\\{c}  back\\\\slash\\nline\n")
    with tempfile.NamedTemporaryFile("w", suffix=".sums", delete=False) as f:
        f.write(text)
    try:
        got = [(s.path, s.digest, s.line) for s in read_manifest(f.name)]
    finally:
        os.unlink(f.name)
    assert got == [("ckpt-0/x", a, 2), ("y", b.lower(), 3), ("back\\slash\nline", c, 4)]


def test_full_finds_nan_and_inf_deep_in_a_float32_tensor(copy, capsys):
    from grok.checkpoint.verify import verify as verify_files
    entry = checkpoint_entries(CONFIG)[0]   # the embedding, float32 [2048, 64]: 512 KiB
    file = copy / "ckpt-0" / entry.filename
    array = load_tensor(file).copy()
    flat = array.reshape(-1)
    flat[flat.size // 4] = np.nan           # neither the first, the middle nor the last 64 KiB
    flat[3 * flat.size // 4] = np.inf
    flat[3 * flat.size // 4 + 1] = -np.inf
    save_tensor(file, array)
    assert all(r.ok for r in verify_files(copy, CONFIG, progress=False))   # sampling misses it
    reports = list(verify_files(copy, CONFIG, full=True, progress=False, chunk_bytes=4096))
    assert [r.file for r in reports if not r.ok] == [entry.filename]
    message = next(r.message for r in reports if not r.ok)
    assert message == (f"array: 3 non-finite value(s) (1 NaN, 2 Inf), the first at flat index "
                       f"{flat.size // 4}")
    code, out, err = run_cli(capsys, copy, "--full", "-q")
    assert code == 1 and "Traceback" not in err
    assert list(fails(out, "leaf")) == [entry.filename] and "3 non-finite" in out
    assert run_cli(capsys, copy, "-q")[0] == 0


def test_full_reads_bf16_scales_and_reports_progress_in_bytes(copy, caplog):
    import logging
    from grok.checkpoint.digests import verify_digests
    from grok.checkpoint.verify import _full_bytes, verify as verify_files
    entry = [e for e in checkpoint_entries(CONFIG) if e.quantized][0]
    file = copy / "ckpt-0" / entry.filename
    leaf = load_tensor(file)
    scales = leaf.scales.copy()
    scales.reshape(-1)[scales.size // 2] = np.nan
    save_tensor(file, QuantizedWeight8bit(leaf.weight, scales))
    with caplog.at_level(logging.INFO, logger="grok.checkpoint.verify"):
        reports = list(verify_files(copy, CONFIG, full=True, workers=2))
        list(verify_digests(copy, copy / "SHA256SUMS", workers=2))
    assert [(r.file, r.message.split(",")[0]) for r in reports if not r.ok] == \
        [(entry.filename, "scales: 1 non-finite value(s) (1 NaN")]
    mb = -(-sum(_full_bytes(e) for e in checkpoint_entries(CONFIG)) // 10**6)
    files_mb = -(-sum(f.stat().st_size for f in (copy / "ckpt-0").iterdir()) // 10**6)
    summaries = [r.getMessage() for r in caplog.records]
    assert any(f": {mb}/{mb} MB" in s for s in summaries), summaries
    assert any(s.startswith("sha256 ") and f": {files_mb}/{files_mb} MB" in s
               for s in summaries), summaries


def test_an_abandoned_digest_check_stops(copy):
    from grok.checkpoint.digests import verify_digests
    reports = verify_digests(copy, copy / "SHA256SUMS", workers=2, progress=False,
                             chunk_bytes=1024)
    assert next(reports).ok
    reports.close()   # the workers stop at their next chunk; nothing raises
