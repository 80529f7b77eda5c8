"""Grok-2 from the release as published: tiny checkpoints in its exact layout
(tests/grok2_release.py) loaded by `grok.load` and run through the library's JAX model, against
the float64 reference of SGLang's semantics (tests/oracle_grok2.py): per-position logits,
routing, greedy continuations (decode steps and chunked prefill past the attention temperature's
length), meshes; and the release's config.json read, or refused in one line."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import grok
from grok.errors import CheckpointError, ConfigError
from grok.families import grok2

from conftest import cpu_devices_env
from grok2_release import CONFIG, write_tiny_grok2
from oracle_grok2 import forward, greedy
from precision import BF16_EPS, greedy_tie_gap, router_tie, top2_gaps, trusted_steps

# Caps and a temperature length that bite on the tiny model's activations, so that dropping or
# changing any one feature moves the logits far more than bfloat16 rounding can (checked below).
SHARP = dict(attn_logit_softcapping=1.0, router_logit_softcapping=0.5,
             final_logit_softcapping=3.0, attn_temperature_len=2)
# bfloat16 roundings on a Grok-2 layer's path to the logits: Grok-1's 10 (precision.py) plus the
# dense MLP's hidden layer and its output's rounding by the norm after the sum.
ROUNDINGS_PER_LAYER = 12
VARIANTS = [("temperature", False), ("temperature_before_cap", True), ("attn_cap", False),
            ("router_cap", False), ("renormalize", True), ("final_cap", False),
            ("final_cap_before_scale", True), ("dense_mlp", False), ("rope_interleaved", True),
            ("embedding_scale", False)]


def rel_error_bound(num_layers: int) -> float:
    """precision.model_rel_error with Grok-2's roundings per layer: 6 x the RMS relative error
    of N = 12 L + 1 independent bfloat16 roundings (u / sqrt(3) each) in quadrature. The final
    tanh cap has slope <= 1: it shrinks an error, never grows it."""
    return 6 * BF16_EPS * math.sqrt((ROUNDINGS_PER_LAYER * num_layers + 1) / 3)


def rel_rows(got, want) -> np.ndarray:
    want = np.asarray(want, np.float64)
    return np.linalg.norm(np.asarray(got, np.float64) - want, axis=-1) / np.linalg.norm(want,
                                                                                        axis=-1)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    path = tmp_path_factory.mktemp("grok2")
    info = write_tiny_grok2(path, ranks=2, **SHARP)
    return path, info


@pytest.fixture(scope="module")
def model(release):
    return grok.load(release[0], progress=False)


@pytest.fixture(scope="module")
def mild(tmp_path_factory):
    """The release's own caps (tests/grok2_release.py), with the temperature from position 3:
    top-2 gaps wide enough to compare greedy tokens (weights whose first 6 greedy steps from
    the prompt below have gaps above greedy_tie_gap, so the comparison is not vacuous)."""
    path = tmp_path_factory.mktemp("grok2-mild")
    info = write_tiny_grok2(path, ranks=2, seed=7, attn_temperature_len=3)
    return grok.load(path, progress=False), info


def tokens(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(3, 280, n)]


def test_load_finds_grok2_and_reads_every_constant_from_config_json(model, release):
    c, cfg = model.config, release[1]["config"]
    assert model.family.name == "grok-2" and model.tokenizer.eos_id == c.eos_token
    assert (c.emb_size, c.num_layers, c.key_size, c.num_q_heads, c.num_kv_heads) == (
        cfg["hidden_size"], cfg["num_hidden_layers"], cfg["head_dim"],
        cfg["num_attention_heads"], cfg["num_key_value_heads"])
    assert (c.moe_ffn_size, c.dense_ffn_size, c.attn_logit_cap, c.router_logit_cap,
            c.final_logit_cap, c.attn_temperature_len, c.rope_base, c.sequence_len) == (
        cfg["moe_intermediate_size"], cfg["intermediate_size"], 1.0, 0.5, 3.0, 2,
        cfg["rope_theta"], cfg["max_position_embeddings"])
    assert not c.tied_embedding and c.exact_gelu and c.weight_format == "bf16"
    assert c.attn_output_multiplier == pytest.approx(cfg["head_dim"] ** -0.5, rel=1e-15)


def test_logits_match_the_sglang_reference_and_no_feature_can_be_dropped(model, release):
    """Every position's logits within the bfloat16 model's bound of the float64 reference; each
    variant (a feature dropped, or the order another server uses) is more than twice that bound
    from the reference, so a model implementing it could not pass. 40 positions: most are past
    attn_temperature_len=2, so the temperature applies."""
    _, info = release
    seq = tokens(40)
    want, routes = forward(info["weights"], info["config"], seq)
    got = model.logits([seq])[0]
    bound = rel_error_bound(model.config.num_layers)
    errors = rel_rows(got, want)
    assert errors.max() <= bound, (errors.max(), bound)
    for name, value in VARIANTS:
        other, _ = forward(info["weights"], info["config"], seq, **{name: value})
        assert rel_rows(other, want).max() > 2 * bound, name


def test_routing_is_the_references_top2_without_renormalisation(model, release):
    _, info = release
    seq = tokens(24, seed=1)
    _, routes = forward(info["weights"], info["config"], seq)
    got = model.routing(seq)
    probs = np.sort(routes["probs"], axis=-1)[..., ::-1]                       # [L, T, E]
    k = model.config.num_selected_experts
    margin = probs[..., k - 1] - probs[..., k]
    for layer in range(model.config.num_layers):
        clear = margin[layer] >= router_tie(layer)
        assert clear.mean() >= 0.5   # (not vacuous: most rows are compared)
        np.testing.assert_array_equal(np.sort(got.experts[layer][clear], axis=-1),
                                      np.sort(routes["experts"][layer][clear], axis=-1))
        # the weights are the probabilities themselves: they sum to less than 1
        assert (got.weights[layer].sum(-1) < 1 - 1e-3).all()
        np.testing.assert_allclose(got.weights[layer][clear],
                                   np.take_along_axis(routes["probs"][layer],
                                                      got.experts[layer], -1)[clear],
                                   rtol=0, atol=8 * BF16_EPS * (layer + 1))


@pytest.mark.parametrize("prefill_tokens", [4096, 8])
def test_greedy_decoding_matches_the_reference(mild, prefill_tokens):
    """Greedy tokens through the engine (one prefill or 8-token chunks, then decode steps at
    positions past attn_temperature_len) equal the reference's, up to a step whose top-2 gap
    two bfloat16-close evaluations could flip (precision.greedy_tie_gap), or eos."""
    model, info = mild
    prompt, n = tokens(19, seed=2), 8
    want = greedy(info["weights"], info["config"], prompt, n)
    model.new_engine(prefill_tokens=prefill_tokens)
    try:
        got = model.generate([prompt], max_new_tokens=n)[0]
    finally:
        model.new_engine()
    ref, _ = forward(info["weights"], info["config"], prompt + want)
    rows = ref[len(prompt) - 1:-1]
    gap = greedy_tie_gap(float(np.linalg.norm(rows, axis=-1).max()), rows.shape[-1],
                         model.config.num_layers)
    steps = min(trusted_steps(top2_gaps(rows), min_gap=gap), len(got))
    assert steps >= 3, steps
    assert got[:steps] == want[:steps]


def test_expert_files_of_any_rank_count_give_the_same_model(tmp_path, release):
    """The same weights written over 8 ranks (and 1) load to exactly the 2-rank load's leaves."""
    from grok.checkpoint.grok2_release import open_release
    path2, info = release
    base = dict(open_release(path2, grok2.read_config(path2)).leaves())
    for ranks in (1, 8):
        path = tmp_path / f"r{ranks}"
        write_tiny_grok2(path, ranks=ranks, **SHARP)
        other = open_release(path, grok2.read_config(path))
        assert other.ranks == ranks
        for entry, leaf in other.leaves():
            assert leaf.dtype == base[entry].dtype and np.array_equal(leaf, base[entry]), entry


