"""lanczos_eigh: implicit eigenpair gradients and shift-and-invert against dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

import subjax.linalg as sl


def _symmetric(rng, n, eigenvalues):
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (u * eigenvalues) @ u.T


@pytest.fixture
def problem(rng):
    n = 60
    d = np.concatenate([[5.0, 4.0, 3.0], np.linspace(-1.0, 1.0, n - 6), [-2.5, -3.5, -4.5]])
    e = rng.standard_normal((n, n))
    return _symmetric(rng, n, d), (e + e.T) / 2, rng.standard_normal(n)


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_lanczos_gradients_match_finite_differences(which, problem, x64):
    a, e, c = (jnp.asarray(v) for v in problem)

    def loss(a):
        r = sl.lanczos_eigh(a, 3, key=jax.random.key(0), tol=1e-12, which=which,
                           max_restarts=100)
        # sign-invariant in each eigenvector; weights make each eigenvalue count
        return jnp.sum(r.eigenvalues * jnp.arange(1.0, 4.0)) + jnp.sum((c @ r.eigenvectors) ** 2)

    g = jax.jit(jax.grad(loss))(a)
    h = 1e-6
    fd = (loss(a + h * e) - loss(a - h * e)) / (2 * h)
    np.testing.assert_allclose(float(jnp.sum(g * e)), float(fd), rtol=1e-6)
    # eigenvalue gradients alone are v v^T (the dense eigh reference)
    gl = jax.grad(lambda a: jnp.sum(sl.lanczos_eigh(a, 3, key=jax.random.key(0), tol=1e-12,
                                                    which=which, max_restarts=100).eigenvalues))(a)
    w, v = np.linalg.eigh(np.asarray(a))
    idx = {"LA": np.argsort(-w), "SA": np.argsort(w), "LM": np.argsort(-np.abs(w))}[which][:3]
    np.testing.assert_allclose(gl, v[:, idx] @ v[:, idx].T, atol=1e-9)


def test_lanczos_gradient_through_sparse_values(rng, x64):
    n = 40
    mask = rng.random((n, n)) < 0.2
    dense = jnp.asarray(_symmetric(rng, n, np.linspace(0.0, 3.0, n)) * (mask | mask.T))
    m = jsparse.BCOO.fromdense(dense)

    def loss_sparse(data):
        r = sl.lanczos_eigh(jsparse.BCOO((data, m.indices), shape=m.shape), 2,
                            key=jax.random.key(1), tol=1e-12, max_restarts=100)
        return jnp.sum(r.eigenvalues)

    def loss_dense(a):
        return jnp.sum(jnp.linalg.eigvalsh(a)[-2:])

    g = jax.grad(loss_sparse)(m.data)
    ref = jax.grad(loss_dense)(dense)
    ref_data = ref[m.indices[:, 0], m.indices[:, 1]]
    np.testing.assert_allclose(g, ref_data, atol=1e-9)


def test_lanczos_shift_invert_finds_interior_eigenvalues(problem, x64):
    a = jnp.asarray(problem[0])
    sigma = 0.05
    lu = jax.scipy.linalg.lu_factor(a - sigma * jnp.eye(a.shape[0]))
    res = sl.lanczos_eigh(a, 3, key=jax.random.key(0), tol=1e-10, which="LM", sigma=sigma,
                          solve=lambda x: jax.scipy.linalg.lu_solve(lu, x), max_restarts=100)
    w, v = np.linalg.eigh(np.asarray(a))
    idx = np.argsort(np.abs(w - sigma))[:3]
    assert bool(res.converged)
    np.testing.assert_allclose(res.eigenvalues, w[idx], atol=1e-10)
    overlap = np.abs(np.sum(np.asarray(res.eigenvectors) * v[:, idx], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-8)
    with pytest.raises(ValueError, match="`sigma` and `solve`"):
        sl.lanczos_eigh(a, 3, key=jax.random.key(0), sigma=0.1)
    with pytest.raises(ValueError, match="`which` must be 'LM'"):
        sl.lanczos_eigh(a, 3, key=jax.random.key(0), sigma=0.1, solve=lambda x: x, which="LA")


def _tridiag_gap(n):
    """Symmetric with a cluster at the top (slow Lanczos: many restarts, locking)."""
    d = np.concatenate([[10.0, 9.999, 9.998], np.linspace(0.0, 9.0, n - 3)])
    return d


@pytest.mark.parametrize("block_size", [1, 2])
def test_lanczos_restarted_pairs_match_dense_eigh(block_size, rng, x64):
    # a clustered top spectrum forces several restarts with locking; the pairs and the
    # orthonormality of the returned vectors are checked against LAPACK
    n = 120
    d = _tridiag_gap(n)
    a = _symmetric(rng, n, d)
    res = sl.lanczos_eigh(jnp.asarray(a), 3, key=jax.random.key(0), tol=1e-10,
                          block_size=block_size, basis_size=12, max_restarts=200)
    assert bool(res.converged) and int(res.n_iters) > 2
    np.testing.assert_allclose(res.eigenvalues, [10.0, 9.999, 9.998], rtol=1e-12)
    v = np.asarray(res.eigenvectors)
    np.testing.assert_allclose(v.T @ v, np.eye(3), atol=1e-12)
    r = a @ v - v * np.asarray(res.eigenvalues)
    assert np.max(np.linalg.norm(r, axis=0)) <= 1e-10 * 10.0 * 1.01


@pytest.mark.parametrize("block_size", [1, 2])
@pytest.mark.parametrize("n", [5, 8, 12, 31, 33])
def test_lanczos_on_small_matrices_matches_dense_eigh(n, block_size, rng, x64):
    # a basis clamped to the matrix: the residual block and a new block still fit, and
    # a basis too small for the rank is a clear error
    a = _symmetric(rng, n, np.linspace(1.0, 2.0, n) ** 3)
    ref = np.linalg.eigvalsh(a)[::-1]
    if n - 2 * block_size < 2 + block_size:
        with pytest.raises(ValueError, match="cannot hold rank=2"):
            sl.lanczos_eigh(jnp.asarray(a), 2, key=jax.random.key(0), block_size=block_size)
        return
    res = sl.lanczos_eigh(jnp.asarray(a), 2, key=jax.random.key(0), tol=1e-10,
                          block_size=block_size)
    assert bool(res.converged)
    np.testing.assert_allclose(res.eigenvalues, ref[:2], rtol=1e-10)
    with pytest.raises(ValueError, match="basis_size"):
        sl.lanczos_eigh(jnp.asarray(a), 2, key=jax.random.key(0), block_size=block_size,
                        basis_size=(n - block_size) // block_size * block_size)


def test_lanczos_flags_a_slightly_asymmetric_operator(rng, x64):
    # A = S + 1e-5 N: its Ritz pairs meet tol=1e-3 by their true residuals, but the
    # projection is not symmetric: `converged` must be False
    n = 80
    s = _symmetric(rng, n, np.linspace(1.0, 5.0, n))
    e = rng.standard_normal((n, n))
    a = jnp.asarray(s + 1e-5 * (e - e.T))
    op = sl.LinearOperator((n, n), jnp.float64, matmat=lambda x: a @ x, symmetric=True)
    res = sl.lanczos_eigh(op, 3, key=jax.random.key(0), tol=1e-3)
    assert float(res.errors[int(res.n_iters) - 1]) <= 1e-3
    assert not bool(res.converged)
    sym = sl.LinearOperator((n, n), jnp.float64, matmat=lambda x: (a + a.T) / 2 @ x,
                            symmetric=True)
    assert bool(sl.lanczos_eigh(sym, 3, key=jax.random.key(0), tol=1e-3).converged)


@pytest.mark.parametrize("width", [None, 1, 3])
def test_sparse_rows_operator_products_match_dense(width, rng, x64):
    import scipy.sparse as sp

    # rectangular, an empty row, rows longer than the padded width, duplicate entries
    a = sp.random(30, 20, density=0.2, random_state=1, format="lil")
    a[4, :] = 0
    a[7, :15] = rng.standard_normal(15)
    coo = a.tocoo()
    dup = sp.coo_matrix((np.r_[coo.data, [1.5]], (np.r_[coo.row, [7]], np.r_[coo.col, [0]])),
                        shape=a.shape)
    dense = dup.toarray()
    op = sl.sparse_rows_operator(dup, width=width)
    x = rng.standard_normal((20, 3))
    y = rng.standard_normal((30, 2))
    np.testing.assert_allclose(op.matmat(jnp.asarray(x)), dense @ x, atol=1e-12)
    np.testing.assert_allclose(op.rmatmat(jnp.asarray(y)), dense.T @ y, atol=1e-12)
    np.testing.assert_allclose(op.matvec(jnp.asarray(x[:, 0])), dense @ x[:, 0], atol=1e-12)
    s = sp.csr_matrix(dense[:20] + dense[:20].T)
    bcoo = jsparse.BCOO.fromdense(jnp.asarray(s.toarray()))
    sym = sl.sparse_rows_operator(bcoo, width=width, symmetric=True)
    np.testing.assert_allclose(sym.matmat(jnp.asarray(x)), s @ x, atol=1e-12)
    np.testing.assert_allclose(sym.rmatmat(jnp.asarray(x)), s @ x, atol=1e-12)
    with pytest.raises(ValueError, match="`width`"):
        sl.sparse_rows_operator(dup, width=0)
    with pytest.raises(ValueError, match="square `a`"):
        sl.sparse_rows_operator(dup, symmetric=True)
    with pytest.raises(TypeError, match="`a` must be a scipy sparse"):
        sl.sparse_rows_operator(dense)


def test_lanczos_on_a_sparse_rows_operator_matches_dense(rng, x64):
    import scipy.sparse as sp

    s = sp.random(300, 300, density=0.03, random_state=2)
    s = sp.csr_matrix(s + s.T)
    op = sl.sparse_rows_operator(s, symmetric=True)
    res = sl.lanczos_eigh(op, 4, key=jax.random.key(0), tol=1e-10)
    w = np.linalg.eigvalsh(s.toarray())[::-1][:4]
    assert bool(res.converged)
    np.testing.assert_allclose(res.eigenvalues, w, rtol=1e-9)
