"""run.py as a user runs it: flags, one-line errors, and a real (tiny, random) checkpoint."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import tiny_config, tokenizer_path
from grok.errors import GrokError
from grok.checkpoint import write_checkpoint
from grok.leaves import random_flat

ROOT = Path(__file__).resolve().parents[1]
COMPILE_CACHE = os.environ["GROK_TEST_XLA_CACHE"]   # the session's (conftest), not the user's


def run(*args: str, stdin: str | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GROK_COMPILE_CACHE": COMPILE_CACHE}
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, input=stdin,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random model with the Grok-1 tokenizer's vocabulary, in the release layout."""
    config = tiny_config(vocab_size=131072, emb_size=16, key_size=4, num_layers=1,
                         sequence_len=64)
    path = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(path, random_flat(config, seed=0), config, progress=False)
    return path


def test_help_documents_every_flag_with_its_default():
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--checkpoint", "--tokenizer", "--max-new-tokens", "--temperature", "--top-p",
                 "--top-k", "--seed", "--prompts-file", "--stream", "--max-batch", "--json",
                 "--repetition-penalty", "--presence-penalty", "--frequency-penalty",
                 "--truncate", "--stop", "--interactive", "--mesh", "--moe-impl",
                 "--kv-cache-tokens", "--no-prefix-cache"):
        assert flag in out.stdout
    text = " ".join(out.stdout.split())
    for default in ("tokens to generate per prompt (default: 64)", "(default: 8)",
                    "0 is greedy (default: 0)", "1 is off; default: 1"):
        assert default in text


def test_missing_checkpoint_is_one_line_naming_the_file(tmp_path):
    out = run("hello", "--checkpoint", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert str(tmp_path / "nowhere" / "ckpt-0") in out.stderr
    assert "checkpoints/README.md" in out.stderr


@pytest.mark.parametrize("flags, words", [
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--top-k", "many"], "invalid int value"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--presence-penalty", "2.5"], "--presence-penalty must be in [-2, 2]"),
    (["--frequency-penalty", "-3"], "--frequency-penalty must be in [-2, 2]"),
    (["--truncate", "right"], "invalid choice: 'right'"),
    (["--moe-impl", "fast"], "invalid choice: 'fast'"),
    (["--stream", "--json"], "not allowed with argument"),
    (["--kv-cache-tokens", "8"], "--kv-cache-tokens must be >= 16, got 8"),
    (["--kv-cache-tokens", "lots"], "argument --kv-cache-tokens: invalid int value"),
])
def test_bad_flags_are_one_line(flags, words):
    out = run("hello", *flags)
    assert out.returncode == 2 and words in out.stderr
    assert out.stderr.count("\n") == 1


def test_each_argument_is_one_prompt_and_outputs_are_told_apart(checkpoint, tmp_path):
    tok = str(tokenizer_path())
    common = ["--checkpoint", str(checkpoint), "--tokenizer", tok, "--max-new-tokens", "3"]
    out = run("The answer is", *common)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The answer is") and "--- prompt" not in out.stdout
    out = run("import os", "class Foo:", *common)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "--- prompt 1 ---" and lines[1].startswith("import os")
    second = lines.index("--- prompt 2 ---")
    assert lines[second + 1].startswith("class Foo:")
    assert "import os class Foo:" not in out.stdout
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    out = run("zeroth", "--prompts-file", str(prompts), *common, "--temperature", "0.8",
              "--top-k", "5", "--json")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["index"] for r in rows] == [1, 2, 3]
    assert [r["prompt"] for r in rows] == ["zeroth", "first prompt", "second prompt"]
    for r in rows:
        assert len(r["tokens"]) == 3 and r["finish_reason"] == "length"
        assert isinstance(r["text"], str) and r["prompt_tokens"] >= 1
    out = run("streamed", "other", "--stream", *common)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == ["--- prompt 1 ---", out.stdout.splitlines()[1]]
    assert out.stdout.splitlines()[1].startswith("streamed")