MESH_SCRIPT = r"""
import json, sys
import jax
import numpy as np
import grok
from grok.leaves import checkpoint_entries
path, out = sys.argv[1], sys.argv[2]
seq = json.loads(sys.argv[3])
one = grok.load(path, progress=False)
flat_one = [np.asarray(x) for x in jax.tree.leaves(one.runner.params)]
result = {"one": one.logits([seq])[0].tolist()}
devices = np.array(jax.devices())
for (data, model), layout in (((1, 2), "tensor"), ((1, 4), "tensor"), ((2, 4), "tensor"),
                              ((1, 4), "expert")):
    mesh = jax.sharding.Mesh(devices[:data * model].reshape(data, model), ("data", "model"))
    m = grok.load(path, mesh=mesh, layout=layout, progress=False)
    leaves = jax.tree.leaves(m.runner.params)
    same = all(np.asarray(a).tobytes() == b.tobytes() for a, b in zip(leaves, flat_one))
    split = sum(len({str(s.index) for s in a.addressable_shards}) > 1 for a in leaves)
    result[f"{data},{model} {layout}"] = [same, split, m.logits([seq])[0].tolist()]
json.dump(result, open(out, "w"))
"""


def test_meshes_load_the_same_weights_and_match_the_reference(release, tmp_path):
    """On 8 virtual CPU devices, tensor meshes (1,2), (1,4), (2,4) and the expert layout on
    (1,4): each device's slices of every leaf are the one-device load's, bit for bit (most
    leaves split), and the sharded model's logits are within the bound of the reference."""
    path, info = release
    seq = tokens(12, seed=3)
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-c", MESH_SCRIPT, str(path), str(out),
                           json.dumps(seq)], cwd=Path(__file__).resolve().parents[1],
                          env=cpu_devices_env(8), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    want, _ = forward(info["weights"], info["config"], seq)
    bound = rel_error_bound(CONFIG["num_hidden_layers"])
    assert rel_rows(result.pop("one"), want).max() <= bound
    for mesh, (same, split, logits) in result.items():
        assert same and split >= 4, (mesh, same, split)
        assert rel_rows(logits, want).max() <= bound, mesh


