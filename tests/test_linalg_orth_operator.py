"""subjax.linalg: orthonormalize and LinearOperator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse as jsparse

import subjax.linalg as sl

QR_METHODS = ("householder", "cholesky_qr2", "shifted_cholesky_qr3")
POLAR_METHODS = ("polar_eigh", "polar_ns")


def _with_cond(rng, m, k, cond, dtype=np.float64):
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((k, k)))
    s = np.logspace(0, -np.log10(cond), k)
    return ((u * s) @ v.T).astype(dtype)


def _orth_err(q):
    q = np.asarray(q, np.float64)
    return np.abs(q.T @ q - np.eye(q.shape[1])).max()


def _span_err(q, x):
    """||(I - Q Q^T) X|| / ||X|| — is span(X) inside span(Q)?"""
    q = np.asarray(q, np.float64)
    x = np.asarray(x, np.float64)
    return np.linalg.norm(x - q @ (q.T @ x)) / np.linalg.norm(x)


@pytest.mark.parametrize("method", QR_METHODS + POLAR_METHODS)
def test_orthonormal_and_same_span_f32(method, rng):
    x = _with_cond(rng, 200, 12, 1e2, np.float32)
    q = sl.orthonormalize(jnp.asarray(x), method)
    assert q.dtype == jnp.float32 and q.shape == x.shape
    assert _orth_err(q) < 1e-5
    assert _span_err(q, x) < 1e-5


@pytest.mark.parametrize("method", QR_METHODS)
def test_qr_methods_agree_with_sign_fixed_householder(method, rng, x64):
    x = _with_cond(rng, 150, 10, 1e3)
    q = np.asarray(sl.orthonormalize(jnp.asarray(x), method))
    qh, rh = np.linalg.qr(x)
    qh = qh * np.sign(np.diag(rh))[None, :]
    np.testing.assert_allclose(q, qh, atol=1e-10)
    # diag(R) = diag(Q^T X) >= 0: the sign convention that makes QR unique.
    assert np.all(np.diag(q.T @ x) > 0)


def test_polar_is_closest_orthonormal(rng, x64):
    x = _with_cond(rng, 80, 6, 10.0)
    u, _, vt = np.linalg.svd(x, full_matrices=False)
    for method in POLAR_METHODS:
        q = np.asarray(sl.orthonormalize(jnp.asarray(x), method))
        np.testing.assert_allclose(q, u @ vt, atol=1e-9, err_msg=method)


def test_cholesky_qr2_falls_back_on_ill_conditioned(rng):
    # cond 1e6 in float32: the Gram matrix is numerically singular, plain CholeskyQR
    # would produce NaN or a badly non-orthogonal Q.
    x = jnp.asarray(_with_cond(rng, 300, 20, 1e6, np.float32))
    for method in ("cholesky_qr2", "shifted_cholesky_qr3"):
        q = sl.orthonormalize(x, method)
        assert np.all(np.isfinite(np.asarray(q)))
        assert _orth_err(q) < 1e-5, method
        assert _span_err(q, x) < 1e-4, method


@pytest.mark.parametrize("method", QR_METHODS + ("polar_eigh",))
def test_rank_deficient_gives_finite_basis(method, rng):
    x = rng.standard_normal((50, 6)).astype(np.float32)
    x[:, 3] = x[:, 0] + x[:, 1]  # rank 5
    x[:, 5] = 0.0
    q = np.asarray(sl.orthonormalize(jnp.asarray(x), method))
    assert np.all(np.isfinite(q))
    assert _span_err(q, x) < 1e-4
    if method != "polar_eigh":  # the polar factor of a rank-deficient x is a partial isometry
        assert _orth_err(q) < 1e-4


def test_batched_matches_loop_and_vmap_jit(rng):
    x = jnp.asarray(rng.standard_normal((2, 3, 40, 5)).astype(np.float32))
    q = sl.orthonormalize(x, "cholesky_qr2")
    assert q.shape == x.shape
    ref = jnp.stack([sl.orthonormalize(xi, "householder") for xi in x.reshape(6, 40, 5)])
    np.testing.assert_allclose(np.asarray(q).reshape(6, 40, 5), np.asarray(ref), atol=2e-5)
    qj = jax.jit(jax.vmap(lambda t: sl.orthonormalize(t, "shifted_cholesky_qr3")))(x[0])
    np.testing.assert_allclose(np.asarray(qj), np.asarray(q[0]), atol=2e-5)
    es = jax.eval_shape(lambda t: sl.orthonormalize(t, "polar_ns"), x)
    assert es.shape == x.shape and es.dtype == x.dtype


def test_low_precision_input_cast_back(rng):
    x = jnp.asarray(rng.standard_normal((64, 4)), jnp.bfloat16)
    q = sl.orthonormalize(x, "cholesky_qr2")
    assert q.dtype == jnp.bfloat16
    assert _orth_err(q) < 2e-2


def test_orthonormalize_bad_input():
    with pytest.raises(ValueError, match="method"):
        sl.orthonormalize(jnp.ones((4, 2)), "gram_schmidt")
    with pytest.raises(ValueError, match="`x`.*columns"):
        sl.orthonormalize(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="`x`"):
        sl.orthonormalize(jnp.ones(4))
    with pytest.raises(TypeError, match="`x`"):
        sl.orthonormalize(jnp.ones((4, 2), jnp.int32))


# ----------------------------------------------------------------- LinearOperator


def test_dense_and_sparse_operators_match(rng):
    a = rng.standard_normal((30, 20)).astype(np.float32)
    a[np.abs(a) < 1.0] = 0.0
    x = jnp.asarray(rng.standard_normal((20, 3)).astype(np.float32))
    y = jnp.asarray(rng.standard_normal((30, 3)).astype(np.float32))
    for op in (
        sl.aslinearoperator(jnp.asarray(a)),
        sl.aslinearoperator(jnp.asarray(a), transpose_once=True),
        sl.aslinearoperator(jsparse.BCOO.fromdense(jnp.asarray(a))),
    ):
        assert op.shape == (30, 20) and op.dtype == jnp.float32
        np.testing.assert_allclose(op.matmat(x), a @ np.asarray(x), atol=1e-5)
        np.testing.assert_allclose(op.rmatmat(y), a.T @ np.asarray(y), atol=1e-5)
        np.testing.assert_allclose(op.matvec(x[:, 0]), a @ np.asarray(x[:, 0]), atol=1e-5)
        np.testing.assert_allclose(op.rmatvec(y[:, 0]), a.T @ np.asarray(y[:, 0]), atol=1e-5)
        np.testing.assert_allclose(op.T.matmat(y), a.T @ np.asarray(y), atol=1e-5)
        np.testing.assert_allclose(op.todense(), a, atol=1e-6)


def test_matrix_free_operator_derives_missing_products(rng):
    a = jnp.asarray(rng.standard_normal((7, 5)).astype(np.float32))
    op = sl.LinearOperator((7, 5), jnp.float32, matvec=lambda v: a @ v)
    y = jnp.asarray(rng.standard_normal((7, 2)).astype(np.float32))
    # rmatmat comes from jax.linear_transpose of the matvec: exact.
    np.testing.assert_allclose(op.rmatmat(y), a.T @ y, atol=1e-5)
    np.testing.assert_allclose(op.matmat(y[:5]), a @ y[:5], atol=1e-5)
    np.testing.assert_allclose(op.T.todense(), a.T, atol=1e-6)


def test_operator_is_a_pytree_through_jit_and_vmap(rng):
    a = jnp.asarray(rng.standard_normal((4, 6, 5)).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((5, 2)).astype(np.float32))

    @jax.jit
    def f(op, x):
        return op.matmat(x)

    op = sl.aslinearoperator(a[0])
    np.testing.assert_allclose(f(op, x), a[0] @ x, atol=1e-5)
    out = jax.vmap(lambda m: sl.aslinearoperator(m).rmatmat(jnp.ones((6, 1))))(a)
    np.testing.assert_allclose(out[..., 0], jnp.sum(a, axis=1), atol=1e-5)


def test_operator_bad_input():
    with pytest.raises(TypeError, match="matvec"):
        sl.LinearOperator((3, 3), jnp.float32)
    with pytest.raises(ValueError, match="shape"):
        sl.LinearOperator((3,), jnp.float32, matvec=lambda x: x)
    with pytest.raises(ValueError, match="`x`"):
        sl.aslinearoperator(jnp.ones((3, 4))).matmat(jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="`a`.*2-D"):
        sl.aslinearoperator(jnp.ones((3, 4, 5)))
    with pytest.raises(TypeError, match="`a`"):
        sl.aslinearoperator(lambda x: x)
    with pytest.raises(TypeError, match="`a`"):
        sl.aslinearoperator(jnp.ones((3, 3), jnp.int32))
