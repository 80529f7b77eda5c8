"""notebooks/quickstart.ipynb runs top to bottom in a fresh Jupyter kernel (nbclient), as a user
would run it: cwd notebooks/, the shipped demo model.

`python tests/test_notebook.py` re-executes the notebook and writes it back with its outputs
(run it after changing the notebook or what it shows)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT = 300      # seconds per cell (a cold CPU compile of a generation step is ~10 s)
MAX_BYTES = 300_000     # the notebook is committed with its outputs (pictures included)

# Appended to the executed copy: what the cells produced is real text.
CHECKS = """
assert completion.strip(), repr(completion)
assert streamed.strip(), repr(streamed)
assert len(results) == 3 and all(r.tokens and r.text.strip() for r in results), results
assert all(r.finish_reason in ("eos", "stop", "length") for r in results)
assert routing.experts.shape[0] == model.config.num_layers
# int4 keeps the trained model's choices (a broken int4 path agrees by chance: ~0%)
assert small.config.weight_bits == 4 and agree >= 0.5, agree
print("notebook checks passed")
"""


def execute(nb, record_timing: bool = True):
    """Run every cell of `nb` in place in a python3 kernel (this interpreter's ipykernel) with cwd
    notebooks/; a cell that raises raises CellExecutionError here."""
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT, kernel_name="python3", record_timing=record_timing,
        coalesce_streams=True, resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    return nb


def _outputs(cell, kind: str | None = None):
    return [o for o in cell.get("outputs", []) if kind is None or o.output_type == kind]


def test_notebook_is_valid_and_small():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert NOTEBOOK.stat().st_size < MAX_BYTES
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("outputs") is not None for c in code)
    for c in code:   # the committed outputs hold no errors either
        assert not _outputs(c, "error"), c.source


def test_notebook_runs_top_to_bottom():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:    # start from a clean slate whatever was committed
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS))
    execute(nb)

    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert not _outputs(cell, "error"), cell.source
    assert "notebook checks passed" in "".join(o.text for o in _outputs(code[-1], "stream"))

    def cell_with(text):
        [cell] = [c for c in code if text in c.source]
        return cell

    def pngs(cell):
        return [o for o in _outputs(cell) if "image/png" in o.get("data", {})]

    assert pngs(cell_with("model.routing(")), "the routing heatmap drew no picture"
    assert pngs(cell_with("model.logits(")), "the next-token chart drew no picture"
    completion = "".join(o.text for o in _outputs(cell_with("model.complete("), "stream")
                         if o.name == "stdout")
    assert completion.startswith("class Stack:") and len(completion) > len("class Stack:") + 20


def main() -> None:
    """Execute the notebook and write it back with its outputs."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    execute(nb, record_timing=False)
    root = f"{NOTEBOOK.parents[1]}/"    # this machine's checkout path: shown relative
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                out.text = out.text.replace(root, "")
    nbformat.write(nb, NOTEBOOK)
    size = NOTEBOOK.stat().st_size
    print(f"wrote {NOTEBOOK} ({size / 1e3:.0f} kB)")
    if size >= MAX_BYTES:
        sys.exit(f"{NOTEBOOK} is over {MAX_BYTES} bytes: shrink its figures")


if __name__ == "__main__":
    main()
