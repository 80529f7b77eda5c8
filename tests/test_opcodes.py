"""grok.checkpoint.opcodes (with unpickle.py): the strict, bounded pickle reader. Each hostile
file a campaign found (issue 14) is refused quickly, in little memory, with one line naming the
file; fuzzing (mutated release files, generated opcode streams) finds no crash, hang or
disagreement with Python's own unpickler."""
from __future__ import annotations

import glob
import os
import random
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import fixture_dir
from grok.checkpoint import CheckpointError, load_tensor, read_header, save_tensor
from grok.checkpoint.arrays import BF16
from grok.checkpoint.fileio import Source
from grok.quant import QuantizedWeight8bit
from grok.tools.fuzz_checkpoint import check, mutate

# Budgets for one hostile file. The attacks they guard against cost seconds to hours and
# gigabytes (2**40 hash steps, a 2**27-slot memo); a parse of a release header takes well under
# a millisecond and a few KB, so these bounds sit orders of magnitude from both.
SECONDS = 2.0
PEAK_BYTES = 8 << 20

P = "\x80\x04"   # PROTO 4 (the streams below are written as latin-1 text for readability)


def _stream(body: str) -> bytes:
    """PROTO 4, then `body` in one frame (as pickle's framer writes it), so that the reader's
    deeper bounds are what refuses it, not the framing check."""
    data = body.encode("latin-1")
    return P.encode("latin-1") + b"\x95" + struct.pack("<Q", len(data)) + data


def _s(text: str) -> str:
    """SHORT_BINUNICODE + MEMOIZE."""
    return "\x8c" + chr(len(text)) + text + "\x94"


ARRAY_HEAD = (_s("numpy.core.multiarray") + _s("_reconstruct") + "\x93\x94" + _s("numpy")
              + _s("ndarray") + "\x93\x94K\x00\x85\x94C\x01b\x94\x87\x94R\x94")


def _dag(levels: int) -> str:
    """t = (t, t) `levels` deep, each level one memo reference: ~8 bytes a level, 2**levels
    nodes when walked (hashing, repr, comparison)."""
    out = "N\x94"
    for level in range(levels):
        out += f"h{chr(level)}h{chr(level)}\x86\x94"
    return out


def _hostile() -> dict[str, bytes]:
    dag = _dag(40)
    nested = "(" * 0 + "N" + "\x85" * 1_000_000           # 10**6 nested 1-tuples
    return {
        "memo index 2**27": bytes.fromhex("80044e72000000082e"),
        "memo index 2**31 after a value": _stream("N" + "r\xff\xff\xff\x7f" + "."),
        "DAG as dict key": _stream("}\x94" + dag + "N" + "s."),
        "DAG as persistent id": _stream(dag + "Q."),
        "DAG as dtype spec": _stream(ARRAY_HEAD + "(K\x01K\x02\x85" + _s("numpy") + _s("dtype")
                                     + "\x93" + dag + "\x89\x88\x87R."),
        "DAG as QW state key": _stream(_s("__main__") + _s("QuantizedWeight8bit") + "\x93)\x81}"
                                       + dag + "Nsb."),
        "list of lists as dtype spec": _stream(ARRAY_HEAD + _s("numpy") + _s("dtype") + "\x93"
                                               + "]\x94" + "(h\x00" * 10 + "e" * 9 + "\x89\x88\x87R."),
        "shape of 200,000 memo refs to 2**63-1": _stream(
            "\x8a\x08" + "\xff" * 7 + "\x7f\x94" + "(" + "h\x00" * 200_000 + "t."),
        "10**6 nested 1-tuples as dict key": _stream("}" + nested + "Ns."),
        "huge BINBYTES8 claim": _stream("\x8e" + "\xff" * 8 + "."),
        "huge BINBYTES8 claim, unframed": (P + "\x8e" + "\xff" * 8 + ".").encode("latin-1"),
        "wide DAG (16**3 nodes, 3 levels)": _stream(
            "N\x94" + "".join("(" + f"h{chr(k)}" * 16 + "t\x94" for k in range(3)) + "."),
        "huge frame claim": _stream("\x95" + "\xff" * 8 + "N."),
        "huge LONG1": _stream("\x8a\xff" + "\x01" * 255 + "."),
        "deep MARKs": _stream("(" * 100_000 + "."),
        "long string": _stream("X" + struct.pack("<I", 1 << 30).decode("latin-1") + "a."),
        "two STOPs": _stream("N.N."),
        "no STOP": _stream("N"),
    }


