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
    sharded_lanczos_eigh,
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
        sharded_randomized_svd(jnp.ones((256, 20)), 15, key=key, mesh=mesh, axis_name="rows",
                               oversample=10)
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


# ------------------------------------------------------------ lanczos_eigh with axis_name


def _sym_with_spectrum(n, top, seed=0):
    """A dense float64 symmetric matrix: ``top`` and a bulk in [-3, 3], random eigenvectors."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    d = np.concatenate([np.linspace(-3.0, 3.0, n - len(top)), top])
    return (u * d) @ u.T


def _wanted(dense, which, k):
    w, v = np.linalg.eigh(dense)
    idx = {"LA": np.argsort(-w), "SA": np.argsort(w), "LM": np.argsort(-np.abs(w))}[which][:k]
    return w[idx], v[:, idx]


def _lanczos_on_rows(mesh, a, *args, **kw):
    """lanczos_eigh(a_local, *args, axis_name="rows", **kw) inside shard_map over the rows
    (eigenvectors row-sharded, the rest replicated)."""
    def f(a):
        r = sl.lanczos_eigh(a, *args, axis_name="rows", **kw)
        return r.eigenvectors, r.eigenvalues, r.n_iters, r.converged, r.errors

    return _on_rows(mesh, f, 1, 4, a)


def _assert_same_lanczos(out, ref, dense, which):
    """8 devices == 1 device (same cycles, pairs to rounding) and == dense eigh."""
    vecs, lam, n_iters, ok, errors = (np.asarray(x) for x in out)
    assert bool(ok) and bool(ref.converged)
    assert int(n_iters) == int(ref.n_iters) > 1  # restarts (and locking) were exercised
    np.testing.assert_allclose(lam, ref.eigenvalues, rtol=0, atol=1e-10)
    sgn = np.sign(np.sum(vecs * np.asarray(ref.eigenvectors), axis=0))
    assert np.all(sgn != 0)
    np.testing.assert_allclose(vecs * sgn, ref.eigenvectors, atol=1e-10)
    np.testing.assert_allclose(errors, ref.errors, rtol=1e-5, atol=1e-13)
    w, v = _wanted(dense, which, lam.shape[0])
    np.testing.assert_allclose(lam, w, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(vecs * v, axis=0)), 1.0, atol=1e-9)


def test_axis_name_lanczos_equals_single_device(mesh, x64):
    """Thick-restarted Lanczos with the basis row-sharded over 8 devices runs the same
    cycles as on one device and returns the same pairs (and LAPACK's)."""
    dense = _sym_with_spectrum(256, [5.0, 4.5, -4.0, -4.4])
    a = jnp.asarray(dense)
    kw = dict(key=jax.random.key(0), tol=1e-10)
    out = _lanczos_on_rows(mesh, a, 3, **kw)
    assert out[0].sharding.spec == P("rows") and out[0].addressable_shards[0].data.shape == (32, 3)
    _assert_same_lanczos(out, sl.lanczos_eigh(a, 3, **kw), dense, "LA")


@pytest.mark.parametrize("which,block_size", [("SA", 1), ("LA", 2), ("SA", 2), ("LM", 2)])
def test_axis_name_lanczos_which_and_blocks_equal_single_device(mesh, x64, which, block_size):
    dense = _sym_with_spectrum(256, [5.0, 4.5, -4.0, -4.4])
    a = jnp.asarray(dense)
    kw = dict(key=jax.random.key(1), tol=1e-10, which=which, block_size=block_size)
    out = _lanczos_on_rows(mesh, a, 3, **kw)
    _assert_same_lanczos(out, sl.lanczos_eigh(a, 3, **kw), dense, which)


@pytest.mark.parametrize("block_size", [1, 2])
def test_axis_name_lanczos_callable_and_v0_equal_single_device(mesh, x64, block_size):
    """A callable on local blocks (doing its own all_gather) with a row-sharded warm start
    equals the single-device run from the same start."""
    dense = _sym_with_spectrum(256, [5.0, 4.5, -4.0, -4.4], seed=1)
    a = jnp.asarray(dense)
    v0 = jax.random.normal(jax.random.key(2), (256, block_size), jnp.float64)

    def f(a, v0):
        def matvec(x):  # this device's rows of A x from this device's rows of x
            return a @ jax.lax.all_gather(x, "rows", tiled=True)

        r = sl.lanczos_eigh(matvec, 3, v0=v0, tol=1e-10, block_size=block_size,
                            axis_name="rows")
        return r.eigenvectors, r.eigenvalues, r.n_iters, r.converged, r.errors

    out = _on_rows(mesh, f, 1, 4, a, v0)
    ref = sl.lanczos_eigh(a, 3, v0=v0, tol=1e-10, block_size=block_size)
    _assert_same_lanczos(out, ref, dense, "LA")


def test_axis_name_lanczos_shift_invert(mesh, x64):
    """Shift-and-invert with a `solve` on local blocks: the eigenvalues nearest sigma."""
    dense = _sym_with_spectrum(128, [5.0, 4.5, -4.0, -4.4], seed=2)
    a = jnp.asarray(dense)
    sigma = 0.01
    lu = jax.scipy.linalg.lu_factor(a - sigma * jnp.eye(128))

    def f(a):
        def solve(x):  # replicated factor: gather x, solve, keep this device's rows
            y = jax.scipy.linalg.lu_solve(lu, jax.lax.all_gather(x, "rows", tiled=True))
            return jax.lax.dynamic_slice_in_dim(y, jax.lax.axis_index("rows") * 16, 16)

        r = sl.lanczos_eigh(a, 3, key=jax.random.key(0), tol=1e-10, which="LM", sigma=sigma,
                            solve=solve, axis_name="rows")
        return r.eigenvectors, r.eigenvalues, r.n_iters, r.converged, r.errors

    vecs, lam, n_iters, ok, _ = _on_rows(mesh, f, 1, 4, a)
    ref = sl.lanczos_eigh(a, 3, key=jax.random.key(0), tol=1e-10, which="LM", sigma=sigma,
                          solve=lambda x: jax.scipy.linalg.lu_solve(lu, x))
    assert bool(ok) and bool(ref.converged) and int(n_iters) == int(ref.n_iters)
    np.testing.assert_allclose(lam, ref.eigenvalues, rtol=0, atol=1e-10)
    w, v = np.linalg.eigh(dense)
    idx = np.argsort(np.abs(w - sigma))[:3]
    np.testing.assert_allclose(lam, w[idx], rtol=0, atol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(vecs) * v[:, idx], axis=0)), 1.0,
                               atol=1e-8)


