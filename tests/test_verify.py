"""`python -m grok.checkpoint verify` (grok.checkpoint.verify) on a good and a broken checkpoint."""
from __future__ import annotations

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
