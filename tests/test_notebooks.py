"""Run every notebook in notebooks/ top to bottom at the small CI size, and check the committed ones.

    python -m pytest tests/test_notebooks.py -q

Each notebook runs in a fresh Jupyter kernel on this interpreter, with
LORA_DROP_NOTEBOOK_SIZE=ci, on CPU, with a per-cell timeout; any error in a cell fails
the test. The outputs of these runs are thrown away. The committed notebooks must carry
the outputs of a full-size run from top to bottom, so a notebook saved without running it
again fails too. To refresh them after a change (at the default full size):

    jupyter nbconvert --to notebook --execute --inplace notebooks/NAME.ipynb

NOTE: the three CI-size runs take about 3 minutes on an idle 2-core CPU, and most of that is
loading the model once per notebook. On a machine busy with other jobs they take several
times longer.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 600  # per cell; a CI-size cell takes under a minute on an idle 2-core CPU

# A small sweep results file in sweep.py's layout, so that 03_speedups.ipynb draws its frontier
# even before results/sweep.json exists.
FAKE_SWEEP = {
    "format": "lora-drop-sweep/1",
    "cells": {
        f"period={period},share={share:g}": {
            "period": period, "share": share, "layers": [], "n_layer": 30,
            "quality": {"ppl": ppl, "full_ppl": 20.0, "ppl_ratio": ppl / 20.0, "top1": top1, "kl": kl, "tokens": 100},
            "speed": {"speedup": speedup, "ideal_speedup": speedup * 1.2, "kv_reduction": 0.3 * share * 2},
        }
        for period, share, ppl, top1, kl, speedup in [
            (2, 0.25, 20.5, 0.95, 0.02, 1.1),
            (8, 0.25, 24.0, 0.80, 0.20, 1.3),
            (8, 0.5, 40.0, 0.55, 0.90, 1.6),
            (16, 0.75, 400.0, 0.10, 4.00, 2.4),
        ]
    },
}


def test_notebooks_found():
    assert [p.name for p in NOTEBOOKS] == ["01_walkthrough.ipynb", "02_hidden_state_drift.ipynb", "03_speedups.ipynb"]


@pytest.fixture
def this_interpreter_kernel(tmp_path, monkeypatch):
    """Point Jupyter's kernel spec "python3" at the interpreter that runs the tests.

    Jupyter looks for kernel specs in $JUPYTER_PATH before the virtual environment and the
    user's folders, so a spec there wins over any other "python3".
    """
    spec_dir = tmp_path / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (tests)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "python3"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_ci_size(path, this_interpreter_kernel, tmp_path, monkeypatch):
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(FAKE_SWEEP))
    monkeypatch.setenv("LORA_DROP_NOTEBOOK_SIZE", "ci")
    monkeypatch.setenv("LORA_DROP_SWEEP_RESULTS", str(sweep_file))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # the notebooks default to DEVICE = "cpu"; keep any GPU out of reach
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=this_interpreter_kernel,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell fails

    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    assert "notebook size: ci" in output_text(code_cells[0])
    assert any(has_image(cell) for cell in code_cells), f"{path.name} drew no figure"


def output_text(cell):
    return "".join(out.get("text", "") for out in cell.get("outputs", []) if out.get("output_type") == "stream")


def has_image(cell):
    return any("image/png" in out.get("data", {}) for out in cell.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_has_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code_cells]
    assert None not in counts, f"{path.name} has code cells that were not run; run the notebook and save it"
    assert counts == list(range(1, len(code_cells) + 1)), (
        f"{path.name} was not run top to bottom in one kernel (execution counts {counts}); run it again and save it")
    errors = [out for cell in code_cells for out in cell.outputs if out.output_type == "error"]
    assert not errors, f"{path.name} was saved with an error: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    assert "notebook size: full" in output_text(code_cells[0]), (
        f"{path.name} was saved from a run at the CI size; run it at the default full size")
    assert any(has_image(cell) for cell in code_cells), f"{path.name} was saved without its figures"
