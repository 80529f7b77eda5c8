"""grok.checkpoint.fileio: slices of checkpoint arrays copied into host arrays, by offset or strided."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from grok.checkpoint import fileio
from grok.checkpoint import save_tensor
from grok.checkpoint.header import read_header


def bits(x):
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


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
    ref = read_header(tmp_path / "t").parts["array"]
    assert ref.raw.inline is None
    assert (fileio.byte_range(ref, index) is not None) == contiguous
    source = fileio.Source(str(tmp_path / "t"))
    try:
        for dtype in (np.float32, ml_dtypes.bfloat16):
            want = array[index].astype(dtype)
            out = np.empty(want.shape, dtype)
            fileio.copy_slice(source, ref, index, out)
            np.testing.assert_array_equal(bits(out), bits(want))
    finally:
        source.close()
