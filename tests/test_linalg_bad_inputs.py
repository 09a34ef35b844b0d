"""subjax.linalg on bad input: a clear error naming the argument, or a truthful `converged`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subjax.linalg as sl
from subjax.parallel import sharded_orthonormalize

SCALES = [1e-30, 1e-20, 1.0, 1e20, 1e30]


@pytest.fixture(scope="module")
def gaussian():
    return jax.random.normal(jax.random.key(0), (200, 100), jnp.float32)


@pytest.mark.parametrize("method", ["block_krylov", "subspace"])
def test_randomized_svd_is_scale_invariant_float32(gaussian, method):
    """Relative accuracy is the same from 1e-30 to 1e30: nothing has an absolute floor."""
    ref = np.linalg.svd(np.asarray(gaussian, np.float64), compute_uv=False)[:5]
    f = jax.jit(lambda a: sl.randomized_svd(a, 5, key=jax.random.key(1), method=method))
    errs = []
    for scale in SCALES:
        res = f(gaussian * jnp.float32(scale))
        assert bool(res.converged), scale
        errs.append(np.max(np.abs(np.asarray(res.s, np.float64) / scale / ref - 1)))
        u = np.asarray(res.u, np.float64)
        np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-5)
    # unscaled: block Krylov resolves the top values to ~1e-4, power iteration to ~3e-2
    assert errs[2] < (1e-3 if method == "block_krylov" else 5e-2)
    np.testing.assert_allclose(errs, errs[2], rtol=0.05)


def test_lanczos_is_scale_invariant_float32():
    x = jax.random.normal(jax.random.key(0), (100, 30), jnp.float32)
    s = x @ x.T
    ref = np.linalg.eigvalsh(np.asarray(s, np.float64))[::-1][:3]
    for scale in (1e-30, 1.0, 1e30):
        res = sl.lanczos_eigh(s * jnp.float32(scale), 3, key=jax.random.key(1), tol=1e-5)
        assert bool(res.converged), scale
        assert float(res.errors[int(res.n_iters) - 1]) <= 1e-5
        np.testing.assert_allclose(np.asarray(res.eigenvalues, np.float64) / scale, ref,
                                   rtol=1e-5)


def test_lanczos_smallest_eigenvalues_near_zero_use_the_norm_scale(x64):
    """A residual relative to max |theta| of the *wanted* values would never converge
    for eigenvalues ~0; the tolerance is relative to ||A||."""
    d = jnp.concatenate([jnp.array([0.0, 1e-12, 2e-12]), jnp.linspace(1.0, 2.0, 97)])
    res = sl.lanczos_eigh(jnp.diag(d), 3, key=jax.random.key(0), which="SA", tol=1e-8,
                          max_restarts=200)
    assert bool(res.converged)
    np.testing.assert_allclose(res.eigenvalues, d[:3], atol=1e-8)


def test_randomized_eigh_rejects_or_flags_asymmetric_input():
    a = jax.random.normal(jax.random.key(0), (60, 60), jnp.float32)
    with pytest.raises(ValueError, match="`a` must be symmetric"):
        sl.randomized_eigh(a, 3, key=jax.random.key(1))
    with pytest.raises(ValueError, match="`a` must be symmetric"):
        sl.lanczos_eigh(a, 3, key=jax.random.key(1))
    traced = jax.jit(lambda a: sl.randomized_eigh(a, 3, key=jax.random.key(1)))(a)
    assert not bool(traced.converged)
    op = sl.LinearOperator((60, 60), jnp.float32, matmat=lambda x: a @ x, symmetric=True)
    assert not bool(sl.randomized_eigh(op, 3, key=jax.random.key(1)).converged)
    assert not bool(sl.lanczos_eigh(op, 3, key=jax.random.key(1), max_restarts=3).converged)
    # the symmetric part is accepted
    sym = sl.randomized_eigh((a + a.T) / 2, 3, key=jax.random.key(1), n_steps=6)
    assert bool(sym.converged)


def test_randomized_eigh_psd_on_indefinite_matrix_is_not_converged():
    a = jnp.diag(jnp.linspace(-1.0, 1.0, 60))
    res = sl.randomized_eigh(a, 3, key=jax.random.key(0), psd=True)
    assert not bool(res.converged)
    spd = jnp.diag(jnp.linspace(0.0, 1.0, 60))
    assert bool(sl.randomized_eigh(spd, 3, key=jax.random.key(0), psd=True).converged)


def test_randomized_eigh_tol_means_the_residual_met_it():
    x = jax.random.normal(jax.random.key(0), (80, 80), jnp.float32)
    a = x @ x.T / 80
    loose = sl.randomized_eigh(a, 4, key=jax.random.key(1), n_steps=1, tol=1e-1)
    tight = sl.randomized_eigh(a, 4, key=jax.random.key(1), n_steps=1, tol=1e-7)
    assert float(loose.errors[0]) == float(tight.errors[0])
    assert bool(loose.converged) == (float(loose.errors[0]) <= 1e-1)
    assert not bool(tight.converged) and float(tight.errors[0]) > 1e-7
    with pytest.raises(ValueError, match="`tol`"):
        sl.randomized_eigh(a, 4, key=jax.random.key(1), tol=-1.0)


@pytest.mark.parametrize("tol", [-1.0, 0.0])
def test_cg_rejects_nonpositive_tol(tol):
    a = jnp.eye(4) * 2.0
    with pytest.raises(ValueError, match="`tol`"):
        sl.cg(a, jnp.ones(4), tol=tol)
    with pytest.raises(ValueError, match="`atol`"):
        sl.cg(a, jnp.ones(4), atol=-1.0)
    # tol = 0 with an absolute tolerance is a valid request
    res = sl.cg(a, jnp.ones(4), tol=0.0, atol=1e-6)
    assert bool(res.converged) and float(res.residual_norm) <= 1e-6


def test_cg_reports_the_true_residual():
    a = jnp.diag(jnp.linspace(1.0, 1e4, 50))
    b = jnp.ones(50)
    res = sl.cg(a, b, tol=1e-6, max_iters=500)
    assert bool(res.converged)
    np.testing.assert_allclose(res.residual_norm, jnp.linalg.norm(b - a @ res.x), rtol=1e-5)


def test_rank_selection_bad_threshold_and_nan_spectrum():
    s = jnp.array([3.0, 2.0, 1.0])
    for f in (sl.energy_rank, sl.normalized_spectrum_rank):
        with pytest.raises(ValueError, match="`threshold`"):
            f(s, 1.5)
        with pytest.raises(ValueError, match="`s` contains NaN"):
            f(jnp.array([1.0, jnp.nan]), 0.5)
        traced = jax.jit(f)
        assert int(traced(s, 1.5)) == -1
        assert int(traced(s, 0.0)) == -1
        assert int(traced(jnp.array([1.0, jnp.nan, 0.5]), 0.9)) == -1
        assert int(traced(s, 0.5)) == int(f(s, 0.5)) >= 1


def test_orthonormalize_nan_input():
    x = jnp.ones((10, 3)).at[2, 1].set(jnp.nan)
    with pytest.raises(ValueError, match="`x` contains NaN"):
        sl.orthonormalize(x, "cholesky_qr2")
    q = jax.jit(lambda x: sl.orthonormalize(x, "cholesky_qr2"))(x)  # documented: NaN out
    assert not bool(jnp.all(jnp.isfinite(q)))


def test_linear_operator_wrong_output_length_names_the_operator():
    bad = sl.LinearOperator((30, 30), jnp.float32, matvec=lambda x: x[:29], symmetric=True)
    with pytest.raises(ValueError, match=r"`matvec` of the LinearOperator of shape \(30, 30\)"):
        sl.randomized_svd(bad, 3, key=jax.random.key(0), oversample=2)
    bad_mm = sl.LinearOperator((30, 20), jnp.float32, matmat=lambda x: jnp.ones((31, x.shape[1])))
    with pytest.raises(ValueError, match=r"`matmat` of the LinearOperator .* \(31, 5\)"):
        sl.randomized_range_finder(bad_mm, 5, key=jax.random.key(0))


def test_axis_name_outside_shard_map_is_a_clear_error():
    x = jnp.ones((16, 2))
    with pytest.raises(ValueError, match="`axis_name`='rows' is not a bound mesh axis"):
        sharded_orthonormalize(x, "rows")
    with pytest.raises(ValueError, match="`axis_name`='rows' is not a bound mesh axis"):
        sl.randomized_svd(x, 1, key=jax.random.key(0), oversample=0, axis_name="rows")
    with pytest.raises(ValueError, match="`axis_name`='rows' is not a bound mesh axis"):
        sl.cg(jnp.eye(16), jnp.ones(16), axis_name="rows")
