"""Text check run by `make lint`: the repository speaks only of the software.

Fails (exit status 1, one line per finding) when a file under README.md, docs/,
subjax/, tests/, notebooks/ or experiments/ contains

* a reference to a tracker item of this project: ``issue 12``, ``issues/12``,
  ``pull request 3``, ``ticket 4`` or a bare ``#12``;
* a path outside the repository: an absolute path into a home or scratch
  directory (``/home/...``, ``/Users/...``, ``/root/...``, ``/work/...``,
  ``/tmp/...``) or a relative ``../`` path that leaves the repository or names
  nothing in it (paths under ``results/``, which runs create, are allowed).

Work in other projects is cited by its full URL
(``https://github.com/ott-jax/ott/issues/504``): URLs are removed from a line
before it is checked, so a URL may contain anything.

Usage: python .ci/check_text.py [PATH ...]   (default: the paths above). Its
tests are in tests/test_check_text.py.
"""

from __future__ import annotations

import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_PATHS = ("README.md", "docs", "subjax", "tests", "notebooks", "experiments")
SUFFIXES = {".py", ".md", ".ipynb", ".txt", ".toml", ".json", ".yaml", ".yml", ".cfg",
            ".sh", ".rst", ".csv"}
SKIP_DIRS = {"__pycache__", ".ipynb_checkpoints", ".pytest_cache", ".ruff_cache"}

URL = re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s<>()\"'`\]]+", re.IGNORECASE)
TRACKER = [
    (re.compile(r"\b(?:issue|pull request|ticket)s?[\s#-]*\d+", re.IGNORECASE),
     "tracker item"),
    (re.compile(r"\b(?:issues|pull)/\d+", re.IGNORECASE), "tracker item"),
    (re.compile(r"(?<![\w&#/])#\d{1,5}(?![\w])"), "tracker number"),
]
ABSOLUTE = re.compile(r"(?<![\w.~-])(?:/home|/Users|/root|/work|/tmp)(?=/|\b)")
WINDOWS_HOME = re.compile(r"\b[A-Za-z]:\\Users\\", re.IGNORECASE)
GENERATED = ("results",)  # top-level directories that runs create (git-ignored)
RELATIVE = re.compile(r"(?<![\w.])((?:\.\./)+)([\w./-]*)")


def line_problems(line: str, directory: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    """Findings in one line of a file that lives in ``directory``."""
    text = URL.sub(" ", line)
    found = []
    for pattern, what in TRACKER:
        found += [f"{what} {m.group(0).strip()!r}" for m in pattern.finditer(text)]
    found += [f"path outside the repository {m.group(0)!r}" for m in ABSOLUTE.finditer(text)]
    found += [f"path outside the repository {m.group(0)!r}"
              for m in WINDOWS_HOME.finditer(text)]
    for m in RELATIVE.finditer(text):
        target = (directory / m.group(0)).resolve()
        if not target.is_relative_to(root.resolve()):
            found.append(f"path outside the repository {m.group(0)!r}")
        elif not target.exists() and (
                target.relative_to(root.resolve()).parts[:1] not in {(g,) for g in GENERATED}):
            found.append(f"relative path to nothing in the repository {m.group(0)!r}")
    return found


def file_problems(path: pathlib.Path, root: pathlib.Path = ROOT) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return []
    name = path.relative_to(root) if path.is_relative_to(root) else path
    return [f"{name}:{i}: {problem}"
            for i, line in enumerate(text.splitlines(), start=1)
            for problem in line_problems(line, path.parent, root)]


def files_under(paths, root: pathlib.Path = ROOT):
    for p in paths:
        p = (root / p) if not pathlib.Path(p).is_absolute() else pathlib.Path(p)
        if p.is_file():
            yield p
        elif p.is_dir():
            for f in sorted(p.rglob("*")):
                if (f.is_file() and f.suffix in SUFFIXES
                        and not SKIP_DIRS.intersection(f.relative_to(p).parts)):
                    yield f


def main(argv: list[str]) -> int:
    problems = [msg for f in files_under(argv or DEFAULT_PATHS) for msg in file_problems(f)]
    for msg in problems:
        print(msg)
    if problems:
        print(f"{len(problems)} finding(s): the repository speaks only of the software "
              "(cite other projects' issues by full URL)", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
