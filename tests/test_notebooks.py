"""The tutorial notebooks: each is a jupytext pair.

``notebooks/NN_name.py`` (percent format) is the source one edits and reviews;
``notebooks/NN_name.ipynb`` is the same cells with outputs stripped, for Jupyter.
After editing either side, ``make notebooks-sync`` (``jupytext --sync``) rewrites
the other. These tests fail when a pair disagrees and execute every notebook from
its ``.py`` source.
"""

import os
import pathlib

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
FORMATS = "ipynb,py:percent"
STEMS = sorted({p.stem for p in NOTEBOOK_DIR.glob("*.py")}
               | {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")})


def _cells(nb):
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def pair_problems(py_path, ipynb_path):
    """What is wrong with one jupytext pair; an empty list when it is in sync."""
    missing = [p.name for p in (py_path, ipynb_path) if not p.exists()]
    if missing:
        return [f"missing {', '.join(missing)}"]
    problems = []
    source = jupytext.read(py_path)
    notebook = jupytext.read(ipynb_path)
    for name, nb in ((py_path.name, source), (ipynb_path.name, notebook)):
        formats = nb.metadata.get("jupytext", {}).get("formats")
        if formats != FORMATS:
            problems.append(f"{name}: jupytext formats {formats!r}, expected {FORMATS!r}")
    if _cells(source) != _cells(notebook):
        problems.append(f"cells of {py_path.name} and {ipynb_path.name} differ")
    raw = nbformat.read(ipynb_path, as_version=4)
    if any(c.get("outputs") or c.get("execution_count") is not None
           for c in raw.cells if c.cell_type == "code"):
        problems.append(f"{ipynb_path.name} has outputs (strip them before committing)")
    return problems


def test_there_are_notebooks():
    assert len(STEMS) >= 6


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_pair_in_sync(stem):
    problems = pair_problems(NOTEBOOK_DIR / f"{stem}.py", NOTEBOOK_DIR / f"{stem}.ipynb")
    assert not problems, "; ".join(problems) + " (run `make notebooks-sync`)"


def test_pair_check_detects_drift(tmp_path):
    """The sync check itself: an edited source, a missing half, stored outputs."""
    stem = STEMS[0]
    py = tmp_path / f"{stem}.py"
    ipynb = tmp_path / f"{stem}.ipynb"
    py.write_text((NOTEBOOK_DIR / f"{stem}.py").read_text())
    ipynb.write_text((NOTEBOOK_DIR / f"{stem}.ipynb").read_text())
    assert pair_problems(py, ipynb) == []

    py.write_text(py.read_text() + "\n# %%\nprint('a cell only the source has')\n")
    assert any("differ" in p for p in pair_problems(py, ipynb))

    py.write_text((NOTEBOOK_DIR / f"{stem}.py").read_text())
    nb = nbformat.read(ipynb, as_version=4)
    code = next(c for c in nb.cells if c.cell_type == "code")
    code.outputs = [nbformat.v4.new_output("stream", name="stdout", text="stale\n")]
    nbformat.write(nb, ipynb)
    assert any("outputs" in p for p in pair_problems(py, ipynb))

    ipynb.unlink()
    assert pair_problems(py, ipynb) == [f"missing {stem}.ipynb"]


@pytest.mark.standard_promotion
@pytest.mark.parametrize("stem", STEMS)
def test_notebook_executes(stem, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    # notebook 02's online section: 2,000 points instead of 50,000 (same code path)
    monkeypatch.setenv("SUBJAX_NOTEBOOK_N", "2000")
    nb = jupytext.read(NOTEBOOK_DIR / f"{stem}.py")
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
