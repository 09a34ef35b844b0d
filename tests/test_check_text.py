"""The repository text check (`.ci/check_text.py`, run by `make lint`).

The strings under test are assembled from pieces so that this file, which the
check also reads, does not contain the patterns it bans.
"""

import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_text", ROOT / ".ci" / "check_text.py")
check_text = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_text)

ISSUE = "iss" + "ue"
HASH = "#"
SLASH = "/"
UP = "." + "./"


def problems(line, directory=ROOT / "docs"):
    return check_text.line_problems(line, directory, ROOT)


@pytest.mark.parametrize("line", [
    f"See {ISSUE} 7 for the targets.",
    f"as asked in {ISSUE.capitalize()}s 12",
    f"fixed in {ISSUE}-8",
    f"notes in docs/notes/{ISSUE}3.md",
    f"the linked {ISSUE}s{SLASH}12 thread",
    f"closes {HASH}3",
    f"(see {HASH}12)",
    f"pull request {HASH}41",
])
def test_tracker_references_are_found(line):
    assert any("tracker" in p for p in problems(line))


@pytest.mark.parametrize("line", [
    f"Read {SLASH}work{SLASH}shared/DESIGN.md first",
    f"scratch files in {SLASH}tmp{SLASH}run1",
    f"cd {SLASH}home{SLASH}me/subjax",
    f"open {SLASH}Users{SLASH}me/subjax",
    "C:" + "\\" + "Users" + "\\" + "me",
    f"Read {UP}{UP}shared/PAPERS.md",         # leaves the repository from docs/
    f"Read {UP}shared/PAPERS.md",             # inside the tree, but nothing is there
])
def test_paths_outside_the_repository_are_found(line):
    assert any("path" in p for p in problems(line))


@pytest.mark.parametrize("line", [
    # other projects' trackers, cited by full URL
    f"ott-jax: https://github.com/ott-jax/ott/{ISSUE}s/504",
    f"<https://github.com/google/jax/pull/123{HASH}discussion>",
    # code and prose that only look similar
    f"x = a{HASH}1 if False else 0",
    "color='" + HASH + "1f77b4'",
    f"An {ISSUE} with this approach is the cost of a top-k.",
    "import matplotlib  # 3 plots",
    "[README](../README.md)",                 # a relative link that stays inside
    "figure: ../results/gcr/quick/plot.png",  # run outputs (git-ignored) are allowed
    "from ..linalg import cg",
    "x = jnp.zeros((n,)) / 2",
])
def test_clean_lines_pass(line):
    assert problems(line) == []


def test_file_report_names_file_and_line(tmp_path):
    (tmp_path / "a.md").write_text(f"fine\nsee {ISSUE} 4\n")
    out = check_text.file_problems(tmp_path / "a.md", tmp_path)
    assert len(out) == 1 and out[0].startswith("a.md:2: tracker item")

