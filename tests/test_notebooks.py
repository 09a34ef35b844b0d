"""The tutorial notebooks: each is a jupytext pair.

``notebooks/NN_name.py`` (percent format) is the source one edits and reviews;
``notebooks/NN_name.ipynb`` is the same cells with outputs stripped, for Jupyter —
except the notebooks in ``KEEPS_OUTPUTS``, whose ``.ipynb`` stores the outputs of a
full-size run (one run, top to bottom, without errors) that the test executes small.
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
# the environment a notebook's test run sets to run it small (the notebook documents it)
SMALL = {"02_optimal_transport": {"SUBJAX_NOTEBOOK_OT_N": "3000"}}
# notebooks whose .ipynb keeps the outputs of a full-size run
KEEPS_OUTPUTS: set[str] = set()
STEMS = sorted({p.stem for p in NOTEBOOK_DIR.glob("*.py")}
               | {p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")})


def _cells(nb):
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def pair_problems(py_path, ipynb_path, keeps_outputs=False):
    """What is wrong with one jupytext pair; an empty list when it is in sync.

    With ``keeps_outputs`` the ``.ipynb`` must hold the outputs of one run of every
    code cell, in order (execution counts 1, 2, ...) and without an error.
    """
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
    code = [c for c in raw.cells if c.cell_type == "code"]
    if not keeps_outputs:
        if any(c.get("outputs") or c.get("execution_count") is not None for c in code):
            problems.append(f"{ipynb_path.name} has outputs (strip them before committing)")
        return problems
    if [c.get("execution_count") for c in code] != list(range(1, len(code) + 1)):
        problems.append(f"{ipynb_path.name}: the outputs are not those of one run of every "
                        "cell in order (execute it, then commit)")
    if any(o.get("output_type") == "error" for c in code for o in c.get("outputs", [])):
        problems.append(f"{ipynb_path.name}: a stored output is an error")
    return problems


def test_there_are_notebooks():
    assert len(STEMS) >= 6


@pytest.mark.parametrize("stem", STEMS)
def test_notebook_pair_in_sync(stem):
    problems = pair_problems(NOTEBOOK_DIR / f"{stem}.py", NOTEBOOK_DIR / f"{stem}.ipynb",
                             keeps_outputs=stem in KEEPS_OUTPUTS)
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

    # a notebook that keeps outputs: one in-order run without errors
    for i, c in enumerate(c for c in nb.cells if c.cell_type == "code"):
        c.execution_count = i + 1
    nbformat.write(nb, ipynb)
    assert pair_problems(py, ipynb, keeps_outputs=True) == []
    code.execution_count = 7
    nbformat.write(nb, ipynb)
    assert any("one run" in p for p in pair_problems(py, ipynb, keeps_outputs=True))
    code.execution_count = 1
    code.outputs = [nbformat.v4.new_output("error", ename="E", evalue="x", traceback=[])]
    nbformat.write(nb, ipynb)
    assert any("error" in p for p in pair_problems(py, ipynb, keeps_outputs=True))

    ipynb.unlink()
    assert pair_problems(py, ipynb) == [f"missing {stem}.ipynb"]


@pytest.mark.standard_promotion
@pytest.mark.parametrize("stem", STEMS)
def test_notebook_executes(stem, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    for name, value in SMALL.get(stem, {}).items():
        monkeypatch.setenv(name, value)
    nb = jupytext.read(NOTEBOOK_DIR / f"{stem}.py")
    client = NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
