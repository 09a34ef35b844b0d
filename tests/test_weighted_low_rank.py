"""Weighted low-rank approximation (subjax.linalg) and Fisher-weighted SVD (subjax.fisher)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subjax.fisher import diag_empirical, fisher_weighted_svd
from subjax.linalg import weighted_low_rank


def _problem(seed, m=9, n=6, dtype=np.float64):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n)).astype(dtype)
    p = rng.uniform(0.1, 5.0, m).astype(dtype)
    q = rng.uniform(0.1, 5.0, n).astype(dtype)
    return a, p, q


def _werr(a, x, p=None, q=None):
    p = np.ones(a.shape[0]) if p is None else np.asarray(p)
    q = np.ones(a.shape[1]) if q is None else np.asarray(q)
    return float(np.sqrt(np.sum(p[:, None] * q[None, :] * (np.asarray(a) - np.asarray(x)) ** 2)))


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_unweighted_is_truncated_svd(x64, rank):
    a, _, _ = _problem(0)
    out = weighted_low_rank(jnp.asarray(a), rank)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    ref = (u[:, :rank] * s[:rank]) @ vt[:rank]
    np.testing.assert_allclose(np.asarray(out.left @ out.right), ref, atol=1e-12)
    np.testing.assert_allclose(np.asarray(out.s), s, rtol=1e-12)
    np.testing.assert_allclose(float(out.error), np.sqrt(np.sum(s[rank:] ** 2)), atol=1e-12)
    assert out.left.shape == (9, rank) and out.right.shape == (rank, 6)


@pytest.mark.parametrize("sides", ["rows", "cols", "both"])
def test_matches_the_analytic_weighted_solution(x64, sides):
    a, p, q = _problem(1)
    p = p if sides in ("rows", "both") else None
    q = q if sides in ("cols", "both") else None
    out = weighted_low_rank(jnp.asarray(a), 2, row_weights=p, col_weights=q)
    dp = np.sqrt(np.ones(9) if p is None else p)
    dq = np.sqrt(np.ones(6) if q is None else q)
    u, s, vt = np.linalg.svd(dp[:, None] * a * dq[None, :], full_matrices=False)
    ref = ((u[:, :2] * s[:2]) @ vt[:2]) / dp[:, None] / dq[None, :]
    x = np.asarray(out.left @ out.right)
    np.testing.assert_allclose(x, ref, atol=1e-12)
    assert np.linalg.matrix_rank(x, tol=1e-9) == 2
    # the reported error is the weighted error of the returned approximation
    np.testing.assert_allclose(float(out.error), _werr(a, x, p, q), rtol=1e-12)


def test_weighted_optimum_beats_every_other_rank_r_candidate(x64):
    a, p, q = _problem(2)
    out = weighted_low_rank(jnp.asarray(a), 2, row_weights=p, col_weights=q)
    best = float(out.error)
    u, s, vt = np.linalg.svd(a, full_matrices=False)
    plain = (u[:, :2] * s[:2]) @ vt[:2]
    assert _werr(a, plain, p, q) > best + 1e-6  # the unweighted SVD is worse here
    rng = np.random.default_rng(0)
    x = np.asarray(out.left @ out.right)
    for _ in range(50):  # rank-2 perturbations of the optimum never improve it
        left = np.asarray(out.left) + 1e-2 * rng.standard_normal((9, 2))
        right = np.asarray(out.right) + 1e-2 * rng.standard_normal((2, 6))
        assert _werr(a, left @ right, p, q) >= best - 1e-12
    # stationarity: the gradient of the weighted objective in both factors vanishes
    w = p[:, None] * q[None, :]

    def obj(lr):
        lf, rf = lr
        return jnp.sum(w * (a - lf @ rf) ** 2)

    g = jax.grad(obj)((out.left, out.right))
    assert max(float(jnp.max(jnp.abs(t))) for t in g) < 1e-10
    assert np.isclose(_werr(a, x, p, q), best)


def test_alternating_least_squares_reaches_the_same_optimum(x64):
    a, p, _ = _problem(3)
    out = weighted_low_rank(jnp.asarray(a), 2, row_weights=p)
    rng = np.random.default_rng(1)
    right = rng.standard_normal((2, 6))
    for _ in range(500):  # row-weighted ALS: left rows by least squares, right by weighted LS
        left = a @ np.linalg.pinv(right)
        sw = np.sqrt(p)[:, None]
        right = np.linalg.lstsq(sw * left, sw * a, rcond=None)[0]
    np.testing.assert_allclose(_werr(a, left @ right, p), float(out.error), rtol=1e-8)


def test_scale_invariance_and_heavy_row_is_fit_exactly(x64):
    a, p, q = _problem(4)
    x1 = weighted_low_rank(jnp.asarray(a), 2, row_weights=p, col_weights=q)
    x2 = weighted_low_rank(jnp.asarray(a), 2, row_weights=7.0 * p, col_weights=0.5 * q)
    np.testing.assert_allclose(np.asarray(x1.left @ x1.right), np.asarray(x2.left @ x2.right),
                               atol=1e-12)
    heavy = np.ones(9)
    heavy[[2, 5]] = 1e8
    x = np.asarray(weighted_low_rank(jnp.asarray(a), 2, row_weights=heavy).left
                   @ weighted_low_rank(jnp.asarray(a), 2, row_weights=heavy).right)
    np.testing.assert_allclose(x[[2, 5]], a[[2, 5]], atol=1e-6)


def test_float32_jit_vmap_eval_shape():
    a, p, _ = _problem(5, dtype=np.float32)
    f = jax.jit(lambda a, p: weighted_low_rank(a, 3, row_weights=p))
    out = f(jnp.asarray(a), jnp.asarray(p))
    assert out.left.dtype == jnp.float32 and out.error.dtype == jnp.float32
    with jax.enable_x64(True):
        ref = weighted_low_rank(jnp.asarray(a, jnp.float64), 3,
                                row_weights=p.astype(np.float64))
        ref = np.asarray(ref.left @ ref.right)
    np.testing.assert_allclose(np.asarray(out.left @ out.right), ref, atol=1e-4)
    batch = jnp.stack([jnp.asarray(a), 2 * jnp.asarray(a)])
    vm = jax.vmap(lambda b: weighted_low_rank(b, 3, row_weights=p))(batch)
    np.testing.assert_allclose(np.asarray(vm.left[1] @ vm.right[1]),
                               2 * np.asarray(out.left @ out.right), rtol=1e-4, atol=1e-4)
    shapes = jax.eval_shape(lambda b: weighted_low_rank(b, 3), jnp.asarray(a))
    assert shapes.left.shape == (9, 3) and shapes.s.shape == (6,)


def test_bad_arguments(x64):
    a, p, _ = _problem(6)
    with pytest.raises(ValueError, match="rank"):
        weighted_low_rank(a, 7)
    with pytest.raises(ValueError, match="rank"):
        weighted_low_rank(a, 0)
    with pytest.raises(ValueError, match="row_weights"):
        weighted_low_rank(a, 2, row_weights=np.zeros(9))
    with pytest.raises(ValueError, match="col_weights"):
        weighted_low_rank(a, 2, col_weights=np.ones(5))
    with pytest.raises(ValueError, match="`a`"):
        weighted_low_rank(a[0], 1)
    with pytest.raises(TypeError, match="`a`"):
        weighted_low_rank(np.ones((3, 3), np.int32), 1)


def _mlp(params, x):
    return jnp.tanh(x @ params["w"]) @ params["v"]


@pytest.mark.parametrize("axis", [0, 1])
def test_fisher_weighted_svd_uses_fisher_line_sums(x64, axis):
    rng = np.random.default_rng(7)
    params = {"w": jnp.asarray(rng.standard_normal((5, 8)) / 2),
              "v": jnp.asarray(rng.standard_normal((8, 3)))}
    x = jnp.asarray(rng.standard_normal((40, 5)))
    y = jnp.asarray(rng.integers(0, 3, 40))
    f = diag_empirical(_mlp, params, x, y)["w"]
    out = fisher_weighted_svd(params["w"], f, 2, axis=axis)
    imp = np.asarray(f).sum(axis=1 - axis)
    kw = {"row_weights": imp} if axis == 0 else {"col_weights": imp}
    ref = weighted_low_rank(params["w"], 2, **kw)
    np.testing.assert_allclose(np.asarray(out.left @ out.right),
                               np.asarray(ref.left @ ref.right), atol=1e-12)
    # worse plain reconstruction, better Fisher-weighted reconstruction than the SVD
    plain = weighted_low_rank(params["w"], 2)
    x_f, x_s = np.asarray(out.left @ out.right), np.asarray(plain.left @ plain.right)
    w = np.asarray(params["w"])
    assert np.linalg.norm(w - x_f) >= np.linalg.norm(w - x_s) - 1e-12
    wr = imp[:, None] if axis == 0 else imp[None, :]
    assert np.sum(wr * (w - x_f) ** 2) <= np.sum(wr * (w - x_s) ** 2) + 1e-12


def test_fisher_weighted_svd_floor_and_checks(x64):
    w = jnp.asarray(np.random.default_rng(8).standard_normal((4, 3)))
    f = jnp.zeros((4, 3)).at[0].set(1.0)  # rows 1..3 never reached by the data
    out = fisher_weighted_svd(w, f, 1, floor=1e-3)
    imp = np.array([3.0, 0.0, 0.0, 0.0])
    imp = np.maximum(imp, 1e-3 * imp.mean())
    ref = weighted_low_rank(w, 1, row_weights=imp)
    np.testing.assert_allclose(np.asarray(out.left @ out.right),
                               np.asarray(ref.left @ ref.right), atol=1e-12)
    # importance ratio 4000: the important row is fit to about 1/4000 of the others' error
    row_err = np.abs(np.asarray(out.left @ out.right) - np.asarray(w)).max(axis=1)
    assert row_err[0] < 1e-3 * row_err[1:].max()
    uniform = fisher_weighted_svd(w, jnp.zeros((4, 3)), 1)  # no information: the plain SVD
    plain = weighted_low_rank(w, 1)
    np.testing.assert_allclose(np.asarray(uniform.left @ uniform.right),
                               np.asarray(plain.left @ plain.right), atol=1e-12)
    with pytest.raises(ValueError, match="fisher"):
        fisher_weighted_svd(w, jnp.ones((3, 4)), 1)
    with pytest.raises(ValueError, match="axis"):
        fisher_weighted_svd(w, f, 1, axis=2)
    with pytest.raises(ValueError, match="floor"):
        fisher_weighted_svd(w, f, 1, floor=-1.0)