HOSTILE = _hostile()


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_streams_are_refused_quickly_in_little_memory(tmp_path, case):
    bad = tmp_path / "tensor00000_000"
    bad.write_bytes(HOSTILE[case])
    for read in (load_tensor, read_header):
        tracemalloc.start()
        start = time.perf_counter()
        with pytest.raises(CheckpointError) as info:
            read(bad)
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        message = str(info.value)
        assert message.startswith(str(bad)) and "\n" not in message and len(message) < 400
        assert seconds < SECONDS and peak < PEAK_BYTES, (case, seconds, peak)


def test_deep_nesting_cannot_crash_the_process(tmp_path):
    """10**6 nested tuples overflowed the C stack of `pickle` (a segfault, everywhere): in a
    child process, so that a crash fails this test instead of killing the run."""
    bad = tmp_path / "t"
    bad.write_bytes(HOSTILE["10**6 nested 1-tuples as dict key"])
    code = ("import sys\nfrom grok.checkpoint.opcodes import PickleError\n"
            "from grok.checkpoint.unpickle import parse_file\n"
            "try:\n    parse_file(sys.argv[1])\nexcept PickleError:\n    print('refused')")
    out = subprocess.run([sys.executable, "-c", code, str(bad)], capture_output=True, text=True,
                         timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "refused", out.stderr[-500:]


# --- damage to real files ---------------------------------------------------------------------
def _fixture_files() -> list[Path]:
    return sorted(Path(p) for p in glob.glob(str(fixture_dir("grok-tiny-top2") / "ckpt-0" / "*")))


def test_one_flipped_bit_turning_build_into_a_memo_write(tmp_path):
    """BUILD (0x62) one bit from LONG_BINPUT (0x72): 4.3 GB of memo from a 4 KB file, before."""
    data = bytearray((fixture_dir("grok-tiny-top2") / "ckpt-0" / "tensor00001_000").read_bytes())
    at = data.index(b"b\x89")          # the dtype's BUILD, before the Fortran flag
    data[at] ^= 0x10
    bad = tmp_path / "t"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="memo slot"):
        load_tensor(bad)


def _big_file(tmp_path: Path) -> Path:
    path = tmp_path / "big"
    save_tensor(path, np.arange(40_000, dtype=np.float32))   # data > 64 KB: outside any frame
    return path


def test_array_data_cut_short_is_refused(tmp_path):
    """Nine bytes cut from an array's data let it swallow the next FRAME header: every reader
    accepted the file with all values shifted, before."""
    good = _big_file(tmp_path)
    data = good.read_bytes()
    ref = read_header(good).parts["array"].raw
    bad = tmp_path / "bad"
    for cut in (9, 1, 4):
        at = ref.offset + ref.length // 2
        bad.write_bytes(data[:at] + data[at + cut:])
        with pytest.raises(CheckpointError) as info:
            load_tensor(bad)
        assert str(bad) in str(info.value)


def test_stray_or_shared_bytes_are_refused(tmp_path):
    """Array data where the header says and nowhere else: an extra bytes object, or the scales
    reusing the weight's bytes through the memo, is refused."""
    good = tmp_path / "q"
    save_tensor(good, QuantizedWeight8bit(np.ones((4, 2), np.int8), np.ones((1, 2), BF16)))
    data = good.read_bytes()
    weight = read_header(good).parts["weight"].raw
    bad = tmp_path / "bad"
    # One more bytes object before the final BUILD, popped by nothing: it must be used.
    bad.write_bytes(data[:-2] + b"C\x00" + data[-2:])
    with pytest.raises(CheckpointError):
        load_tensor(bad)
    assert weight.length == 8 and load_tensor(good).weight.sum() == 8


