"""Tests of grok.checkpoint: release-format reading/writing and the unpickling allow-list."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import pickle
import pickletools
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

import jax.numpy as jnp  # noqa: E402

from grok.checkpoint import (CheckpointError, load_tensor, read_checkpoint,  # noqa: E402
                             read_config, save_tensor, write_checkpoint)
from grok.config import GROK1, GrokConfig  # noqa: E402
from grok.leaves import checkpoint_entries, random_flat  # noqa: E402
from grok.progress import Progress  # noqa: E402
from grok.quant import QuantizedWeight8bit  # noqa: E402

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
TINY = GrokConfig(vocab_size=64, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=2,
                  num_layers=2, widening_factor=2.0, num_experts=4, num_selected_experts=2,
                  sequence_len=32)
TINY12 = TINY.replace(num_layers=12, vocab_size=16, emb_size=16, num_experts=2)
TINY_S4 = TINY.replace(scale_blocks=4, num_layers=3)
BF16 = np.dtype(ml_dtypes.bfloat16)


def fixture_dir(name: str) -> Path:
    path = FIXTURES / name
    if not (path / "ckpt-0").is_dir():
        pytest.skip(f"fixture {path} not present (expected ../shared/fixtures beside the checkout)")
    return path


def bits(x: np.ndarray) -> np.ndarray:
    """The raw bits, so comparisons are exact (also for NaNs / signed zeros)."""
    return np.ascontiguousarray(x).view(np.dtype(f"u{x.dtype.itemsize}"))


def assert_same_leaf(a, b) -> None:
    assert type(a) is type(b)
    if isinstance(a, QuantizedWeight8bit):
        assert a.weight.dtype == b.weight.dtype == np.int8
        assert a.scales.dtype == b.scales.dtype == BF16
        assert a.weight.shape == b.weight.shape and a.scales.shape == b.scales.shape
        np.testing.assert_array_equal(bits(a.weight), bits(b.weight))
        np.testing.assert_array_equal(bits(a.scales), bits(b.scales))
    else:
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_array_equal(bits(a), bits(b))


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def tiny_flat():
    return random_flat(TINY, seed=1)


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_flat) -> Path:
    write_checkpoint(tmp_path / "model", tiny_flat, TINY, progress=False)
    return tmp_path / "model"


# --- fixtures from the release format ------------------------------------------------------------
@pytest.mark.parametrize("name", ["grok-tiny-dense", "grok-tiny-top2"])
def test_read_release_fixtures(name):
    path = fixture_dir(name)
    meta = json.loads((path / "meta.json").read_text())
    config = read_config(path)
    assert config.num_layers == 12 and config.emb_size == 128 and config.scale_blocks == 8
    flat = read_checkpoint(path, config, workers=3, progress=False)
    assert len(flat) == 146
    assert list(flat) == meta["names"]
    for entry in checkpoint_entries(config):
        leaf = flat[entry.name]
        if entry.quantized:
            assert isinstance(leaf, QuantizedWeight8bit)
            assert leaf.weight.shape == entry.shape and leaf.weight.dtype == np.int8
            assert leaf.scales.shape == entry.scales_shape and leaf.scales.dtype == BF16
        else:
            assert isinstance(leaf, np.ndarray) and leaf.dtype == np.float32
            assert leaf.shape == entry.shape
    # the ckpt-0 directory itself is accepted too
    again = read_checkpoint(path / "ckpt-0", config, workers=1, progress=False)
    assert_same_leaf(again["transformer/decoder_layer_10/router/w"],
                     flat["transformer/decoder_layer_10/router/w"])


def test_fixture_files_are_what_meta_says():
    path = fixture_dir("grok-tiny-top2")
    digest = hashlib.sha256()
    for entry in checkpoint_entries(read_config(path)):
        digest.update((path / "ckpt-0" / entry.filename).read_bytes())
    assert digest.hexdigest() == json.loads((path / "meta.json").read_text())["sha256"]


def _opcodes(data: bytes) -> list:
    """Opcodes and arguments, with numpy 2's module spelling mapped to numpy 1's; frame sizes
    (which differ by that one character) are left out."""
    out = []
    for op, arg, _ in pickletools.genops(data):
        if op.name != "FRAME":
            out.append((op.name, "numpy.core.multiarray" if arg == "numpy._core.multiarray" else arg))
    return out


def test_written_files_match_release_structure(tmp_path):
    path = fixture_dir("grok-tiny-top2")
    config = read_config(path)
    flat = read_checkpoint(path, config, progress=False)
    write_checkpoint(tmp_path / "copy", flat, config, progress=False)
    for index in (0, 1, 2, 3, 6, 13):   # embedding, norm, expert / attention weights, router
        name = f"ckpt-0/tensor{index:05d}_000"
        original = (path / name).read_bytes()
        written = (tmp_path / "copy" / name).read_bytes()
        assert _opcodes(written) == _opcodes(original), name
    globals_ = {arg for op, arg in _opcodes((tmp_path / "copy/ckpt-0/tensor00002_000").read_bytes())
                if op == "SHORT_BINUNICODE"}
    assert {"__main__", "QuantizedWeight8bit", "ml_dtypes", "bfloat16"} <= globals_
    assert read_config(tmp_path / "copy") == config


def test_load_tensor_types():
    ckpt = fixture_dir("grok-tiny-top2") / "ckpt-0"
    embed = load_tensor(ckpt / "tensor00000_000")
    assert type(embed) is np.ndarray and embed.dtype == np.float32 and embed.shape == (512, 128)
    q = load_tensor(ckpt / "tensor00003_000")   # moe/linear_1: 8 row blocks
    assert type(q) is QuantizedWeight8bit
    assert q.weight.dtype == np.int8 and q.scales.dtype == BF16
    assert q.weight.shape == (8, 176, 128) and q.scales.shape == (8, 8, 128)


# --- round trips -------------------------------------------------------------------------------
@pytest.mark.parametrize("config", [TINY, TINY12, TINY_S4, TINY.replace(scale_blocks=2)],
                         ids=["tiny", "12-layers", "3-layers-scale4", "scale2"])
def test_round_trip_bit_exact(tmp_path, config):
    flat = random_flat(config, seed=7)
    write_checkpoint(tmp_path / "m", flat, config, progress=False)
    assert read_config(tmp_path / "m") == config
    assert read_config(tmp_path / "m" / "ckpt-0") == config
    back = read_checkpoint(tmp_path / "m", read_config(tmp_path / "m"), progress=False)
    assert list(back) == [e.name for e in checkpoint_entries(config)]
    for name, leaf in flat.items():
        assert_same_leaf(back[name], leaf)


def test_file_order_is_string_order(tmp_path):
    flat = random_flat(TINY12, seed=3)
    write_checkpoint(tmp_path / "m", flat, TINY12, progress=False)
    ckpt = tmp_path / "m" / "ckpt-0"
    # 2 top-level leaves, then decoder_layer_0, _1, _10, _11, _2, ... with 12 leaves each
    assert_same_leaf(load_tensor(ckpt / "tensor00003_000"),
                     flat["transformer/decoder_layer_0/moe/linear_1/w"])
    assert_same_leaf(load_tensor(ckpt / f"tensor{2 + 2 * 12:05d}_000"),
                     flat["transformer/decoder_layer_10/moe/linear/w"])
    assert_same_leaf(load_tensor(ckpt / f"tensor{2 + 4 * 12 + 11:05d}_000"),
                     flat["transformer/decoder_layer_2/router/w"])
    assert_same_leaf(load_tensor(ckpt / "tensor00000_000"),
                     flat["language_model/in_out_embed/embeddings"])


def test_write_accepts_jax_arrays(tmp_path, tiny_flat):
    flat = dict(tiny_flat)
    q = flat["transformer/decoder_layer_1/moe/linear/w"]
    flat["transformer/decoder_layer_1/moe/linear/w"] = QuantizedWeight8bit(
        jnp.asarray(q.weight), jnp.asarray(q.scales))
    flat["language_model/rms_norm/scale"] = jnp.asarray(flat["language_model/rms_norm/scale"])
    write_checkpoint(tmp_path / "m", flat, TINY, progress=False)
    back = read_checkpoint(tmp_path / "m", TINY, progress=False)
    for name, leaf in tiny_flat.items():
        assert_same_leaf(back[name], leaf)


def test_no_config_json_when_asked_or_grok1(tmp_path, tiny_flat):
    write_checkpoint(tmp_path / "m", tiny_flat, TINY, write_config=False, progress=False)
    assert not (tmp_path / "m" / "config.json").exists()
    assert read_config(tmp_path / "m") == GROK1 and GROK1.is_grok1


# --- hostile pickles ---------------------------------------------------------------------------
class Payload:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _hostile(marker: Path) -> dict[str, tuple[bytes, str]]:
    touch = f"touch {marker}"
    scales = np.ones((1, 4), BF16)
    nested = io.BytesIO()
    from grok.checkpoint.release import ReleasePickler
    ReleasePickler(nested, protocol=4).dump(
        QuantizedWeight8bit(Payload(os.system, touch), scales))
    return {
        "os.system": (pickle.dumps(Payload(os.system, touch), protocol=4), "posix.system"),
        "eval": (pickle.dumps(Payload(eval, f"__import__('os').system({touch!r})"), protocol=4),
                 "builtins.eval"),
        "popen": (pickle.dumps(Payload(subprocess.Popen, ["touch", str(marker)]), protocol=4),
                  "subprocess.Popen"),
        "check_call": (pickle.dumps(Payload(subprocess.check_call, ["touch", str(marker)])),
                       "subprocess.check_call"),
        "import": (pickle.dumps(Payload(__import__, "os"), protocol=4), "builtins.__import__"),
        "raw GLOBAL": (b"cposix\nsystem\n(V" + touch.encode() + b"\ntR.", "posix.system"),
        "nested in QW state": (nested.getvalue(), "posix.system"),
        "object array": (pickle.dumps(np.array([Payload(os.system, touch)], dtype=object),
                                      protocol=4), "posix.system"),
    }


@pytest.mark.parametrize("case", ["os.system", "eval", "popen", "check_call", "import",
                                  "raw GLOBAL", "nested in QW state", "object array"])
def test_hostile_pickles_are_refused(tmp_path, case):
    marker = tmp_path / "MARKER"
    data, global_name = _hostile(marker)[case]
    bad = tmp_path / "tensor00000_000"
    bad.write_bytes(data)
    message = error_of(load_tensor, bad)
    # The strict reader stops at the first thing a checkpoint file cannot hold: the global
    # itself, or what comes before it (no PROTO opcode; an object dtype).
    refusal = {"raw GLOBAL": "PROTO", "object array": "'O8' not allowed"}.get(case)
    assert str(bad) in message
    assert refusal in message if refusal else (global_name in message and "disallowed" in message)
    assert not marker.exists()


def test_hostile_pickle_inside_checkpoint(tiny_ckpt, tmp_path):
    marker = tmp_path / "MARKER"
    bad = tiny_ckpt / "ckpt-0" / "tensor00007_000"
    bad.write_bytes(_hostile(marker)["os.system"][0])
    message = error_of(read_checkpoint, tiny_ckpt, TINY, progress=False)
    assert str(bad) in message and "posix.system" in message
    assert not marker.exists()


def test_disallowed_module_is_not_imported(tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "evil_ckpt_module.py").write_text(
        f"open({str(marker)!r}, 'w').close()\ndef f(*a):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    bad = tmp_path / "t"
    bad.write_bytes(b"\x80\x04cevil_ckpt_module\nf\n)R.")
    assert "evil_ckpt_module.f" in error_of(load_tensor, bad)
    assert not marker.exists() and "evil_ckpt_module" not in sys.modules


def test_allowed_globals_cannot_be_modified(tmp_path):
    from grok.checkpoint import unpickle as ck
    reconstruct = ck.ALLOWED[("numpy.core.multiarray", "_reconstruct")]
    bad = tmp_path / "t"
    for target in (b"cnumpy.core.multiarray\n_reconstruct\n", b"c__main__\nQuantizedWeight8bit\n",
                   b"cnumpy\nndarray\n", b"cml_dtypes\nbfloat16\n"):
        # BUILD with (None, {'__doc__': 'pwned'}) would setattr on a plain function or class
        bad.write_bytes(b"\x80\x04" + target + b"(N}V__doc__\nVpwned\nstb.")
        error_of(load_tensor, bad)
    assert getattr(reconstruct, "__doc__", None) != "pwned"
    assert ck.QWStub.__doc__ != "pwned" and getattr(ck.NDARRAY, "__doc__", None) != "pwned"
    load_tensor(fixture_dir("grok-tiny-top2") / "ckpt-0" / "tensor00002_000")   # still works


def test_persistent_ids_are_refused(tmp_path):
    class PidPickler(pickle.Pickler):
        def persistent_id(self, obj):
            return "tensor" if isinstance(obj, str) and obj == "x" else None
    buf = io.BytesIO()
    PidPickler(buf, protocol=4).dump("x")
    bad = tmp_path / "t"
    bad.write_bytes(buf.getvalue())
    assert "persistent id" in error_of(load_tensor, bad)


def test_qw_state_may_only_hold_weight_and_scales(tmp_path):
    from grok.checkpoint.release import ReleasePickler
    q = QuantizedWeight8bit(np.zeros((4, 2), np.int8), np.ones((1, 2), BF16))
    buf = io.BytesIO()
    ReleasePickler(buf, protocol=4).dump(q)
    data = buf.getvalue().replace(b"\x8c\x06scales", b"\x8c\x06extras", 1)
    bad = tmp_path / "t"
    bad.write_bytes(data)
    assert "'weight' and 'scales'" in error_of(load_tensor, bad)
    bad.write_bytes(pickle.dumps(np.zeros((4, 2), np.int8)))
    assert "expected float32" in error_of(load_tensor, bad)
    bad.write_bytes(pickle.dumps(np.array([1, 2], dtype=object)))
    assert "not allowed" in error_of(load_tensor, bad)
    bad.write_bytes(pickle.dumps({"weight": 1}))
    assert "expected a float32 array or QuantizedWeight8bit" in error_of(load_tensor, bad)


# --- broken files --------------------------------------------------------------------------------
def test_truncated_and_empty_files(tiny_ckpt):
    ckpt = tiny_ckpt / "ckpt-0"
    for index in (0, 2):
        f = ckpt / f"tensor{index:05d}_000"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
        assert str(f) in error_of(load_tensor, f)
        assert str(f) in error_of(read_checkpoint, tiny_ckpt, TINY, progress=False)
        f.write_bytes(data[:-1])   # loses only the STOP opcode
        assert str(f) in error_of(load_tensor, f)
        f.write_bytes(data + b"junk")
        assert "trailing" in error_of(load_tensor, f)
        f.write_bytes(b"")
        message = error_of(read_checkpoint, tiny_ckpt, TINY, progress=False)
        assert str(f) in message and "empty" in message
        f.write_bytes(data)
    f = ckpt / "tensor00001_000"
    f.write_bytes(os.urandom(64))
    assert str(f) in error_of(load_tensor, f)


def test_missing_and_extra_files(tiny_ckpt):
    ckpt = tiny_ckpt / "ckpt-0"
    assert "missing" in error_of(load_tensor, ckpt / "tensor09999_000")
    (ckpt / "tensor00005_000").rename(tiny_ckpt / "stash")
    (ckpt / "tensor00009_000").unlink()
    message = error_of(read_checkpoint, tiny_ckpt, TINY, progress=False)
    assert str(ckpt / "tensor00005_000") in message and "missing" in message and "2 of 26" in message
    (tiny_ckpt / "stash").rename(ckpt / "tensor00005_000")
    save_tensor(ckpt / "tensor00009_000", random_flat(TINY)[checkpoint_entries(TINY)[9].name])
    read_checkpoint(tiny_ckpt, TINY, progress=False)
    (ckpt / "tensor00026_000").write_bytes(b"")
    message = error_of(read_checkpoint, tiny_ckpt, TINY, progress=False)
    assert str(ckpt / "tensor00026_000") in message and "unexpected" in message
    # a config with fewer layers than the files on disk is an error, not a silent partial read
    (ckpt / "tensor00026_000").unlink()
    assert "unexpected" in error_of(read_checkpoint, tiny_ckpt, TINY.replace(num_layers=1),
                                    progress=False)


def _replace(ckpt: Path, name: str, leaf) -> Path:
    entry = next(e for e in checkpoint_entries(TINY) if e.name == name)
    path = ckpt / "ckpt-0" / entry.filename
    save_tensor(path, leaf)
    return path


def test_wrong_shapes_and_dtypes(tiny_ckpt, tiny_flat):
    router = "transformer/decoder_layer_1/router/w"
    norm = "transformer/decoder_layer_0/rms_norm_2/scale"
    query = "transformer/decoder_layer_1/multi_head_attention/query/w"
    key = "transformer/decoder_layer_0/multi_head_attention/key/w"
    q, k = tiny_flat[query], tiny_flat[key]
    cases = [
        (router, np.ascontiguousarray(tiny_flat[router].T), "shape [4, 32], expected [32, 4]"),
        (norm, tiny_flat[norm].astype(np.float16), "float16"),
        (query, QuantizedWeight8bit(q.weight, q.scales.view(np.int16).astype(np.int8)), "int8"),
        (key, QuantizedWeight8bit(k.weight.T.copy(), k.scales), "does not fit"),
        (query, QuantizedWeight8bit(q.weight.astype(np.int16), q.scales), "int16"),
        (query, q.weight.astype(np.float32), "expected QuantizedWeight8bit"),
        (router, QuantizedWeight8bit(np.zeros((32, 4), np.int8), np.ones((1, 4), BF16)),
         "expected a float32 array"),
        ("transformer/decoder_layer_0/moe/linear_1/w",
         QuantizedWeight8bit(np.zeros((4, 48, 32), np.int8), np.ones((4, 4, 32), BF16)),
         "scales shape [4, 4, 32], expected [4, 8, 32]"),
    ]
    for name, leaf, expected in cases:
        path = _replace(tiny_ckpt, name, leaf)
        message = error_of(read_checkpoint, tiny_ckpt, TINY, progress=False)
        assert str(path) in message and expected in message, message
        save_tensor(path, tiny_flat[name])
    read_checkpoint(tiny_ckpt, TINY, progress=False)


def test_not_a_checkpoint_dir(tmp_path):
    assert "ckpt-0" in error_of(read_checkpoint, tmp_path, TINY, progress=False)
    assert "no such" in error_of(read_checkpoint, tmp_path / "nope", TINY, progress=False)


# --- write refusals --------------------------------------------------------------------------------
def test_write_refuses_bad_leaves_before_writing(tmp_path, tiny_flat):
    router = "transformer/decoder_layer_1/router/w"
    target = tmp_path / "out" / "model"
    for change, expected in [({router: tiny_flat[router].T}, "shape [4, 32], expected [32, 4]"),
                             ({router: tiny_flat[router].astype(np.float64)}, "float64"),
                             ({"bogus/leaf": np.zeros(1, np.float32)}, "bogus/leaf")]:
        message = error_of(write_checkpoint, target, {**tiny_flat, **change}, TINY,
                           progress=False)
        assert expected in message
        if "bogus" not in expected:
            assert router in message
        assert not target.exists() and not (tmp_path / "out").exists()
    flat = dict(tiny_flat)
    del flat[router]
    assert router in error_of(write_checkpoint, target, flat, TINY, progress=False)
    assert not target.exists()


def test_write_refuses_to_overwrite(tmp_path, tiny_flat):
    target = tmp_path / "model"
    write_checkpoint(target, tiny_flat, TINY, progress=False)
    other = random_flat(TINY, seed=99)
    assert "overwrite" in error_of(write_checkpoint, target, other, TINY, progress=False)
    back = read_checkpoint(target, TINY, progress=False)
    assert_same_leaf(back["language_model/rms_norm/scale"], tiny_flat["language_model/rms_norm/scale"])
    write_checkpoint(target, other, TINY, overwrite=True, progress=False)
    back = read_checkpoint(target, TINY, progress=False)
    for name, leaf in other.items():
        assert_same_leaf(back[name], leaf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]   # no temporaries left
    assert sorted(p.name for p in target.iterdir()) == ["ckpt-0", "config.json"]


def test_write_into_existing_empty_dir(tmp_path, tiny_flat):
    (tmp_path / "model" / "ckpt-0").mkdir(parents=True)
    write_checkpoint(tmp_path / "model", tiny_flat, TINY, progress=False)
    assert len(list((tmp_path / "model" / "ckpt-0").iterdir())) == 26


# --- progress --------------------------------------------------------------------------------------
def test_progress_logs_when_not_a_tty(tiny_ckpt, caplog, capsys):
    with caplog.at_level(logging.INFO, logger="grok.checkpoint"):
        read_checkpoint(tiny_ckpt, TINY, progress=True)
    assert "26/26 files" in caplog.text
    assert "26/26" not in capsys.readouterr().err


def test_progress_bar_on_tty():
    class Tty(io.StringIO):
        def isatty(self):
            return True
    stream = Tty()
    with Progress(3, "demo", stream=stream, min_interval=0.0) as bar:
        for _ in range(3):
            bar.update(1, 10**9)
    text = stream.getvalue()
    assert "\r" in text and "3/3 files" in text and "3.00 GB" in text and text.endswith("\n")


# --- the package's structure ---------------------------------------------------------------------
PACKAGE = ROOT / "grok" / "checkpoint"
MAY_IMPORT = {"grok.config", "grok.errors", "grok.files", "grok.leaves", "grok.quant", "grok.progress"}
# for `plan`, and the families' config and tokenizer readers (`convert`, `plan --config`)
CLI_MAY_IMPORT = {"grok.parallel", "grok.parallel.memory", "grok.parallel.rules", "grok.families"}


def _grok_imports(tree):
    """(module imported, names taken from it, at module level?) of every grok import."""
    import ast
    nested = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.ClassDef))
              for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        top = id(node) not in nested
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("grok"):
                    yield alias.name, [], top
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grok"):
            names = [a.name for a in node.names]
            subs = [n for n in names if (PACKAGE / f"{n}.py").is_file()] \
                if node.module == "grok.checkpoint" else []
            for sub in subs:
                yield f"grok.checkpoint.{sub}", [], top
            if len(subs) < len(names):
                yield node.module, [n for n in names if n not in subs], top


def test_checkpoint_modules_import_only_what_they_may_without_cycles():
    """grok.checkpoint depends on config, errors, the leaf table, quant and progress only (its
    CLI on grok.parallel for `plan`), at module level (no import hidden in a function), takes no
    underscore name from another module, its modules form no cycle, and none of them reaches
    back into the package's __init__."""
    import ast
    import re
    graph = {}
    for file in sorted(PACKAGE.glob("*.py")):
        source = file.read_text()
        tree = ast.parse(source)
        module = file.stem
        graph[module] = set()
        allowed = MAY_IMPORT | (CLI_MAY_IMPORT if module == "__main__" else set())
        bound = set()
        for imported, names, top in _grok_imports(tree):
            assert top, f"{file.name}: imports {imported} inside a function"
            assert not any(n.startswith("_") for n in names), f"{file.name}: {imported} {names}"
            if imported.startswith("grok.checkpoint."):
                graph[module].add(imported.rsplit(".", 1)[1])
                bound.add(imported.rsplit(".", 1)[1])
            elif imported == "grok.checkpoint":
                assert module == "__init__", f"{file.name}: imports names of grok.checkpoint"
            else:
                assert imported in allowed, f"{file.name}: imports {imported}"
                bound.update(names)
        for name in bound:   # no module._private through an imported module either
            assert not re.search(rf"\b{name}\._[a-z]", source), f"{file.name}: {name}._..."
    graph.pop("__init__")

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for dep in graph.get(module, ()):
            visit(dep, path + [module])
    for module in graph:
        visit(module, [])


def test_the_release_pickler_ignores_dispatch_entries_other_libraries_add(tmp_path, monkeypatch):
    """dill (imported by lm-eval's `datasets`) adds its own savers to pickle._Pickler.dispatch,
    its `type` saver writing a class's global past our save_global: a file written after that
    named grok.quant.QuantizedWeight, which every reader refuses. Written with such entries in
    place, a leaf still names __main__.QuantizedWeight8bit and reads back."""
    import pickle

    from grok.checkpoint.release import load_tensor, save_tensor
    from grok.quant import quantize
    leaf = quantize(np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32), 2)
    hijack = lambda pickler, obj: pickle._Pickler.save_global(pickler, obj)   # noqa: E731
    monkeypatch.setitem(pickle._Pickler.dispatch, type, hijack)
    save_tensor(tmp_path / "t", leaf)
    assert b"QuantizedWeight8bit" in (tmp_path / "t").read_bytes()
    back = load_tensor(tmp_path / "t")
    assert np.array_equal(back.weight, leaf.weight) and np.array_equal(back.scales, leaf.scales)
