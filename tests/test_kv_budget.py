"""The KV pool's budget: the memory plan counts its pages, grok.load sizes it (asked, or from the
device's memory) and refuses one that cannot fit, and the flags reach the engine."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import grok
from grok import launch
from grok.config import GROK1
from grok.errors import GrokError, RequestError, ShardingError
from grok.parallel import memory
from grok.serving import engine as engine_mod

ROOT = Path(__file__).resolve().parents[1]
GROK2ISH = GROK1.replace(num_kv_heads=6)    # kv heads that 4 devices do not divide


def _pool_bytes(config, tokens, kv_heads_local):
    pages = -(-tokens // 16)
    return 2 * config.num_layers * pages * 16 * kv_heads_local * config.key_size * 2


def test_the_plan_counts_pages_of_the_engines_size():
    """The memory plan's pages are the ones an engine makes by default."""
    import inspect
    default = inspect.signature(engine_mod.Engine).parameters["page_size"].default
    assert memory.PAGE_SIZE == default == 16


@pytest.mark.parametrize("config, mesh, local_heads", [
    (GROK1, (1, 1), 8), (GROK1, (1, 8), 1), (GROK1, (2, 4), 2), (GROK1, (8, 1), 8),
    (GROK2ISH, (1, 4), 6)])
def test_the_plan_counts_the_pools_pages(config, mesh, local_heads):
    """bytes = 2 * L * pages * page * Hkv_local * K * 2, whatever the batch; pages are not split
    over "data" (every data shard holds the whole pool), kv heads over "model" when they
    divide; the count rounds up to whole pages."""
    for tokens in (16, 100, 65536):
        est = memory.estimate_memory(config, mesh, batch=8, kv_cache_tokens=tokens)
        assert est.kv_cache == _pool_bytes(config, tokens, local_heads)
        assert est.kv_pages == -(-tokens // 16)
        assert est.kv_cache == memory.estimate_memory(config, mesh, batch=1,
                                                kv_cache_tokens=tokens).kv_cache
    # not given: a pool of batch x length slots (in whole pages), the engine's default
    default = memory.estimate_memory(config, mesh, batch=8, length=1000)
    assert default.kv_cache == _pool_bytes(config, 8 * 1000, local_heads)


def test_the_report_names_the_pool():
    fits, report = memory.plan_report(GROK1, 8, 80, batch=8, kv_cache_tokens=100000)
    assert fits
    assert "KV pool: 6250 pages of 16 = 100000 tokens (12.2 sequences of 8192 tokens)" in report
    assert "KV cache room: up to" in report and "pages of 16" in report.splitlines()[-1]
    # without a pool size the report is as it was
    _, plain = memory.plan_report(GROK1, 8, 80, batch=8)
    assert "KV pool:" not in plain
    assert "sequences of 8192 tokens" in plain.splitlines()[-1]


def test_room_and_max_batch_with_a_fixed_pool():
    mesh, cap = (1, 8), 80e9
    room = memory.kv_room(GROK1, mesh, cap, batch=8)
    assert room % 16 == 0
    rest = memory.estimate_memory(GROK1, mesh, batch=8, kv_cache_tokens=0)
    page = memory.page_bytes(GROK1, mesh)
    assert room // 16 == (int(cap) - rest.weights - rest.workspace) // page
    assert memory.estimate_memory(GROK1, mesh, batch=8, kv_cache_tokens=room,
                                  capacity_gb=cap / 1e9).fits
    assert not memory.estimate_memory(GROK1, mesh, batch=8, kv_cache_tokens=room + 16,
                                      capacity_gb=cap / 1e9).fits
    # a pool of fixed size: the batch only grows the workspace; too big a pool: none
    assert memory.max_batch(GROK1, mesh, 80, kv_cache_tokens=65536) > 0
    assert memory.max_batch(GROK1, mesh, 80, kv_cache_tokens=room + 16) == 0


def test_a_pool_that_does_not_fit_is_refused_in_one_line():
    memory.check_fits(GROK1, (1, 8), int(80e9), batch=8, kv_cache_tokens=65536)
    with pytest.raises(ShardingError) as err:
        memory.check_fits(GROK1, (1, 8), int(80e9), batch=8, kv_cache_tokens=4_000_000)
    text = str(err.value)
    assert "\n" not in text and "with a KV pool of 250000 pages of 16" in text
    assert "DOES NOT FIT" in text


def test_the_plan_command_takes_the_pool_size():
    from grok.checkpoint.__main__ import main
    run = lambda *a: subprocess.run([sys.executable, "-m", "grok.checkpoint", "plan", *a],
                                    cwd=ROOT, capture_output=True, text=True, timeout=120)
    ok = run("--devices", "8", "--memory", "80", "--batch", "8", "--kv-cache-tokens", "65536")
    assert ok.returncode == 0, ok.stderr
    assert "KV pool: 4096 pages of 16 = 65536 tokens (8 sequences of 8192 tokens)" in ok.stdout
    big = run("--devices", "8", "--memory", "80", "--kv-cache-tokens", "4000000")
    assert big.returncode == 1 and "does not fit on any mesh" in big.stdout
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--devices", "8", "--memory", "80", "--kv-cache-tokens", "8"])
    assert exit_.value.code == 2


# --- the default from the device's memory --------------------------------------------------
def test_the_default_pool_from_free_memory():
    config, mesh, batch = GROK1, (1, 8), 8
    context = config.sequence_len
    rest = memory.estimate_memory(config, mesh, batch=batch, kv_cache_tokens=0)
    page = memory.page_bytes(config, mesh)
    # room for 1000 pages within 90% of the memory: 1000 pages
    capacity = (rest.weights + rest.workspace + 1000.5 * page) / memory.KV_MEMORY_FRACTION
    assert memory.default_kv_tokens(config, mesh, capacity, batch=batch) == 1000 * 16
    # plenty: at most twice batch x context (the rest of the memory stays free)
    assert memory.default_kv_tokens(config, mesh, 1e12, batch=batch) == 2 * batch * context
    # too little: still a page a sequence (check_fits then decides)
    assert memory.default_kv_tokens(config, mesh, rest.weights, batch=batch) == batch * 16
    # no memory report (a CPU): batch x context, the engine's own default
    assert memory.default_kv_tokens(config, mesh, None, batch=batch) == batch * context


def test_load_sizes_the_pool_from_the_devices_memory(monkeypatch, caplog):
    """A device that reports its memory (faked): the pool is what fits, logged at load."""
    config = grok.load("demo", progress=False).config
    rest = memory.estimate_memory(config, (1, 1), batch=2, kv_cache_tokens=0)
    capacity = int((rest.weights + rest.workspace + 20.5 * memory.page_bytes(config, (1, 1)))
                   / memory.KV_MEMORY_FRACTION)
    monkeypatch.setattr(memory, "device_memory", lambda device: capacity)
    with caplog.at_level(logging.INFO, logger="grok.api"):
        model = grok.load("demo", progress=False, max_batch=2)
    assert model.engine.kv_cache_tokens == 20 * 16 and model.engine.pages == 20
    assert "KV pool: 20 pages of 16 = 320 tokens" in caplog.text
    # memory_gb says the same without a device
    monkeypatch.setattr(memory, "device_memory", lambda device: None)
    model = grok.load("demo", progress=False, max_batch=2, memory_gb=capacity / 1e9)
    assert model.engine.kv_cache_tokens == 20 * 16


def test_the_default_on_cpu_is_max_batch_sequences_of_the_context(caplog):
    with caplog.at_level(logging.INFO, logger="grok.api"):
        model = grok.load("demo", progress=False, max_batch=3)
    context = model.config.sequence_len
    assert model.engine.kv_cache_tokens == 3 * context and model.engine.prefix_cache is True
    assert model.engine.max_context == context
    assert f"KV pool: {3 * context // 16} pages of 16" in caplog.text


# --- the settings reach the engine ----------------------------------------------------------
def test_load_passes_the_pool_and_prefix_cache_to_every_engine():
    model = grok.load("demo", progress=False, max_batch=2, kv_cache_tokens=100,
                      prefix_cache=False)
    assert model.engine.kv_cache_tokens == 112 and model.engine.pages == 7   # whole pages
    assert model.engine.prefix_cache is False and model.engine.max_context == 112
    again = model.new_engine(prefill_tokens=64)
    assert (again.kv_cache_tokens, again.prefix_cache, again.prefill_tokens) == (112, False, 64)
    assert model.generate([[5, 6, 7]], 3)[0]


def test_a_multi_host_leader_announces_the_pool_it_makes(monkeypatch):
    """The followers build no engine: they replay the leader's calls, its new_pool(pages,
    page_size) first, so their pool is the leader's."""
    from grok.serving import lockstep
    sent = []
    monkeypatch.setattr(lockstep, "send", lambda name, args: sent.append((name, args)))
    model = grok.load("demo", progress=False, max_batch=2, kv_cache_tokens=256)
    model.new_engine(steps=lockstep.Leader(model.runner))
    model.generate([[5, 6, 7]], 2)
    assert sent[0] == ("new_pool", (16, 16))


def test_from_flat_takes_the_settings():
    from conftest import tiny_config
    from grok.leaves import random_flat
    config = tiny_config()
    model = grok.from_flat(random_flat(config, seed=0), config, max_batch=2,
                           kv_cache_tokens=48, prefix_cache=False)
    assert (model.engine.kv_cache_tokens, model.engine.prefix_cache) == (48, False)


@pytest.mark.parametrize("kwargs, words", [
    (dict(kv_cache_tokens=8), "kv_cache_tokens must be an integer in [16 (a page), 268435456], "
     "got 8"),
    (dict(kv_cache_tokens=100.0), "kv_cache_tokens must be an integer in"),
    (dict(kv_cache_tokens=True), "kv_cache_tokens must be an integer in"),
    (dict(kv_cache_tokens=10 ** 15), "268435456], got 1000000000000000"),
    (dict(prefix_cache=1), "prefix_cache must be True or False, got 1"),
    (dict(prefix_cache="no"), "prefix_cache must be True or False, got 'no'"),
])
def test_bad_values_are_refused_in_one_line_before_loading(kwargs, words, monkeypatch):
    from grok import families
    monkeypatch.setattr(families, "detect", lambda path: pytest.fail("read the checkpoint"))
    with pytest.raises(RequestError) as err:
        grok.load("demo", **kwargs)
    assert words in str(err.value) and "\n" not in str(err.value)
    from conftest import tiny_config
    with pytest.raises(RequestError) as err:
        grok.from_flat({}, tiny_config(), **kwargs)
    assert words in str(err.value)


def test_load_refuses_a_pool_that_does_not_fit_before_reading_weights(monkeypatch):
    from grok.checkpoint import loader
    monkeypatch.setattr(loader, "load_params", lambda *a, **k: pytest.fail("read the weights"))
    with pytest.raises(GrokError, match="with a KV pool of 6250000 pages of 16"):
        grok.load("demo", (1, 1), memory_gb=2, kv_cache_tokens=100_000_000)


# --- flags --------------------------------------------------------------------------------
@pytest.mark.parametrize("module", ["grok.cli", "grok.serve.__main__"])
def test_the_flags_parse_into_loads_options(module, capsys):
    import importlib
    parse_args = importlib.import_module(module).parse_args
    prompt = ["hi"] if module == "grok.cli" else []     # run.py needs a prompt
    options = launch.load_options(parse_args([*prompt, "--kv-cache-tokens", "4096",
                                              "--no-prefix-cache"]))
    assert options["kv_cache_tokens"] == 4096 and options["prefix_cache"] is False
    plain = launch.load_options(parse_args(prompt))
    assert plain["kv_cache_tokens"] is None and plain["prefix_cache"] is True
    for value, words in (("8", "--kv-cache-tokens must be >= 16, got 8"),
                         (str(2 ** 40), f"--kv-cache-tokens must be <= {2 ** 28}, got {2 ** 40}"),
                         ("lots", "argument --kv-cache-tokens: invalid int value: 'lots'")):
        with pytest.raises(SystemExit) as exit_:
            parse_args([*prompt, "--kv-cache-tokens", value])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and words in err and err.count("\n") == 1, err


def test_the_server_loads_with_the_flags(monkeypatch, capsys):
    """python -m grok.serve hands --kv-cache-tokens and --no-prefix-cache to grok.load (and so
    to the engine it serves with: new_engine keeps them)."""
    import grok.serve.__main__ as command
    seen = {}

    def load(path, mesh, **kwargs):
        seen.update(kwargs)
        raise GrokError("stopped before loading")
    monkeypatch.setattr(grok, "load", load)
    monkeypatch.setenv("GROK_COMPILE_CACHE", "off")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    code = command.main(["--checkpoint", "demo", "--kv-cache-tokens", "512",
                         "--no-prefix-cache", "--prefill-tokens", "256"])
    assert code == 2 and "stopped before loading" in capsys.readouterr().err
    assert seen["kv_cache_tokens"] == 512 and seen["prefix_cache"] is False
    assert seen["prefill_tokens"] == 256     # the memory estimate's workspace is sized by it


def test_load_sizes_the_workspace_by_the_prefill_budget_and_keeps_it_for_its_engines():
    model = grok.load("demo", progress=False, max_batch=2, prefill_tokens=32)
    assert model.engine.prefill_tokens == 32 and model.new_engine().prefill_tokens == 32
    with pytest.raises(RequestError, match="prefill_tokens must be an integer >= 1, got 0"):
        grok.load("demo", progress=False, prefill_tokens=0)
