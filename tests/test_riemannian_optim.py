"""Riemannian optimizers: Brockett cost, Grassmann PCA, SPD mean, drift, pytrees, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

from subjax.manifolds import SPD, Grassmann, Sphere, Stiefel
from subjax.optim import manifold_labels, riemannian_adam, riemannian_sgd


def _run(opt, loss, params, steps):
    state = opt.init(params)

    def body(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), None

    (params, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=steps))(
        (params, state))
    return params


def _spd_matrix(key, n, dtype=jnp.float32):
    q = Stiefel(n, n).random_point(key, (), dtype)
    ev = jnp.linspace(1.0, 0.1, n, dtype=dtype)
    return (q * ev) @ q.T, ev, q


@pytest.mark.standard_promotion  # optax schedules are not strict-clean
@pytest.mark.parametrize("opt_name", ["sgd", "sgd_nesterov_cayley", "adam", "sgd_exp"])
def test_brockett_cost_on_stiefel(opt_name):
    # min -tr(X^T A X N), N = diag(p..1): minimizer = top eigenvectors of A in order
    n, p = 12, 3
    a, ev, q = _spd_matrix(jax.random.key(0), n)
    nmat = jnp.diag(jnp.arange(p, 0, -1).astype(jnp.float32))
    st = Stiefel(n, p)
    loss = lambda x: -jnp.trace(x.T @ a @ x @ nmat)
    opt = {
        "sgd": riemannian_sgd(0.2, 0.9, manifolds=st),
        "sgd_nesterov_cayley": riemannian_sgd(0.2, 0.9, True, manifolds=st, retraction="cayley"),
        "adam": riemannian_adam(optax.cosine_decay_schedule(0.1, 2000, 0.01), manifolds=st),
        "sgd_exp": riemannian_sgd(0.2, 0.9, manifolds=st, retraction="exp"),
    }[opt_name]
    x = _run(opt, loss, st.random_point(jax.random.key(1)), 2000 if opt_name == "adam" else 600)
    fmin = -float(jnp.sum(ev[:p] * jnp.diag(nmat)))
    assert float(loss(x)) == pytest.approx(fmin, abs=1e-4)
    np.testing.assert_allclose(jnp.abs(x.T @ q[:, :p]), jnp.eye(p), atol=1e-2)
    assert float(st.check(x)) < 1e-5


def test_grassmann_pca_recovers_top_eigenvectors():
    # stochastic PCA on data: top-p subspace, principal angles ~ 0, batch of 4 problems
    n, p, b = 30, 4, 4
    keys = jax.random.split(jax.random.key(0), b)
    scales = jnp.concatenate([jnp.array([5.0, 4.0, 3.0, 2.5]), jnp.ones(n - p) * 0.5])
    data = jax.vmap(lambda k: jax.random.normal(k, (2000, n)) * scales)(keys)
    rot = Stiefel(n, n).random_point(jax.random.key(5), (b,))
    data = data @ jnp.swapaxes(rot, -1, -2)
    gr = Grassmann(n, p)

    def loss(x, k):  # minibatch of 128 rows per problem
        idx = jax.random.randint(k, (128,), 0, 2000)
        xb = data[:, idx]
        return -jnp.sum((xb @ x) ** 2) / 128

    # Robbins-Monro style decay, so the stochastic iterate settles
    opt = riemannian_sgd(lambda t: 0.01 / (1 + t / 100), 0.9, manifolds=gr)
    x = gr.random_point(jax.random.key(2), (b,))

    def body(carry, k):
        x, state = carry
        u, state = opt.update(jax.grad(loss)(x, k), state, x)
        return (optax.apply_updates(x, u), state), None

    keys = jax.random.split(jax.random.key(3), 400)
    (x, _), _ = jax.jit(lambda c, ks: jax.lax.scan(body, c, ks))((x, opt.init(x)), keys)
    top = rot[..., :p]  # true top-p eigenvectors (scales sorted)
    angles = gr.principal_angles(x, top)
    assert float(jnp.max(angles)) < 0.1, angles
    # full-batch exact: recovers to high precision
    cov = jnp.swapaxes(data, -1, -2) @ data / 2000
    full = lambda x: -jnp.sum(jnp.swapaxes(x, -1, -2) @ cov * jnp.swapaxes(x, -1, -2))
    x = _run(riemannian_sgd(0.05, 0.9, manifolds=gr), full, x, 300)
    evecs = jnp.linalg.eigh(cov)[1][..., ::-1][..., :p]
    assert float(jnp.max(gr.principal_angles(x, evecs))) < 1e-3


def test_sphere_rayleigh_and_spd_karcher_mean_by_sgd(x64):
    a, ev, q = _spd_matrix(jax.random.key(3), 8, jnp.float64)
    sp = Sphere(8)
    x = _run(riemannian_sgd(0.5, 0.5, manifolds=sp), lambda x: -x @ a @ x,
             sp.random_point(jax.random.key(1), (), jnp.float64), 500)
    assert abs(float(jnp.abs(x @ q[:, 0])) - 1) < 1e-6
    # SPD (affine) Riemannian gradient descent on the Frechet variance of two matrices
    spd = SPD(3)
    mats = spd.random_point(jax.random.key(4), (2,), jnp.float64)
    loss = lambda x: 0.25 * (spd.dist(x, mats[0]) ** 2 + spd.dist(x, mats[1]) ** 2)
    x0 = 0.5 * (mats[0] + mats[1])  # generic start: eigh has distinct eigenvalues there
    x = _run(riemannian_sgd(0.5, manifolds=spd), loss, x0, 60)
    sa = scipy.linalg.sqrtm(np.asarray(mats[0])).real
    isa = np.linalg.inv(sa)
    geo = sa @ scipy.linalg.sqrtm(isa @ np.asarray(mats[1]) @ isa).real @ sa
    np.testing.assert_allclose(x, geo, atol=1e-8)


@pytest.mark.parametrize("retraction", ["polar", "exp"])
def test_orthonormality_after_10000_float32_steps(retraction):
    # noisy gradients, big steps; lax.scan for speed. exp (geodesic) drifts on its own,
    # the periodic re-orthonormalisation keeps the error below 1e-5
    gr = Grassmann(16, 4)
    c = jax.random.normal(jax.random.key(0), (2, 16, 16))
    c = c @ jnp.swapaxes(c, -1, -2)
    opt = riemannian_sgd(0.02, 0.9, manifolds=gr, retraction=retraction)
    x0 = gr.random_point(jax.random.key(1), (2,))

    def body(carry, k):
        x, s = carry
        g = -2 * c @ x / 16 + jax.random.normal(k, x.shape)
        u, s = opt.update(g, s, x)
        x = optax.apply_updates(x, u)
        return (x, s), jnp.max(gr.check(x))

    keys = jax.random.split(jax.random.key(2), 10_000)
    (x, _), errs = jax.jit(lambda c0, ks: jax.lax.scan(body, c0, ks))((x0, opt.init(x0)), keys)
    assert x.dtype == jnp.float32
    assert float(jnp.max(errs)) < 1e-5, float(jnp.max(errs))


@pytest.mark.standard_promotion  # optax.partition / adam / schedules
def test_mixed_pytree_partition_and_schedule():
    gr = Grassmann(6, 2)
    params = {"w": gr.random_point(jax.random.key(0), (3,)), "b": jnp.ones(4), "s": jnp.ones(())}
    manifolds = {"w": gr, "b": None, "s": None}
    tx = optax.partition(
        {"riemannian": riemannian_sgd(optax.linear_schedule(0.1, 0.0, 10), 0.9,
                                      manifolds=manifolds),
         "euclidean": optax.adam(0.1)},
        manifold_labels(manifolds))
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(12):
        u, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, u)
    assert float(jnp.max(gr.check(params["w"]))) < 1e-5
    # the adam leaves moved by about lr per step, the schedule has reached 0
    assert float(params["s"]) == pytest.approx(1 - 12 * 0.1, abs=1e-3)
    u, state = tx.update(grads, state, params)
    np.testing.assert_allclose(u["w"], 0, atol=1e-6)


@pytest.mark.standard_promotion  # optax.adam's bias correction
def test_euclidean_leaves_match_optax_sgd_and_adam():
    params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    grads = {"a": jnp.array([1.0, -2.0, 0.5]), "b": jnp.full((2, 2), 0.3)}
    for ours, ref in [(riemannian_sgd(0.1, 0.9, True), optax.sgd(0.1, 0.9, True)),
                      (riemannian_adam(0.1), optax.adam(0.1))]:
        s1, s2 = ours.init(params), ref.init(params)
        p1 = p2 = params
        for _ in range(3):
            u1, s1 = ours.update(grads, s1, p1)
            u2, s2 = ref.update(grads, s2, p2)
            p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
        # rtol: float32 rounding of optax's bias correction 1 - 0.999**t
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), p1, p2)


def test_vmap_over_independent_problems():
    st = Stiefel(5, 2)
    opt = riemannian_sgd(0.1, 0.9, manifolds=st)
    xs = st.random_point(jax.random.key(0), (4,))
    gs = jax.random.normal(jax.random.key(1), xs.shape)
    us, _ = jax.vmap(lambda x, g: opt.update(g, opt.init(x), x))(xs, gs)
    ub, _ = opt.update(gs, opt.init(xs), xs)  # the batched leaf is 4 points
    np.testing.assert_allclose(us, ub, atol=1e-6)


def test_bad_inputs():
    st = Stiefel(5, 2)
    opt = riemannian_sgd(0.1, manifolds={"w": st, "b": None})
    with pytest.raises(ValueError, match=r"`params\['w'\]` is not on Stiefel.*constraint error"):
        opt.init({"w": 2 * jnp.eye(5, 2), "b": jnp.ones(2)})
    with pytest.raises(ValueError, match="argument `manifolds`.*does not match"):
        opt.init({"w": st.random_point(jax.random.key(0)), "c": jnp.ones(2)})
    with pytest.raises(ValueError, match=r"params\['w'\]` has shape \(4, 2\)"):
        opt.init({"w": jnp.eye(4, 2), "b": jnp.ones(2)})
    with pytest.raises(TypeError, match="`manifolds` must hold"):
        riemannian_adam(0.1, manifolds={"w": "stiefel"}).init({"w": jnp.eye(5, 2)})
    with pytest.raises(TypeError, match="`learning_rate`"):
        riemannian_sgd("fast")
    with pytest.raises(ValueError, match="`refresh_every`"):
        riemannian_sgd(0.1, refresh_every=0)
    with pytest.raises(ValueError, match="`method`"):
        riemannian_sgd(0.1, manifolds=st, retraction="svd").update(
            jnp.ones((5, 2)), riemannian_sgd(0.1, manifolds=st).init(jnp.eye(5, 2)),
            jnp.eye(5, 2))
    with pytest.raises(ValueError, match="needs `params`"):
        opt.update({"w": jnp.ones((5, 2)), "b": jnp.ones(2)}, None)
    # under eval_shape (traced) init only checks shapes
    s = jax.eval_shape(riemannian_sgd(0.1, 0.9, manifolds=st).init,
                       jax.ShapeDtypeStruct((3, 5, 2), jnp.float32))
    assert s.momentum.shape == (3, 5, 2)


# --- optax / Flax citizenship ------------------------------------------------------


def _mixed_problem():
    st = Stiefel(5, 2)
    manifolds = {"w": st, "b": None}
    params = {"w": st.random_point(jax.random.key(0)), "b": jnp.ones(2)}
    grads = {"w": jax.random.normal(jax.random.key(1), (5, 2)), "b": jnp.ones(2)}
    return st, manifolds, params, grads


@pytest.mark.parametrize("make", [riemannian_sgd, riemannian_adam])
def test_update_accepts_extra_args(make):
    _, manifolds, params, grads = _mixed_problem()
    opt = make(0.1, manifolds=manifolds)
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    state = opt.init(params)
    u0, s0 = opt.update(grads, state, params)
    u1, s1 = opt.update(grads, state, params, value=jnp.array(3.0), loss_fn=None)
    for a, b in zip(jax.tree.leaves((u0, s0)), jax.tree.leaves((u1, s1)), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.standard_promotion  # optax.inject_hyperparams casts hyperparameters
@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_inject_hyperparams_without_static_args_matches_direct(name):
    # every numeric hyperparameter (refresh_every included) becomes a traced array
    st, manifolds, params, grads = _mixed_problem()
    make = riemannian_sgd if name == "sgd" else riemannian_adam
    kw = {"momentum": 0.9} if name == "sgd" else {"b1": 0.8}
    injected = optax.inject_hyperparams(make)(0.05, manifolds=manifolds, refresh_every=2, **kw)
    direct = make(0.05, manifolds=manifolds, refresh_every=2, **kw)
    si, sd = injected.init(params), direct.init(params)
    assert {"learning_rate", "refresh_every"} <= set(si.hyperparams)
    step_i = jax.jit(injected.update)
    pi, pd = params, params
    for _ in range(5):
        ui, si = step_i(grads, si, pi)
        ud, sd = direct.update(grads, sd, pd)
        pi, pd = optax.apply_updates(pi, ui), optax.apply_updates(pd, ud)
    for a, b in zip(jax.tree.leaves(pi), jax.tree.leaves(pd), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert float(st.check(pi["w"])) < 1e-5


def test_callable_manifolds_refused_and_pytree_kept_under_inject_hyperparams():
    st, manifolds, params, grads = _mixed_problem()
    with pytest.raises(TypeError, match="`manifolds`.*not a callable.*inject_hyperparams"):
        riemannian_sgd(0.1, manifolds=lambda p: manifolds)
    with jax.numpy_dtype_promotion("standard"):
        opt = optax.inject_hyperparams(riemannian_sgd)(0.5, manifolds=manifolds)
        state = opt.init(params)
        for _ in range(5):
            u, state = opt.update(grads, state, params)
            params = optax.apply_updates(params, u)
    assert float(st.check(params["w"])) < 1e-5  # the Stiefel leaf stayed on Stiefel


@pytest.mark.parametrize("make", [riemannian_sgd, riemannian_adam])
def test_tree_map_params_with_manifold_pytree(make):
    _, manifolds, params, grads = _mixed_problem()
    opt = make(0.1, 0.9, manifolds=manifolds)
    state = opt.init(params)
    _, state = opt.update(grads, state, params)
    same = optax.tree_map_params(opt, lambda p: p, state)
    assert jax.tree.structure(same) == jax.tree.structure(state)
    doubled = optax.tree_map_params(opt, lambda p: 2 * p, state)
    first = doubled.momentum if make is riemannian_sgd else doubled.mu
    orig = state.momentum if make is riemannian_sgd else state.mu
    np.testing.assert_allclose(first["w"], 2 * orig["w"])
    np.testing.assert_array_equal(doubled.count, state.count)


@pytest.mark.parametrize("make", [riemannian_sgd, riemannian_adam])
def test_complex_params_rejected_naming_the_leaf(make):
    with pytest.raises(TypeError, match=r"real parameters only.*params\['z'\]"):
        make(0.1).init({"z": jnp.ones((2, 2), jnp.complex64), "b": jnp.ones(2)})


def test_hyperparameters_and_labels_validated():
    with pytest.raises(ValueError, match="`momentum` must be in \\[0.0, 1.0\\)"):
        riemannian_sgd(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="`b2`"):
        riemannian_adam(0.1, b2=1.0)
    with pytest.raises(ValueError, match="`eps`"):
        riemannian_adam(0.1, eps=-1.0)
    with pytest.raises(TypeError, match=r"`manifolds\['w'\]` is str"):
        manifold_labels({"w": "x"})
    _, manifolds, params, grads = _mixed_problem()
    opt = riemannian_sgd(0.1, manifolds=manifolds)
    with pytest.raises(ValueError, match="`updates`.*does not match `params`"):
        opt.update({"w": grads["w"]}, opt.init(params), params)


@pytest.mark.standard_promotion  # optax schedules are not strict-clean
@pytest.mark.parametrize("make", [riemannian_sgd, riemannian_adam])
def test_learning_rate_typed_as_optax_schedule(make):
    import inspect

    assert inspect.signature(make).parameters["learning_rate"].annotation is (
        optax.ScalarOrSchedule)
    _, manifolds, params, grads = _mixed_problem()
    a, b = make(0.05, manifolds=manifolds), make(optax.constant_schedule(0.05),
                                                  manifolds=manifolds)
    sa, sb = a.init(params), b.init(params)
    pa = pb = params
    for _ in range(3):
        ua, sa = a.update(grads, sa, pa)
        ub, sb = b.update(grads, sb, pb)
        pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6)


# --- manifold Muon -----------------------------------------------------------------


def test_manifold_muon_direction_is_the_constrained_spectral_steepest_descent(x64):
    from subjax.optim._manifold_muon import stiefel_spectral_direction

    st = Stiefel(8, 3)
    w = st.random_point(jax.random.key(0), (), jnp.float64)
    g = jax.random.normal(jax.random.key(1), (8, 3), jnp.float64)
    a, res, n_iters = stiefel_spectral_direction(w, g, max_iters=1000, tol=1e-10)
    assert float(res) < 1e-10 and int(n_iters) < 1000
    np.testing.assert_allclose(w.T @ a + a.T @ w, 0, atol=1e-9)  # tangent
    np.testing.assert_allclose(jnp.linalg.norm(a, 2), 1.0, rtol=1e-9)  # on the unit ball
    a_scaled, _, _ = stiefel_spectral_direction(w, 1e-4 * g, max_iters=1000, tol=1e-10)
    np.testing.assert_allclose(a_scaled, a, atol=1e-8)  # depends on G's direction only
    # -a beats every feasible direction: the normalised projected gradient and random ones
    ours = float(jnp.sum(g * -a))
    feasible = [st.proj(w, g)] + [st.proj(w, jax.random.normal(jax.random.key(k), (8, 3),
                                                               jnp.float64)) for k in range(50)]
    for b in feasible:
        b = b / jnp.linalg.norm(b, 2)
        assert ours <= min(float(jnp.sum(g * b)), float(jnp.sum(-g * b))) + 1e-9


@pytest.mark.standard_promotion
def test_manifold_muon_trains_on_stiefel_and_grassmann_and_reports_the_dual():
    from subjax.optim import manifold_muon

    c = jnp.diag(jnp.arange(6.0, 0.0, -1.0))
    st, gr = Stiefel(6, 2), Grassmann(6, 2)
    params = {"w": st.random_point(jax.random.key(0)),
              "v": gr.random_point(jax.random.key(1), (2,)), "b": jnp.ones(3)}

    def loss(p):
        vv = jnp.swapaxes(p["v"], -1, -2)
        return (-jnp.trace(p["w"].T @ c @ p["w"] @ jnp.diag(jnp.array([2.0, 1.0])))
                - jnp.sum((vv @ c) * vv) + jnp.sum(p["b"] ** 2))

    # a spectral step has fixed length: it needs a decaying learning rate to settle
    lr = optax.cosine_decay_schedule(0.1, 150)
    opt = manifold_muon(lr, 0.5, manifolds={"w": st, "v": gr, "b": None})
    state = opt.init(params)
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p))
    for k in range(150):
        u, state = step(params, state)
        params = optax.apply_updates(params, u)
        if k == 0:  # away from the optimum the dual ascent converges
            assert 0.0 <= float(state.dual_residual) < 1e-4
    # Brockett minimum 2*6 + 5, two Grassmann points at 6 + 5 each
    assert float(loss(params)) == pytest.approx(-(17.0 + 22.0), abs=1e-3)
    assert float(st.check(params["w"])) < 1e-5
    assert float(jnp.max(gr.check(params["v"]))) < 1e-5
    with pytest.raises(TypeError, match="manifold_muon handles Stiefel"):
        manifold_muon(0.1, manifolds={"s": Sphere(3)}).init({"s": jnp.ones(3) / 3**0.5})
    with pytest.raises(ValueError, match="`momentum`"):
        manifold_muon(0.1, momentum=1.0)


def test_sgd_momentum_is_parallel_transported_on_affine_spd(x64):
    # the stored momentum is a tangent vector at the new point: the parallel transport
    # of m_new = grad f(x) along the step (not m_new left as a matrix at x)
    spd = SPD(3)
    x = spd.random_point(jax.random.key(0), (), jnp.float64)
    b = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    grads = {"p": b - jnp.linalg.inv(x)}  # Euclidean gradient of tr(P B) - log det P
    opt = riemannian_sgd(0.1, 0.9, manifolds={"p": spd}, refresh_every=None)
    updates, state = opt.update(grads, opt.init({"p": x}), {"p": x})
    y = x + updates["p"]
    rg = spd.egrad2rgrad(x, grads["p"])
    np.testing.assert_allclose(y, spd.exp(x, -0.1 * rg), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.momentum["p"], spd.transport(x, y, rg), rtol=1e-10,
                               atol=1e-12)
    # parallel transport keeps the affine-metric norm
    np.testing.assert_allclose(spd.norm(y, state.momentum["p"]), spd.norm(x, rg), rtol=1e-10)
