"""recycled_cg: deflated CG over a sequence of related SPD systems, against dense solves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subjax.linalg as sl


def _sequence(rng, n=200, steps=4):
    """SPD matrices sharing a few tiny eigenvalues (the ones CG struggles with)."""
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = np.concatenate([np.logspace(-4, -2, 6), np.linspace(0.1, 1.0, n - 6)])
    base = (u * d) @ u.T
    mats = []
    for _ in range(steps):
        e = rng.standard_normal((n, n)) * 1e-6 / np.sqrt(n)
        mats.append(base + (e + e.T) / 2)
    return mats, u[:, :6]


def test_recycled_cg_sequence_matches_dense_and_gets_faster(rng, x64):
    mats, low = _sequence(rng)
    solve = jax.jit(lambda a, b, w: sl.recycled_cg(a, b, w, n_store=48, tol=1e-10))
    w = None
    iters = []
    for i, a in enumerate(mats):
        a = jnp.asarray(a)
        b = jnp.asarray(rng.standard_normal(a.shape[0]))
        res = sl.recycled_cg(a, b, k=6, n_store=48, tol=1e-10) if w is None else solve(a, b, w)
        ref = np.linalg.solve(np.asarray(a), np.asarray(b))
        assert bool(res.converged), i
        np.testing.assert_allclose(res.x, ref, rtol=1e-7, atol=1e-7 * np.abs(ref).max())
        np.testing.assert_allclose(res.residual_norm, np.linalg.norm(b - a @ res.x), rtol=1e-6)
        q = np.asarray(res.recycle)
        np.testing.assert_allclose(q.T @ q, np.eye(6), atol=1e-8)
        iters.append(int(res.n_iters))
        w = res.recycle
    plain = sl.cg(jnp.asarray(mats[-1]), b, tol=1e-10)
    # the recycled space converges to the 6 smallest eigenvectors ...
    angles = sl.principal_angles(w, jnp.asarray(low))
    assert float(angles[-1]) < 1e-2
    # ... which removes them from CG's spectrum: far fewer iterations than plain CG
    assert iters[-1] <= 40 and iters[-1] < int(plain.n_iters) / 2
    assert iters[-1] < iters[0]


def test_recycled_cg_with_exact_eigenvectors_deflates_them(rng, x64):
    mats, low = _sequence(rng, steps=1)
    a = jnp.asarray(mats[0])
    b = jnp.asarray(rng.standard_normal(a.shape[0]))
    res = sl.recycled_cg(a, b, jnp.asarray(low), tol=1e-10)
    plain = sl.cg(a, b, tol=1e-10)
    assert bool(res.converged) and bool(plain.converged)
    np.testing.assert_allclose(res.x, plain.x, rtol=1e-6, atol=1e-6 * np.abs(plain.x).max())
    # the effective condition number drops from 1e4 to 10: CG's bound
    # 0.5 sqrt(kappa) ln(2 / tol) is then ~38 iterations, less than half plain CG's
    assert int(res.n_iters) <= 40 and int(res.n_iters) < int(plain.n_iters) / 2


def test_recycled_cg_not_converged_and_bad_input(rng):
    mats, _ = _sequence(rng, n=60, steps=1)
    a = jnp.asarray(mats[0], jnp.float32)
    b = jnp.ones(60, jnp.float32)
    capped = sl.recycled_cg(a, b, k=4, tol=1e-6, max_iters=3)
    assert not bool(capped.converged) and int(capped.n_iters) == 3
    with pytest.raises(ValueError, match="`tol`"):
        sl.recycled_cg(a, b, tol=0.0)
    with pytest.raises(ValueError, match="`recycle`"):
        sl.recycled_cg(a, b, jnp.ones((59, 3)))
    with pytest.raises(ValueError, match="`k`"):
        sl.recycled_cg(a, b, jnp.ones((60, 3)), k=4)
    with pytest.raises(ValueError, match="n_store"):
        sl.recycled_cg(a, b, k=20)
    with pytest.raises(ValueError, match="`a` must be square"):
        sl.recycled_cg(jnp.ones((60, 50)), b)


def _nonsymmetric_sequence(rng, n=160, steps=4, drift=1e-3):
    """Nonsymmetric matrices with ten small eigenvalues (restarted GMRES stalls on them)."""
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = np.concatenate([np.logspace(-3, -1, 10), np.linspace(0.5, 2.0, n - 10)])
    base = (q * d) @ q.T + 0.05 * np.triu(rng.standard_normal((n, n)), 1) / np.sqrt(n)
    return [base + drift * rng.standard_normal((n, n)) / np.sqrt(n) for _ in range(steps)]


def test_gcro_dr_sequence_matches_dense_and_beats_gmres(rng, x64):
    mats = _nonsymmetric_sequence(rng)
    solve = jax.jit(lambda a, b, u: sl.gcro_dr(a, b, u, restart=30, tol=1e-9, max_iters=2000))
    u, iters, plain = None, [], []
    for i, a in enumerate(mats):
        a = jnp.asarray(a)
        b = jnp.asarray(rng.standard_normal(a.shape[0]))
        res = (sl.gcro_dr(a, b, k=8, restart=30, tol=1e-9, max_iters=2000) if u is None
               else solve(a, b, u))
        ref = np.linalg.solve(np.asarray(a), np.asarray(b))
        assert bool(res.converged), i
        np.testing.assert_allclose(res.x, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        true = np.linalg.norm(b - a @ res.x)
        np.testing.assert_allclose(res.residual_norm, true, rtol=1e-6)
        assert true <= 1e-9 * np.linalg.norm(b)
        # the history is the per-step estimate, ending below tol after n_iters steps
        errs = np.asarray(res.errors)
        assert errs[int(res.n_iters) - 1] <= 1e-9 and np.all(errs[int(res.n_iters):] == -1)
        g = sl.gmres(a, b, restart=30, tol=1e-9, max_iters=600)
        true = float(jnp.linalg.norm(b - a @ g.x))
        assert bool(g.converged) == (true <= 1e-9 * float(jnp.linalg.norm(b)))
        iters.append(int(res.n_iters))
        plain.append(int(g.n_iters))
        u = res.recycle
    # the recycled space holds the slow part of the spectrum: once it is built, each
    # solve needs a fraction of the steps of restarted GMRES with the same basis size
    assert max(iters[1:]) < min(plain) / 3, (iters, plain)
    assert max(iters[1:]) < iters[0] / 2, iters
    full = sl.gmres(a, b, restart=a.shape[0], tol=1e-9)  # unrestarted: converges
    assert bool(full.converged) and int(full.n_iters) <= a.shape[0]
    np.testing.assert_allclose(full.x, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())


def test_gmres_matches_dense_float32_and_x0(rng):
    n = 40
    a = np.eye(n) * 3 + rng.standard_normal((n, n)) / np.sqrt(n)
    b = rng.standard_normal(n)
    ref = np.linalg.solve(a, b)
    res = sl.gmres(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), restart=10,
                   tol=1e-5)
    assert res.x.dtype == jnp.float32 and bool(res.converged)
    np.testing.assert_allclose(res.x, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # starting from the solution: no step
    warm = sl.gmres(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32),
                    x0=jnp.asarray(ref, jnp.float32), tol=1e-4)
    assert bool(warm.converged) and int(warm.n_iters) == 0


def test_gcro_dr_invariant_space_smaller_than_k(x64):
    # three distinct eigenvalues: the Krylov space is exhausted after three steps,
    # fewer than k = 5 directions exist; the recycle stays finite and usable
    n = 60
    a = jnp.diag(jnp.repeat(jnp.array([1.0, 2.0, 5.0]), n // 3))
    b = jnp.linspace(1.0, 2.0, n)
    res = sl.gcro_dr(a, b, k=5, restart=12, tol=1e-10)
    assert bool(res.converged) and int(res.n_iters) == 3
    assert bool(jnp.all(jnp.isfinite(res.recycle)))
    np.testing.assert_allclose(res.x, b / jnp.diag(a), rtol=1e-10)
    again = sl.gcro_dr(a, 2 * b, res.recycle, restart=12, tol=1e-10)
    assert bool(again.converged) and int(again.n_iters) <= 3
    np.testing.assert_allclose(again.x, 2 * b / jnp.diag(a), rtol=1e-9)


def test_gcro_dr_not_converged(rng):
    (a,) = _nonsymmetric_sequence(rng, n=60, steps=1)
    a = jnp.asarray(a, jnp.float32)
    b = jnp.ones(60, jnp.float32)
    capped = sl.gcro_dr(a, b, k=4, restart=10, tol=1e-6, max_iters=7)
    assert not bool(capped.converged) and int(capped.n_iters) == 7
    assert float(capped.residual_norm) > 1e-6 * float(jnp.linalg.norm(b))
    g = sl.gmres(a, b, restart=10, tol=1e-6, max_iters=5)
    assert not bool(g.converged) and int(g.n_iters) == 5


def test_gcro_dr_bad_input():
    a = jnp.eye(60, dtype=jnp.float32)
    b = jnp.ones(60, jnp.float32)
    with pytest.raises(ValueError, match="`tol`"):
        sl.gcro_dr(a, b, tol=0.0)
    with pytest.raises(ValueError, match="`recycle`"):
        sl.gcro_dr(a, b, jnp.ones((59, 3)))
    with pytest.raises(ValueError, match="`k`"):
        sl.gcro_dr(a, b, jnp.ones((60, 3)), k=4)
    with pytest.raises(ValueError, match="`k`=10 must be below `restart`"):
        sl.gcro_dr(a, b, k=10, restart=10)
    with pytest.raises(ValueError, match="`restart`"):
        sl.gmres(a, b, restart=0)
    with pytest.raises(ValueError, match="`a` must be square"):
        sl.gcro_dr(jnp.ones((60, 50)), b)
    with pytest.raises(ValueError, match="`b`"):
        sl.gmres(a, jnp.ones(59))
    with pytest.raises(ValueError, match="`a` contains NaN"):
        sl.gcro_dr(a.at[0, 0].set(jnp.nan), b)


def test_gcro_dr_jit_matches_eager_and_nan_under_jit_is_flagged(rng):
    (a,) = _nonsymmetric_sequence(rng, n=50, steps=1)
    a = jnp.asarray(a, jnp.float32)
    b = jnp.asarray(rng.standard_normal(50), jnp.float32)
    eager = sl.gcro_dr(a, b, k=4, restart=12, tol=1e-4)
    jitted = jax.jit(lambda a, b: sl.gcro_dr(a, b, k=4, restart=12, tol=1e-4))(a, b)
    assert int(jitted.n_iters) == int(eager.n_iters)
    np.testing.assert_allclose(jitted.x, eager.x, rtol=1e-4, atol=1e-5)
    shapes = jax.eval_shape(lambda a, b: sl.gcro_dr(a, b, k=4, restart=12), a, b)
    assert shapes.recycle.shape == (50, 4) and shapes.errors.shape == (500,)
    bad = jax.jit(lambda a, b: sl.gcro_dr(a, b, k=4, restart=12, tol=1e-4))(
        a.at[3, 3].set(jnp.nan), b)
    assert not bool(bad.converged)
