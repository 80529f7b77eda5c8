"""Converted checkpoints: `python -m grok.checkpoint convert` (release or converted ->
safetensors, int8 or int4), loading them (whole, and streamed onto a mesh through SafetensorsReader), verify, run.py,
and every kind of bad input named in one line with the destination never half-written."""
from __future__ import annotations

import copy
import hashlib
import json
import random
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import grok
from conftest import cpu_devices_env, fixture_dir
from grok.checkpoint import read_checkpoint, read_config
from grok.checkpoint.__main__ import main as checkpoint_main
from grok.checkpoint.convert import DEFAULT_GROUP_SIZE, convert
from grok.checkpoint.loader import load_params
from grok.checkpoint.reader import SafetensorsReader, as_reader
from grok.checkpoint.safetensors_io import read_leaf, read_st_header, write_leaf
from grok.cli import main as cli_main
from grok.config import DEMO_DIR
from grok.errors import CheckpointError, ConfigError
from grok.tools.fuzz_checkpoint import check_safetensors, mutate
from grok.leaves import abstract_params, checkpoint_entries
from grok.parallel import rules
from grok.quant import INT4, QuantizedWeight, dequantize, pack_int4, unpack_int4
from oracle import oracle_forward, weights64
from precision import assert_rows_within, model_rel_error, near_tie_rows, rel_rows

FIXTURE = "grok-tiny-top2"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The fixture converted once to int8 and to int4 (default group size)."""
    src = fixture_dir(FIXTURE)
    root = tmp_path_factory.mktemp("converted")
    convert(src, root / "int8", 8, progress=False)
    convert(src, root / "int4", 4, progress=False)
    return src, root / "int8", root / "int4"


def _quantised(config):
    return [e for e in checkpoint_entries(config) if e.quantized]


def test_int8_keeps_the_release_numbers_exactly(converted):
    src, int8, _ = converted
    config = read_config(src)
    assert read_config(int8) == config.replace(weight_bits=8, group_size=0)
    assert json.loads((int8 / "config.json").read_text())["weight_bits"] == 8   # recorded
    release = read_checkpoint(src, config, progress=False)
    ours = read_checkpoint(int8, config, progress=False)
    for name, leaf in release.items():
        parts = (leaf.weight, leaf.scales) if hasattr(leaf, "scales") else (leaf,)
        again = (ours[name].weight, ours[name].scales) if hasattr(leaf, "scales") else (ours[name],)
        for a, b in zip(parts, again):
            assert a.dtype == b.dtype and np.array_equal(a, b), name


def test_int8_streamed_onto_a_mesh_holds_the_release_params(converted):
    """The streaming loader through SafetensorsReader places exactly the release's arrays: the
    same program over the same params, so the same logits as the release's load."""
    src, int8, _ = converted
    config = read_config(int8)
    assert isinstance(as_reader(int8, config), SafetensorsReader)
    mesh = rules.make_mesh((1, 1))
    shardings = rules.params_shardings(abstract_params(config), mesh, config)
    want = jax.tree.leaves(load_params(src, read_config(src), shardings, progress=False))
    got = jax.tree.leaves(load_params(int8, config, shardings, progress=False))
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))


def test_int4_files_record_their_group_and_are_within_half_a_step(converted):
    src, _, int4 = converted
    config = read_config(int4)
    assert (config.weight_bits, config.group_size) == (4, DEFAULT_GROUP_SIZE)
    release = read_checkpoint(src, read_config(src), progress=False)
    flat = read_checkpoint(int4, config, progress=False)
    for entry in _quantised(config):
        header = read_st_header(int4 / "ckpt-0" / f"{entry.filename}.safetensors")
        # the demo's and fixtures' F=176: 32 asked, 22 taken (the largest divisor not above)
        assert header.metadata["group_size"] == str(entry.group_size)
        assert entry.group_size == (22 if entry.shape[-2] == 176 else 32)
        leaf = flat[entry.name]
        assert leaf.fmt is INT4 and leaf.weight.dtype == np.uint8
        # each int4 value is the int8 weight rounded to its group's step: within half a step,
        # plus the clipped maximum's bf16 scale rounding (7 x 2^-8 of a step)
        step = np.repeat(leaf.scales.astype(np.float64), entry.group_size, axis=-2)
        err = np.abs(dequantize(leaf, np.float64) - dequantize(release[entry.name], np.float64))
        assert (err <= step * (0.5 + 7 * 2.0 ** -8)).all(), entry.name
        assert np.abs(unpack_int4(leaf.weight)).max() <= 7


