"""Shared pytest fixtures and helpers for subjax.

Fixtures
--------
- ``x64``: run the test body with ``jax_enable_x64`` on (float64 arrays available).
- ``key``: a fresh ``jax.random`` key (seed 0); ``rng``: a seeded numpy Generator.
- strict dtype promotion is on for every test (autouse). A test that calls into
  third-party code which is not strict-clean (optax, flax internals) opts out with
  ``@pytest.mark.standard_promotion``.

Helpers
-------
- ``slow_tests.txt`` lists tests measured at more than a few seconds of CPU on a
  2-core machine (mostly compilation); they get the ``slow`` marker at collection,
  so ``make test`` skips them and ``make test-all`` runs them. A listed id that no
  longer exists is an error.
- :func:`run_on_fake_devices` runs a Python snippet in a subprocess that sees
  ``n`` fake CPU devices (``XLA_FLAGS`` must be set before JAX starts).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "standard_promotion: run with jax_numpy_dtype_promotion='standard' "
        "(third-party code under test is not strict-clean)",
    )


def _listed_slow_tests():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "slow_tests.txt")
    with open(path, encoding="utf-8") as fh:
        lines = (line.split("#", 1)[0].strip() for line in fh)
        return [line for line in lines if line]


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects
def pytest_collection_modifyitems(config, items):
    listed = _listed_slow_tests()
    used = set()
    for item in items:
        base = item.nodeid.split("[", 1)[0]
        for entry in listed:
            if item.nodeid == entry or base == entry:
                item.add_marker(pytest.mark.slow)
                used.add(entry)
    collected_files = {item.nodeid.split("::", 1)[0] for item in items}
    stale = [e for e in listed if e not in used and e.split("::", 1)[0] in collected_files]
    whole_files = not any("::" in str(arg) for arg in config.args)
    if stale and whole_files:
        raise pytest.UsageError("tests/slow_tests.txt lists tests that do not exist: "
                                + ", ".join(stale))


@pytest.fixture(autouse=True)
def _strict_promotion(request):
    if request.node.get_closest_marker("standard_promotion") is not None:
        yield
        return
    with jax.numpy_dtype_promotion("strict"):
        yield


@pytest.fixture
def x64():
    """Enable float64 for the duration of the test."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def key():
    return jax.random.key(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def run_on_fake_devices(code: str, n: int = 8, timeout: float = 600.0) -> str:
    """Run ``code`` in a fresh Python process that sees ``n`` fake CPU devices.

    The snippet should ``assert`` what it checks and may ``print`` results;
    its stdout is returned. A non-zero exit fails the calling test with the
    subprocess's stderr.
    """
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}"
    ).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"fake-device subprocess failed (exit {proc.returncode}):\n"
            f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


@pytest.fixture
def fake_devices():
    """Fixture form of :func:`run_on_fake_devices`."""
    return run_on_fake_devices
