"""README.md stays true: its Python block runs as written, and its command lines name real flags."""
from __future__ import annotations

import contextlib
import io
import re
import tempfile
from pathlib import Path

import pytest

from grok.cli import parse_args

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_the_python_api_block_runs_as_written(monkeypatch, tmp_path):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README.md has no python block"
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))   # its converted checkpoint
    out = io.StringIO()
    for block in blocks:
        with contextlib.redirect_stdout(out):
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    assert out.getvalue().strip(), "the README's example printed nothing"


def _usage_flags() -> set[str]:
    start = README.index("## Command line")
    usage = README[start:README.index("\n## ", start)]
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", usage))


def test_every_flag_the_readme_names_is_a_flag_of_run_py():
    import argparse
    with contextlib.redirect_stdout(io.StringIO()) as help_text, pytest.raises(SystemExit):
        parse_args(["--help"])
    known = set(re.findall(r"(--[a-z][a-z-]*)", help_text.getvalue()))
    flags = _usage_flags()
    assert len(flags) > 15 and flags <= known, sorted(flags - known)
    assert isinstance(parse_args(["x"]), argparse.Namespace)


def test_every_extra_the_readme_installs_is_in_pyproject():
    """The install lines (CUDA 13, CUDA 12, TPU, kernels, serve, ...) name extras pyproject.toml
    defines, and each accelerator extra pulls JAX's own package for it."""
    import tomllib
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    named = {name for group in re.findall(r'pip install -e "\.\[([a-z0-9,]+)\]"', README)
             for name in group.split(",")}
    assert {"cuda13", "cuda12", "tpu", "kernels", "serve", "test"} <= named
    assert named <= set(extras), named - set(extras)
    for extra in ("cuda13", "cuda12", "tpu"):
        assert any(dep.startswith(f"jax[{extra}]") for dep in extras[extra]), extra
