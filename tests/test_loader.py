"""The streaming loader: bounded host memory, bit-identical params, both copy paths, any
CheckpointReader, the shardings it is given."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from conftest import FIXTURES, tiny_config
from grok.api import device_params
from grok.checkpoint import fileio, loader, transfer
from grok.checkpoint import (CheckpointError, CheckpointReader, Part, ReleaseReader,
                             read_checkpoint, write_checkpoint)
from grok.checkpoint.arrays import ArrayRef, RawRef
from grok.errors import ShardingError
from grok.leaves import abstract_params, checkpoint_entries, random_flat
from grok.parallel import rules

CONFIG = tiny_config(vocab_size=2048, emb_size=64)   # a 512 KB embedding: frames are skipped


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_checkpoint(path, random_flat(CONFIG, seed=1), CONFIG, progress=False)
    return path


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


def shardings(config=CONFIG, mesh=(1, 1), scan=True, layout="tensor"):
    """The params tree's shardings, as grok.load makes them for the loader."""
    return rules.params_shardings(abstract_params(config, scan), rules.make_mesh(mesh), config,
                                  layout)


def test_streaming_is_bit_identical_and_bounded(ckpt, monkeypatch):
    want = device_params(read_checkpoint(ckpt, CONFIG, progress=False), CONFIG)
    # small chunks and staging buffers: files split over the workers, conversions in pieces
    monkeypatch.setattr(fileio, "CHUNK", 3000)
    monkeypatch.setattr(fileio, "STAGE", 1000)
    stats = loader.LoadStats()
    got = loader.load_params(ckpt, CONFIG, shardings(), workers=2, max_inflight=2, stats=stats,
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
    unrolled = loader.load_params(ckpt, CONFIG, shardings(scan=False), scan=False,
                                  progress=False)
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
    real = fileio.host_array

    def spy(shape, dtype):
        array = real(shape, dtype)
        made.append(array)
        return array
    monkeypatch.setattr(fileio, "host_array", spy)
    got = loader.load_params(ckpt, CONFIG, shardings(), progress=False)
    assert loader.last_stats.max_inflight_tensors <= 2
    pointers = {a.ctypes.data for a in made}
    assert all(leaf.unsafe_buffer_pointer() in pointers for leaf in jax.tree.leaves(got))


def test_copying_path_reuses_host_buffers(ckpt, monkeypatch):
    """The path for devices that copy host memory (GPUs): slices read into a pool of reused host
    buffers, handed over, and written in place into the stacked leaves on device."""
    import jax.numpy as jnp
    want = device_params(read_checkpoint(ckpt, CONFIG, progress=False), CONFIG)
    # On a CPU device handing a host buffer over aliases it: the pool must then not reuse it.
    _same(loader.load_params(ckpt, CONFIG, shardings(), zero_copy=False, progress=False), want)
    # A device that copies (as a GPU does): the buffers are reused, the results still exact.
    made = []
    real = fileio.host_array
    monkeypatch.setattr(fileio, "host_array",
                        lambda shape, dtype: made.append(shape) or real(shape, dtype))
    monkeypatch.setattr(transfer, "to_device",
                        lambda host, device: jax.device_put(jnp.array(host), device))
    stats = loader.LoadStats()
    _same(loader.load_params(ckpt, CONFIG, shardings(), zero_copy=False, max_inflight=2,
                             stats=stats, progress=False), want)
    assert stats.max_inflight_tensors <= 2
    files = len(checkpoint_entries(CONFIG))
    assert len(made) < files // 2, (len(made), files)     # buffers were reused


def test_fixture_matches_reader():
    fixture = FIXTURES / "grok-tiny-top2"
    if not (fixture / "ckpt-0").is_dir():
        pytest.skip("fixture not found")
    from grok.checkpoint import read_config
    config = read_config(fixture)
    want = device_params(read_checkpoint(fixture, config, progress=False), config)
    got = loader.load_params(fixture, config, shardings(config), progress=False)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_array_equal(bits(a), bits(b))


def test_load_refuses_early_when_it_cannot_fit(ckpt, monkeypatch):
    import grok
    from grok.parallel.rules import ShardingError
    monkeypatch.setattr(loader, "load_params", lambda *a, **k: pytest.fail("read weights"))
    with pytest.raises(ShardingError, match=r"does not fit with a KV pool of \d+ pages of 16: "
                                            r"mesh 1x1: .* GB per device"):
        grok.load(ckpt, (1, 1), memory_gb=1e-4)


class RawFiles(CheckpointReader):
    """A format the loader has never heard of: every part's bytes alone in a raw file
    (`<index>.<part>`), shapes and dtypes kept by the reader -- what a safetensors reader
    would hand over too. `lie` makes it report a wrong shape for one leaf."""

    def __init__(self, directory, flat, lie=None):
        self.name = str(directory)
        self.parts = {}
        self.lie = lie
        directory.mkdir()
        for entry in checkpoint_entries(CONFIG):
            leaf = flat[entry.name]
            arrays = ({"weight": leaf.weight, "scales": leaf.scales} if entry.quantized
                      else {"array": leaf})
            for part, array in arrays.items():
                file = directory / f"{entry.index}.{part}"
                file.write_bytes(np.ascontiguousarray(array).tobytes())
                self.parts[entry.index, part] = (str(file), array.shape, array.dtype)

    def locate(self, entry):
        out = {}
        for part in (("weight", "scales") if entry.quantized else ("array",)):
            file, shape, dtype = self.parts[entry.index, part]
            if entry.name == self.lie:
                shape = shape[:-1] + (shape[-1] - 1,)
            ref = ArrayRef(tuple(shape), np.dtype(dtype),
                           RawRef(0, int(np.prod(shape)) * np.dtype(dtype).itemsize))
            out[part] = Part(file, ref)
        return out


@pytest.mark.parametrize("zero_copy", [True, False], ids=["aliasing", "copying"])
def test_loader_reads_through_any_checkpoint_reader(ckpt, tmp_path, zero_copy):
    """The loader knows no file format: a reader over raw files gives the same params as the
    release's pickles (bit for bit), on both copy paths, and so does a ReleaseReader."""
    flat = read_checkpoint(ckpt, CONFIG, progress=False)
    want = device_params(flat, CONFIG)
    _same(loader.load_params(RawFiles(tmp_path / "raw", flat), CONFIG, shardings(),
                             zero_copy=zero_copy, progress=False), want)
    _same(loader.load_params(ReleaseReader(ckpt, CONFIG), CONFIG, shardings(),
                             zero_copy=zero_copy, progress=False), want)


def test_loader_checks_what_a_reader_hands_over(ckpt, tmp_path):
    """A reader reporting a leaf with the wrong shape is refused (copying it would overrun)."""
    flat = read_checkpoint(ckpt, CONFIG, progress=False)
    name = "transformer/decoder_layer_1/router/w"
    reader = RawFiles(tmp_path / "raw", flat, lie=name)
    with pytest.raises(CheckpointError, match=f"shape .* expected .* \\(leaf {name}\\)"):
        loader.load_params(reader, CONFIG, shardings(), progress=False)


def test_loader_refuses_shardings_that_do_not_fit_the_tree(ckpt):
    """The shardings tree must be the params tree's: unrolled shardings for a scanned load, or a
    stacked leaf sharded along its layer axis, are ShardingErrors before any file is read."""
    from jax.sharding import NamedSharding, PartitionSpec
    with pytest.raises(ShardingError, match="no sharding for layers/"):
        loader.load_params(ckpt, CONFIG, shardings(scan=False), scan=True, progress=False)
    tree = shardings()
    norm = tree["layers"]["decoder_layer/rms_norm"]
    norm["scale"] = NamedSharding(norm["scale"].mesh, PartitionSpec("model"))
    with pytest.raises(ShardingError, match="layer axis"):
        loader.load_params(ckpt, CONFIG, tree, progress=False)