def test_int4_model_matches_the_float64_oracle_of_its_weights(converted):
    """int4 on the random fixture moves the logits far from the int8 truth (BENCHMARKS.md: the
    random 12-layer model amplifies the weights' error), so the load is checked against the exact
    evaluation of the int4 weights themselves, with the parity tests' bfloat16 bound."""
    src, _, int4 = converted
    config = read_config(int4)
    prompt = np.load(src / "expected.npz")["prompt_1"].tolist()
    logits, routing = oracle_forward(weights64(read_checkpoint(int4, config, progress=False)),
                                     config, np.asarray(prompt)[None])
    ours = grok.load(int4, mesh=(1, 1), progress=False).logits([prompt])[0]   # streamed
    assert_rows_within(rel_rows(ours, logits[0]), model_rel_error(config.num_layers),
                       near_tie_rows(routing.margin[:, 0]), "int4 load vs float64 oracle")


def test_verify_passes_and_names_a_damaged_file(converted, tmp_path, capsys):
    _, _, int4 = converted
    assert checkpoint_main(["verify", str(int4), "-q"]) == 0
    copy = tmp_path / "copy"
    shutil.copytree(int4, copy)
    victim = copy / "ckpt-0" / "tensor00005_000.safetensors"
    victim.write_bytes(victim.read_bytes()[:-3])
    capsys.readouterr()
    assert checkpoint_main(["verify", str(copy), "-q"]) == 1
    out = capsys.readouterr().out
    assert "FAIL tensor00005_000.safetensors" in out and "1 with problems" in out


def test_the_manifest_lists_every_file_and_verify_checks_it(converted, tmp_path, capsys):
    """DST/SHA256SUMS: each file of the conversion with its SHA-256 (hashed here independently),
    and `verify --sha256` passes on it, then names the file a copy damaged."""
    _, _, int4 = converted
    lines = (int4 / "SHA256SUMS").read_text().splitlines()
    listed = dict(reversed(line.split("  ", 1)) for line in lines)
    files = {p.relative_to(int4).as_posix() for p in int4.rglob("*") if p.is_file()}
    assert set(listed) == files - {"SHA256SUMS"} and "ckpt-0/tensor00000_000.safetensors" in listed
    for name, digest in listed.items():
        assert hashlib.sha256((int4 / name).read_bytes()).hexdigest() == digest, name
    assert checkpoint_main(["verify", str(int4), "-q", "--sha256", str(int4 / "SHA256SUMS")]) == 0
    capsys.readouterr()
    assert checkpoint_main(["verify", str(int4), "-q"]) == 0   # without it: said how to use it
    assert f"--sha256 {int4 / 'SHA256SUMS'} checks every byte" in capsys.readouterr().out
    copy = tmp_path / "copy"
    shutil.copytree(int4, copy)
    victim = copy / "config.json"
    victim.write_text(victim.read_text().replace('"weight_bits": 4', '"weight_bits":4'))
    capsys.readouterr()
    assert checkpoint_main(["verify", str(copy), "-q", "--sha256", str(copy / "SHA256SUMS")]) == 1
    assert "config.json" in capsys.readouterr().out