def test_exact_gelu_is_used(mild):
    """The experts and the dense MLP use erf GELU. At -3 the tanh form is 10% off erf's
    (-0.00364 vs -0.00405), far beyond the bfloat16 rounding of the hidden layer (2^-8
    relative), though in the logits of a random model the forms differ by only ~1e-3: so one
    MoE evaluation and the model's dense MLP are checked with pre-activations of exactly -3."""
    import jax.numpy as jnp

    from grok.kernels.plan import resolve_plan
    from grok.model.moe import moe
    d, f = 16, 8
    x = jnp.ones((2, d), jnp.bfloat16)
    w1 = jnp.full((1, d, f), -3.0 / d, jnp.float32)       # x w1 = -3 exactly
    wv = jnp.full((1, d, f), 1.0 / d, jnp.float32)        # x wv = 1 exactly
    w2 = jnp.eye(f, d, dtype=jnp.float32)[None]           # the hidden layer, passed through
    gates, chosen = jnp.ones((2, 1)), jnp.zeros((2, 1), jnp.int32)
    erf = 0.5 * -3 * (1 + math.erf(-3 / math.sqrt(2)))
    tanh = 0.5 * -3 * (1 + math.tanh(math.sqrt(2 / math.pi) * (-3 - 0.044715 * 27)))
    assert abs(tanh - erf) > 0.05 * abs(erf)
    for impl in ("grouped", "dense", "gather"):
        out = np.asarray(moe(x, gates, chosen, w1, wv, w2, resolve_plan(impl), exact_gelu=True))
        assert np.abs(out[:, :f] - erf).max() <= 2 * BF16_EPS * abs(erf), impl
    # the model's own flag reaches the dense MLP too: the loaded Grok-2 config asks for erf
    model, _ = mild
    assert model.config.exact_gelu


@pytest.mark.parametrize("change,words", [
    ({"rope_type": "yarn"}, "rope_type='yarn' is not supported"),
    ({"sliding_window_size": 4096}, "sliding_window_size=4096"),
    ({"architectures": ["LlamaForCausalLM"]}, "does not name Grok1ForCausalLM"),
    ({"residual_moe": "yes"}, "residual_moe must be true or false"),
    ({"moe_intermediate_size": 0}, "moe_intermediate_size must be positive"),
    ({"head_dim": -1}, "head_dim must be a positive integer"),
    ({"attn_temperature_len": 1}, "attn_temperature_len"),
    ({"router_logit_softcapping": float("nan")}, "router_logit_cap"),
    ({"num_attention_heads": 3}, "not a multiple of num_kv_heads"),
])
def test_bad_release_configs_are_refused_in_one_line(tmp_path, change, words):
    (tmp_path / "config.json").write_text(json.dumps({**CONFIG, **change}))
    with pytest.raises(ConfigError) as err:
        grok2.read_config(tmp_path)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert "config.json" in str(err.value)


