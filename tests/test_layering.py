"""The package's layering rules (README, "Design"), read from the source with `ast`: which
package may import which, no import cycles, no reaching into another module's private names."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "grok"

# What each part of grok may import (besides itself). The base modules first.
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "progress": set(),
    "files": set(),
    "config": {"errors", "files"},
    "quant": {"errors"},
    "leaves": {"config", "errors", "quant"},
    "parallel": {"config", "errors", "leaves", "quant"},
    "kernels": {"config", "errors", "leaves", "quant", "parallel"},
    "model": {"config", "errors", "leaves", "quant", "kernels"},
    "checkpoint": {"config", "errors", "files", "leaves", "quant", "progress"},
    "serving": {"config", "errors", "files", "leaves", "quant", "kernels", "model", "parallel"},
    # Model families: a release directory -> config, leaves, tokenizer, chat template.
    "families": {"config", "errors", "files", "leaves", "quant", "checkpoint", "serving",
                 "progress"},
    "api": {"config", "errors", "leaves", "quant", "kernels", "model", "parallel", "checkpoint",
            "serving", "progress", "families"},
    # What both command lines need to start (flags, mesh, compile cache, Ctrl-C).
    "launch": {"config", "errors", "parallel"},
    "cli": {"config", "errors", "api", "parallel", "serving", "checkpoint", "launch"},
    # The HTTP server: what the command line may use, never the command line itself.
    "serve": {"config", "errors", "api", "parallel", "serving", "checkpoint", "launch"},
    "tools": {"config", "errors", "leaves", "quant", "kernels", "model", "parallel",
              "checkpoint", "serving", "api", "progress"},
}
# Command-line entry points may reach further than their package (they are not imported by it).
EXCEPTIONS = {"grok.checkpoint.__main__": {"parallel", "families"}}
# The model never depends on the memory planner, loading or serving.
FORBIDDEN_FOR_MODEL = ("grok.parallel.memory", "grok.checkpoint", "grok.serving", "grok.api",
                       "grok.cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


MODULES = _modules()


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str) -> list[tuple[str, str, int]]:
    """(imported grok module, imported name or "", line) of every import in module `name`,
    wherever it is (function bodies too), except those only for type checkers."""
    tree = ast.parse(MODULES[name].read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if MODULES[name].name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.startswith("grok")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([base] if base else []))
            if not base.startswith("grok"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((sub, "", node.lineno) if sub in MODULES
                           else (base, alias.name, node.lineno))
    return out


def _part(module: str) -> str:
    """The part of grok a module belongs to: its subpackage, or the top-level module's name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "grok"


def test_packages_import_only_what_the_layering_allows():
    bad = []
    for name in MODULES:
        part = _part(name)
        if part == "grok":
            continue
        if part not in ALLOWED:
            bad.append(f"{name} is in no layer of the table: add it to ALLOWED (and README)")
            continue
        allowed = ALLOWED[part] | {part} | EXCEPTIONS.get(name, set())
        for target, _, line in _imports(name):
            if target != "grok" and _part(target) not in allowed:
                bad.append(f"{name}:{line} imports {target}")
    assert not bad, "\n".join(bad)


def test_the_model_knows_no_files_planner_or_serving():
    bad = [f"{name}:{line} imports {target}" for name in MODULES if _part(name) == "model"
           for target, _, line in _imports(name) if target.startswith(FORBIDDEN_FOR_MODEL)]
    assert not bad, "\n".join(bad)


def test_nothing_in_the_library_imports_the_tools():
    bad = [f"{name} imports {target}" for name in MODULES if _part(name) != "tools"
           for target, _, _ in _imports(name) if _part(target) == "tools"]
    assert not bad, bad


def test_nothing_in_the_library_imports_the_server():
    bad = [f"{name} imports {target}" for name in MODULES if _part(name) != "serve"
           for target, _, _ in _imports(name) if _part(target) == "serve"]
    assert not bad, bad


def test_there_are_no_import_cycles():
    graph = {name: {t for t, _, _ in _imports(name) if t in MODULES and t != name}
             for name in MODULES}
    # a package's __init__ importing its own submodules is how packages re-export: not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def _private_uses(path: Path, name: str | None) -> list[str]:
    """`from grok.x import _y` and `x._y` for an imported grok module x, in one file."""
    tree = ast.parse(path.read_text())
    aliases, bad = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("grok"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                if full in MODULES:
                    aliases[alias.asname or alias.name] = full
                elif alias.name.startswith("_") and node.module != name:
                    bad.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("grok") and alias.asname:
                    aliases[alias.asname] = alias.name
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") \
                and not node.attr.startswith("__") and isinstance(node.value, ast.Name) \
                and aliases.get(node.value.id, name) != name:
            bad.append(f"{path.name}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}")
    return bad


def test_no_module_uses_another_modules_private_names():
    bad = [b for name, path in MODULES.items() for b in _private_uses(path, name)]
    bad += [b for path in sorted((ROOT / "benchmarks").glob("*.py"))
            for b in _private_uses(path, None)]
    assert not bad, "\n".join(bad)


def test_the_checks_catch_a_planted_violation(tmp_path, monkeypatch):
    """A model module importing the checkpoint package, and a cycle, are reported."""
    planted = PACKAGE / "model" / "_planted_violation.py"
    planted.write_text("from grok.checkpoint import read_checkpoint\nimport grok.model.forward\n")
    cyclic = PACKAGE / "model" / "_planted_cycle.py"
    cyclic.write_text("import grok.model._planted_cycle2\n")
    cyclic2 = PACKAGE / "model" / "_planted_cycle2.py"
    cyclic2.write_text("from grok.model import _planted_cycle\n")
    try:
        monkeypatch.setattr(__import__(__name__), "MODULES", _modules())
        with pytest.raises(AssertionError, match="_planted_violation:1 imports grok.checkpoint"):
            test_packages_import_only_what_the_layering_allows()
        with pytest.raises(pytest.fail.Exception, match="_planted_cycle"):
            test_there_are_no_import_cycles()
    finally:
        for p in (planted, cyclic, cyclic2):
            p.unlink()
