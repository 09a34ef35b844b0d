"""Online (blockwise PointCloud) Newton solvers equal the dense ones: potentials, plan,
gradients against finite differences, in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subjax import ot, testing

SOLVERS = {
    "newton": ot.sinkhorn_newton,
    "sns": lambda C, **kw: ot.sparse_newton_sinkhorn(C, row_budget=6, **kw),
}


def _clouds(n=37, m=23, d=2, seed=0, dtype=jnp.float64):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d), dtype)
    y = jax.random.normal(ky, (m, d), dtype) + 0.5
    return x, y


def _weights(n, seed):
    w = np.random.default_rng(seed).uniform(0.5, 1.5, n)
    return jnp.asarray(w / w.sum())


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("cost", ["sqeuclidean", "euclidean"])
def test_online_equals_dense(x64, name, cost):
    x, y = _clouds()
    a, b = _weights(37, 1), _weights(23, 2)
    pc = ot.PointCloud(x, y, cost, block_size=8)
    assert pc.is_online
    kw = dict(a=a, b=b, epsilon=0.03, tol=1e-10)
    run = jax.jit(lambda geom: SOLVERS[name](geom, **kw))
    online, dense = run(pc), run(ot.cost_matrix(x, y, cost))
    assert bool(online.converged) and bool(dense.converged)
    assert float(online.error) <= 1e-10
    # the reported error is the marginal error recomputed from the potentials
    np.testing.assert_allclose(float(online.error), float(sum(online.marginal_errors())),
                               atol=1e-13)
    shift = online.f[0] - dense.f[0]
    np.testing.assert_allclose(online.f - shift, dense.f, atol=1e-8)
    np.testing.assert_allclose(online.g + shift, dense.g, atol=1e-8)
    np.testing.assert_allclose(online.plan(), dense.plan(), atol=1e-11)
    np.testing.assert_allclose(online.reg_ot_cost, dense.reg_ot_cost, rtol=1e-10)
    np.testing.assert_allclose(online.transport_cost, dense.transport_cost, rtol=1e-8)


def test_online_unbalanced_equals_dense(x64):
    x, y = _clouds(20, 15)
    a, b = 2 * _weights(20, 3), _weights(15, 4)
    kw = dict(a=a, b=b, epsilon=0.2, rho_a=0.5, rho_b=2.0, tol=1e-11)
    online = ot.sparse_newton_sinkhorn(ot.PointCloud(x, y, block_size=4), row_budget=4, **kw)
    dense = ot.sinkhorn(ot.cost_matrix(x, y), **kw)
    assert bool(online.converged) and bool(dense.converged)
    np.testing.assert_allclose(online.f, dense.f, atol=1e-9)
    np.testing.assert_allclose(online.g, dense.g, atol=1e-9)


def _fd(fun, x, d, h=1e-5):
    fun = jax.jit(fun)
    return (fun(x + h * d) - fun(x - h * d)) / (2 * h)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_online_gradients_match_finite_differences(x64, name):
    """Implicit differentiation of the online solvers never builds the plan and
    agrees with central differences and with the dense solver's gradient."""
    x, y = _clouds(15, 12)
    a, b = _weights(15, 5), _weights(12, 6)
    k1, k2 = jax.random.split(jax.random.key(7))
    w1 = jax.random.normal(k1, (15,), jnp.float64)
    w2 = jax.random.normal(k2, (12,), jnp.float64)
    w2 = w2 - w2.mean() + w1.sum() / 12  # gauge invariant: sum(w1) == sum(w2)

    def fun(x, online=True):
        geom = ot.PointCloud(x, y, block_size=4) if online else ot.cost_matrix(x, y)
        o = SOLVERS[name](geom, a=a, b=b, epsilon=0.1, tol=1e-13)
        return jnp.vdot(w1, o.f) + jnp.vdot(w2, o.g) + o.reg_ot_cost

    d = jax.random.normal(jax.random.key(8), x.shape, jnp.float64)
    g_online = jax.jit(jax.grad(fun))(x)
    np.testing.assert_allclose(jnp.vdot(g_online, d), _fd(fun, x, d), rtol=1e-6)
    g_dense = jax.jit(jax.grad(lambda x: fun(x, online=False)))(x)
    np.testing.assert_allclose(g_online, g_dense, atol=1e-8 * float(jnp.max(jnp.abs(g_dense))))


