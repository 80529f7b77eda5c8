"""Values outside a checkpoint's format (issue 24): scales that are NaN, infinite, zero or
negative are refused by every load (the whole-file reader and the streaming loader) in one line
naming the file and leaf, and `verify` flags them; int4 values of -8 (the format's values are
[-7, 7]) are caught by `verify --full`. A file that shrinks while verify reads it is a report."""
from __future__ import annotations

import shutil

import jax
import ml_dtypes
import numpy as np
import pytest

from conftest import tiny_config
from grok.checkpoint import load_tensor, read_checkpoint, read_config, save_tensor, write_checkpoint
from grok.checkpoint import safetensors_io
from grok.checkpoint.convert import convert
from grok.checkpoint.fileio import Mapped
from grok.checkpoint.loader import load_params
from grok.checkpoint.values import bad_scales
from grok.checkpoint.verify import verify
from grok.config import DEMO_DIR
from grok.errors import CheckpointError
from grok.leaves import abstract_params, checkpoint_entries, random_flat
from grok.parallel import rules
from grok.quant import QuantizedWeight8bit

CONFIG = tiny_config(vocab_size=256, emb_size=32)
BAD_SCALES = {"nan": np.nan, "inf": np.inf, "zero": 0.0, "negative": -0.5, "minus-zero": -0.0}


def test_the_scales_bit_test_is_the_float_test_on_every_bfloat16():
    """bad_scales tests a bfloat16's bits (no float copy): on all 65536 patterns it must say what
    `not (finite and > 0)` says of the value."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    values = every.astype(np.float32)
    np.testing.assert_array_equal(bad_scales(every), ~(np.isfinite(values) & (values > 0)))


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("release") / "tiny"
    write_checkpoint(path, random_flat(CONFIG, seed=5), CONFIG, progress=False)
    return path


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    path = tmp_path_factory.mktemp("int4") / "demo4"
    convert(DEMO_DIR, path, 4, progress=False)
    return path


def damage_release_scale(path, value):
    """A copy of the release checkpoint with one scale of a quantised leaf set to `value`."""
    entry = [e for e in checkpoint_entries(CONFIG) if e.quantized][1]
    file = path / "ckpt-0" / entry.filename
    leaf = load_tensor(file)
    scales = leaf.scales.copy()
    scales.reshape(-1)[scales.size // 2] = value
    save_tensor(file, QuantizedWeight8bit(leaf.weight, scales))
    return file, entry


def one_device(path, config, zero_copy):
    mesh = rules.make_mesh((1, 1), jax.devices()[:1])
    shardings = rules.params_shardings(abstract_params(config), mesh, config)
    return load_params(path, config, shardings, progress=False, zero_copy=zero_copy)


@pytest.mark.parametrize("bad", BAD_SCALES, ids=list(BAD_SCALES))
def test_every_load_refuses_scales_that_are_not_finite_and_positive(release, tmp_path, bad):
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    file, entry = damage_release_scale(copy, BAD_SCALES[bad])
    want = rf"^{file}: scales: 1 value\(s\) not finite and > 0 .*\(leaf {entry.name}\)$"
    with pytest.raises(CheckpointError, match=want):
        read_checkpoint(copy, CONFIG, progress=False)
    for zero_copy in (True, False):   # straight into the device buffers, or via the pool
        with pytest.raises(CheckpointError, match=want):
            one_device(copy, CONFIG, zero_copy)
    [report] = [r for r in verify(copy, CONFIG, progress=False) if not r.ok]
    assert report.file == file.name and "scales" in report.message


def int4_weight_file(path):
    """(file, entry, weight ArrayRef) of the int4 checkpoint's largest expert weight."""
    config = read_config(path)
    entry = max((e for e in checkpoint_entries(config) if e.quantized),
                key=lambda e: np.prod(e.weight_shape))
    file = path / "ckpt-0" / safetensors_io.filename(entry)
    return file, entry, safetensors_io.leaf_parts(safetensors_io.read_st_header(file), entry)


def test_int4_and_safetensors_scales_are_checked_on_load(int4, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(int4, copy)
    config = read_config(copy)
    file, entry, parts = int4_weight_file(copy)
    scales = parts["scales"]
    data = bytearray(file.read_bytes())
    data[scales.raw.offset:scales.raw.offset + 2] = np.array([0], ml_dtypes.bfloat16).tobytes()
    file.write_bytes(bytes(data))
    want = rf"^{file}: scales: 1 value\(s\) not finite and > 0 \(the first, at flat index 0, " \
           rf"is 0.0\) \(leaf {entry.name}\)$"
    with pytest.raises(CheckpointError, match=want):
        read_checkpoint(copy, config, progress=False)
    with pytest.raises(CheckpointError, match=want):
        one_device(copy, config, zero_copy=True)


def test_full_verify_catches_int4_values_of_minus_eight(int4, tmp_path):
    """A nibble of 8 is -8: outside the format, yet it unpacks to a weight. Deep in the largest
    weight (beyond the sampled stretches) only --full reads it; in its first bytes the sample
    does."""
    copy = tmp_path / "copy"
    shutil.copytree(int4, copy)
    config = read_config(copy)
    file, entry, parts = int4_weight_file(copy)
    weight = parts["weight"]
    assert weight.nbytes > 4 * 1024   # several sampled stretches' worth
    deep, high = weight.raw.offset + weight.nbytes // 3, weight.raw.offset + 5
    data = bytearray(file.read_bytes())
    data[deep] = (data[deep] & 0xF0) | 0x08   # low nibble -8
    data[high] = (data[high] & 0x0F) | 0x80   # high nibble -8
    file.write_bytes(bytes(data))
    sampled = {r.file: r for r in verify(copy, config, progress=False, sample_bytes=3 * 1024)}
    assert not sampled[file.name].ok
    assert "weight: 1 int4 value(s) of -8" in sampled[file.name].message   # only the early one
    assert sum(not r.ok for r in sampled.values()) == 1
    full = {r.file: r for r in verify(copy, config, progress=False, full=True, chunk_bytes=1024)}
    assert full[file.name].message == ("weight: 2 int4 value(s) of -8, outside the format's "
                                       "[-7, 7], the first in packed byte 5")
    assert sum(not r.ok for r in full.values()) == 1


def test_a_file_that_shrinks_during_verify_is_its_report(release, tmp_path, monkeypatch):
    """Cut short between its header's parse and the reading of its values (it used to raise
    ValueError from numpy, out of verify)."""
    from grok.checkpoint import verify as verify_module
    copy = tmp_path / "copy"
    shutil.copytree(release, copy)
    victim = [e for e in checkpoint_entries(CONFIG) if e.quantized][0].filename
    real = verify_module.read_header

    def shrinking(path):
        header = real(path)
        if path.name == victim:
            with open(path, "r+b") as f:
                f.truncate(header.end // 2)
        return header

    monkeypatch.setattr(verify_module, "read_header", shrinking)
    for full in (False, True):
        shutil.copy(release / "ckpt-0" / victim, copy / "ckpt-0" / victim)
        bad = [(r.file, r.message) for r in verify(copy, CONFIG, progress=False, full=full)
               if not r.ok]
        assert bad == [(victim, "truncated while reading")]
    # the loader's memory map of a file shorter than its header says: a CheckpointError
    header = real(release / "ckpt-0" / victim)
    assert (copy / "ckpt-0" / victim).stat().st_size < header.end
    mapped = Mapped(str(copy / "ckpt-0" / victim))
    try:
        with pytest.raises(CheckpointError, match="truncated while reading"):
            mapped.array(header.parts["scales"])
    finally:
        mapped.close()
