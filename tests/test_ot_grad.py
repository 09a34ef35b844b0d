"""Gradients of subjax.ot solutions (envelope theorem, implicit differentiation) vs
central finite differences in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subjax import ot

SOLVERS = {
    "sinkhorn": ot.sinkhorn,
    "newton": ot.sinkhorn_newton,
    "sns": lambda C, **kw: ot.sparse_newton_sinkhorn(C, row_budget=6, **kw),
}
KW = {"epsilon": 0.1, "tol": 1e-13}


def _fd(fun, x, direction, h=1e-5):
    fun = jax.jit(fun)
    return (fun(x + h * direction) - fun(x - h * direction)) / (2 * h)


def _problem(n=15, m=12, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, 2), jnp.float64)
    y = jax.random.normal(ky, (m, 2), jnp.float64) + 0.3
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.5, n)
    b = rng.uniform(0.5, 1.5, m)
    return x, y, jnp.asarray(a / a.sum()), jnp.asarray(b / b.sum())


@pytest.mark.parametrize("name", list(SOLVERS))
def test_reg_cost_grad_wrt_cost_is_plan(x64, name):
    x, y, a, b = _problem()
    C = ot.cost_matrix(x, y)
    fun = lambda C: SOLVERS[name](C, a=a, b=b, **KW).reg_ot_cost
    grad = jax.jit(jax.grad(fun))(C)
    np.testing.assert_allclose(grad, SOLVERS[name](C, a=a, b=b, **KW).plan(), atol=1e-10)
    d = jax.random.normal(jax.random.key(3), C.shape, jnp.float64)
    np.testing.assert_allclose(jnp.vdot(grad, d), _fd(fun, C, d), rtol=1e-6)


@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean", "l1"])
def test_reg_cost_grad_wrt_points(x64, cost):
    x, y, a, b = _problem()

    def fun(x):
        return ot.sinkhorn(ot.cost_matrix(x, y, cost), a=a, b=b, **KW).reg_ot_cost

    def fun_pc(x):
        return ot.sinkhorn(ot.PointCloud(x, y, cost, block_size=4), a=a, b=b, **KW).reg_ot_cost

    d = jax.random.normal(jax.random.key(4), x.shape, jnp.float64)
    fd = _fd(fun, x, d)
    np.testing.assert_allclose(jnp.vdot(jax.jit(jax.grad(fun))(x), d), fd, rtol=1e-6)
    np.testing.assert_allclose(jnp.vdot(jax.jit(jax.grad(fun_pc))(x), d), fd, rtol=1e-6)


def test_reg_cost_grad_wrt_marginals_and_eps(x64):
    x, y, a, b = _problem()
    C = ot.cost_matrix(x, y)
    # mass-preserving perturbation directions (the balanced problem needs equal mass)
    da = jax.random.normal(jax.random.key(5), a.shape, jnp.float64)
    da = da - da.mean()
    fun_a = lambda a: ot.sinkhorn_newton(C, a=a, b=b, **KW).reg_ot_cost
    np.testing.assert_allclose(jnp.vdot(jax.jit(jax.grad(fun_a))(a), da), _fd(fun_a, a, da),
                               rtol=1e-6)
    fun_e = lambda e: ot.sinkhorn(C, a=a, b=b, epsilon=e, tol=1e-13).reg_ot_cost
    np.testing.assert_allclose(jax.jit(jax.grad(fun_e))(0.1), _fd(fun_e, 0.1, 1.0), rtol=1e-6)


@pytest.mark.parametrize("name", [
    "sinkhorn",
    pytest.param("newton", marks=pytest.mark.slow),
    pytest.param("sns", marks=pytest.mark.slow),
])
def test_implicit_grad_of_potentials(x64, name):
    """A gauge-invariant functional of (f, g): w1.f + w2.g with sum(w1) == sum(w2)."""
    x, y, a, b = _problem()
    C = ot.cost_matrix(x, y)
    k1, k2 = jax.random.split(jax.random.key(6))
    w1 = jax.random.normal(k1, (15,), jnp.float64)
    w2 = jax.random.normal(k2, (12,), jnp.float64)
    w2 = w2 - w2.mean() + w1.sum() / 12

    def fun(C, a):
        o = SOLVERS[name](C, a=a, b=b, **KW)
        return jnp.vdot(w1, o.f) + jnp.vdot(w2, o.g)

    dC = jax.random.normal(jax.random.key(7), C.shape, jnp.float64)
    gC, ga = jax.jit(jax.grad(fun, argnums=(0, 1)))(C, a)
    fun = jax.jit(fun)
    np.testing.assert_allclose(jnp.vdot(gC, dC), _fd(lambda C: fun(C, a), C, dC), rtol=1e-5)
    da = jax.random.normal(jax.random.key(8), a.shape, jnp.float64)
    da = da - da.mean()
    np.testing.assert_allclose(jnp.vdot(ga, da), _fd(lambda a: fun(C, a), a, da), rtol=1e-5)


def test_unbalanced_grads(x64):
    x, y, a, b = _problem()

    def fun(x, a):
        o = ot.sinkhorn(ot.cost_matrix(x, y), a=a, b=b, epsilon=0.2, rho_a=0.5, rho_b=2.0,
                        tol=1e-13)
        return o.reg_ot_cost + jnp.sum(o.f**2)

    dx = jax.random.normal(jax.random.key(9), x.shape, jnp.float64)
    da = jax.random.normal(jax.random.key(10), a.shape, jnp.float64)  # any direction
    gx, ga = jax.jit(jax.grad(fun, argnums=(0, 1)))(x, a)
    fun = jax.jit(fun)
    np.testing.assert_allclose(jnp.vdot(gx, dx), _fd(lambda x: fun(x, a), x, dx), rtol=1e-6)
    np.testing.assert_allclose(jnp.vdot(ga, da), _fd(lambda a: fun(x, a), a, da), rtol=1e-6)


def test_grad_under_vmap_and_jit(x64):
    x, y, a, b = _problem()
    xs = jnp.stack([x, x + 0.1, x - 0.2])
    fun = lambda x: ot.sinkhorn_newton(ot.cost_matrix(x, y), a=a, b=b, **KW).reg_ot_cost
    g_b = jax.jit(jax.vmap(jax.grad(fun)))(xs)
    g1 = jax.jit(jax.grad(fun))
    for i in range(3):
        np.testing.assert_allclose(g_b[i], g1(xs[i]), atol=1e-9)
