"""Shared test helpers: tiny configs, random models and the ../shared fixtures; the XLA settings
of the test session."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

# Set before any jax backend starts, here and in every subprocess a test starts (they inherit the
# environment). The test programs are tiny, so compiling them is most of the suite's time:
# - XLA's backend (LLVM) optimisation off: about a third less compile time. LLVM without
#   fast-math does not reorder float operations, so the numbers are the same.
# - one compilation cache for the session (xdist workers and subprocesses alike): a program
#   compiled once (the same tiny model in another file, run.py in another test) is read back.
#   Its keys hold the program, jax and the flags, so a hit is the same executable.
if "GROK_TEST_XLA_CACHE" not in os.environ:
    os.environ["GROK_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="grok-test-xla-")
    _CACHE_OWNER = True      # the process that made it (pytest's main one) removes it
else:
    _CACHE_OWNER = False
XLA_CACHE = os.environ["GROK_TEST_XLA_CACHE"]
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", XLA_CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("GROK_COMPILE_CACHE", XLA_CACHE)       # run.py and grok.serve's own

import pytest

from grok.config import GrokConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
TOKENIZER = SHARED / "grok1-tokenizer" / "tokenizer.model"


def cpu_devices_env(devices: int) -> dict[str, str]:
    """The environment of a subprocess that sees `devices` virtual CPU devices (XLA's device
    count is fixed when jax is imported): the caller's XLA flags go along (e.g.
    --xla_cpu_max_isa, to check the bounds on other ISAs)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONWARNINGS="ignore")


def tiny_config(**changes) -> GrokConfig:
    """A Grok-shaped config small enough to compile and run in a second on a CPU."""
    base = dict(vocab_size=64, emb_size=32, key_size=8, num_q_heads=4, num_kv_heads=2,
                num_layers=2, widening_factor=2.0, num_experts=4, num_selected_experts=2,
                sequence_len=64, embedding_multiplier_scale=1.0, scale_blocks=4)
    base.update(changes)
    return GrokConfig(**base)


def fixture_dir(name: str) -> Path:
    """A parity fixture directory, or skip the test when ../shared is not beside the checkout."""
    path = FIXTURES / name
    if not (path / "ckpt-0").is_dir():
        pytest.skip(f"parity fixture {path} not found (clone the project beside ../shared)")
    return path


def tokenizer_path() -> Path:
    if not TOKENIZER.is_file():
        pytest.skip(f"Grok-1 tokenizer {TOKENIZER} not found (it lives in ../shared)")
    return TOKENIZER


# The heaviest files first (measured on the 2-core CI box): pytest-xdist hands whole files to its
# workers in collection order, so a heavy file collected last would leave the other worker idle.
HEAVY_FIRST = ("test_moe_mesh.py", "test_engine.py", "test_serve_multihost.py", "test_bench.py",
               "test_cli.py", "test_model.py", "test_moe.py", "test_benchmarks.py",
               "test_sharding.py", "test_serve.py", "test_notebook.py", "test_readme.py",
               "test_safetensors.py", "test_multihost.py", "test_prefill.py", "test_int4.py",
               "test_logprobs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))   # stable in a file


def pytest_unconfigure(config):
    if _CACHE_OWNER:
        shutil.rmtree(XLA_CACHE, ignore_errors=True)
