"""Matrix products in subjax's numerics run at full precision.

On GPUs and TPUs JAX's default precision runs a float32 product in TF32 or bfloat16
passes (about three significant digits). These tests trace the public entry points on
float32 inputs and assert that every ``dot_general`` they trace is ``HIGHEST``. On a
CPU the precision changes no result, so the jaxpr is what can be checked here.
"""

from __future__ import annotations

import importlib
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subjax.fisher
import subjax.linalg
import subjax.manifolds
import subjax.nn
import subjax.optim
import subjax.ot
import subjax.parallel
from subjax import linalg, manifolds, ot, testing

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
KEY = jax.random.key(0)


def _assert_highest(fn, *args, require=True):
    precisions = testing.matmul_precisions(fn, *args)
    assert precisions or not require, "expected the computation to contain matrix products"
    low = [p for p in precisions if p != HIGHEST]
    assert not low, f"{len(low)} of {len(precisions)} products below HIGHEST: {set(low)}"


def _spd(n):
    x = jax.random.normal(KEY, (n, n))
    return x @ x.T / n + jnp.eye(n)


@pytest.mark.parametrize("name", [
    "randomized_svd", "randomized_eigh", "randomized_eigh_psd", "lanczos_eigh",
    "subspace_iteration", "cg", "gmres", *[f"orth_{m}" for m in linalg.ORTH_METHODS]])
def test_linalg_products_run_at_full_precision(name):
    a = jax.random.normal(KEY, (60, 40))
    s = _spd(40)
    b = jnp.ones(40)
    calls = {
        "randomized_svd": (lambda a: linalg.randomized_svd(a, 5, key=KEY).s, a),
        "randomized_eigh": (lambda s: linalg.randomized_eigh(s, 5, key=KEY).eigenvalues, s),
        "randomized_eigh_psd": (lambda s: linalg.randomized_eigh(
            s, 5, key=KEY, psd=True).eigenvalues, s),
        "lanczos_eigh": (lambda s: linalg.lanczos_eigh(s, 3, key=KEY).eigenvalues, s),
        "subspace_iteration": (lambda a: linalg.subspace_iteration(
            a, jnp.eye(60, 4)).s, a),
        "cg": (lambda s: linalg.cg(s, b).x, s),
        "gmres": (lambda s: linalg.gmres(s, b).x, s),
    }
    for m in linalg.ORTH_METHODS:
        calls[f"orth_{m}"] = (lambda a, m=m: linalg.orthonormalize(a, m), a)
    fn, arg = calls[name]
    _assert_highest(fn, arg, require=name != "orth_householder")  # LAPACK, no products


@pytest.mark.parametrize("manifold", [
    manifolds.Stiefel(12, 4), manifolds.Grassmann(12, 4), manifolds.SPD(5)],
    ids=lambda m: type(m).__name__)
def test_manifold_operations_run_at_full_precision(manifold):
    x = manifold.random_point(KEY)
    u = manifold.random_tangent(jax.random.key(1), x)
    def ops(x, u):
        return (manifold.check(x), manifold.retract(x, u), manifold.proj(x, 2 * u),
                manifold.inner(x, u, u), manifold.project_point(x + u))

    _assert_highest(ops, x, u)


@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn_newton", "sparse_newton_sinkhorn"])
@pytest.mark.parametrize("online", [False, True], ids=["dense", "online"])
def test_ot_solvers_run_at_full_precision(solver, online):
    x = jax.random.normal(KEY, (30, 3))
    y = jax.random.normal(jax.random.key(1), (25, 3))

    def solve(x, y):
        geom = ot.PointCloud(x, y, block_size=8) if online else ot.cost_matrix(x, y)
        return getattr(ot, solver)(geom, epsilon=0.5, tol=1e-3).f

    _assert_highest(solve, x, y)


def _optimizer_cases():
    cases = []
    for path in sorted(pathlib.Path(__file__).parent.glob("optim_cases_*.py")):
        cases += importlib.import_module(path.stem).CASES
    return cases


@pytest.mark.standard_promotion  # optax's bias correction is not strict-clean
@pytest.mark.parametrize("case", _optimizer_cases(), ids=lambda c: c.name)
def test_optimizer_transforms_run_at_full_precision(case):
    testing.check_full_precision(case)


@pytest.mark.standard_promotion
def test_check_full_precision_fails_a_default_precision_transform():
    import optax

    def update(g, state, params=None):
        return jax.tree.map(lambda w: jnp.outer(w, w) @ w, jax.tree.map(jnp.ravel, g)), state

    case = testing.TransformCase(
        "plain", lambda learning_rate: optax.GradientTransformation(
            lambda p: optax.EmptyState(), update), {"learning_rate": 0.1})
    with pytest.raises(AssertionError, match="below HIGHEST"):
        testing.check_full_precision(case)


# The training-step helpers run the user's model as the user configured it.
PARALLEL_USER_CODE = {"FSDPShardings", "axis_size", "check_axis", "data_parallel",
                      "fsdp_shardings", "fsdp_spec", "fsdp_step", "initialize",
                      "replicate", "shard_batch", "train_step"}


@pytest.mark.parametrize("family", [subjax.linalg, subjax.ot, subjax.fisher, subjax.optim,
                                    subjax.nn, subjax.parallel], ids=lambda m: m.__name__)
def test_every_exported_function_is_wrapped(family):
    for name in family.__all__:
        obj = getattr(family, name)
        if not callable(obj) or isinstance(obj, type):
            continue
        wrapped = getattr(obj, "_full_precision", False)
        if family is subjax.parallel and name in PARALLEL_USER_CODE:
            assert not wrapped, name
        else:
            assert wrapped, f"{family.__name__}.{name} is not run at full precision"


def test_sharded_randomized_svd_runs_at_full_precision():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    a = jax.random.normal(KEY, (40, 30))
    _assert_highest(lambda a: subjax.parallel.sharded_randomized_svd(
        a, 4, key=KEY, mesh=mesh).s, a)


@pytest.mark.parametrize("solver", ["sinkhorn", "sinkhorn_newton", "sparse_newton_sinkhorn"])
@pytest.mark.parametrize("online", [False, True], ids=["dense", "online"])
def test_ot_gradients_run_at_full_precision(solver, online):
    # the implicit backward pass is traced after the forward call returned
    x = jax.random.normal(KEY, (30, 3))
    y = jax.random.normal(jax.random.key(1), (25, 3))

    def loss(x):
        geom = ot.PointCloud(x, y, block_size=8) if online else ot.cost_matrix(x, y)
        res = getattr(ot, solver)(geom, epsilon=0.5, tol=1e-3)
        return jnp.sum(res.f ** 2) + res.reg_ot_cost

    _assert_highest(jax.grad(loss), x)


def test_lanczos_and_cg_gradients_run_at_full_precision():
    a = _spd(40)
    b = jnp.ones(40)
    _assert_highest(jax.grad(lambda a: jnp.sum(
        linalg.lanczos_eigh(a, 2, key=KEY).eigenvectors ** 3)), a)
    _assert_highest(jax.grad(lambda a: jnp.sum(linalg.cg(a, b).x)), a)


def test_a_returned_product_function_runs_at_full_precision():
    # make_fvp returns v -> F v, traced later on the caller's schedule
    w = jax.random.normal(KEY, (5, 3))
    x = jax.random.normal(jax.random.key(1), (8, 5))
    fvp = subjax.fisher.make_fvp(lambda p, x: x @ p, w, x)
    assert getattr(fvp, "_full_precision", False)
    _assert_highest(fvp, jnp.ones_like(w))
