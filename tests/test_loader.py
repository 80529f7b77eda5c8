"""The streaming loader (header parsing by offset, bounded host memory, bit-identical params) and
`python -m grok.checkpoint verify`."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import FIXTURES, tiny_config
from grok import loader
from grok.api import device_params
from grok.checkpoint import (CheckpointError, load_tensor, read_checkpoint, save_tensor,
                             write_checkpoint)
from grok.params import checkpoint_entries, random_flat
from grok.quant import QuantizedWeight8bit

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tiny_config(vocab_size=2048, emb_size=64)   # a 512 KB embedding: frames are skipped


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_checkpoint(path, random_flat(CONFIG, seed=1), CONFIG, progress=False)
    return path


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def test_header_finds_raw_bytes_by_offset(ckpt):
    for entry in checkpoint_entries(CONFIG)[:14]:
        file = ckpt / "ckpt-0" / entry.filename
        header = loader.read_header(file)
        leaf = load_tensor(file)
        raw = file.read_bytes()
        parts = {"weight": leaf.weight, "scales": leaf.scales} if header.quantized \
            else {"array": leaf}
        assert set(parts) == set(header.parts) and header.end == len(raw)
        for name, array in parts.items():
            ref = header.parts[name]
            assert ref.shape == array.shape and ref.dtype == array.dtype
            data = ref.raw.inline if ref.raw.inline is not None else \
                raw[ref.raw.offset:ref.raw.offset + ref.raw.length]
            assert data == array.tobytes()
    big = loader.read_header(ckpt / "ckpt-0" / "tensor00000_000").parts["array"]
    assert big.raw.inline is None and big.raw.offset > 0     # the embedding is not read


def test_streaming_is_bit_identical_and_bounded(ckpt, monkeypatch):
    want = device_params(read_checkpoint(ckpt, CONFIG, progress=False), CONFIG)
    # small chunks and staging buffers: files split over the workers, conversions in pieces
    monkeypatch.setattr(loader, "CHUNK", 3000)
    monkeypatch.setattr(loader, "STAGE", 1000)
    stats = loader.LoadStats()
    got = loader.load_params(ckpt, CONFIG, (1, 1), workers=2, max_inflight=2, stats=stats,
                             progress=False)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(bits(a), bits(b))
    sizes = [os.path.getsize(ckpt / "ckpt-0" / e.filename) for e in checkpoint_entries(CONFIG)]
    assert stats.files == len(sizes)
    assert stats.max_inflight_tensors <= 2
    assert stats.max_inflight_bytes <= 2 * max(sizes)
    assert sum(sizes) * 0.95 < stats.bytes_read <= sum(sizes)
    # the unrolled layout too
    unrolled = loader.load_params(ckpt, CONFIG, (1, 1), scan=False, progress=False)
    assert isinstance(unrolled["layers"], tuple) and len(unrolled["layers"]) == CONFIG.num_layers
    w = unrolled["layers"][1]["decoder_layer/moe/linear_1"]["w"]
    np.testing.assert_array_equal(bits(w.weight),
                                  bits(want["layers"]["decoder_layer/moe/linear_1"]["w"].weight[1]))


def _same(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(bits(a), bits(b))


def test_cpu_path_reads_straight_into_device_buffers(ckpt, monkeypatch):
    """On a CPU device the arrays the files are read into become the device buffers (each byte
    is copied once): every loaded leaf's buffer is one of the loader's host arrays."""
    made = []
    real = loader._host_array

    def spy(shape, dtype):
        array = real(shape, dtype)
        made.append(array)
        return array
    monkeypatch.setattr(loader, "_host_array", spy)
    got = loader.load_params(ckpt, CONFIG, (1, 1), progress=False)
    assert loader.last_stats.max_inflight_tensors <= 2
    pointers = {a.ctypes.data for a in made}
    assert all(leaf.unsafe_buffer_pointer() in pointers for leaf in jax.tree.leaves(got))


def test_copying_path_reuses_host_buffers(ckpt, monkeypatch):
    """The path for devices that copy host memory (GPUs): slices read into a pool of reused host
    buffers, handed over, and written in place into the stacked leaves on device."""
    import jax.numpy as jnp
    want = device_params(read_checkpoint(ckpt, CONFIG, progress=False), CONFIG)
    # On a CPU device handing a host buffer over aliases it: the pool must then not reuse it.
    _same(loader.load_params(ckpt, CONFIG, (1, 1), zero_copy=False, progress=False), want)
    # A device that copies (as a GPU does): the buffers are reused, the results still exact.
    made = []
    real = loader._host_array
    monkeypatch.setattr(loader, "_host_array",
                        lambda shape, dtype: made.append(shape) or real(shape, dtype))
    monkeypatch.setattr(loader, "_to_device",
                        lambda host, device: jax.device_put(jnp.array(host), device))
    stats = loader.LoadStats()
    _same(loader.load_params(ckpt, CONFIG, (1, 1), zero_copy=False, max_inflight=2, stats=stats,
                             progress=False), want)
    assert stats.max_inflight_tensors <= 2
    files = len(checkpoint_entries(CONFIG))
    assert len(made) < files // 2, (len(made), files)     # buffers were reused


@pytest.mark.parametrize("index,contiguous", [
    ((slice(None), slice(None), slice(None)), True),
    ((slice(1, 3), slice(None), slice(None)), True),
    ((slice(2, 3), slice(4, 8), slice(None)), True),
    ((slice(1, 2), slice(2, 3), slice(1, 5)), True),
    ((slice(None), slice(0, 4), slice(None)), False),
    ((slice(None), slice(None), slice(3, 6)), False)])
def test_copy_slices(tmp_path, index, contiguous):
    """Contiguous slices are read by offset, strided ones copied out of a memory map, float32
    converted on the way: all equal numpy's slicing."""
    array = np.random.default_rng(0).standard_normal((4, 64, 80)).astype(np.float32)
    save_tensor(tmp_path / "t", array)
    ref = loader.read_header(tmp_path / "t").parts["array"]
    assert ref.raw.inline is None
    assert (loader._byte_range(ref, index) is not None) == contiguous
    source = loader._Source(str(tmp_path / "t"))
    try:
        for dtype in (np.float32, ml_dtypes.bfloat16):
            want = array[index].astype(dtype)
            out = np.empty(want.shape, dtype)
            loader._copy(source, ref, index, out)
            np.testing.assert_array_equal(bits(out), bits(want))
    finally:
        source.close()


def test_fixture_matches_reader():
    fixture = FIXTURES / "grok-tiny-top2"
    if not (fixture / "ckpt-0").is_dir():
        pytest.skip("fixture not found")
    from grok.checkpoint import read_config
    config = read_config(fixture)
    want = device_params(read_checkpoint(fixture, config, progress=False), config)
    got = loader.load_params(fixture, config, (1, 1), progress=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(bits(a), bits(b))


def test_load_refuses_early_when_it_cannot_fit(ckpt, monkeypatch):
    import grok
    from grok.sharding import ShardingError
    monkeypatch.setattr(loader, "load_params", lambda *a, **k: pytest.fail("read weights"))
    with pytest.raises(ShardingError, match=r"does not fit: mesh 1x1: .* GB per device"):
        grok.load(ckpt, (1, 1), memory_gb=1e-4)


# --- verify ------------------------------------------------------------------------------------
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


def test_header_errors(tmp_path):
    file = tmp_path / "t"
    save_tensor(file, np.ones((4, 3), ml_dtypes.bfloat16))
    with pytest.raises(CheckpointError, match="expected float32"):
        loader.read_header(file)
    with pytest.raises(CheckpointError, match="missing"):
        loader.read_header(tmp_path / "nope")
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        loader.read_header(file)
