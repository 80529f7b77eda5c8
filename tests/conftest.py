"""Shared test helpers: tiny configs, random models and the ../shared fixtures."""
from __future__ import annotations

from pathlib import Path

import pytest

from grok.config import GrokConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
FIXTURES = SHARED / "fixtures"
TOKENIZER = SHARED / "grok1-tokenizer" / "tokenizer.model"


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
HEAVY_FIRST = ("test_engine.py", "test_moe_mesh.py", "test_bench.py", "test_cli.py", "test_moe.py",
               "test_model.py", "test_benchmarks.py", "test_sharding.py", "test_serve.py",
               "test_notebook.py", "test_multihost.py", "test_readme.py", "test_logprobs.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))   # stable in a file
