"""subjax.linalg: conjugate gradients, subspace geometry, rank selection."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

import subjax.linalg as sl


def _spd(rng, n, cond=100.0):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * np.logspace(0, np.log10(cond), n)) @ q.T


# ------------------------------------------------------------------------------ cg


def test_cg_solves_and_reports(rng, x64):
    a = _spd(rng, 60)
    b = rng.standard_normal(60)
    res = sl.cg(jnp.asarray(a), jnp.asarray(b), tol=1e-10, max_iters=300)
    assert bool(res.converged)
    np.testing.assert_allclose(np.asarray(res.x), np.linalg.solve(a, b), rtol=1e-8, atol=1e-10)
    it = int(res.n_iters)
    assert 0 < it <= 300
    e = np.asarray(res.errors)
    assert e.shape == (300,) and np.all(e[:it] >= 0) and np.all(e[it:] == -1)
    assert e[it - 1] <= 1e-10 and float(res.residual_norm) <= 1e-10 * np.linalg.norm(b)
    true_res = np.linalg.norm(b - a @ np.asarray(res.x))
    assert true_res <= 1e-9 * np.linalg.norm(b)


def test_cg_preconditioner_and_operators(rng):
    n = 200
    d = np.logspace(0, 4, n)  # diagonal-dominated, badly conditioned
    off = rng.standard_normal((n, n)) * 0.01
    a = (np.diag(d) + off @ off.T).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    plain = sl.cg(jnp.asarray(a), jnp.asarray(b), tol=1e-5, max_iters=400)
    jac = sl.cg(jnp.asarray(a), jnp.asarray(b), tol=1e-5, max_iters=400,
                m=jnp.asarray(1.0 / np.diag(a)))
    assert bool(jac.converged)
    assert int(jac.n_iters) < int(plain.n_iters) / 3
    x_ref = np.linalg.solve(a.astype(np.float64), b)
    np.testing.assert_allclose(np.asarray(jac.x), x_ref, rtol=1e-3, atol=1e-6)
    # the same system as BCOO, LinearOperator and a plain callable
    aj = jnp.asarray(a)
    for op in (jsparse.BCOO.fromdense(aj),
               sl.LinearOperator((n, n), jnp.float32, matvec=lambda x: aj @ x, symmetric=True),
               lambda x: aj @ x):
        r = sl.cg(op, jnp.asarray(b), tol=1e-5, max_iters=400, m=lambda r: r / jnp.diag(aj))
        assert bool(r.converged)
        np.testing.assert_allclose(np.asarray(r.x), x_ref, rtol=1e-3, atol=1e-6)


def test_cg_not_spd_or_capped_is_not_converged(rng):
    a = np.diag(np.concatenate([np.ones(5), -np.ones(5)])).astype(np.float32)
    b = np.ones(10, np.float32)
    res = sl.cg(jnp.asarray(a), jnp.asarray(b), tol=1e-6)
    assert not bool(res.converged)
    assert np.all(np.isfinite(np.asarray(res.x)))
    capped = sl.cg(jnp.asarray(_spd(rng, 50, 1e4), jnp.float32), jnp.ones(50), max_iters=3,
                   tol=1e-8)
    assert not bool(capped.converged) and int(capped.n_iters) == 3


def test_cg_implicit_gradients_match_finite_differences(rng, x64):
    n = 30
    a = jnp.asarray(_spd(rng, n, 20.0))
    b = jnp.asarray(rng.standard_normal(n))
    c = jnp.asarray(rng.standard_normal(n))

    def loss(a, b):
        return jnp.vdot(c, sl.cg(a, b, tol=1e-13).x)

    ga, gb = jax.grad(loss, argnums=(0, 1))(a, b)
    x = np.linalg.solve(np.asarray(a), np.asarray(b))
    lam = np.linalg.solve(np.asarray(a), np.asarray(c))
    np.testing.assert_allclose(np.asarray(gb), lam, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(ga), -np.outer(lam, x), rtol=1e-7, atol=1e-12)
    eps = 1e-6
    for seed in range(2):
        r = np.random.default_rng(seed)
        da = r.standard_normal((n, n))
        da = jnp.asarray(da + da.T)
        db = jnp.asarray(r.standard_normal(n))
        fd = (loss(a + eps * da, b + eps * db) - loss(a - eps * da, b - eps * db)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.vdot(ga, da) + jnp.vdot(gb, db)), float(fd),
                                   rtol=1e-6)
    # gradient through a matrix-free operator's closed-over parameter
    d = jnp.asarray(np.linspace(1.0, 3.0, n))

    def loss_d(d):
        return jnp.vdot(c, sl.cg(lambda x: d * x + 0.1 * x, b, tol=1e-13).x)

    gd = jax.grad(loss_d)(d)
    np.testing.assert_allclose(np.asarray(gd), -np.asarray(c * b) / np.asarray(d + 0.1) ** 2,
                               rtol=1e-8)


def test_cg_jit_vmap(rng):
    a = jnp.asarray(_spd(rng, 20, 10.0), jnp.float32)
    bs = jnp.asarray(rng.standard_normal((4, 20)), jnp.float32)
    xs = jax.jit(jax.vmap(lambda b: sl.cg(a, b, tol=1e-6).x))(bs)
    np.testing.assert_allclose(np.asarray(xs), np.linalg.solve(np.asarray(a), np.asarray(bs).T).T,
                               rtol=1e-3, atol=1e-5)


def test_cg_bad_input():
    with pytest.raises(ValueError, match="`b`"):
        sl.cg(jnp.eye(3), jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="`a` must be square"):
        sl.cg(jnp.ones((3, 4)), jnp.ones(3))
    with pytest.raises(ValueError, match="`a`.*incompatible"):
        sl.cg(jnp.eye(4), jnp.ones(3))
    with pytest.raises(ValueError, match="`x0`"):
        sl.cg(jnp.eye(3), jnp.ones(3), x0=jnp.ones(2))
    with pytest.raises(ValueError, match="`m`"):
        sl.cg(jnp.eye(3), jnp.ones(3), m=jnp.ones(2))
    with pytest.raises(TypeError, match="`a`"):
        sl.cg("eye", jnp.ones(3))
    with pytest.raises(ValueError, match="max_iters"):
        sl.cg(jnp.eye(3), jnp.ones(3), max_iters=0)


# ------------------------------------------------------------------------ geometry


def _with_angles(rng, n, theta):
    """Two orthonormal bases with prescribed principal angles."""
    k = len(theta)
    q, _ = np.linalg.qr(rng.standard_normal((n, 2 * k)))
    e1, e2 = q[:, :k], q[:, k:]
    return e1, e1 * np.cos(theta) + e2 * np.sin(theta)


def test_principal_angles_and_distances(rng, x64):
    theta = np.array([1e-9, 1e-4, 0.3, 1.2, np.pi / 2])
    q1, q2 = _with_angles(rng, 40, theta)
    ang = np.asarray(sl.principal_angles(jnp.asarray(q1), jnp.asarray(q2)))
    # small angles resolved to full relative accuracy (the cosine alone cannot)
    np.testing.assert_allclose(ang, theta, rtol=1e-6)
    # invariant to the choice of bases
    r, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    ang2 = sl.principal_angles(jnp.asarray(q1 @ r), jnp.asarray(q2 * 3.0), orthonormal=False)
    np.testing.assert_allclose(np.asarray(ang2), theta, rtol=1e-6, atol=1e-8)
    p1, p2 = q1 @ q1.T, q2 @ q2.T
    d = {m: float(sl.subspace_distance(jnp.asarray(q1), jnp.asarray(q2), metric=m))
         for m in ("projection", "chordal", "geodesic")}
    np.testing.assert_allclose(d["projection"], np.linalg.norm(p1 - p2, 2), rtol=1e-8)
    np.testing.assert_allclose(d["chordal"], np.linalg.norm(p1 - p2) / np.sqrt(2), rtol=1e-8)
    np.testing.assert_allclose(d["geodesic"], np.linalg.norm(theta), rtol=1e-8)


def test_principal_angles_unequal_dims_batched_f32(rng):
    q, _ = np.linalg.qr(rng.standard_normal((30, 6)))
    big, small = q[:, :6], q[:, 2:4]  # small subspace inside big one
    ang = sl.principal_angles(jnp.asarray(big, jnp.float32), jnp.asarray(small, jnp.float32))
    assert ang.shape == (2,) and ang.dtype == jnp.float32
    assert float(jnp.max(ang)) < 1e-3
    batch = jnp.asarray(np.stack(_with_angles(rng, 20, np.array([0.1, 0.5]))), jnp.float32)
    out = jax.jit(jax.vmap(sl.principal_angles))(batch, batch[::-1])
    np.testing.assert_allclose(np.asarray(out), [[0.1, 0.5]] * 2, atol=1e-5)


def test_projections_and_residual_norms(rng):
    q, _ = np.linalg.qr(rng.standard_normal((12, 3)))
    q = jnp.asarray(q, jnp.float32)
    x = jnp.asarray(rng.standard_normal((12, 5)), jnp.float32)
    p = sl.project(x, q)
    c = sl.project_complement(x, q)
    np.testing.assert_allclose(np.asarray(p + c), np.asarray(x), atol=1e-6)
    np.testing.assert_allclose(np.asarray(q.T @ c), 0.0, atol=1e-5)  # orthogonal to span
    np.testing.assert_allclose(np.asarray(sl.project(p, q)), np.asarray(p), atol=1e-5)  # idempotent
    r = sl.residual_norms(x, q)
    np.testing.assert_allclose(np.asarray(r), np.linalg.norm(np.asarray(c), axis=0), rtol=1e-5)
    rr = sl.residual_norms(x, q, relative=True)
    np.testing.assert_allclose(np.asarray(rr), np.asarray(r) / np.linalg.norm(np.asarray(x),
                               axis=0), rtol=1e-5)
    assert float(sl.residual_norms(x[:, 0], q)) == pytest.approx(float(r[0]), rel=1e-5)


def test_geometry_bad_input():
    with pytest.raises(ValueError, match="same number of rows"):
        sl.principal_angles(jnp.ones((4, 2)), jnp.ones((5, 2)))
    with pytest.raises(ValueError, match="equal dimension"):
        sl.subspace_distance(jnp.eye(4)[:, :2], jnp.eye(4)[:, :3])
    with pytest.raises(ValueError, match="metric"):
        sl.subspace_distance(jnp.eye(4)[:, :2], jnp.eye(4)[:, :2], metric="frobenius")
    with pytest.raises(TypeError, match="same dtype"):
        sl.principal_angles(jnp.eye(4)[:, :2], jnp.eye(4, dtype=jnp.bfloat16)[:, :2])
    with pytest.raises(ValueError, match="rows"):
        sl.project(jnp.ones(5), jnp.eye(4)[:, :2])


# ---------------------------------------------------------------- rank selection


def test_energy_and_normalized_rank():
    s = jnp.array([4.0, 2.0, 1.0, 0.5, 0.0])
    e = np.cumsum(np.asarray(s) ** 2) / np.sum(np.asarray(s) ** 2)  # .753, .941, .988, 1, 1
    assert int(sl.energy_rank(s, 0.75)) == 1
    assert int(sl.energy_rank(s, 0.9)) == 2
    assert int(sl.energy_rank(s, 0.98)) == 3
    assert int(sl.energy_rank(s, 0.99)) == 4
    assert int(sl.energy_rank(s, 1.0)) == 4
    assert int(sl.energy_rank(s, float(e[1]))) == 2  # exactly at the boundary
    assert int(sl.energy_rank(jnp.zeros(3))) == 0
    batch = jnp.stack([s, s * 2.0])
    np.testing.assert_array_equal(np.asarray(jax.jit(sl.energy_rank)(batch, 0.9)), [2, 2])
    assert int(sl.normalized_spectrum_rank(s, 0.25)) == 3
    assert int(sl.normalized_spectrum_rank(s, 0.2)) == 3
    assert int(sl.normalized_spectrum_rank(s, 1.0)) == 1
    with pytest.raises(ValueError, match="threshold"):
        sl.energy_rank(s, 1.5)
    with pytest.raises(ValueError, match="`s`"):
        sl.energy_rank(jnp.zeros(0))


def test_marchenko_pastur_median_against_sampling():
    rng = np.random.default_rng(0)
    for beta in (0.25, 1.0):
        m, n = int(2000 * beta), 2000
        z = rng.standard_normal((m, n))
        emp = np.median(np.linalg.eigvalsh(z @ z.T / n))
        assert sl.marchenko_pastur_median(beta) == pytest.approx(emp, rel=2e-2)
    # independent reference: adaptive quadrature of the density up to the median
    from scipy import integrate

    for beta in (0.1, 0.5, 1.0):
        lo, hi = (1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2
        med = sl.marchenko_pastur_median(beta)
        dens = lambda t: np.sqrt(max((hi - t) * (t - lo), 0.0)) / (2 * np.pi * beta * t)
        mass, _ = integrate.quad(dens, lo, med, limit=200)
        assert mass == pytest.approx(0.5, abs=1e-4)


@pytest.mark.parametrize("estimate", [True, False])
def test_marchenko_pastur_rank_recovers_planted_rank(estimate):
    rng = np.random.default_rng(1)
    m, n, r, sigma = 300, 150, 4, 0.5
    signal = (rng.standard_normal((m, r)) * np.array([8.0, 6.0, 5.0, 4.0])) @ (
        rng.standard_normal((r, n)) / np.sqrt(n))
    # each planted value sits well above the edge sigma (sqrt m + sqrt n) ~= 14.8
    y = signal * np.sqrt(n) / 2 + sigma * rng.standard_normal((m, n))
    s = jnp.asarray(np.linalg.svd(y, compute_uv=False), jnp.float32)
    out = sl.marchenko_pastur_rank(s, (m, n), sigma=None if estimate else sigma)
    assert int(out) == r
    # pure noise: nothing above the edge
    s0 = jnp.asarray(np.linalg.svd(sigma * rng.standard_normal((m, n)), compute_uv=False),
                     jnp.float32)
    # pure noise: its top value sits at the edge up to Tracy–Widom fluctuations of relative
    # size ~ n^(-2/3); a 5% margin clears them, the bare edge lets at most a couple through.
    sig = None if estimate else sigma
    assert int(sl.marchenko_pastur_rank(s0, (m, n), sigma=sig, margin=1.05)) == 0
    assert int(sl.marchenko_pastur_rank(s0, (m, n), sigma=sig)) <= 2
    with pytest.raises(ValueError, match="sigma"):
        sl.marchenko_pastur_rank(s[:10], (m, n))
    with pytest.raises(ValueError, match="`s`"):
        sl.marchenko_pastur_rank(s, (100, 100))