def test_online_never_builds_the_plan(x64):
    """The compiled online solve holds no n x m array (n, m prime, blocks of 8 rows)."""
    x, y = _clouds(211, 197)
    pc = ot.PointCloud(x, y, block_size=8)
    for solver in SOLVERS.values():
        hlo = jax.jit(lambda pc: solver(pc, epsilon=0.05, tol=1e-8).f).lower(pc).as_text()
        assert "211x197" not in hlo and "197x211" not in hlo
        hlo = jax.jit(jax.grad(
            lambda x: solver(ot.PointCloud(x, y, block_size=8), epsilon=0.05,
                             tol=1e-8).reg_ot_cost)).lower(x).as_text()
        assert "211x197" not in hlo and "197x211" not in hlo


def test_dense_newton_on_a_pointcloud_without_blocks_materialises(x64):
    x, y = _clouds()
    pc = ot.PointCloud(x, y)  # block_size=None: the whole matrix at once
    assert not pc.is_online
    out = ot.sinkhorn_newton(pc, epsilon=0.05, tol=1e-10)
    ref = ot.sinkhorn_newton(ot.cost_matrix(x, y), epsilon=0.05, tol=1e-10)
    np.testing.assert_allclose(out.f, ref.f, atol=1e-12)


def test_solve_auto_picks_and_solves(x64):
    x, y = _clouds(30, 23)
    pc = ot.PointCloud(x, y, block_size=8)
    kw = dict(epsilon=0.05, tol=1e-9)
    auto = ot.solve(pc, **kw)
    sns = ot.sparse_newton_sinkhorn(pc, **kw)
    assert bool(auto.converged) and float(auto.error) <= 1e-9
    np.testing.assert_array_equal(auto.f, sns.f)  # online: SNS
    C = ot.cost_matrix(x, y)
    auto = ot.solve(C, **kw)
    newton = ot.sinkhorn_newton(C, **kw)
    assert bool(auto.converged)
    np.testing.assert_array_equal(auto.f, newton.f)  # dense: Newton
    named = ot.solve(C, method="sinkhorn", **kw)
    np.testing.assert_array_equal(named.f, ot.sinkhorn(C, **kw).f)
    # the three agree on the solution
    np.testing.assert_allclose(named.reg_ot_cost, auto.reg_ot_cost, rtol=1e-9)
    with pytest.raises(ValueError, match="method"):
        ot.solve(C, method="lbfgs", **kw)


def test_column_passes_of_a_rectangular_cloud_stay_blockwise(x64):
    """With m < block_size < n the column passes still run in blocks (of as many
    entries as a block of rows), not on the whole transposed cost."""
    x, y = _clouds(211, 13)
    pc = ot.PointCloud(x, y, block_size=64)
    assert pc.is_online and pc.transpose().is_online
    for solver in (ot.sinkhorn, ot.sinkhorn_newton, ot.solve):
        hlo = jax.jit(lambda pc: solver(pc, epsilon=0.05, tol=1e-8).f).lower(pc).as_text()
        assert "211x13" not in hlo and "13x211" not in hlo


@pytest.mark.parametrize("m,k", [(1000, 16), (37, 6), (10, 10), (333, 3)])
def test_two_level_top_k_selects_the_largest_entries(m, k):
    from subjax.ot._newton import _top_k_indices

    q = jax.random.uniform(jax.random.key(m), (5, m))
    q = jnp.round(q * 40) / 40  # many ties
    idx = _top_k_indices(q, k)
    assert idx.shape == (5, k)
    assert all(len(set(row)) == k for row in np.asarray(idx).tolist())
    np.testing.assert_array_equal(jnp.take_along_axis(q, idx, axis=1), jax.lax.top_k(q, k)[0])