def test_a_missing_key_or_file_and_mismatched_files_are_one_line(tmp_path, release):
    cfg = dict(CONFIG)
    del cfg["rope_theta"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="key rope_theta missing"):
        grok2.read_config(tmp_path)
    # the release's files with a config of another width: refused naming a file and tensor
    path, _ = release
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps({**CONFIG, **SHARP, "hidden_size": 32}))
    with pytest.raises(CheckpointError) as err:
        grok.load(bad, progress=False)
    assert "\n" not in str(err.value) and "safetensors" in str(err.value)
    # a missing rank file
    gap = tmp_path / "gap"
    gap.mkdir()
    for f in path.iterdir():
        if "TP-000" not in f.name:
            (gap / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match="ranks 001; expected TP-000 to TP-000"):
        grok.load(gap, progress=False)


@pytest.mark.parametrize("bits", [8, 4])
def test_convert_from_the_release(release, tmp_path, bits):
    """`python -m grok.checkpoint convert grok-2/ DST --bits {8,4}`: safetensors of int8
    (per-output-channel scales) or int4 (groups of up to 32 rows) weights, the tokenizer copied,
    SHA256SUMS, and a config.json that says grok-2: `grok.load(DST)` is the Grok-2 model again
    (its tokenizer and chat template), each weight within half a step of its stored (bfloat16)
    scale of the release's value: values are rounded against the stored scale; a scale rounded
    down (by <= 2^-8) can push the largest value past the clip, by <= 2 x 2^-8 of a step."""
    from grok.checkpoint.grok2_release import open_release
    from grok.quant import dequantize
    path, _ = release
    dst = tmp_path / f"int{bits}"
    done = subprocess.run([sys.executable, "-m", "grok.checkpoint", "convert", str(path),
                           str(dst), "--bits", str(bits)], capture_output=True, text=True,
                          timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in dst.iterdir()} == {"ckpt-0", "config.json", "tokenizer.tok.json",
                                              "SHA256SUMS"}
    model = grok.load(dst, progress=False)
    assert model.family.name == "grok-2" and model.chat_template is not None
    assert model.config.weight_bits == bits and model.config.dense_ffn_size == 96
    release_leaves = dict(open_release(path, grok2.read_config(path)).leaves())
    converted = grok.checkpoint.read_checkpoint(dst, model.config, progress=False)
    for entry, leaf in release_leaves.items():
        got = converted[entry.name]
        if not entry.bf16:
            assert np.array_equal(np.asarray(got, np.float32), np.asarray(leaf, np.float32))
            continue
        step = np.repeat(np.asarray(got.scales, np.float64), entry.shape[-2] // got.scales.shape[-2],
                         axis=-2)
        err = np.abs(dequantize(got, np.float64) - np.asarray(leaf, np.float64))
        assert (err <= step * (0.5 + 2 * BF16_EPS) + 1e-12).all(), entry.name
    verify = subprocess.run([sys.executable, "-m", "grok.checkpoint", "verify", str(dst),
                             "--sha256", str(dst / "SHA256SUMS")], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]
    assert model.chat([{"role": "user", "content": "hi"}], max_new_tokens=3) is not None


def test_verify_reads_a_release_and_names_a_damaged_file(release, tmp_path):
    """`verify grok-2/`: every header and tensor shape checked (no data read); `--full` reads
    every value; a truncated file is one line naming it, exit status 1 or 2, no traceback."""
    path, _ = release
    run = lambda d, *a: subprocess.run([sys.executable, "-m", "grok.checkpoint", "verify", str(d),
                                        *a], capture_output=True, text=True, timeout=300,
                                       cwd=Path(__file__).resolve().parents[1])
    for flags in ((), ("--full",)):
        done = run(path, *flags)
        assert done.returncode == 0 and "21 files ok" in done.stdout, done.stdout + done.stderr
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in path.iterdir():
        target = bad / f.name
        if f.name.endswith("00006-TP-001.safetensors"):
            target.write_bytes(f.read_bytes()[:-10])
        else:
            target.symlink_to(f)
    done = run(bad)
    assert done.returncode in (1, 2) and "Traceback" not in done.stderr
    message = (done.stdout + done.stderr).strip()
    assert "00006-TP-001.safetensors" in message and len(message.splitlines()) == 1