def test_links_are_followed_and_named(tmp_path):
    """A Hugging Face cache is a folder of links into a blob store: followed wherever they
    point; a dangling link's error names the link and its target."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshot" / "ckpt-0"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    source = fixture_dir("grok-tiny-top2") / "ckpt-0" / "tensor00001_000"
    (blobs / "abc123").write_bytes(source.read_bytes())
    (snapshot / "tensor00001_000").symlink_to(os.path.relpath(blobs / "abc123", snapshot))
    assert np.array_equal(load_tensor(snapshot / "tensor00001_000"), load_tensor(source))
    (blobs / "abc123").unlink()
    with pytest.raises(CheckpointError) as info:
        read_header(snapshot / "tensor00001_000")
    assert str(snapshot / "tensor00001_000") in str(info.value)
    assert str(blobs / "abc123") in str(info.value) and "missing" in str(info.value)


# --- fuzzing ------------------------------------------------------------------------------------
def _seeds() -> list[bytes]:
    files = _fixture_files()
    return [f.read_bytes() for f in files[:12] if f.stat().st_size < 100_000]


SEEDS = _seeds()
FUZZ = settings(max_examples=400, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_fuzz_mutated_release_files(seed):
    """Random damage to real release files: a clean one-line refusal, or values equal to what
    Python's unpickler makes of the same bytes (check raises a Finding otherwise)."""
    rng = random.Random(seed)
    data = mutate(rng.choice(SEEDS), rng)
    start = time.perf_counter()
    check(data)
    assert time.perf_counter() - start < SECONDS


_NAMES = ["numpy.core.multiarray", "_reconstruct", "numpy", "ndarray", "dtype", "f4", "i1", "<",
          "|", ">", "weight", "scales", "ml_dtypes", "bfloat16", "__main__",
          "QuantizedWeight8bit", "posix", "system", "O8"]
_OPS = st.one_of(
    st.sampled_from([b"(", b"N", b"\x88", b"\x89", b")", b"\x85", b"\x86", b"\x87", b"t", b"}",
                     b"s", b"u", b"\x93", b"R", b"\x81", b"b", b"\x94", b".", b"]", b"e", b"Q"]),
    st.integers(0, 255).map(lambda k: b"K" + bytes([k])),
    st.integers(-2 ** 31, 2 ** 31 - 1).map(lambda v: b"J" + struct.pack("<i", v)),
    st.integers(0, 70).map(lambda k: b"h" + bytes([k])),
    st.integers(0, 2 ** 32 - 1).map(lambda k: b"r" + struct.pack("<I", k)),
    st.integers(0, 2 ** 32 - 1).map(lambda k: b"j" + struct.pack("<I", k)),
    st.sampled_from(_NAMES).map(lambda s: b"\x8c" + bytes([len(s)]) + s.encode()),
    st.binary(max_size=40).map(lambda b: b"C" + bytes([len(b)]) + b),
    st.integers(0, 2 ** 64 - 1).map(lambda n: b"\x8e" + struct.pack("<Q", n)),
    st.integers(0, 2 ** 64 - 1).map(lambda n: b"\x95" + struct.pack("<Q", n)),
    st.binary(min_size=1, max_size=9).map(lambda b: b"\x8a" + bytes([len(b)]) + b),
)


@FUZZ
@given(prefix=st.integers(0, 400), ops=st.lists(_OPS, max_size=60))
def test_fuzz_generated_opcode_streams(prefix, ops):
    """Opcode streams built from the release's vocabulary and its neighbours (memo writes and
    reads anywhere, frames and bytes of any claimed length, globals allowed and not), after a
    prefix of a real file: a refusal or agreement with the reference, in bounded time."""
    data = SEEDS[prefix % len(SEEDS)][:prefix] + b"".join(ops)
    start = time.perf_counter()
    check(data if data.startswith(b"\x80") else b"\x80\x04" + data)
    assert time.perf_counter() - start < SECONDS


@settings(max_examples=40, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_fuzz_file_readers_agree(tmp_path_factory, seed):
    """Through files: load_tensor and the streaming loader's reads (fileio) give the same bytes
    for every accepted file, and both refuse the rest."""
    rng = random.Random(seed)
    path = tmp_path_factory.getbasetemp() / "fuzz_readers"
    path.write_bytes(mutate(rng.choice(SEEDS), rng))
    try:
        leaf = load_tensor(path)
    except CheckpointError:
        with pytest.raises(CheckpointError):
            read_header(path)
        return
    parts = [leaf.weight, leaf.scales] if isinstance(leaf, QuantizedWeight8bit) else [leaf]
    source = Source(str(path))
    try:
        for array, ref in zip(parts, read_header(path).parts.values()):
            assert np.array_equal(source.array(ref).view(np.uint8), array.view(np.uint8))
    finally:
        source.close()
