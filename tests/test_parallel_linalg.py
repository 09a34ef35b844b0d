"""Row-sharded randomized SVD / subspace iteration on 8 fake devices equal subjax.linalg."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import subjax.linalg as sl
from subjax.linalg import (
    SubspaceIterationResult,
    orthonormalize,
    randomized_svd,
    subspace_iteration,
)
from subjax.parallel import (
    sharded_orthonormalize,
    sharded_randomized_svd,
    sharded_subspace_iteration,
)

pytestmark = pytest.mark.multidevice


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return Mesh(np.array(jax.devices()), ("rows",))


def decaying(m, n, decay=0.8, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (m, n)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (n, n)))
    return (u * decay ** jnp.arange(n, dtype=jnp.float32)) @ v.T


def assert_same_svd(res, ref, atol=2e-5):
    """Equal singular values; singular pairs equal up to a joint sign per pair."""
    np.testing.assert_allclose(res.s, ref.s, rtol=1e-5, atol=1e-7)
    u, ur = np.asarray(res.u), np.asarray(ref.u)
    sgn = np.sign(np.sum(u * ur, axis=0))
    assert np.all(sgn != 0)
    np.testing.assert_allclose(u * sgn, ur, atol=atol)
    np.testing.assert_allclose(np.asarray(res.vt) * sgn[:, None], ref.vt, atol=atol)


@pytest.mark.parametrize("method,n_steps", [
    ("block_krylov", 1), pytest.param("subspace", 1, marks=pytest.mark.slow)])
def test_sharded_randomized_svd_equals_single_device(mesh, method, n_steps):
    a = decaying(256, 48)
    key = jax.random.key(3)
    res = sharded_randomized_svd(a, 6, key=key, mesh=mesh, axis_name="rows", oversample=6,
                                 n_steps=n_steps, method=method)
    ref = randomized_svd(a, 6, key=key, oversample=6, n_steps=n_steps, method=method)
    assert bool(res.converged)
    assert_same_svd(res, ref)
    # and it is the SVD: the spectrum used to build `a`
    np.testing.assert_allclose(res.s, 0.8 ** np.arange(6), rtol=1e-4)
    # u stays split by rows, one block per device
    assert res.u.sharding.spec == P("rows")
    assert res.u.addressable_shards[0].data.shape == (32, 6)
    # a different key gives a different sketch (the key is really used)
    other = sharded_randomized_svd(a, 6, key=jax.random.key(4), mesh=mesh, axis_name="rows",
                                   oversample=6, n_steps=n_steps, method=method)
    assert float(jnp.max(jnp.abs(jnp.abs(other.u) - jnp.abs(res.u)))) > 0


@pytest.mark.parametrize("orth_method,ref_method", [
    ("cholesky_qr2", "cholesky_qr2"),
    pytest.param("householder", "householder", marks=pytest.mark.slow)])
def test_sharded_subspace_iteration_equals_single_device(mesh, orth_method, ref_method):
    a = decaying(128, 32, decay=0.7)
    q0 = jax.random.normal(jax.random.key(5), (128, 3))
    res = sharded_subspace_iteration(a, q0, mesh=mesh, axis_name="rows", max_iters=25, tol=1e-4,
                                     orth_method=orth_method)
    ref = subspace_iteration(a, q0, max_iters=25, tol=1e-4, orth_method=ref_method)
    assert int(res.n_iters) == int(ref.n_iters) < 25
    assert bool(res.converged) and bool(ref.converged)
    np.testing.assert_allclose(res.errors, ref.errors, rtol=1e-3, atol=1e-6)
    assert_same_svd(res, ref, atol=1e-4)


def test_sharded_orthonormalize_methods(mesh):
    x = jax.random.normal(jax.random.key(0), (256, 6))
    # ill-conditioned columns (cond ~ 1e6 in float32): Cholesky-QR2 must fall back
    scales = jnp.logspace(0, -6, 6, dtype=jnp.float32)
    x_bad = x @ jnp.linalg.qr(jax.random.normal(jax.random.key(1), (6, 6)))[0] * scales
    methods = ("cholesky_qr2", "shifted_cholesky_qr3", "householder")

    @jax.jit
    def all_methods(x, x_bad):  # one compilation for the six cases
        f = jax.shard_map(
            lambda x, xb: tuple(sharded_orthonormalize(v, "rows", m)
                                for v in (x, xb) for m in methods),
            mesh=mesh, in_specs=P("rows"), out_specs=P("rows"))
        return f(x, x_bad)

    qs = all_methods(x, x_bad)
    ref = orthonormalize(x, "householder")
    for i, q in enumerate(qs):
        np.testing.assert_allclose(q.T @ q, np.eye(6), atol=5e-5)
        if i < len(methods):  # well conditioned: the unique QR factor, as on one device
            np.testing.assert_allclose(q, ref, atol=2e-5)
        else:  # same column space even where the factor itself is ill-determined
            resid = x_bad - q @ (q.T @ x_bad)
            assert float(jnp.linalg.norm(resid)) < 1e-5 * float(jnp.linalg.norm(x_bad))


def test_bad_inputs(mesh):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"250 rows of `a` are not divisible by the size 8 "
                                         r"of mesh axis 'rows'"):
        sharded_randomized_svd(jnp.ones((250, 20)), 3, key=key, mesh=mesh, axis_name="rows")
    with pytest.raises(ValueError, match=r"axis_name='data' is not an axis of the mesh"):
        sharded_randomized_svd(jnp.ones((256, 20)), 3, key=key, mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match=r"rank \+ oversample"):
        sharded_randomized_svd(jnp.ones((256, 20)), 15, key=key, mesh=mesh, axis_name="rows")
    with pytest.raises(ValueError, match="`q0` must have shape"):
        sharded_subspace_iteration(jnp.ones((256, 20)), jnp.ones((255, 2)), mesh=mesh,
                                   axis_name="rows")
    with pytest.raises(ValueError, match="`orth_method`"):
        sharded_subspace_iteration(jnp.ones((256, 20)), jnp.ones((256, 2)), mesh=mesh,
                                   axis_name="rows", orth_method="mgs")
    with pytest.raises(TypeError, match="`a` must have a real floating dtype"):
        sharded_randomized_svd(jnp.ones((256, 20), jnp.int32), 3, key=key, mesh=mesh,
                               axis_name="rows")


def test_traceable_under_eval_shape_and_vmap(mesh):
    """Shapes only (no compilation): the sharded primitives trace under eval_shape,
    jit and vmap like their single-device counterparts."""
    key = jax.random.key(0)
    a = jax.ShapeDtypeStruct((2, 64, 16), jnp.float32)
    svd = lambda a: sharded_randomized_svd(a, 3, key=key, mesh=mesh, axis_name="rows",
                                           oversample=2)
    out = jax.eval_shape(jax.vmap(svd), a)
    assert out.u.shape == (2, 64, 3) and out.s.shape == (2, 3) and out.vt.shape == (2, 3, 16)
    sub = lambda a: sharded_subspace_iteration(a, a[:, :2], mesh=mesh, axis_name="rows",
                                               max_iters=3)
    res = jax.eval_shape(jax.jit(sub), jax.ShapeDtypeStruct((64, 16), jnp.float32))
    assert res.u.shape == (64, 2) and res.errors.shape == (3,)


def test_float64(mesh, x64):
    x = jax.random.normal(jax.random.key(0), (128, 5), dtype=jnp.float64)
    q = jax.jit(jax.shard_map(lambda v: sharded_orthonormalize(v, "rows", "cholesky_qr2"),
                              mesh=mesh, in_specs=P("rows"), out_specs=P("rows")))(x)
    assert q.dtype == jnp.float64
    np.testing.assert_allclose(q, orthonormalize(x, "householder"), atol=1e-13)


def _on_rows(mesh, f, n_out_tall, n_out_short, *args):
    """``shard_map`` of ``f`` with every argument row-sharded; the first ``n_out_tall``
    outputs row-sharded, the next ``n_out_short`` replicated."""
    out_specs = (P("rows"),) * n_out_tall + (P(),) * n_out_short
    return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=(P("rows"),) * len(args),
                                 out_specs=out_specs))(*args)


def test_axis_name_randomized_primitives_equal_single_device(mesh):
    """randomized_range_finder / randomized_eigh (Krylov and Nystrom) with `axis_name`
    inside shard_map give the single-device results."""
    a = decaying(256, 48)
    key = jax.random.key(7)
    q = _on_rows(mesh, lambda a: (sl.randomized_range_finder(a, 6, key=key, n_steps=2,
                                                             axis_name="rows"),), 1, 0, a)[0]
    ref = sl.randomized_range_finder(a, 6, key=key, n_steps=2)
    np.testing.assert_allclose(q, ref, atol=2e-5)

    x = decaying(128, 128, decay=0.7)
    s = x @ x.T
    for psd in (False, True):
        def eig(s, psd=psd):
            r = sl.randomized_eigh(s, 4, key=key, oversample=4, n_steps=3, psd=psd,
                                   axis_name="rows")
            return r.eigenvectors, r.eigenvalues, r.converged, r.errors

        vecs, lam, ok, err = _on_rows(mesh, eig, 1, 3, s)
        r = sl.randomized_eigh(s, 4, key=key, oversample=4, n_steps=3, psd=psd)
        assert bool(ok) and bool(r.converged)
        np.testing.assert_allclose(lam, r.eigenvalues, rtol=1e-5)
        np.testing.assert_allclose(err, r.errors, rtol=1e-2, atol=1e-6)
        sgn = np.sign(np.sum(np.asarray(vecs) * np.asarray(r.eigenvectors), axis=0))
        np.testing.assert_allclose(np.asarray(vecs) * sgn, r.eigenvectors, atol=1e-4)
        np.testing.assert_allclose(lam, 0.49 ** np.arange(4), rtol=1e-4)


def test_axis_name_right_subspace_iteration_equals_single_device(mesh):
    """subspace_iteration(side="right") on a row-sharded matrix: the (n, k) basis is
    replicated, A Q row-sharded; 8 devices give the one-device iteration and result."""
    a = decaying(256, 32, decay=0.7)
    q0 = jax.random.normal(jax.random.key(6), (32, 3))

    def it(a, q0):
        r = sl.subspace_iteration(a, q0, max_iters=25, tol=1e-4, side="right", axis_name="rows")
        return r.u, r.s, r.vt, r.n_iters, r.converged, r.errors

    f = jax.jit(jax.shard_map(it, mesh=mesh, in_specs=(P("rows"), P()),
                              out_specs=(P("rows"), P(), P(), P(), P(), P())))
    u, s, vt, n_iters, converged, errors = f(a, q0)
    ref = sl.subspace_iteration(a, q0, max_iters=25, tol=1e-4, side="right")
    assert bool(converged) and bool(ref.converged)
    assert int(n_iters) == int(ref.n_iters) < 25
    np.testing.assert_allclose(errors, ref.errors, rtol=1e-3, atol=1e-6)
    assert u.sharding.spec == P("rows") and u.addressable_shards[0].data.shape == (32, 3)
    res = SubspaceIterationResult(u, s, vt, n_iters, converged, errors)
    assert_same_svd(res, ref, atol=1e-4)
    np.testing.assert_allclose(s, 0.7 ** np.arange(3), rtol=1e-4)


def test_sharded_subspace_iteration_right_side_wrapper(mesh):
    """sharded_subspace_iteration(side="right") takes an (n, k) replicated start and
    equals the one-device right-subspace iteration; a row-shaped q0 is refused."""
    a = decaying(128, 32, decay=0.7)
    q0 = jax.random.normal(jax.random.key(7), (32, 3))
    res = sharded_subspace_iteration(a, q0, mesh=mesh, axis_name="rows", max_iters=25, tol=1e-4,
                                     side="right")
    ref = subspace_iteration(a, q0, max_iters=25, tol=1e-4, side="right")
    assert bool(res.converged) and int(res.n_iters) == int(ref.n_iters) < 25
    assert_same_svd(res, ref, atol=1e-4)
    with pytest.raises(ValueError, match="q0"):
        sharded_subspace_iteration(a, jnp.ones((128, 3)), mesh=mesh, axis_name="rows",
                                   side="right")
    with pytest.raises(ValueError, match="side"):
        sharded_subspace_iteration(a, q0, mesh=mesh, axis_name="rows", side="up")


def test_axis_name_cg_equals_single_device(mesh):
    rng = np.random.default_rng(0)
    g = rng.standard_normal((64, 64)).astype(np.float32)
    a = jnp.asarray(g @ g.T / 64 + np.eye(64, dtype=np.float32))
    b = jnp.asarray(rng.standard_normal(64).astype(np.float32))
    dinv = 1.0 / jnp.diag(a)

    def solve(a, b, dinv):
        r = sl.cg(a, b, tol=1e-6, max_iters=200, m=dinv, axis_name="rows")
        return r.x, r.converged, r.n_iters, r.residual_norm

    x, ok, it, rn = _on_rows(mesh, solve, 1, 3, a, b, dinv)
    ref = sl.cg(a, b, tol=1e-6, max_iters=200, m=dinv)
    assert bool(ok) and bool(ref.converged) and int(it) == int(ref.n_iters)
    np.testing.assert_allclose(x, ref.x, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x, np.linalg.solve(np.asarray(a), np.asarray(b)), atol=1e-4)


@pytest.mark.parametrize("n_dev", [8, 6])
def test_orthonormalize_axis_all_methods(n_dev):
    """Every method under an axis: butterfly TSQR on 8 devices, gathered TSQR on 6."""
    mesh = Mesh(np.array(jax.devices()[:n_dev]), ("rows",))
    x = jax.random.normal(jax.random.key(0), (12 * n_dev, 5))
    methods = sl.ORTH_METHODS
    qs = _on_rows(mesh, lambda x: tuple(sl.orthonormalize(x, m, ns_steps=60, axis_name="rows")
                                        for m in methods), len(methods), 0, x)
    for m, q in zip(methods, qs, strict=True):
        np.testing.assert_allclose(q, sl.orthonormalize(x, m, ns_steps=60), atol=5e-5,
                                   err_msg=m)
    # fewer local rows than columns: the padded TSQR still gives the unique factor
    y = jax.random.normal(jax.random.key(1), (2 * n_dev, 5))
    (q,) = _on_rows(mesh, lambda y: (sl.orthonormalize(y, "householder", axis_name="rows"),),
                    1, 0, y)
    np.testing.assert_allclose(q, sl.orthonormalize(y, "householder"), atol=5e-5)