def test_run_py_chat_keeps_the_history_and_a_base_model_refuses(mild, tmp_path):
    """`run.py --checkpoint grok-2/ --chat`: each stdin line is a user turn whose reply is
    printed on a line of its own; the second turn's prompt holds the first exchange (its reply
    is the Python API's reply to the whole history). The demo (a base model) refuses --chat in
    one line, exit 2, unless given --chat-template."""
    model, _ = mild
    path = str(tmp_path / "g2")
    write_tiny_grok2(path, ranks=2, seed=7, attn_temperature_len=3)
    root = Path(__file__).resolve().parents[1]
    run = lambda *args, stdin="": subprocess.run(
        [sys.executable, "run.py", *args], input=stdin, capture_output=True, text=True,
        timeout=300, cwd=root, env=cpu_devices_env(1))
    done = run("--checkpoint", path, "--chat", "--system", "Be brief.", "--max-new-tokens", "4",
               "--temperature", "0", stdin="hello\nand then?\n")
    assert done.returncode == 0, done.stderr[-2000:]
    replies = done.stdout.split("\n")[:2]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert replies[0] == model.chat(history, 4)
    history += [{"role": "assistant", "content": replies[0]},
                {"role": "user", "content": "and then?"}]
    assert replies[1] == model.chat(history, 4)
    base = run("--checkpoint", "demo", "--chat", "hi")
    assert base.returncode == 2 and "no chat template" in base.stderr
    assert len(base.stderr.strip().splitlines()) == 1
    template = tmp_path / "chat.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    ok = run("--checkpoint", "demo", "--chat", "def f(", "--chat-template", str(template),
             "--max-new-tokens", "3")
    assert ok.returncode == 0 and ok.stdout.strip(), ok.stderr[-2000:]


RELEASE_CONFIG = {   # xai-org/grok-2's config.json as published (shared/grok2-release.md)
    **CONFIG, "vocab_size": 131072, "hidden_size": 8192, "num_hidden_layers": 64,
    "head_dim": 128, "num_attention_heads": 64, "num_key_value_heads": 8,
    "intermediate_size": 32768, "moe_intermediate_size": 16384, "num_local_experts": 8,
    "num_experts_per_tok": 2, "rms_norm_eps": 1e-05,
    "embedding_multiplier_scale": 90.50966799187809, "output_multiplier_scale": 0.5,
    "attn_logit_softcapping": 30.0, "router_logit_softcapping": 30.0,
    "final_logit_softcapping": 50, "attn_temperature_len": 1024, "rope_theta": 208533496,
    "original_max_position_embeddings": 8192, "scaling_factor": 16.0, "beta_fast": 8,
    "beta_slow": 1, "max_position_embeddings": 131072}


@pytest.mark.parametrize("devices,memory,bits,fits", [
    (2, 141, "4", True), (4, 80, "4", True), (2, 141, None, False), (8, 80, None, True),
    (4, 80, "8", False), (8, 80, "8", True)])
