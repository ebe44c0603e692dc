"""The notebooks of notebooks/ run end to end, offline: each is executed in a fresh kernel, from a
temporary copy of the folder (its working directory), and any error (an assertion of the notebook
included) fails the test. The committed notebooks carry no outputs."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT = 180  # seconds; a cell that builds the demo model or loads the embeddings takes a few


def test_the_notebooks_are_there():
    assert NAMES == ["01_langchain_private_rag.ipynb", "02_llamaindex_private_rag.ipynb",
                     "03_expert_streaming_explained.ipynb"]


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    copy = tmp_path_factory.mktemp("nb") / "notebooks"
    shutil.copytree(NOTEBOOKS, copy, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    return copy


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name: str, workdir: Path, monkeypatch: pytest.MonkeyPatch):
    # The kernel inherits the environment: no model hub, no telemetry (the notebooks set these too,
    # and block the network), no display.
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "ANONYMIZED_TELEMETRY": "False"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(workdir / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(workdir)}})
    try:
        client.execute()  # raises CellExecutionError at the first failing cell
    finally:
        nbformat.write(nb, workdir / f"executed-{name}")  # kept in the temporary folder, for a look
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs
              if o.output_type == "error"]
    assert not errors
    assert os.path.getsize(workdir / f"executed-{name}") < 1_000_000  # outputs stay small
