"""The teaching notebooks: stored without outputs, and they run from top to bottom and draw their pictures.

`notebooks/01_diffedit_step_by_step.ipynb` runs on the model shipped with the package (`diffedit/assets/shapes-sd/`).
Until that model is installed, the notebook is pointed at a tiny random SD1-style checkpoint through
`DIFFEDIT_NOTEBOOK_MODEL`: the pictures are then noise, but every cell still runs.
"""

import shutil
from pathlib import Path

import pytest
import torch

from diffedit.locations import shipped_model_installed

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

torch.set_num_threads(1)

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
STEP_BY_STEP = NOTEBOOKS / "01_diffedit_step_by_step.ipynb"
CELL_TIMEOUT_S = 180  # the budget for the whole notebook; no single cell may take longer


def test_stored_notebooks_are_valid_and_have_no_outputs():
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert STEP_BY_STEP in paths
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        nbformat.validate(nb)
        assert nb.nbformat == 4
        for cell in nb.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [], f"{path.name}: a code cell has stored outputs"
                assert cell.execution_count is None, f"{path.name}: a code cell has an execution count"


def test_step_by_step_notebook_runs_and_shows_images(tmp_path, monkeypatch, request):
    if shipped_model_installed():
        monkeypatch.delenv("DIFFEDIT_NOTEBOOK_MODEL", raising=False)
    else:
        monkeypatch.setenv("DIFFEDIT_NOTEBOOK_MODEL", str(request.getfixturevalue("sd1_folder")))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    copy = tmp_path / STEP_BY_STEP.name
    shutil.copy(STEP_BY_STEP, copy)
    nb = nbformat.read(copy, as_version=4)

    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError, naming the cell, if any cell fails

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
    code_cells_with_images = [cell for cell in nb.cells if cell.cell_type == "code" and any(
        "image/png" in out.get("data", {}) for out in cell.outputs)]
    assert len(images) >= 10, f"expected the notebook's pictures, got {len(images)} images"
    assert len(code_cells_with_images) >= 6  # scene, noise, predictions, mask, inversion, decoding, baseline
    printed = "".join(out.get("text", "") for out in outputs if out.output_type == "stream")
    assert "IoU with the true edit region" in printed
    assert "same mask from method.estimate_mask: True" in printed


def test_thresholding_notebook_runs_on_a_small_grid_and_draws_its_plots(tmp_path, monkeypatch):
    """notebooks/02_mask_thresholding.ipynb on the shipped model with 4 edits (20 by default)."""
    if not shipped_model_installed():
        pytest.skip("the thresholding notebook measures the shipped model, which is not installed")
    monkeypatch.setenv("DIFFEDIT_NOTEBOOK_EDITS", "4")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOKS / "02_mask_thresholding.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    assert sum("image/png" in out.get("data", {}) for out in outputs) == 2  # the thresholding and the maps plots
    text = "".join(out.get("text", "") for out in outputs)
    assert "4 held-out edits" in text and "otsu 1.5:" in text and "best threshold per image:" in text