def test_axis_name_lanczos_flags_an_asymmetric_matrix(mesh, x64):
    """Row blocks of S + 1e-5 N (N antisymmetric): the true residuals meet tol=1e-3 but the
    psum'd recurrence check sees the asymmetry, so converged=False; S itself converges."""
    s = _sym_with_spectrum(128, [5.0, 4.5], seed=3)
    e = np.random.default_rng(4).standard_normal((128, 128))
    bad = jnp.asarray(s + 1e-5 * (e - e.T))
    out = _lanczos_on_rows(mesh, bad, 2, key=jax.random.key(0), tol=1e-3)
    assert float(out[4][int(out[2]) - 1]) <= 1e-3
    assert not bool(out[3])
    assert bool(_lanczos_on_rows(mesh, jnp.asarray(s), 2, key=jax.random.key(0), tol=1e-3)[3])


def test_axis_name_lanczos_bad_inputs(mesh, x64):
    """Shapes are checked while tracing (no compilation): messages name the argument."""
    def trace(f, *args):
        specs = (P("rows"),) * len(args)
        return jax.eval_shape(jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P()),
                              *args)

    def eig(a, **kw):
        return sl.lanczos_eigh(a, 2, axis_name="rows", **kw).eigenvalues

    key = jax.random.key(0)
    sq = jax.ShapeDtypeStruct((256, 256), jnp.float64)
    with pytest.raises(ValueError, match=r"`a` must be square .*row blocks of \(32, 200\)"):
        trace(lambda a: eig(a, key=key), jax.ShapeDtypeStruct((256, 200), jnp.float64))
    with pytest.raises(ValueError, match=r"`v0` must have shape \(32, 1\) \(this device's rows\)"):
        trace(lambda a, v: eig(a, v0=v), sq, jax.ShapeDtypeStruct((256, 2), jnp.float64))
    with pytest.raises(ValueError, match=r"`v0` must have shape \(32, k\)"):
        trace(lambda a, v: eig(a, v0=v), sq, jax.ShapeDtypeStruct((128, 1), jnp.float64))
    with pytest.raises(ValueError, match="callable `a` with `axis_name` needs `v0`"):
        trace(lambda a: eig(lambda x: x, key=key), sq)
    with pytest.raises(ValueError,
                       match=r"basis_size` \+ 2 x `block_size` = 256 \+ 2 x 2 exceeds n=256"):
        trace(lambda a: eig(a, key=key, block_size=2, basis_size=256), sq)
    # the shapes of a valid call: local eigenvectors, replicated eigenvalues
    out = jax.eval_shape(jax.shard_map(
        lambda a: tuple(sl.lanczos_eigh(a, 2, key=key, axis_name="rows"))[:2], mesh=mesh,
        in_specs=P("rows"), out_specs=(P(), P("rows"))), sq)
    assert out[0].shape == (2,) and out[1].shape == (256, 2)
    # forward-only: a derivative is refused by name, not by a collective's missing rule
    with pytest.raises(TypeError, match="`axis_name` is forward-only"):
        f = jax.shard_map(lambda a: eig(a, key=key), mesh=mesh, in_specs=P("rows"),
                          out_specs=P())
        jax.eval_shape(jax.grad(lambda a: jnp.sum(f(a))), sq)
    with pytest.raises(ValueError, match="not a bound mesh axis"):
        sl.lanczos_eigh(jnp.eye(16), 2, key=key, axis_name="rows")