def test_interactive_and_too_long_prompts_speak_the_cli(checkpoint):
    tok = str(tokenizer_path())
    common = ["--checkpoint", str(checkpoint), "--tokenizer", tok, "--max-new-tokens", "3"]
    too_long = "word " * 200
    out = run("--interactive", "--stream", *common, stdin=f"one\n{too_long}\n\ntwo\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "--- prompt 1 ---" and lines[1].startswith("one")
    assert lines[2] == "--- prompt 3 ---" and lines[3].startswith("two")
    assert "pass --truncate left" in out.stderr and "truncate='left'" not in out.stderr
    out = run(too_long, *common)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "prompt 1 is 201 tokens" in out.stderr and "--truncate left" in out.stderr
    out = run(too_long, *common, "--truncate", "left", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["prompt_tokens"] == 64 - 3
    out = run("", *common)
    assert out.returncode == 2 and "prompt 1 is empty" in out.stderr
    assert "token list" not in out.stderr


def test_a_tokenizer_flag_naming_no_file_says_so(checkpoint, tmp_path):
    out = run("hi", "--checkpoint", str(checkpoint), "--tokenizer", str(tmp_path / "tok.model"))
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert f"--tokenizer {tmp_path / 'tok.model'} is not a file" in out.stderr
    assert "or pass --tokenizer" not in out.stderr


def test_the_demo_model_samples_with_its_sampling_json_unless_flags_say_otherwise():
    out = run("def f(x):", "--checkpoint", "demo", "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    assert ("sampling.json: --temperature 0.5 --top-p 0.9 --repetition-penalty 1.15"
            in out.stderr)
    out = run("def f(x):", "--checkpoint", "demo", "--max-new-tokens", "4", "--temperature", "0",
              "--repetition-penalty", "1", "--top-p", "1")
    assert out.returncode == 0 and "sampling.json" not in out.stderr, out.stderr


def _popen(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GROK_COMPILE_CACHE": COMPILE_CACHE}
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_a_closed_pipe_ends_the_run_quietly():
    """`run.py ... --stream | head -1`: exit 0 and no traceback once the reader is gone."""
    proc = _popen("def f(x):", "--checkpoint", "demo", "--stream", "--max-new-tokens", "200",
                  "--temperature", "0")
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "Error" not in err, err


@pytest.mark.parametrize("when", ["importing", "generating"])
def test_ctrl_c_exits_130_without_a_traceback(when):
    proc = _popen("def f(x):", "--stream", "--max-new-tokens", "200", "--checkpoint", "demo")
    if when == "importing":
        time.sleep(1.0)             # inside the imports of jax or the checkpoint's loading
    else:
        proc.stdout.read(1)         # the first streamed byte: the model is running
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert code == 130 and "Traceback" not in err and "KeyboardInterrupt" not in err, err


@pytest.mark.parametrize("module, args", [("grok.checkpoint", ["plan", "--devices", "8",
                                                                "--memory", "80"]),
                                          ("grok.tools.bench", ["--help"]),
                                          ("grok.tools.train_demo", ["--help"])])
def test_python_dash_m_commands_start_clean(module, args):
    out = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert "RuntimeWarning" not in out.stderr and "Traceback" not in out.stderr


def test_a_truncated_shard_is_named_in_one_line(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    (broken / "ckpt-0").mkdir(parents=True)
    for f in (checkpoint / "ckpt-0").iterdir():
        (broken / "ckpt-0" / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    victim = broken / "ckpt-0" / "tensor00002_000"
    victim.write_bytes(victim.read_bytes()[:100])
    out = run("hi", "--checkpoint", str(broken), "--tokenizer", str(tokenizer_path()))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "tensor00002_000" in out.stderr and out.stderr.count("\n") == 1


def test_a_request_the_engine_refuses_is_one_line(checkpoint):
    out = run("hi", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_path()),
              "--max-new-tokens", "3", "--seed", "-1")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "seed must be an integer in [0, 2**32), got -1" in out.stderr


@pytest.mark.parametrize("content, words", [
    (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (nested too deeply to parse)"),
    (b'{"emb_size": "\xff"}', "not UTF-8 text"),
    (b'{"widening_factor": 1e308}', "widening_factor must be a positive number"),
    (b'{"num_layers": 10000000}', "num_layers must be a positive integer <= 1024"),
    (None, "config.json: is a directory"),
])
def test_a_bad_config_json_is_one_line_and_exit_2_in_process(tmp_path, monkeypatch, capsys,
                                                             content, words):
    """grok.cli.main itself (no subprocess, nothing compiled): the config is read, and refused,
    before any weights."""
    import grok.cli
    monkeypatch.setattr(grok.cli, "exit_on_interrupt", lambda: None)   # keep pytest's Ctrl-C
    monkeypatch.setenv("GROK_COMPILE_CACHE", "off")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "ckpt-0").mkdir()
    (tmp_path / "tokenizer.model").write_bytes(b"")   # never opened: the config fails first
    config = tmp_path / "config.json"
    if content is None:
        config.mkdir()
    else:
        config.write_bytes(content)
    code = grok.cli.main(["hi", "--checkpoint", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"run.py: error: {config}") and words in err, err


def test_moe_impl_reaches_the_model_and_a_missing_kernel_package_is_one_line(
        checkpoint, monkeypatch, capsys):
    """--moe-impl is the loaded model's evaluation (grok.load's moe_impl, its plan's choice), and
    --moe-impl tokamax without the package is one line naming it, exit 2 (in process)."""
    import grok
    import grok.cli
    from grok.kernels import tokamax_moe
    monkeypatch.setattr(grok.cli, "exit_on_interrupt", lambda: None)   # keep pytest's Ctrl-C
    monkeypatch.setenv("GROK_COMPILE_CACHE", "off")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    seen, real = [], grok.load

    def load(*args, **kwargs):   # the real load; the run stops before sampling
        model = real(*args, **kwargs)
        seen.append(model.runner.plan.moe)
        raise GrokError("stopped after loading")
    monkeypatch.setattr(grok, "load", load)
    flags = ["hi", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_path())]
    assert grok.cli.main([*flags, "--moe-impl", "dense"]) == 2
    assert seen == ["dense"] and "stopped after loading" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "tokamax", None)     # `import tokamax` now fails
    tokamax_moe.load.cache_clear()
    try:
        code = grok.cli.main([*flags, "--moe-impl", "tokamax"])
    finally:
        tokamax_moe.load.cache_clear()
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "grok[kernels]" in err, err


def test_kv_cache_flags_reach_the_engine(checkpoint, monkeypatch, capsys):
    """--kv-cache-tokens and --no-prefix-cache are the loaded model's engine's pool and prefix
    cache (in process; the run stops after loading)."""
    import grok
    import grok.cli
    monkeypatch.setattr(grok.cli, "exit_on_interrupt", lambda: None)   # keep pytest's Ctrl-C
    monkeypatch.setenv("GROK_COMPILE_CACHE", "off")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    seen, real = [], grok.load

    def load(*args, **kwargs):
        engine = real(*args, **kwargs).engine
        seen.append((engine.kv_cache_tokens, engine.prefix_cache))
        raise GrokError("stopped after loading")
    monkeypatch.setattr(grok, "load", load)
    flags = ["hi", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_path())]
    assert grok.cli.main([*flags, "--kv-cache-tokens", "100", "--no-prefix-cache"]) == 2
    assert grok.cli.main([*flags, "--max-batch", "2"]) == 2
    assert seen == [(112, False), (2 * 64, True)]      # whole pages; else max-batch x context
    assert "stopped after loading" in capsys.readouterr().err