def test_plan_reads_the_release_config(tmp_path, devices, memory, bits, fits):
    """`plan --config grok-2/config.json`: Grok-2 (269B parameters, bf16 as released) with a
    cache of 8 x 8192 tokens: int4 fits 2 x 141 GB and 4 x 80 GB; bf16 needs 8 x 80 GB, and on
    2 x 141 GB the report says int4 would fit."""
    from grok.families import config_file
    from grok.leaves import checkpoint_entries
    file = tmp_path / "config.json"
    file.write_text(json.dumps(RELEASE_CONFIG))
    params = sum(math.prod(e.shape) for e in checkpoint_entries(config_file(file)))
    assert 269e9 < params < 270e9   # the release's "about 269B"
    args = ["--config", str(file), "--devices", str(devices), "--memory", str(memory),
            "--batch", "8", "--length", "8192"] + (["--bits", bits] if bits else [])
    done = subprocess.run([sys.executable, "-m", "grok.checkpoint", "plan", *args],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == (0 if fits else 1), done.stdout + done.stderr
    if not fits and bits is None:
        assert "in int4 (python -m grok.checkpoint convert SRC DST --bits 4) it would fit" \
            in done.stdout


def test_lazy_leaves_read_only_what_a_slice_needs(release):
    """The mesh path's leaves (LazyLeaf): any slice equals the same slice of the assembled leaf,
    and a device whose slice of an expert matrix is one rank's part (the model axis as the
    ranks) reads only that rank's file."""
    from grok.checkpoint.grok2_release import open_release
    path, _ = release
    rel = open_release(path, grok2.read_config(path))
    rng = np.random.default_rng(0)
    for entry in grok.leaves.checkpoint_entries(rel.config):
        whole, lazy = rel.leaf(entry), rel.lazy_leaf(entry)
        assert lazy.shape == whole.shape and lazy.dtype == whole.dtype
        assert np.array_equal(lazy[tuple(slice(None) for _ in whole.shape)], whole)
        cut = []
        for n in whole.shape:
            lo = int(rng.integers(0, n))
            cut.append(slice(lo, int(rng.integers(lo + 1, n + 1))))
        assert np.array_equal(lazy[tuple(cut)], whole[tuple(cut)]), entry.name

    class Recording:
        def __init__(self, view, rank, seen):
            self.view, self.rank, self.seen, self.shape = view, rank, seen, view.shape

        def __getitem__(self, index):
            self.seen.add(self.rank)
            return self.view[index]
    entry = next(e for e in grok.leaves.checkpoint_entries(rel.config)
                 if e.name.endswith("layer_0/moe/linear/w"))
    lazy, seen = rel.lazy_leaf(entry), set()
    lazy.views = [[Recording(v, r, seen) for r, v in enumerate(ranks)] for ranks in lazy.views]
    experts, d, f = entry.shape
    part = lazy[(slice(0, experts), slice(0, d), slice(f // 2, f))]   # the second rank's rows
    assert seen == {1} and np.array_equal(part, rel.leaf(entry)[:, :, f // 2:])
    rel.close()


def test_partial_downloads_and_sources_are_refused_in_one_line(release, tmp_path):
    """A release with no expert files (a partial download), and one without its tokenizer
    (whose ids a conversion would have to guess), are one-line errors; a release's parent
    directory lends convert nothing (a sampling.json there belongs to another model)."""
    path, _ = release
    common = tmp_path / "common"
    common.mkdir()
    for f in path.iterdir():
        if "TP-0" not in f.name:
            (common / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match="ranks none; expected TP-000") as err:
        grok.load(common, progress=False)
    assert "\n" not in str(err.value)
    bare = tmp_path / "models" / "bare"
    bare.mkdir(parents=True)
    for f in path.iterdir():
        if f.name != "tokenizer.tok.json":
            (bare / f.name).symlink_to(f)
    with pytest.raises(CheckpointError, match="tokenizer.tok.json: missing"):
        grok.convert(bare, tmp_path / "out", bits=8, progress=False)
    (bare / "tokenizer.tok.json").symlink_to(path / "tokenizer.tok.json")
    (bare.parent / "sampling.json").write_text('{"temperature": 0.9}')
    grok.convert(bare, tmp_path / "out", bits=8, progress=False)
    assert not (tmp_path / "out" / "sampling.json").exists()


def test_max_context_sizes_the_model_and_odd_widths_refuse_int4(release):
    """grok.load(max_context=N) runs the model with an N-token context (the memory check and
    the cache sized by it); past the model's own it is refused in one line. int4 packs pairs of
    rows: an odd dense MLP width is refused by the config, not by a traceback in convert."""
    path, _ = release
    model = grok.load(path, progress=False, max_context=32)
    assert model.config.sequence_len == 32 and model.engine.max_context <= 32
    with pytest.raises(grok.RequestError, match=r"max_context must be an integer in \[1, 128\]"):
        grok.load(path, progress=False, max_context=129)
    with pytest.raises(ConfigError, match="dense widths"):
        model.config.replace(dense_ffn_size=97, weight_bits=4, group_size=32)