def test_sparse_operator_has_the_plans_marginals(x64):
    """SNS's operator (the top-k entries plus the missed mass as a rank-one term) is
    the plan ``P_k + r c^T / sum(r)``: exact marginals, adjoint products, a PSD
    Hessian whose null direction is the exact one's (1, -1)."""
    from subjax.ot._newton import _top_k_indices, sparse_operator

    n, m, k = 9, 7, 3
    P = jax.random.uniform(jax.random.key(3), (n, m), jnp.float64) ** 4
    idx = _top_k_indices(P, k)
    vals = jnp.take_along_axis(P, idx, axis=1)
    rows, cols = P.sum(1), P.sum(0)
    mv, rmv = sparse_operator(ot.Dense(P), vals, idx, m, rows, cols)
    Pk = jnp.zeros((n, m)).at[jnp.arange(n)[:, None], idx].set(vals)
    r, c = rows - Pk.sum(1), cols - Pk.sum(0)
    ref = Pk + jnp.outer(r, c) / r.sum()
    M = jax.vmap(mv, in_axes=1, out_axes=1)(jnp.eye(m))
    MT = jax.vmap(rmv, in_axes=1, out_axes=1)(jnp.eye(n))
    np.testing.assert_allclose(M, ref, atol=1e-15)
    np.testing.assert_allclose(MT, ref.T, atol=1e-15)
    np.testing.assert_allclose(mv(jnp.ones(m)), rows, rtol=1e-14)
    np.testing.assert_allclose(rmv(jnp.ones(n)), cols, rtol=1e-14)
    H = jnp.block([[jnp.diag(rows), M], [M.T, jnp.diag(cols)]])
    w = jnp.linalg.eigvalsh(H)
    assert float(w[0]) > -1e-14 and float(w[1]) > 1e-6  # one null direction
    np.testing.assert_allclose(H @ jnp.concatenate([jnp.ones(n), -jnp.ones(m)]), 0, atol=1e-14)


def test_fused_selection_equals_a_separate_pass(x64):
    """The pattern selected in the evaluation pass is the separate pass's."""
    from subjax.ot import _common as cm
    from subjax.ot._newton import Options, evaluate, sparsity_pattern

    x, y = _clouds(37, 23)
    prob = cm.Problem(ot.PointCloud(x, y, block_size=8), jnp.full(37, 1 / 37),
                      jnp.full(23, 1 / 23), jnp.asarray(0.05))
    f = jax.random.normal(jax.random.key(1), (37,), jnp.float64) * 0.1
    g = jax.random.normal(jax.random.key(2), (23,), jnp.float64) * 0.1
    opts = Options(sparse=True, materialize=False, budget=5, cg_max_iters=10, max_backtracks=5)
    pt, pattern = evaluate(prob, f, g, prob.epsilon, opts, select=True)
    plain = evaluate(prob, f, g, prob.epsilon, opts)
    np.testing.assert_array_equal(pattern, sparsity_pattern(prob, plain, prob.epsilon, 5))
    np.testing.assert_array_equal(pt.rows, plain.rows)
    np.testing.assert_array_equal(pt.cols, plain.cols)


def test_online_sns_with_a_poor_pattern_converges(x64):
    """One entry per row at small epsilon: the sparse steps are poor and online no
    exact step replaces them unless the line search fails; the run still meets a
    tight tolerance and matches the dense Newton solution."""
    x, y = _clouds()
    pc = ot.PointCloud(x, y, block_size=8)
    kw = dict(epsilon=0.01, tol=1e-10)
    out = ot.sparse_newton_sinkhorn(pc, row_budget=1, **kw)
    ref = ot.sinkhorn_newton(ot.cost_matrix(x, y), **kw)
    assert bool(out.converged) and float(out.error) <= 1e-10
    np.testing.assert_allclose(float(out.error), float(sum(out.marginal_errors())), atol=1e-13)
    np.testing.assert_allclose(out.reg_ot_cost, ref.reg_ot_cost, rtol=1e-10)


def test_float32_costs_and_plan_products_ask_for_full_precision():
    # On GPUs the default precision runs float32 products in TF32: an error of ~1e-3
    # in a cost divided by a small epsilon would pass for convergence error.
    x = jax.random.normal(jax.random.key(0), (40, 3))
    y = jax.random.normal(jax.random.key(1), (30, 3))
    pc = ot.PointCloud(x, y, block_size=8)
    eps = 0.05 * float(pc.mean_cost())
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for fn in (lambda x, y: ot.cost_matrix(x, y),
               lambda x, y: ot.sinkhorn_newton(ot.PointCloud(x, y, block_size=8),
                                               epsilon=eps, tol=1e-3).f,
               lambda x, y: ot.sinkhorn_newton(ot.cost_matrix(x, y), epsilon=eps,
                                               tol=1e-3).f):
        precisions = testing.matmul_precisions(fn, x, y)
        assert precisions and all(p == highest for p in precisions), precisions
