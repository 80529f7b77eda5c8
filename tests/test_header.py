"""grok.checkpoint.header: a checkpoint pickle's arrays found by offset, under the allow-list, by
the same validator as load_tensor -- so every entry point agrees on what a file holds."""
from __future__ import annotations

import shutil

import ml_dtypes
import numpy as np
import pytest

from conftest import tiny_config
from grok.checkpoint import (CheckpointError, load_tensor, read_checkpoint, save_tensor,
                             write_checkpoint)
from grok.checkpoint import loader
from grok.checkpoint.header import read_header
from grok.checkpoint.release import ReleasePickler
from grok.checkpoint.verify import verify
from grok.leaves import abstract_params, checkpoint_entries, random_flat
from grok.parallel import rules
from grok.quant import QuantizedWeight8bit

CONFIG = tiny_config(vocab_size=2048, emb_size=64)   # a 512 KB embedding: frames are skipped


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    write_checkpoint(path, random_flat(CONFIG, seed=1), CONFIG, progress=False)
    return path


def test_header_finds_raw_bytes_by_offset(ckpt):
    for entry in checkpoint_entries(CONFIG)[:14]:
        file = ckpt / "ckpt-0" / entry.filename
        header = read_header(file)
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
    big = read_header(ckpt / "ckpt-0" / "tensor00000_000").parts["array"]
    assert big.raw.inline is None and big.raw.offset > 0     # the embedding is not read


def test_header_errors(tmp_path):
    file = tmp_path / "t"
    save_tensor(file, np.ones((4, 3), ml_dtypes.bfloat16))
    with pytest.raises(CheckpointError, match="expected float32"):
        read_header(file)
    with pytest.raises(CheckpointError, match="missing"):
        read_header(tmp_path / "nope")
    file.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_header(file)


def _leaf(name):
    return next(e for e in checkpoint_entries(CONFIG) if e.name.endswith(name))


def _release_pickle(path, leaf):
    """Write `leaf` as the release's pickler would, keeping its memory order (save_tensor
    writes C order)."""
    with open(path, "wb") as f:
        ReleasePickler(f, protocol=4).dump(leaf)


# (leaf, how the file is spoiled, what the error says); the embedding is beyond the header
# parser's inline size (its data is located by offset), the others are inside pickle frames.
SPOILED = {
    "big-endian embedding": ("in_out_embed/embeddings",
                             lambda a: a.astype(">f4"), "big-endian"),
    "big-endian norm": ("decoder_layer_1/rms_norm/scale", lambda a: a.astype(">f4"),
                        "big-endian"),
    "Fortran-ordered router": ("decoder_layer_0/router/w", np.asfortranarray, "Fortran"),
    "Fortran-ordered int8 weight": ("decoder_layer_1/multi_head_attention/query/w",
                                    lambda q: QuantizedWeight8bit(np.asfortranarray(q.weight),
                                                                  q.scales), "Fortran"),
}


@pytest.mark.parametrize("case", sorted(SPOILED))
def test_every_reader_refuses_big_endian_and_fortran_files_alike(ckpt, tmp_path, case):
    """The release writes neither byte-swapped nor Fortran-ordered arrays: load_tensor,
    read_checkpoint, read_header, verify and the mesh loader all refuse such a file, naming it
    (before, load_tensor took byte-swapped values and everyone took Fortran order)."""
    name, spoil, word = SPOILED[case]
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    entry = _leaf(name)
    file = copy / "ckpt-0" / entry.filename
    _release_pickle(file, spoil(load_tensor(file)))
    for read in (load_tensor, read_header):
        with pytest.raises(CheckpointError, match=word) as info:
            read(file)
        assert str(file) in str(info.value)
    with pytest.raises(CheckpointError, match=word) as info:
        read_checkpoint(copy, CONFIG, progress=False)
    assert str(file) in str(info.value)
    report = next(r for r in verify(copy, CONFIG) if r.file == entry.filename)
    assert not report.ok and word in report.message
    shardings = rules.params_shardings(abstract_params(CONFIG), rules.make_mesh((1, 1)), CONFIG)
    with pytest.raises(CheckpointError, match=word) as info:
        loader.load_params(copy, CONFIG, shardings, progress=False)
    assert str(file) in str(info.value)


def test_a_build_opcode_cannot_move_an_arrays_data(ckpt, tmp_path):
    """A BUILD right after the embedding's raw bytes, setting the offset the header parser
    recorded for them, would point the loader at other bytes of the file: both parsers refuse."""
    source = ckpt / "ckpt-0" / _leaf("in_out_embed/embeddings").filename
    ref = read_header(source).parts["array"].raw
    data = source.read_bytes()
    end = ref.offset + ref.length
    bad = tmp_path / "t"
    bad.write_bytes(data[:end] + b"}\x8c\x06offsetK\x00sb" + data[end:])
    for read in (load_tensor, read_header):
        with pytest.raises(CheckpointError) as info:
            read(bad)
        assert str(bad) in str(info.value)


def _outcome(read, file):
    """('ok', the parts' bytes) or ('error', None)."""
    try:
        leaf = read(file)
    except CheckpointError:
        return "error", None
    if hasattr(leaf, "parts"):   # a header: the bytes where it says they are
        raw = file.read_bytes()
        return "ok", [p.raw.inline if p.raw.inline is not None
                      else raw[p.raw.offset:p.raw.offset + p.raw.length]
                      for p in leaf.parts.values()]
    parts = [leaf.weight, leaf.scales] if isinstance(leaf, QuantizedWeight8bit) else [leaf]
    return "ok", [p.tobytes() for p in parts]


@pytest.mark.parametrize("name", ["in_out_embed/embeddings", "language_model/rms_norm/scale",
                                  "decoder_layer_0/moe/linear_1/w"])
def test_parsers_agree_on_files_with_a_byte_deleted(ckpt, tmp_path, name):
    """One byte deleted anywhere in a file's pickle opcodes: load_tensor and read_header both
    refuse the file, or both accept it with the same bytes (the header parser used to accept a
    frame shorter than it claims, with shifted values)."""
    data = (ckpt / "ckpt-0" / _leaf(name).filename).read_bytes()
    ref = read_header(ckpt / "ckpt-0" / _leaf(name).filename)
    first = min((p.raw.offset for p in ref.parts.values() if p.raw.inline is None),
                default=len(data))
    bad = tmp_path / "t"
    for cut in range(0, min(first, 400)):
        bad.write_bytes(data[:cut] + data[cut + 1:])
        assert _outcome(load_tensor, bad) == _outcome(read_header, bad), cut


def test_only_regular_files_are_read(ckpt, tmp_path):
    """A FIFO (which would block the reader forever) or a directory in a tensor's place is
    refused at once by both parsers; a link to a regular file is followed."""
    import os
    fifo, folder, link = tmp_path / "fifo", tmp_path / "dir", tmp_path / "link"
    os.mkfifo(fifo)
    folder.mkdir()
    for bad in (fifo, folder):
        for read in (load_tensor, read_header):
            with pytest.raises(CheckpointError, match="not a regular file") as info:
                read(bad)
            assert str(bad) in str(info.value)
    link.symlink_to(ckpt / "ckpt-0" / "tensor00001_000")
    assert read_header(link).parts["array"].shape == load_tensor(link).shape
