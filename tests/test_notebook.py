"""notebooks/quickstart.ipynb is stored without outputs and runs top to bottom in a fresh ``python3`` kernel."""

import os
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"


def kernel_env() -> dict[str, str]:
    """This process's environment for the kernel, less conftest's 8 forced host devices: the notebook must run
    on the single device a user has. XLA's optimisation level 0 stays, as for every test (the notebook's cost
    is mostly compile time). The repository goes first on the path, so the kernel imports this checkout."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "PYTHONPATH": path}


def test_stored_notebook_has_no_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, (
                f"{NOTEBOOK.relative_to(REPO)} cell {i} holds outputs: clear them before committing "
                f"(Jupyter: Edit > Clear Outputs of All Cells, then save)")
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel works in tmp_path, so the notebook's exports land there, not in the checkout.
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=kernel_env())  # a failing cell raises CellExecutionError with its source and traceback
    assert any(output.output_type == "display_data" for cell in nb.cells for output in cell.get("outputs", []))
