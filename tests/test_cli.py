"""run.py as a user runs it: flags, one-line errors, and a real (tiny, random) checkpoint."""
from __future__ import annotations

import os
import subprocess
import tempfile
import sys
from pathlib import Path

import pytest

from conftest import tiny_config, tokenizer_path
from grok.checkpoint import write_checkpoint
from grok.params import random_flat

ROOT = Path(__file__).resolve().parents[1]
COMPILE_CACHE = tempfile.mkdtemp(prefix="grok-test-xla-")   # not the user's cache


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


def test_help_documents_every_flag():
    out = run("--help")
    assert out.returncode == 0
    for flag in ("--checkpoint", "--tokenizer", "--max-new-tokens", "--temperature", "--top-p",
                 "--top-k", "--seed", "--prompts-file", "--stream", "--max-batch"):
        assert flag in out.stdout


def test_missing_checkpoint_is_one_line_naming_the_file(tmp_path):
    out = run("hello", "--checkpoint", str(tmp_path / "nowhere"))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert str(tmp_path / "nowhere" / "ckpt-0") in out.stderr
    assert "checkpoints/README.md" in out.stderr


@pytest.mark.parametrize("flags, words", [
    (["--top-p", "0"], "--top-p must be in (0, 1]"),
    (["--temperature", "-1"], "--temperature must be >= 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["--top-k", "many"], "invalid int value"),
])
def test_bad_flags_are_one_line(flags, words):
    out = run("hello", *flags)
    assert out.returncode == 2 and words in out.stderr
    assert out.stderr.count("\n") == 1


def test_generates_from_a_release_layout_checkpoint(checkpoint, tmp_path):
    tok = str(tokenizer_path())
    out = run("The answer is", "--checkpoint", str(checkpoint), "--tokenizer", tok,
              "--max-new-tokens", "4")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("The answer is")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first prompt\n\nsecond prompt\n")
    out = run("--prompts-file", str(prompts), "--checkpoint", str(checkpoint), "--tokenizer", tok,
              "--max-new-tokens", "3", "--temperature", "0.8", "--top-k", "5")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("first") and lines[1].startswith("second")
    out = run("streamed", "--stream", "--checkpoint", str(checkpoint), "--tokenizer", tok,
              "--max-new-tokens", "3")
    assert out.returncode == 0 and out.stdout.startswith("streamed"), out.stderr
    too_long = "word " * 200
    out = run("--interactive", "--stream", "--checkpoint", str(checkpoint), "--tokenizer", tok,
              "--max-new-tokens", "3", stdin=f"one\n{too_long}\n\ntwo\n")
    assert out.returncode == 0, out.stderr
    assert [line[:3] for line in out.stdout.splitlines()] == ["one", "two"]
    assert "exceeds the context" in out.stderr


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