def test_sharded_lanczos_eigh_wrapper_equals_lanczos_eigh(mesh, x64):
    dense = _sym_with_spectrum(256, [5.0, 4.5, -4.0, -4.4], seed=5)
    a = jnp.asarray(dense)
    kw = dict(key=jax.random.key(3), tol=1e-10, which="SA", block_size=2)
    res = sharded_lanczos_eigh(a, 3, mesh=mesh, axis_name="rows", **kw)
    assert res.eigenvectors.sharding.spec == P("rows")
    out = (res.eigenvectors, res.eigenvalues, res.n_iters, res.converged, res.errors)
    _assert_same_lanczos(out, sl.lanczos_eigh(a, 3, **kw), dense, "SA")
    v0 = jnp.ones((256, 1))
    with pytest.raises(ValueError, match=r"`v0` must have shape \(256, block_size\)"):
        sharded_lanczos_eigh(a, 3, mesh=mesh, axis_name="rows", v0=v0[:128])
    with pytest.raises(ValueError, match="`a` must be square"):
        sharded_lanczos_eigh(a[:, :128], 3, mesh=mesh, axis_name="rows", v0=v0)


@pytest.mark.parametrize("block_size", [1, 2])
def test_axis_name_lanczos_exhausted_krylov_space(mesh, x64, block_size):
    """A rank-5 matrix: its Krylov space is exhausted after at most 5 + block_size vectors,
    well inside the 30-vector basis, so the block normalisation must take its robust
    (sharded) fallback; the pairs are still those of eigh, with an orthonormal basis."""
    rng = np.random.default_rng(6)
    u, _ = np.linalg.qr(rng.standard_normal((128, 5)))
    dense = (u * np.array([4.0, 3.0, 2.0, -1.0, -2.5])) @ u.T
    out = _lanczos_on_rows(mesh, jnp.asarray(dense), 3, key=jax.random.key(0), tol=1e-10,
                           block_size=block_size)
    vecs, lam, _, ok, _ = (np.asarray(x) for x in out)
    assert bool(ok)
    np.testing.assert_allclose(lam, [4.0, 3.0, 2.0], rtol=0, atol=1e-10)
    np.testing.assert_allclose(vecs.T @ vecs, np.eye(3), atol=1e-12)
    w, v = _wanted(dense, "LA", 3)
    np.testing.assert_allclose(np.abs(np.sum(vecs * v, axis=0)), 1.0, atol=1e-9)
