"""subjax.linalg: randomized SVD / eigh, subspace iteration, block Lanczos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

import subjax.linalg as sl


def _known_spectrum(rng, m, n, s, dtype=np.float64):
    u, _ = np.linalg.qr(rng.standard_normal((m, len(s))))
    v, _ = np.linalg.qr(rng.standard_normal((n, len(s))))
    return ((u * s) @ v.T).astype(dtype), u, np.asarray(s), v


def _max_angle(q1, q2):
    return float(sl.principal_angles(jnp.asarray(q1), jnp.asarray(q2))[-1])


def _orth_err(q):
    q = np.asarray(q, np.float64)
    return np.abs(q.T @ q - np.eye(q.shape[1])).max()


SPECTRA = {
    "fast": lambda p: np.exp(-np.arange(p) / 4.0),  # sigma_30 / sigma_1 ~ 1e-3
    "slow": lambda p: 1.0 / np.arange(1, p + 1),  # sigma_{k+1}/sigma_k -> 1
}


@pytest.mark.parametrize("decay", ["fast", "slow"])
@pytest.mark.parametrize("method", ["block_krylov", "subspace"])
def test_randomized_svd_matches_dense_svd(decay, method, rng, x64):
    m, n, rank = 300, 200, 10
    a, u, s, v = _known_spectrum(rng, m, n, SPECTRA[decay](n))
    res = sl.randomized_svd(jnp.asarray(a), rank, key=jax.random.key(0), method=method)
    assert res.u.shape == (m, rank) and res.s.shape == (rank,) and res.vt.shape == (rank, n)
    assert bool(res.converged)
    assert _orth_err(res.u) < 1e-12 and _orth_err(res.vt.T) < 1e-12
    rel = np.abs(np.asarray(res.s) / s[:rank] - 1)
    if decay == "fast" or method == "block_krylov":
        assert rel.max() < 1e-8
        assert _max_angle(res.u[:, :5], u[:, :5]) < 1e-5
        assert _max_angle(res.vt.T[:, :5], v[:, :5]) < 1e-5
    else:
        # Power iteration on a slowly decaying spectrum: accurate but not exact —
        # and clearly worse than block Krylov on the same products.
        assert rel.max() < 3e-2
        bk = sl.randomized_svd(jnp.asarray(a), rank, key=jax.random.key(0))
        assert np.abs(np.asarray(bk.s) / s[:rank] - 1).max() < 0.1 * rel.max()
    # Eckart–Young: the rank-k approximation error is close to the optimum.
    err = np.linalg.norm(a - np.asarray(res.u * res.s) @ np.asarray(res.vt), 2)
    assert err <= s[rank] * (1.05 if decay == "slow" else 1 + 1e-6)


def test_randomized_svd_float32_accuracy_and_dtype(rng):
    a, _, s, _ = _known_spectrum(rng, 256, 256, SPECTRA["slow"](256), np.float32)
    res = jax.jit(lambda a: sl.randomized_svd(a, 16, key=jax.random.key(1)))(jnp.asarray(a))
    assert res.s.dtype == jnp.float32 and res.u.dtype == jnp.float32
    assert np.abs(np.asarray(res.s) / s[:16] - 1).max() < 1e-4
    assert _orth_err(res.u) < 1e-5 and _orth_err(res.vt.T) < 1e-5


def test_randomized_svd_vmap_sparse_and_operator(rng):
    mats = np.stack([_known_spectrum(rng, 60, 40, SPECTRA["fast"](40), np.float32)[0]
                     for _ in range(3)])
    f = jax.jit(jax.vmap(lambda a: sl.randomized_svd(a, 4, key=jax.random.key(0)).s))
    s_batch = np.asarray(f(jnp.asarray(mats)))
    ref = np.linalg.svd(mats, compute_uv=False)[:, :4]
    np.testing.assert_allclose(s_batch, ref, rtol=1e-4)
    a = jnp.asarray(mats[0])
    sp = jsparse.BCOO.fromdense(a)
    op = sl.LinearOperator(a.shape, a.dtype, matvec=lambda x: a @ x, rmatvec=lambda y: a.T @ y)
    for arg in (sp, op):
        s = sl.randomized_svd(arg, 4, key=jax.random.key(0)).s
        np.testing.assert_allclose(np.asarray(s), ref[0], rtol=1e-4)


def test_randomized_svd_rank_deficient_is_finite(rng):
    a = (rng.standard_normal((80, 3)) @ rng.standard_normal((3, 60))).astype(np.float32)
    res = sl.randomized_svd(jnp.asarray(a), 5, key=jax.random.key(0))
    assert bool(res.converged)
    assert np.all(np.isfinite(np.asarray(res.u))) and np.all(np.isfinite(np.asarray(res.vt)))
    np.testing.assert_allclose(res.s[:3], np.linalg.svd(a, compute_uv=False)[:3], rtol=1e-4)
    assert np.all(np.asarray(res.s[3:]) < 1e-4 * float(res.s[0]))
    assert _orth_err(res.u) < 1e-4


def test_randomized_svd_exactly_low_rank_structure():
    # Only 3 non-zero rows: every block after the first is exactly rank deficient,
    # the Krylov space is exhausted at once; the fallback keeps the basis orthonormal.
    a = jnp.diag(jnp.concatenate([jnp.arange(3.0, 0.0, -1.0), jnp.zeros(97)]))
    res = sl.randomized_svd(a, 5, key=jax.random.key(0))
    np.testing.assert_allclose(np.asarray(res.s), [3.0, 2.0, 1.0, 0.0, 0.0], atol=1e-5)
    assert _orth_err(res.u) < 1e-5 and _orth_err(res.vt.T) < 1e-5
    zero = sl.randomized_svd(jnp.zeros((50, 40)), 3, key=jax.random.key(0))
    assert bool(zero.converged) and np.all(np.asarray(zero.s) == 0.0)
    assert _orth_err(zero.u) < 1e-5


def test_default_oversample_fills_whole_panels_and_fits(rng):
    from subjax.linalg._validate import check_rank, default_oversample

    for r in range(1, 80):
        p = default_oversample(r)
        assert 8 <= p < 16 and (r + p) % 8 == 0
    assert check_rank(32, (1024, 1024), "a", None) == (32, 8)
    assert check_rank(15, (256, 20), "a", None) == (15, 5)  # lowered to fit
    a = jnp.asarray(rng.standard_normal((64, 20)), jnp.float32)
    key = jax.random.key(0)
    np.testing.assert_array_equal(sl.randomized_svd(a, 15, key=key).s,
                                  sl.randomized_svd(a, 15, key=key, oversample=5).s)
    sym = a.T @ a
    np.testing.assert_array_equal(sl.randomized_eigh(sym, 15, key=key).eigenvalues,
                                  sl.randomized_eigh(sym, 15, key=key, oversample=5).eigenvalues)


def test_randomized_eigh_exhausted_krylov_space():
    # the second Krylov block has rank 3 < 16: CholeskyQR alone fails on it, the
    # fallbacks give exact values and orthonormal vectors
    n = 100
    a = jnp.diag(jnp.concatenate([jnp.array([3.0, -2.0, 1.0]), jnp.zeros(n - 3)]))
    res = sl.randomized_eigh(a, 5, key=jax.random.key(0), oversample=11)
    np.testing.assert_allclose(np.asarray(res.eigenvalues)[:3], [3.0, -2.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(np.asarray(res.eigenvalues)[3:], 0.0, atol=1e-5)
    assert _orth_err(res.eigenvectors) < 1e-5 and bool(res.converged)


def test_randomized_svd_grad_matches_finite_differences(rng, x64):
    a, _, _, _ = _known_spectrum(rng, 40, 30, SPECTRA["fast"](30))
    a = jnp.asarray(a + 1e-3 * rng.standard_normal(a.shape))
    w = jnp.asarray(rng.standard_normal(4))

    def f(a):
        return jnp.vdot(w, sl.randomized_svd(a, 4, key=jax.random.key(3), oversample=6).s)

    g = jax.grad(f)(a)
    assert np.all(np.isfinite(np.asarray(g)))
    for seed in range(2):
        d = jnp.asarray(np.random.default_rng(seed).standard_normal(a.shape))
        eps = 1e-6
        fd = (f(a + eps * d) - f(a - eps * d)) / (2 * eps)
        np.testing.assert_allclose(float(jnp.vdot(g, d)), float(fd), rtol=1e-6)
    # and the gradient is the analytic one of the exact singular values: sum w_i u_i v_i^T.
    u, _, vt = np.linalg.svd(np.asarray(a))
    exact = (u[:, :4] * np.asarray(w)) @ vt[:4]
    np.testing.assert_allclose(np.asarray(g), exact, atol=1e-6)


def test_randomized_svd_bad_input(rng):
    a = jnp.ones((32, 40))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"rank=40 exceeds min\(m, n\)=32 for argument `a`"):
        sl.randomized_svd(a, 40, key=key)
    with pytest.raises(ValueError, match="oversample"):
        sl.randomized_svd(a, 30, key=key, oversample=10)
    with pytest.raises(TypeError, match="`key`"):
        sl.randomized_svd(a, 3, key=None)
    with pytest.raises(TypeError, match="`rank`"):
        sl.randomized_svd(a, 3.5, key=key)
    with pytest.raises(ValueError, match="`a`.*2-D"):
        sl.randomized_svd(jnp.ones(5), 1, key=key)
    with pytest.raises(ValueError, match="method"):
        sl.randomized_svd(a, 3, key=key, method="lanczos")
    bad = np.asarray(rng.standard_normal((20, 20)), np.float32)
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="`a` contains NaN or inf"):
        sl.randomized_svd(jnp.asarray(bad), 3, key=key)
    # Under jit the check cannot raise; the result reports it.
    res = jax.jit(lambda a: sl.randomized_svd(a, 3, key=key))(jnp.asarray(bad))
    assert not bool(res.converged)


# ----------------------------------------------------------- range finder, subspace iteration


def test_orth_robust_block_at_rounding_level_outside_basis(rng):
    """A Krylov block of a quickly decaying spectrum: almost all of it in span(K), the
    parts outside graded from 1e-1 down to float32 rounding level (two projected
    CholeskyQR passes do not suffice here). The result is orthonormal, orthogonal to
    K, and q r is the part of y outside span(K)."""
    from subjax.linalg._orth import orth_robust

    kmat, _ = np.linalg.qr(rng.standard_normal((300, 40)))
    outside = np.logspace(-1, -8, 10) * rng.standard_normal((300, 10))
    y = kmat @ rng.standard_normal((40, 10)) + outside
    k32, y32 = jnp.asarray(kmat, jnp.float32), jnp.asarray(y, jnp.float32)
    q, r = jax.jit(orth_robust)(y32, k32)
    q64, r64, k64 = (np.asarray(x, np.float64) for x in (q, r, k32))
    assert _orth_err(q64) < 1e-5
    assert np.abs(k64.T @ q64).max() < 1e-5
    y64 = np.asarray(y32, np.float64)
    outside = y64 - k64 @ (k64.T @ y64)
    assert np.linalg.norm(outside - q64 @ r64) < 1e-5 * np.linalg.norm(y64)


def test_range_finder_captures_range(rng):
    a, u, s, _ = _known_spectrum(rng, 120, 90, SPECTRA["fast"](90), np.float32)
    q = sl.randomized_range_finder(jnp.asarray(a), 20, key=jax.random.key(0), n_steps=2)
    assert q.shape == (120, 20) and _orth_err(q) < 1e-5
    resid = np.linalg.norm(a - np.asarray(q) @ (np.asarray(q).T @ a), 2)
    assert resid < 2.0 * s[20]
    with pytest.raises(ValueError, match="size"):
        sl.randomized_range_finder(jnp.asarray(a), 91, key=jax.random.key(0))


def test_subspace_iteration_warm_start_converges_faster(rng, x64):
    n, k = 150, 5
    s = np.concatenate([np.linspace(2.0, 1.5, k), 0.8 ** np.arange(1, n - k + 1)])
    a, u, _, v = _known_spectrum(rng, n, n, s)
    a = jnp.asarray(a)
    cold = sl.subspace_iteration(a, jnp.asarray(rng.standard_normal((n, k))), max_iters=100,
                                 tol=1e-8)
    # warm start: the previous basis of a slightly perturbed matrix (a periodic refresh).
    a_prev = a + 1e-3 * jnp.asarray(rng.standard_normal((n, n))) / np.sqrt(n)
    prev = sl.subspace_iteration(a_prev, jnp.asarray(rng.standard_normal((n, k))), max_iters=100,
                                 tol=1e-8)
    warm = sl.subspace_iteration(a, prev.u, max_iters=100, tol=1e-8)
    assert bool(cold.converged) and bool(warm.converged)
    assert int(warm.n_iters) < int(cold.n_iters) / 2
    for res in (cold, warm):
        np.testing.assert_allclose(np.asarray(res.s), s[:k], rtol=1e-7)
        assert _max_angle(res.u, u[:, :k]) < 1e-5
        assert _orth_err(res.u) < 1e-12
        e = np.asarray(res.errors)
        it = int(res.n_iters)
        assert np.all(e[:it] >= 0) and np.all(e[it:] == -1)


def test_subspace_iteration_fixed_iterations_jit_vmap(rng):
    mats = jnp.asarray(np.stack([_known_spectrum(rng, 50, 40, SPECTRA["fast"](40),
                                                 np.float32)[0] for _ in range(2)]))
    q0 = jnp.asarray(rng.standard_normal((50, 3)).astype(np.float32))
    f = jax.jit(jax.vmap(lambda a: sl.subspace_iteration(a, q0, max_iters=30)))
    res = f(mats)
    assert res.u.shape == (2, 50, 3) and np.all(np.asarray(res.n_iters) == 30)
    ref = np.linalg.svd(np.asarray(mats), compute_uv=False)[:, :3]
    np.testing.assert_allclose(np.asarray(res.s), ref, rtol=1e-4)
    with pytest.raises(ValueError, match="`q0`"):
        sl.subspace_iteration(mats[0], q0[:10])
    with pytest.raises(ValueError, match="orth_method"):
        sl.subspace_iteration(mats[0], q0, orth_method="mgs")


def test_subspace_iteration_right_side_matches_dense_svd(rng, x64):
    """side="right" iterates on the (n, k) right basis: float64 dense SVD reference."""
    m, n, k = 90, 40, 4
    s = np.concatenate([[3.0, 2.5, 2.0, 1.6], 0.6 * 0.9 ** np.arange(n - k)])
    a, u, _, v = _known_spectrum(rng, m, n, s)
    q0 = jnp.asarray(rng.standard_normal((n, k)))
    res = sl.subspace_iteration(jnp.asarray(a), q0, max_iters=200, tol=1e-10, side="right")
    assert bool(res.converged) and int(res.n_iters) < 200
    assert res.u.shape == (m, k) and res.vt.shape == (k, n)
    np.testing.assert_allclose(np.asarray(res.s), s[:k], rtol=1e-10)
    assert _max_angle(res.vt.T, v[:, :k]) < 1e-8
    assert _max_angle(res.u, u[:, :k]) < 1e-8
    assert _orth_err(res.vt.T) < 1e-12 and _orth_err(res.u) < 1e-12
    # u diag(s) vt is the rank-k truncation of a
    ref = (u[:, :k] * s[:k]) @ v[:, :k].T
    np.testing.assert_allclose(np.asarray(res.u * res.s) @ np.asarray(res.vt), ref, atol=1e-9)
    # the same iteration as side="left" on a^T, with the roles of u and vt swapped
    left = sl.subspace_iteration(jnp.asarray(a.T), q0, max_iters=200, tol=1e-10)
    assert int(left.n_iters) == int(res.n_iters)
    np.testing.assert_allclose(np.asarray(left.s), np.asarray(res.s), rtol=1e-12)
    sgn = np.sign(np.sum(np.asarray(left.u) * np.asarray(res.vt).T, axis=0))
    np.testing.assert_allclose(np.asarray(left.u) * sgn, np.asarray(res.vt).T, atol=1e-10)
    with pytest.raises(ValueError, match="`q0`"):
        sl.subspace_iteration(jnp.asarray(a), jnp.ones((m, k)), side="right")
    with pytest.raises(ValueError, match="side"):
        sl.subspace_iteration(jnp.asarray(a), q0, side="top")


def test_subspace_iteration_not_converged_is_reported(rng):
    n = 60
    s = np.ones(n)  # no gap at all: the subspace never settles
    s[:3] = [1.0, 0.999, 0.998]
    a, _, _, _ = _known_spectrum(rng, n, n, s, np.float32)
    res = sl.subspace_iteration(jnp.asarray(a), jnp.asarray(rng.standard_normal((n, 3)),
                                jnp.float32), max_iters=5, tol=1e-7)
    assert not bool(res.converged) and int(res.n_iters) == 5


# ----------------------------------------------------------- randomized_eigh, lanczos_eigh


def _sym_known(rng, n, w):
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (q * w) @ q.T, q


@pytest.mark.parametrize("psd", [True, False])
def test_randomized_eigh_psd(psd, rng, x64):
    n = 200
    w = np.exp(-np.arange(n) / 5.0)
    a, q = _sym_known(rng, n, w)
    res = sl.randomized_eigh(jnp.asarray(a), 8, key=jax.random.key(0), n_steps=3, psd=psd,
                             oversample=10)
    np.testing.assert_allclose(np.asarray(res.eigenvalues), w[:8], rtol=1e-6)
    assert _max_angle(res.eigenvectors[:, :4], q[:, :4]) < 1e-4
    assert _orth_err(res.eigenvectors) < 1e-10
    assert bool(res.converged)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_randomized_eigh_indefinite_which(which, rng, x64):
    n = 120
    w = np.concatenate([-(0.7 ** np.arange(n // 2)) * 3.0, 0.7 ** np.arange(n // 2)])
    a, _ = _sym_known(rng, n, w)
    res = sl.randomized_eigh(jnp.asarray(a), 3, key=jax.random.key(1), n_steps=6, which=which)
    ref = {"LA": np.sort(w)[::-1][:3], "SA": np.sort(w)[:3],
           "LM": w[np.argsort(-np.abs(w))][:3]}[which]
    np.testing.assert_allclose(np.asarray(res.eigenvalues), ref, rtol=1e-6)


def test_randomized_eigh_default_steps_on_a_slowly_decaying_spectrum(rng, x64):
    """The default (5 Krylov steps) resolves the top eigenvalues of an indefinite
    ``|lambda_i| = 1/i`` spectrum to ~1e-7; 2 steps (the old default) leave 3e-2."""
    n = 400
    w = (1.0 / np.arange(1, n + 1)) * rng.choice([-1.0, 1.0], n)
    a, _ = _sym_known(rng, n, w)
    res = sl.randomized_eigh(jnp.asarray(a), 10, key=jax.random.key(0))
    ref = w[np.argsort(-np.abs(w))][:10]
    got = np.asarray(res.eigenvalues)
    got = got[np.argsort(-np.abs(got))]
    assert int(res.n_iters) == 5
    np.testing.assert_allclose(got, ref, rtol=1e-6)


def test_eigh_bad_input():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="`a` must be square"):
        sl.randomized_eigh(jnp.ones((10, 12)), 2, key=key, oversample=2)
    with pytest.raises(ValueError, match="`a` must be square"):
        sl.lanczos_eigh(jnp.ones((10, 12)), 2, key=key)
    with pytest.raises(ValueError, match="which"):
        sl.lanczos_eigh(jnp.eye(10), 2, key=key, which="BE")
    with pytest.raises(ValueError, match="rank=11"):
        sl.lanczos_eigh(jnp.eye(10), 11, key=key)
    with pytest.raises(ValueError, match="multiple of `block_size`"):
        sl.lanczos_eigh(jnp.eye(100), 5, key=key, block_size=3, basis_size=20)
    with pytest.raises(ValueError, match="basis_size"):
        sl.lanczos_eigh(jnp.eye(100), 5, key=key, basis_size=5)
    with pytest.raises(ValueError, match="exceeds n=100"):
        sl.lanczos_eigh(jnp.eye(100), 5, key=key, basis_size=100)
    with pytest.raises(ValueError, match="oversample"):
        sl.randomized_eigh(jnp.eye(10), 5, key=key, oversample=6)


def _sparse_sym(rng, n, nnz_per_row=4):
    rows = np.repeat(np.arange(n), nnz_per_row)
    cols = rng.integers(0, n, size=n * nnz_per_row)
    vals = rng.standard_normal(n * nnz_per_row)
    import scipy.sparse as sp

    m = sp.coo_matrix((vals, (rows, cols)), shape=(n, n)).tocsr()
    m = (m + m.T) * 0.5 + sp.diags(np.linspace(0.0, 3.0, n))
    return m


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_eigh_sparse_vs_dense(which, rng):
    m = _sparse_sym(rng, 400)
    w_ref, v_ref = np.linalg.eigh(m.toarray())
    a = jsparse.BCOO.from_scipy_sparse(m.astype(np.float32).tocoo())
    res = sl.lanczos_eigh(a, 5, key=jax.random.key(0), tol=1e-5, which=which, max_restarts=60)
    assert bool(res.converged)
    idx = {"SA": np.arange(5), "LA": np.arange(400)[::-1][:5],
           "LM": np.argsort(-np.abs(w_ref))[:5]}[which]
    np.testing.assert_allclose(np.asarray(res.eigenvalues), w_ref[idx], atol=2e-4)
    # Ritz residuals are small (eigenvector accuracy is limited by the gaps).
    y = np.asarray(res.eigenvectors, np.float64)
    r = m @ y - y * np.asarray(res.eigenvalues, np.float64)
    assert np.linalg.norm(r, axis=0).max() < 1e-3
    assert _orth_err(y) < 1e-5
    e = np.asarray(res.errors)
    assert np.all(e[int(res.n_iters):] == -1)


def test_lanczos_eigh_f64_jit_vmap_warm(rng, x64):
    w = np.linspace(1.0, 2.0, 80) ** 3
    a, q = _sym_known(rng, 80, w)
    f = jax.jit(lambda a: sl.lanczos_eigh(a, 3, key=jax.random.key(0), tol=1e-10,
                                          block_size=4, basis_size=32, max_restarts=50))
    res = f(jnp.asarray(a))
    assert bool(res.converged)
    np.testing.assert_allclose(np.asarray(res.eigenvalues), w[::-1][:3], rtol=1e-9)
    batch = jax.vmap(f)(jnp.asarray(np.stack([a, 2 * a])))
    np.testing.assert_allclose(np.asarray(batch.eigenvalues[1]), 2 * w[::-1][:3], rtol=1e-9)
    # warm start from the converged block: converges in one cycle.
    v0 = jnp.concatenate([res.eigenvectors, jnp.asarray(rng.standard_normal((80, 1)))], axis=1)
    warm = sl.lanczos_eigh(jnp.asarray(a), 3, v0=v0, tol=1e-10, block_size=4, basis_size=32)
    assert int(warm.n_iters) < int(res.n_iters)


def test_lanczos_nonconvergence_reported(rng):
    w = np.linspace(1.0, 1.0001, 200).astype(np.float32)  # tiny gaps
    a, _ = _sym_known(rng, 200, w)
    res = sl.lanczos_eigh(jnp.asarray(a, jnp.float32), 3, key=jax.random.key(0), tol=1e-12,
                          max_restarts=2, basis_size=8)
    assert not bool(res.converged) and int(res.n_iters) == 2
