"""The shared optimizer conformance suite: every check of :mod:`subjax.testing`
on every registered case (``tests/optim_cases_*.py``).

The checks: extra keyword arguments, jit vs eager, ``init`` on abstract
parameters, ``optax.inject_hyperparams``, ``optax.MultiSteps``, state stability
under ``lax.cond``, learning-rate schedules, convergence (alone and after
clipping), orbax round trip, ``optax.tree_map_params``, ``nnx.Optimizer`` under
``nnx.jit``, complex parameters, and dtype preservation per dtype.
"""

import glob
import importlib.util
import os

import jax.numpy as jnp
import pytest

from subjax import testing

# optax's own transforms (adam's bias correction, MultiSteps) are not clean under
# strict dtype promotion, and every case runs inside them here.
pytestmark = pytest.mark.standard_promotion

_HERE = os.path.dirname(os.path.abspath(__file__))


def _discover():
    cases, xfail = [], {}
    for path in sorted(glob.glob(os.path.join(_HERE, "optim_cases_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cases.extend(mod.CASES)
        xfail.update(getattr(mod, "XFAIL", {}))
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), f"duplicate case names: {names}"
    return cases, xfail


CASES, XFAIL = _discover()
_SLOW = {"converges", "nnx", "orbax"}


def _param(case, check, *extra):
    marks = []
    reason = XFAIL.get((case.name, check))
    if reason is not None:
        marks.append(pytest.mark.xfail(strict=True, reason=reason))
    if check in _SLOW:
        marks.append(pytest.mark.slow)
    ident = "-".join([case.name, check] + [str(e) for e in extra])
    return pytest.param(case, check, *extra, marks=marks, id=ident)


@pytest.mark.parametrize(
    ("case", "check"), [_param(c, k) for c in CASES for k in testing.CHECKS]
)
def test_check(case, check):
    testing.CHECKS[check](case)


@pytest.mark.parametrize(
    ("case", "check", "dtype"),
    [_param(c, "dtype", jnp.dtype(d).name) for c in CASES for d in c.dtypes],
)
def test_dtype_preserved(case, check, dtype):
    del check
    testing.check_dtype_preserved(case, dtype)