def test_the_safetensors_package_reads_our_files(converted):
    safetensors = pytest.importorskip("safetensors")
    _, _, int4 = converted
    entry = _quantised(read_config(int4))[0]
    path = int4 / "ckpt-0" / f"{entry.filename}.safetensors"
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == {f"{entry.name}/weight", f"{entry.name}/scales"}
        assert f.metadata()["weight_format"] == "int4"
        weight = f.get_tensor(f"{entry.name}/weight")
    ours = read_checkpoint(int4, read_config(int4), progress=False)[entry.name]
    np.testing.assert_array_equal(weight, ours.weight)


def test_we_read_the_safetensors_packages_files(converted, tmp_path):
    """A leaf written by the safetensors package (its own header layout and key order) reads
    back through our parser as the same arrays."""
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    _, _, int4 = converted
    config = read_config(int4)
    entry = _quantised(config)[1]
    ours = read_checkpoint(int4, config, progress=False)[entry.name]
    path = tmp_path / f"{entry.filename}.safetensors"
    metadata = {"format": "grok", "leaf": entry.name, "weight_format": "int4",
                "group_size": str(entry.group_size)}
    safetensors_numpy.save_file({f"{entry.name}/weight": ours.weight,
                                 f"{entry.name}/scales": ours.scales}, str(path), metadata)
    again = read_leaf(path, entry)
    assert again.fmt is INT4
    for a, b in ((again.weight, ours.weight), (again.scales, ours.scales)):
        assert a.dtype == b.dtype and np.array_equal(a, b)


