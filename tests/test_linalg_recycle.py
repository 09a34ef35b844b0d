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
