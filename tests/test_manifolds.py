"""Geometry of subjax.manifolds: retraction axioms, exp/log, transport, metric, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from subjax.manifolds import SPD, Euclidean, Grassmann, Sphere, Stiefel

# (manifold, retraction) pairs; every retraction is compared with the exponential map
RETRACTIONS = [
    (Sphere(5), "exp"), (Sphere(5), "projection"),
    *[(Stiefel(7, 3), r) for r in Stiefel.retractions],
    *[(Grassmann(7, 3), r) for r in Grassmann.retractions],
    *[(SPD(4, m), "exp") for m in ("affine", "bures_wasserstein", "log_euclidean")],
]
RIDS = [f"{type(m).__name__}{getattr(m, 'metric', '')}-{r}" for m, r in RETRACTIONS]

WITH_LOG = [Sphere(5), Grassmann(7, 3), SPD(4, "affine"), SPD(4, "bures_wasserstein"),
            SPD(4, "log_euclidean")]
LIDS = [f"{type(m).__name__}{getattr(m, 'metric', '')}" for m in WITH_LOG]
ALL = [Euclidean((3, 2)), Sphere(5), Stiefel(7, 3), Grassmann(7, 3), SPD(4, "affine"),
       SPD(4, "bures_wasserstein"), SPD(4, "log_euclidean")]
AIDS = [f"{type(m).__name__}{getattr(m, 'metric', '')}" for m in ALL]


def _point_tangent(m, seed=0, batch=(3,)):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = m.random_point(k1, batch, jnp.float64)
    u = m.random_tangent(k2, x)
    return x, u / jnp.max(jnp.abs(u))


def _on(m, x, tol):
    assert float(jnp.max(m.check(x))) < tol


@pytest.mark.parametrize(("m", "method"), RETRACTIONS, ids=RIDS)
def test_retraction_axioms(x64, m, method):
    x, u = _point_tangent(m)
    np.testing.assert_allclose(m.retract(x, 0 * u, method), x, atol=1e-12)
    errs = []
    for t in (1e-2, 1e-3):
        y = m.retract(x, t * u, method)
        _on(m, y, 1e-10)
        errs.append(float(jnp.max(jnp.abs(y - m.exp(x, t * u)))))
    # first-order agreement with exp: the gap shrinks at least quadratically in t
    assert errs[1] < errs[0] / 50 or errs[1] < 1e-12, errs
    # and the derivative at 0 is u (central difference)
    h = 1e-5
    d = (m.retract(x, h * u, method) - m.retract(x, -h * u, method)) / (2 * h)
    np.testing.assert_allclose(d, u, atol=1e-6)


@pytest.mark.parametrize("m", WITH_LOG, ids=LIDS)
def test_exp_log_inverse_and_distance(x64, m):
    x, u = _point_tangent(m, seed=1)
    u = 0.4 * u
    np.testing.assert_allclose(m.log(x, m.exp(x, u)), u, atol=1e-9)
    y = m.random_point(jax.random.key(7), (3,), jnp.float64)
    if isinstance(m, Sphere):
        y = m.project_point(x + 0.8 * (y - x))  # stay away from the antipode
    v = m.log(x, y)
    y2 = m.exp(x, v)
    if isinstance(m, Grassmann):
        np.testing.assert_allclose(m.dist(y, y2), 0, atol=1e-6)
    else:
        np.testing.assert_allclose(y2, y, atol=1e-9)
    np.testing.assert_allclose(m.dist(x, y), m.norm(x, v), rtol=1e-8)
    np.testing.assert_allclose(m.dist(x, y), m.dist(y, x), rtol=1e-8)


@pytest.mark.parametrize("m", WITH_LOG, ids=LIDS)
def test_riemannian_gradient_of_squared_distance_is_minus_log(x64, m):
    # egrad2rgrad and the metric must agree: grad (d^2(., y) / 2)(x) = -log_x(y)
    x = m.random_point(jax.random.key(2), (), jnp.float64)
    y = m.random_point(jax.random.key(3), (), jnp.float64)
    if isinstance(m, Sphere):
        y = m.project_point(x + 0.8 * (y - x))
    eg = jax.grad(lambda z: 0.5 * m.dist(z, y) ** 2)(x)
    np.testing.assert_allclose(m.egrad2rgrad(x, eg), -m.log(x, y), atol=1e-7)


@pytest.mark.parametrize("m", ALL, ids=AIDS)
def test_rgrad_represents_differential(x64, m):
    # <rgrad f, u>_x = Df(x)[u] for tangent u, f(z) = sum(sin(z) * c)
    x, u = _point_tangent(m, seed=3, batch=())
    c = jax.random.normal(jax.random.key(9), x.shape, jnp.float64)
    f = lambda z: jnp.sum(jnp.sin(z) * c)
    eg = jax.grad(f)(x)
    lhs = m.inner(x, m.egrad2rgrad(x, eg), u)
    rhs = jnp.sum(eg * u)
    np.testing.assert_allclose(lhs, rhs, rtol=1e-8, atol=1e-10)
    # and the Riemannian gradient is tangent
    rg = m.egrad2rgrad(x, eg)
    np.testing.assert_allclose(m.proj(x, rg), rg, atol=1e-10)


@pytest.mark.parametrize("m", ALL, ids=AIDS)
def test_transport_keeps_vectors_tangent(x64, m):
    x, u = _point_tangent(m, seed=4)
    y = m.retract(x, 0.5 * u) if not isinstance(m, Euclidean) else x + u
    v = m.random_tangent(jax.random.key(11), x)
    w = m.transport(x, y, v)
    np.testing.assert_allclose(m.proj(y, w), w, atol=1e-10)
    if isinstance(m, Stiefel):  # Stiefel / Grassmann: tangent conditions directly
        xtw = jnp.swapaxes(y, -1, -2) @ w
        sym_or_full = xtw if isinstance(m, Grassmann) else xtw + jnp.swapaxes(xtw, -1, -2)
        np.testing.assert_allclose(sym_or_full, 0, atol=1e-10)
    if isinstance(m, SPD) and m.metric == "affine":  # parallel transport is an isometry
        np.testing.assert_allclose(m.inner(y, w, w), m.inner(x, v, v), rtol=1e-8)


def test_inverse_retractions(x64):
    for m, method in [(Stiefel(7, 3), "polar"), (Grassmann(7, 3), "polar"),
                      (Grassmann(7, 3), "qr"), (Sphere(5), "projection")]:
        x, u = _point_tangent(m, seed=5)
        u = 0.3 * u
        np.testing.assert_allclose(m.inverse_retract(x, m.retract(x, u, method), method), u,
                                   atol=1e-9)
    with pytest.raises(NotImplementedError, match="cayley"):
        Stiefel(5, 2).inverse_retract(jnp.eye(5, 2), jnp.eye(5, 2), "cayley")


def test_grassmann_principal_angles_match_scipy(x64):
    gr = Grassmann(9, 3)
    x, y = gr.random_point(jax.random.key(0), (2,), jnp.float64)
    ref = np.sort(scipy.linalg.subspace_angles(np.asarray(x), np.asarray(y)))
    np.testing.assert_allclose(gr.principal_angles(x, y), ref, atol=1e-10)
    np.testing.assert_allclose(gr.dist(x, y), np.linalg.norm(ref), atol=1e-10)
    # invariance to the choice of basis
    q = Stiefel(3, 3).random_point(jax.random.key(1), (), jnp.float64)
    np.testing.assert_allclose(gr.dist(x @ q, y), gr.dist(x, y), atol=1e-10)
    # tiny angles are resolved (no arccos cancellation)
    u = gr.random_tangent(jax.random.key(3), x)
    u = 1e-7 * u / gr.norm(x, u)
    np.testing.assert_allclose(gr.dist(x, gr.exp(x, u)), 1e-7, rtol=1e-5)


@pytest.mark.parametrize("m", [Stiefel(6, 2), Grassmann(6, 2)], ids=["stiefel", "grassmann"])
@pytest.mark.parametrize("method", ["polar", "cholesky_qr", "qr"])
def test_fused_momentum_step_matches_composition(x64, m, method):
    x, _ = _point_tangent(m, seed=6, batch=(4,))
    g = jax.random.normal(jax.random.key(1), x.shape, jnp.float64)
    mom = m.random_tangent(jax.random.key(2), x)
    lr, beta = jnp.asarray(0.07), jnp.asarray(0.9)
    u, m_new = m.momentum_step(x, g, mom, lr, beta, False, method)
    ref_m = m.proj(x, beta * mom) + m.egrad2rgrad(x, g)
    ref_u = m.retract(x, -lr * ref_m, method) - x
    np.testing.assert_allclose(m_new, ref_m, atol=1e-12)
    np.testing.assert_allclose(u, ref_u, atol=1e-12)
    # drifted x: the fused step still lands on the manifold (Gram of x is computed)
    xd = x * (1 + 1e-4)
    u, _ = m.momentum_step(xd, g, mom, lr, beta, False, method)
    _on(m, xd + u, 1e-12)


def test_batch_jit_vmap_float32():
    gr = Grassmann(10, 3)
    x = gr.random_point(jax.random.key(0), (5, 2))
    assert x.shape == (5, 2, 10, 3) and x.dtype == jnp.float32
    _on(gr, x, 1e-5)
    u = 0.1 * gr.random_tangent(jax.random.key(1), x)
    for method in gr.retractions:
        y = jax.jit(gr.retract, static_argnums=2)(x, u, method)
        yv = jax.vmap(jax.vmap(lambda a, b: gr.retract(a, b, method)))(x, u)
        assert y.dtype == jnp.float32
        np.testing.assert_allclose(y, yv, atol=1e-5)
        _on(gr, y, 2e-5)
    assert gr.dist(x, x).shape == (5, 2) and gr.inner(x, u, u).shape == (5, 2)
    s = jax.eval_shape(gr.exp, x, u)
    assert s.shape == x.shape
    xb = x.astype(jnp.bfloat16)
    assert gr.retract(xb, u.astype(jnp.bfloat16)).dtype == jnp.bfloat16


def test_spd_karcher_means_closed_form(x64):
    a = SPD(3).random_point(jax.random.key(0), (), jnp.float64)
    b = SPD(3).random_point(jax.random.key(1), (), jnp.float64)
    sa = scipy.linalg.sqrtm(np.asarray(a)).real
    isa = np.linalg.inv(sa)
    geo = sa @ scipy.linalg.sqrtm(isa @ np.asarray(b) @ isa).real @ sa  # a # b
    logeu = scipy.linalg.expm(0.5 * (scipy.linalg.logm(a).real + scipy.linalg.logm(b).real))
    for metric, ref in [("affine", geo), ("log_euclidean", logeu)]:
        m = SPD(3, metric)
        x = jnp.eye(3, dtype=jnp.float64)
        for _ in range(30):  # Karcher fixed point: x <- exp_x(mean_i log_x(a_i))
            x = m.exp(x, 0.5 * (m.log(x, a) + m.log(x, b)))
        np.testing.assert_allclose(x, ref, atol=1e-9)
        np.testing.assert_allclose(m.dist(x, a), m.dist(x, b), rtol=1e-8)  # a midpoint
    # Bures-Wasserstein barycenter of commuting matrices: ((sqrt a + sqrt b) / 2)^2
    da, db = jnp.array([1.0, 4.0, 9.0]), jnp.array([4.0, 1.0, 0.25])
    m = SPD(3, "bures_wasserstein")
    x = jnp.eye(3, dtype=jnp.float64)
    for _ in range(30):
        x = m.exp(x, 0.5 * (m.log(x, jnp.diag(da)) + m.log(x, jnp.diag(db))))
    np.testing.assert_allclose(x, jnp.diag(((jnp.sqrt(da) + jnp.sqrt(db)) / 2) ** 2), atol=1e-9)


def test_bad_inputs():
    with pytest.raises(ValueError, match="`p`=5 exceeds `n`=3"):
        Stiefel(3, 5)
    with pytest.raises(ValueError, match="`p`"):
        Grassmann(3, 4)
    with pytest.raises(ValueError, match="`metric`"):
        SPD(3, "frobenius")
    with pytest.raises(ValueError, match="`retraction`"):
        Stiefel(5, 2, retraction="householder")
    with pytest.raises(ValueError, match="`method`"):
        Stiefel(5, 2).retract(jnp.eye(5, 2), jnp.zeros((5, 2)), "nope")
    with pytest.raises(ValueError, match=r"`w` has shape \(4, 2\)"):
        Stiefel(5, 2).validate_shape(jnp.zeros((4, 2)), "w")
    with pytest.raises(ValueError, match="constraint error"):
        Stiefel(5, 2).assert_on_manifold(2 * jnp.eye(5, 2))
    with pytest.raises(ValueError, match="not symmetric"):
        SPD(2).assert_on_manifold(jnp.array([[1.0, 0.5], [0.0, 1.0]]), "cov")
    with pytest.raises(ValueError, match="not positive definite"):
        SPD(2).assert_on_manifold(jnp.array([[1.0, 0.0], [0.0, -1.0]]), "cov")
    with pytest.raises(ValueError, match="`n`"):
        Sphere(0)
    # check() is a real constraint error
    assert float(Sphere(3).check(jnp.array([0.0, 0.0, 2.0]))) == pytest.approx(1.0)
    assert float(SPD(2).check(jnp.array([[1.0, 0.0], [0.0, -3.0]]))) == pytest.approx(3.0)


def test_every_operation_checks_its_arguments():
    st = Stiefel(5, 2)
    x = st.random_point(jax.random.key(0))
    with pytest.raises(ValueError, match=r"`x` has shape \(4, 2\).*\(5, 2\)"):
        st.retract(jnp.ones((4, 2)), jnp.ones((4, 2)))
    with pytest.raises(ValueError, match=r"`x` has shape \(4,\)"):
        Sphere(3).retract(jnp.ones(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"`u` has shape \(5, 3\)"):
        st.proj(x, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="`u` has shape .* does not broadcast with the point `x`"):
        st.proj(jnp.stack([x, x]), jnp.ones((3, 5, 2)))
    with pytest.raises(TypeError, match="`x` must have a real floating dtype, got int32"):
        st.proj(jnp.ones((5, 2), jnp.int32), x)
    with pytest.raises(TypeError, match="`u` must have a real floating dtype, got complex64"):
        st.proj(x, jnp.ones((5, 2), jnp.complex64))
    with pytest.raises(TypeError, match="`v`"):
        Grassmann(5, 2).transport(x, x, "tangent")
    # a batch of tangents at one point broadcasts
    assert st.proj(x, jnp.ones((3, 5, 2))).shape == (3, 5, 2)


@pytest.mark.parametrize("metric", ["affine", "bures_wasserstein", "log_euclidean"])
def test_spd_operations_refuse_a_concrete_non_spd_point(metric):
    spd = SPD(2, metric)
    bad = jnp.diag(jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="`x` is not positive definite"):
        spd.exp(bad, jnp.eye(2))
    with pytest.raises(ValueError, match="`y` is not positive definite"):
        spd.dist(jnp.eye(2), bad)
    with pytest.raises(ValueError, match="`x` is not symmetric"):
        spd.log(jnp.array([[1.0, 0.5], [0.0, 1.0]]), jnp.eye(2))
    # traced points are only shape-checked
    assert jax.jit(spd.dist)(jnp.eye(2), 2 * jnp.eye(2)).shape == ()


def test_grassmann_log_finite_at_the_cut_locus(x64):
    gr = Grassmann(6, 2)
    e = jnp.eye(6, dtype=jnp.float64)
    x = e[:, :2]
    for y in (e[:, 2:4], jnp.stack([e[:, 0], e[:, 3]], 1)):  # two / one orthogonal angles
        v = gr.log(x, y)
        assert bool(jnp.all(jnp.isfinite(v)))
        np.testing.assert_allclose(x.T @ v, 0, atol=1e-12)  # horizontal
        np.testing.assert_allclose(jnp.linalg.norm(v), gr.dist(x, y), rtol=1e-12)
        np.testing.assert_allclose(gr.dist(y, gr.exp(x, v)), 0, atol=1e-7)
    # and it is the logarithm away from the cut locus (compare with the old closed form)
    x, y = gr.random_point(jax.random.key(3), (2,), jnp.float64)
    a = x.T @ y
    m = (y - x @ a) @ jnp.linalg.inv(a)
    u, s, vt = jnp.linalg.svd(m, full_matrices=False)
    np.testing.assert_allclose(gr.log(x, y), (u * jnp.arctan(s)) @ vt, atol=1e-12)


def test_concrete_points_closed_over_by_jit_are_checked():
    """A concrete point captured by a jitted function is validated, not a tracer error."""
    st, spd = Stiefel(4, 2), SPD(2)
    x = st.random_point(jax.random.key(0))
    assert jax.jit(lambda: st.check(x))().shape == ()
    st.assert_on_manifold(x)
    off = 2 * x
    with pytest.raises(ValueError, match="`w` is not on"):
        jax.jit(lambda: st.assert_on_manifold(off, "w"))()
    good, bad = 2 * jnp.eye(2), jnp.diag(jnp.array([1.0, -1.0]))
    np.testing.assert_allclose(jax.jit(lambda: spd.dist(jnp.eye(2), good))(),
                               spd.dist(jnp.eye(2), good), rtol=1e-6)
    with pytest.raises(ValueError, match="`y` is not positive definite"):
        jax.jit(lambda: spd.dist(jnp.eye(2), bad))()
