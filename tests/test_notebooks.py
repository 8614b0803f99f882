"""The notebooks run top to bottom in a real Jupyter kernel and show what they promise.

Each notebook is executed with nbclient in a temporary working copy that mirrors the repository
layout (``notebooks/<name>.ipynb`` beside a copy of ``sample/``), headless (``MPLBACKEND=Agg``),
with its temporary files under pytest's ``tmp_path``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "notebooks" / "quickstart.ipynb"
EXPORTED = re.compile(r"^exported (\d+) chips to (.+)$", re.MULTILINE)


def run_notebook(path: Path, workdir: Path, monkeypatch: pytest.MonkeyPatch) -> nbformat.NotebookNode:
    """Execute a copy of ``path`` in ``workdir/notebooks`` and return it with its outputs.

    Parameters
    ----------
    path : Path
        The notebook in the repository (left untouched).
    workdir : Path
        A scratch folder: receives the copy, ``sample/`` and the kernel's temporary files.
    monkeypatch : pytest.MonkeyPatch
        Sets the kernel's environment (inherited from this process).
    """
    (workdir / "notebooks").mkdir(parents=True)
    shutil.copytree(ROOT / "sample", workdir / "sample")
    copy = workdir / "notebooks" / path.name
    shutil.copy(path, copy)
    tmp = workdir / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TMPDIR", str(tmp))  # the notebook's mkdtemp and Dask's scratch space
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # silences jupyter_core's migration warning
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=120, allow_errors=True,
        resources={"metadata": {"path": str(copy.parent)}},
    )
    client.execute()
    return nb


def outputs(nb: nbformat.NotebookNode) -> list[dict]:
    """Every output of every code cell, in order."""
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.get("outputs", [])]


def text_of(nb: nbformat.NotebookNode) -> str:
    """All printed text (streams and text/plain, text/html results) of the notebook."""
    parts = []
    for out in outputs(nb):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.extend(str(out["data"][kind]) for kind in ("text/plain", "text/html") if kind in out["data"])
    return "\n".join(parts)


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> nbformat.NotebookNode:
    """The quickstart notebook, executed once for all the checks below."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return run_notebook(QUICKSTART, tmp_path_factory.mktemp("quickstart"), monkeypatch)


def test_quickstart_committed_without_outputs() -> None:
    nb = nbformat.read(QUICKSTART, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_quickstart_runs_without_errors(quickstart: nbformat.NotebookNode) -> None:
    errors = [out for out in outputs(quickstart) if out["output_type"] == "error"]
    assert not errors, "\n".join(f"{e['ename']}: {e['evalue']}" for e in errors)
    assert "cluster closed" in text_of(quickstart)


def test_quickstart_shows_dashboard_link(quickstart: nbformat.NotebookNode) -> None:
    assert re.search(r"Dask dashboard: https?://\S+/status", text_of(quickstart))


def test_quickstart_draws_figures(quickstart: nbformat.NotebookNode) -> None:
    pngs = [out for out in outputs(quickstart) if "image/png" in out.get("data", {})]
    assert len(pngs) >= 3  # boxes, masks, features per class, histograms


def test_quickstart_chip_counts_match_files(quickstart: nbformat.NotebookNode) -> None:
    exports = EXPORTED.findall(text_of(quickstart))
    assert len(exports) == 2  # PASCAL_VOC_rectangles and Classified_Tiles
    for count, folder in exports:
        images = Path(folder.strip()) / "images"
        assert int(count) > 0
        assert int(count) == len(list(images.iterdir())), folder