def test_a_conversion_is_byte_for_byte_reproducible(converted, tmp_path):
    """Two conversions of the same source give the same bytes in every file (a SHA-256 manifest
    of one checks the other)."""
    src, _, int4 = converted
    again = tmp_path / "again"
    convert(src, again, 4, progress=False)
    files = sorted(p.relative_to(int4) for p in int4.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (int4 / name).read_bytes() == (again / name).read_bytes(), name


def test_run_py_on_an_int4_demo(tmp_path, capsys):
    dst = tmp_path / "demo4"
    assert checkpoint_main(["convert", str(DEMO_DIR), str(dst), "--bits", "4"]) == 0
    assert (dst / "tokenizer.model").is_file() and (dst / "sampling.json").is_file()
    capsys.readouterr()
    assert cli_main(["def f(x):", "--checkpoint", str(dst), "--max-new-tokens", "1",
                     "--temperature", "0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(result["tokens"]) == 1 and result["prompt"] == "def f(x):"


def _assert_same_leaves(a: Path, b: Path) -> None:
    """The checkpoints at `a` and `b` have the same config and bit-identical leaves."""
    config = read_config(a)
    assert read_config(b) == config
    want = read_checkpoint(a, config, progress=False)
    got = read_checkpoint(b, config, progress=False)
    assert set(got) == set(want)
    for name, leaf in want.items():
        parts = (leaf.weight, leaf.scales) if hasattr(leaf, "scales") else (leaf,)
        again = (got[name].weight, got[name].scales) if hasattr(leaf, "scales") else (got[name],)
        for x, y in zip(parts, again, strict=True):
            assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_converting_an_int8_safetensors_checkpoint(converted, tmp_path):
    """int8 safetensors as the source: -> int8 keeps its numbers, -> int4 gives the leaves
    converting the release directly gives (the same int8 values requantised alike)."""
    _, int8, int4 = converted
    convert(int8, tmp_path / "int8", 8, progress=False)
    _assert_same_leaves(int8, tmp_path / "int8")
    convert(int8, tmp_path / "int4", 4, progress=False)
    _assert_same_leaves(int4, tmp_path / "int4")


def test_int4_is_copied_to_its_own_groups_and_otherwise_refused(converted, tmp_path, capsys):
    """An int4 source converts only to int4 with the same groups (a copy; its own group size is
    the default); int8 or other groups would round already-rounded weights: one line, no DST."""
    src, _, int4 = converted
    # one leaf's values halved (to [-4, 3]) and scales doubled: requantising would move them to
    # [-7, 7] (convert's own int4 already has a 7 in each group, so requantises to itself)
    odd = tmp_path / "odd"
    shutil.copytree(int4, odd)
    entry = _quantised(read_config(odd))[0]
    file = odd / "ckpt-0" / f"{entry.filename}.safetensors"
    leaf = read_leaf(file, entry)
    write_leaf(file, entry, QuantizedWeight(pack_int4(unpack_int4(leaf.weight) // 2),
                                            leaf.scales * 2, INT4))
    convert(odd, tmp_path / "same", 4, DEFAULT_GROUP_SIZE, progress=False)
    _assert_same_leaves(odd, tmp_path / "same")
    # a group size other than the default, kept without --group-size
    g16 = tmp_path / "g16"
    convert(src, g16, 4, 16, progress=False)
    assert checkpoint_main(["convert", str(g16), str(tmp_path / "copy"), "--bits", "4"]) == 0
    _assert_same_leaves(g16, tmp_path / "copy")
    assert read_config(tmp_path / "copy").group_size == 16
    kept = sorted(p.name for p in tmp_path.iterdir())
    for args, asked in ((["--bits", "8"], "int8"),
                        (["--bits", "4", "--group-size", "32"], "int4 group size 32")):
        capsys.readouterr()
        assert checkpoint_main(["convert", str(g16), str(tmp_path / "no"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and f"{g16}: its weights are already int4 (group size 16)" in err
        assert f"to {asked} would compound the rounding error" in err
        assert "convert from the release (or an int8) checkpoint instead" in err
        assert sorted(p.name for p in tmp_path.iterdir()) == kept   # no DST, no partial
    with pytest.raises(ConfigError, match="already int4"):
        convert(int4, tmp_path / "no", 4, 16, progress=False)
    assert not (tmp_path / "no").exists()


# --- bad input ------------------------------------------------------------------------------------

def _rewrite(path: Path, edit) -> None:
    """Rewrite a safetensors file's JSON header with `edit(header)`, keeping the data."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    text = json.dumps(header).encode()
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


@pytest.fixture
def damaged(converted, tmp_path):
    """A copy of the int4 checkpoint and its first quantised file (to damage)."""
    _, _, int4 = converted
    copy = tmp_path / "int4"
    shutil.copytree(int4, copy)
    entry = _quantised(read_config(copy))[0]
    return copy, copy / "ckpt-0" / f"{entry.filename}.safetensors", entry


def _shift(field, by):
    def edit(header):
        name = next(k for k in header if k.endswith(field))
        header[name]["data_offsets"] = [o + by for o in header[name]["data_offsets"]]
    return edit


def _set(field, key, value):
    def edit(header):
        header[next(k for k in header if k.endswith(field))][key] = value
    return edit


@pytest.mark.parametrize("damage,words", [
    (lambda p: p.write_bytes(p.read_bytes()[:5]), "no header length"),
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "after the last tensor|data_offsets"),
    (lambda p: p.write_bytes((1 << 40).to_bytes(8, "little") + p.read_bytes()[8:]),
     "header length"),
    (lambda p: p.write_bytes(p.read_bytes()[:8] + b"x" + p.read_bytes()[9:]), "not JSON"),
    (lambda p: _rewrite(p, _shift("/scales", 2)), "data_offsets"),
    (lambda p: _rewrite(p, _shift("/weight", 1 << 30)), "data_offsets"),
    (lambda p: _rewrite(p, _set("/weight", "dtype", "F64")), r"dtype: 'F64' is not one of"),
    (lambda p: _rewrite(p, _set("/weight", "dtype", "I8")), "weight dtype int8, expected uint8"),
    (lambda p: _rewrite(p, _set("/scales", "shape", [1, 2])), "data_offsets"),
    (lambda p: _rewrite(p, lambda h: h["__metadata__"].update(group_size="16")),
     "__metadata__.group_size"),
    (lambda p: _rewrite(p, lambda h: h["__metadata__"].update(leaf="transformer/other")),
     "__metadata__.leaf is 'transformer/other'"),
])
def test_a_damaged_file_is_one_line_naming_file_and_field(damaged, damage, words):
    copy, victim, entry = damaged
    damage(victim)
    config = read_config(copy)
    for read in (lambda: read_checkpoint(copy, config, progress=False),
                 lambda: SafetensorsReader(copy, config).locate(entry)):
        with pytest.raises(CheckpointError, match=words) as err:
            read()
        assert str(victim) in str(err.value) and "\n" not in str(err.value)


def test_a_config_whose_format_does_not_match_the_tensors(damaged, converted):
    copy, victim, _ = damaged
    text = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**text, "weight_bits": 8, "group_size": 0}))
    with pytest.raises(CheckpointError, match=r"__metadata__\.weight_format is 'int4'.*"
                       "weight_bits=8"):
        read_checkpoint(copy, read_config(copy), progress=False)
    src = converted[0]   # an int4 config over release (int8) files
    with pytest.raises(CheckpointError, match="release-format files hold int8"):
        read_checkpoint(src, read_config(src).replace(weight_bits=4, group_size=64),
                        progress=False)


def test_convert_never_leaves_a_half_written_destination(converted, tmp_path, capsys):
    src = converted[0]
    # a group size that does not divide K, when forced: one line naming file and field
    with pytest.raises(ConfigError, match=r"--group-size 64 does not divide the 176 input rows "
                       r"of tensor\d+_000"):
        convert(src, tmp_path / "a", 4, 64, exact=True, progress=False)
    # a source file damaged late in the run
    bad_src = tmp_path / "src"
    shutil.copytree(src, bad_src)
    last = sorted((bad_src / "ckpt-0").iterdir())[-1]
    last.write_bytes(last.read_bytes()[:-7])
    assert checkpoint_main(["convert", str(bad_src), str(tmp_path / "b"), "--bits", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(last) in err and "\n" not in err
    # an existing destination is left as it was
    existing = tmp_path / "c"
    existing.mkdir()
    (existing / "keep").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert(src, existing, 8, progress=False)
    assert [p.name for p in existing.iterdir()] == ["keep"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "src"]   # no a, b or partials


def test_plan_reads_the_format_from_a_converted_checkpoints_config(converted, capsys):
    from grok.parallel import memory
    _, int8, int4 = converted
    weights = {bits: memory.estimate_memory(read_config(path), (1, 1)).weights
               for bits, path in ((8, int8), (4, int4))}
    config8 = read_config(int8)
    quantised = sum(int(np.prod(e.shape)) for e in _quantised(config8))
    # int4 saves half a byte per quantised weight, less its scales (a bf16 per group of >= 22)
    assert weights[8] - weights[4] > quantised * (0.5 - 2 / 22)
    assert checkpoint_main(["plan", "--devices", "1", "--memory", "80",
                            "--config", str(int4 / "config.json")]) == 0
    assert "fits on mesh(es): 1,1" in capsys.readouterr().out


# --- fuzzing: our header parser against the safetensors package -------------------------------

_ODD_VALUES = [-1, 0, 1, 7, 2 ** 31, 2 ** 64, 10 ** 30, 1.5, "8", None, [], [0], [1, 2, 3],
               {"a": 1}, "I8", "U8", "BF16", "F64", "int4", ""]


def _fuzzed_header(data: bytes, rng: random.Random) -> bytes:
    """`data` with one to three fields of its JSON header replaced by odd values (an offset, a
    shape, a dtype, a metadata entry, a whole tensor entry) and the length prefix recomputed, or
    kept stale one time in eight."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])

    def odd():   # a copy: an odd list put in twice must not end up inside itself
        return copy.deepcopy(rng.choice(_ODD_VALUES))

    for _ in range(rng.randint(1, 3)):
        key = rng.choice(sorted(header))
        value = header[key]
        if isinstance(value, dict) and value and rng.random() < 0.8:
            field = rng.choice(sorted(value))
            if isinstance(value[field], list) and value[field] and rng.random() < 0.5:
                value[field][rng.randrange(len(value[field]))] = odd()
            else:
                value[field] = odd()
        else:
            header[key] = odd()
    text = json.dumps(header).encode()
    length = n if rng.random() < 0.125 else len(text)
    return length.to_bytes(8, "little") + text + data[8 + n:]


@pytest.fixture(scope="module")
def fuzz_seed(converted):
    """One quantised leaf's file of the int4 checkpoint (bytes) and its leaf-table entry."""
    _, _, int4 = converted
    entry = _quantised(read_config(int4))[1]
    return (int4 / "ckpt-0" / f"{entry.filename}.safetensors").read_bytes(), entry


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2 ** 32 - 1))
def test_fuzzed_files_are_refused_in_one_line_or_read_as_the_package_reads_them(
        fuzz_seed, tmp_path, seed):
    """Random damage to a real converted file, to its bytes (grok.tools.fuzz_checkpoint.mutate)
    or to its header's fields: our reader either refuses it with a one-line CheckpointError
    naming the file, or reads the arrays that the safetensors package reads from it; and the
    header parser passes the campaign's check (check_safetensors) on it."""
    safetensors = pytest.importorskip("safetensors")
    data, entry = fuzz_seed
    rng = random.Random(seed)
    damaged = mutate(data, rng) if rng.random() < 0.5 else _fuzzed_header(data, rng)
    path = tmp_path / f"fuzz{seed}.safetensors"
    path.write_bytes(damaged)
    check_safetensors(damaged)   # the atheris campaign's check of the header parser: no Finding
    try:
        ours = read_leaf(path, entry)
    except CheckpointError as err:
        assert "\n" not in str(err) and str(path) in str(err) and len(str(err)) < 1000, err
        return
    names = {f"{entry.name}/weight": ours.weight, f"{entry.name}/scales": ours.scales}
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert set(f.keys()) == set(names)
        for name, array in names.items():
            theirs = f.get_tensor(name)
            assert theirs.dtype == array.dtype and np.array_equal(theirs, array), name


# --- streamed onto 8 virtual devices (a subprocess: the device count is fixed at jax's import) --

STREAM_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import numpy as np, jax
    from grok.checkpoint import read_config
    from grok.checkpoint.loader import load_params
    from grok.leaves import abstract_params
    from grok.parallel import rules
    path = sys.argv[1]
    config = read_config(path)
    abstract = abstract_params(config)
    one = jax.tree.leaves(load_params(path, config, rules.params_shardings(
        abstract, rules.make_mesh((1, 1), jax.devices()[:1]), config), progress=False))
    out = {}
    for shape, layout in (((1, 8), "tensor"), ((2, 4), "tensor"), ((1, 4), "expert")):
        mesh = rules.make_mesh(shape, jax.devices()[: shape[0] * shape[1]])
        got = jax.tree.leaves(load_params(path, config, rules.params_shardings(
            abstract, mesh, config, layout), progress=False))
        split = sum(len({str(s.index) for s in a.addressable_shards}) > 1 for a in got)
        same = all(a.dtype == b.dtype and a.shape == b.shape
                   and np.asarray(a).tobytes() == np.asarray(b).tobytes() for a, b in zip(got, one))
        out[f"{shape} {layout}"] = [len(got) == len(one) and same, split]
    json.dump(out, open(sys.argv[2], "w"))
""")


def test_int4_streamed_onto_meshes_is_the_one_device_load_bit_for_bit(converted, tmp_path):
    """The streaming loader reads each device's slice of the packed int4 rows and of their
    scales straight from the files: on a (1, 8) and (2, 4) tensor mesh and a (1, 4) expert
    mesh the arrays are the one-device load's, bit for bit, and most of them are split."""
    _, _, int4 = converted
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, str(int4), str(out)],
                          cwd=Path(__file__).resolve().parents[1], env=cpu_devices_env(8),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for mesh, (same, split) in json.loads(out.read_text()).items():
        assert same and split >= 8, (mesh, same, split)
