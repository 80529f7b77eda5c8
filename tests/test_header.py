"""grok.checkpoint.header: a checkpoint pickle's arrays found by offset, under the allow-list."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from conftest import tiny_config
from grok.checkpoint import CheckpointError, load_tensor, save_tensor, write_checkpoint
from grok.checkpoint.header import read_header
from grok.leaves import checkpoint_entries, random_flat

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
