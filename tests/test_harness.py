"""The experiment harness: resume after SIGKILL, corrupt-checkpoint fallback, CLI errors."""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time
import types

import pytest

from experiments import harness

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _subprocess_cli(args, results):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "experiments", *args, "--results", str(results), "--no-progress"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def _cli(args, results):
    """``python -m experiments ARGS`` run in this process (its exit status and stderr).

    The same ``main`` the command line calls; running it in-process saves a fresh
    interpreter and jax import per call. The SIGKILL test and
    ``test_command_line_exit_status`` use a real subprocess.
    """
    from experiments.__main__ import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main([*args, "--results", str(results), "--no-progress"])
        except SystemExit as exit_:  # argparse errors
            code = exit_.code
    return types.SimpleNamespace(returncode=code, stderr=err.getvalue())


def _popen(args, results):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "experiments", *args, "--results", str(results), "--no-progress"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _strip_times(history):
    return [{k: v for k, v in row.items() if "time" not in k} for row in history]


def _load(results, mode="quick"):
    return json.loads((results / "demo" / mode / "results.json").read_text())


def _ckpt_steps(results, mode="quick"):
    dirs = list((results / "demo" / mode).glob("checkpoints-*"))
    if not dirs:
        return []
    return sorted(int(p.name) for p in dirs[0].iterdir() if p.name.isdigit()
                  and (p / harness._MANIFEST).exists())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted quick run of the demo."""
    res = tmp_path_factory.mktemp("ref")
    proc = _cli(["run", "demo", "--quick"], res)
    assert proc.returncode == 0, proc.stderr
    payload = _load(res)
    assert payload["resumed_from"] == 0
    return payload


def test_demo_reaches_closed_form(reference):
    r = reference["results"]
    assert r["final_rel_error"] < 1e-2
    assert abs(r["final_loss"] - r["optimal_loss"]) <= 1e-3 * max(r["optimal_loss"], 1e-12) + 1e-6


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, reference):
    proc = _popen(["run", "demo", "--quick", "--throttle", "0.25"], tmp_path)
    deadline = time.time() + 120
    while time.time() < deadline and not [s for s in _ckpt_steps(tmp_path) if s >= 6]:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "demo" / "quick" / "results.json").exists()
    killed_at = max(_ckpt_steps(tmp_path))
    assert killed_at < reference["config"]["steps"]

    again = _cli(["run", "demo", "--quick"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed from checkpoint at step" in again.stderr
    payload = _load(tmp_path)
    assert payload["resumed_from"] >= 6
    assert payload["results"] == reference["results"]
    assert _strip_times(payload["history"]) == _strip_times(reference["history"])


def test_truncated_latest_checkpoint_falls_back_to_previous(tmp_path, reference):
    stop = _cli(["run", "demo", "--quick", "--stop-after", "8"], tmp_path)
    assert stop.returncode == 0, stop.stderr
    steps = _ckpt_steps(tmp_path)
    assert steps[-1] == 8 and 6 in steps
    latest = next((tmp_path / "demo" / "quick").glob("checkpoints-*")) / "8"
    victims = [p for p in latest.rglob("*") if p.is_file() and p.name != harness._MANIFEST
               and p.stat().st_size > 0]
    assert victims
    for p in victims:  # truncate every data file of the latest checkpoint
        with open(p, "r+b") as fh:
            fh.truncate(p.stat().st_size // 2)

    again = _cli(["run", "demo", "--quick"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "checkpoint at step 8 is corrupt or partial" in again.stderr
    assert "resumed from checkpoint at step 6" in again.stderr
    payload = _load(tmp_path)
    assert payload["resumed_from"] == 6
    assert payload["results"] == reference["results"]


def test_missing_manifest_counts_as_partial(tmp_path, reference):
    assert _cli(["run", "demo", "--quick", "--stop-after", "4"], tmp_path).returncode == 0
    latest = next((tmp_path / "demo" / "quick").glob("checkpoints-*")) / "4"
    (latest / harness._MANIFEST).unlink()
    again = _cli(["run", "demo", "--quick"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert "integrity manifest is missing" in again.stderr
    assert _load(tmp_path)["results"] == reference["results"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no-such-experiment"], "unknown experiment 'no-such-experiment'"),
        (["run", "demo", "--set", "bogus=1"], "unknown config key 'bogus'"),
        (["run", "demo", "--set", "steps=many"], "bad value 'many' for config key 'steps'"),
        (["run", "demo", "--set", "n=3"], "n=3 must be >= d=40"),
        (["run", "demo", "--set", "noise=nan"], "bad value 'nan' for config key 'noise'"),
        (["run", "demo", "--set", "steps"], "--set expects key=value"),
    ],
)
def test_bad_cli_input_exits_nonzero_and_writes_nothing(tmp_path, args, message):
    results = tmp_path / "results"
    proc = _cli(args, results)
    assert proc.returncode != 0
    assert message in proc.stderr
    assert not results.exists(), "bad input must not write into results/"


def test_command_line_exit_status(tmp_path):
    """The real command line: a bad argument exits non-zero with the message on stderr."""
    results = tmp_path / "results"
    proc = _subprocess_cli(["run", "demo", "--set", "bogus=1"], results)
    assert proc.returncode != 0
    assert "unknown config key 'bogus'" in proc.stderr
    assert not results.exists()


def test_config_parsing_types():
    exp = harness.get_experiment("demo")
    cfg = harness.make_config(exp, "quick", {"noise": "0.5", "steps": "7"})
    assert cfg.noise == 0.5 and cfg.steps == 7
    full = harness.make_config(exp, "full")
    assert full.steps == exp.full["steps"]
    with pytest.raises(harness.ConfigError, match="mode must be one of"):
        harness.make_config(exp, "medium")


def test_reproduce_writes_report(tmp_path, monkeypatch):
    """`reproduce` over a registry holding only the demo writes REPORT.md with table + plot."""
    demo = harness.get_experiment("demo")
    monkeypatch.setattr(harness, "discover", lambda: {"demo": demo})
    monkeypatch.setattr(harness, "BROKEN", {})
    from experiments.__main__ import main

    assert main(["reproduce", "--quick", "--results", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    lines = report.splitlines()
    assert lines[2] == "| " + " | ".join(harness.CLAIM_COLUMNS) + " |"  # the report opens with it
    assert lines[4].startswith(f"| demo | {demo.title} |  |  | no computed verdict")
    assert "![relative error vs iteration](demo/quick/convergence.png)" in report
    assert (tmp_path / "demo" / "quick" / "convergence.png").stat().st_size > 1000
