"""K-FAC statistics capture and the K-FAC / natural-gradient / FISMO optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from fisher_models import mlp_apply, mlp_params
from flax import nnx
from jax.flatten_util import ravel_pytree

from subjax import fisher, optim
from subjax.fisher import _likelihood as lk


def _manual_layer_data(params, x):
    """Per-example layer inputs and pre-activations of the tiny MLP, by hand."""
    acts, pre = [], []
    h = x
    n = len(params)
    for i in range(n):
        p = params[f"l{i}"]
        acts.append(h)
        s = h @ p["kernel"] + p["bias"]
        pre.append(s)
        h = jnp.tanh(s) if i < n - 1 else s
    return acts, pre, h


def _delta(params, x, y, likelihood, layer):
    """Per-example d nll_i / d s_i at ``layer`` by jax.jacobian through the tail."""
    n = len(params)
    acts, pre, _ = _manual_layer_data(params, x)

    def tail(s_i, y_i):
        h = s_i
        for j in range(layer, n):
            if j > layer:
                p = params[f"l{j}"]
                h = h @ p["kernel"] + p["bias"]
            if j < n - 1:
                h = jnp.tanh(h)
        return lk.nll(likelihood, h[None], y_i[None])[0]

    return jax.vmap(jax.grad(tail))(pre[layer], y), acts[layer]


@pytest.mark.parametrize("mode", ["empirical", "true"])
def test_kronecker_factors_match_dense(x64, key, mode):
    params = mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (7,), 0, 4)
    skey = jax.random.key(3)
    loss, grads, stats = jax.jit(lambda p: fisher.kfac_grads_and_stats(
        mlp_apply, p, x, y, likelihood="categorical", fisher=mode, key=skey))(params)
    ref_loss, ref_grads = jax.value_and_grad(
        lambda p: lk.mean_nll("categorical", mlp_apply(p, x), y))(params)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
    np.testing.assert_allclose(ravel_pytree(grads)[0], ravel_pytree(ref_grads)[0], rtol=1e-10)
    if mode == "true":  # the targets the capture sampled with the same key
        y_used = jax.random.categorical(skey, mlp_apply(params, x), axis=-1)
    else:
        y_used = y
    assert set(stats) == {"l0", "l1"}
    for layer in (0, 1):
        delta, a = _delta(params, x, y_used, "categorical", layer)
        a1 = jnp.concatenate([a, jnp.ones((a.shape[0], 1))], axis=1)
        np.testing.assert_allclose(stats[f"l{layer}"].a, a1.T @ a1 / 7, rtol=1e-5)
        np.testing.assert_allclose(stats[f"l{layer}"].g, delta.T @ delta / 7, rtol=1e-5,
                                   atol=1e-12)


def test_kfac_block_is_exact_for_one_example_and_matches_per_example_sum(x64, key):
    params = mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(4), (6, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(5), (6,), 0, 4)
    delta, a = _delta(params, x, y, "categorical", 1)
    a1 = jnp.concatenate([a, jnp.ones((6, 1))], axis=1)
    # per-example gradients of the augmented weight [W; b] of layer 1
    gw = jnp.einsum("ni,no->nio", a1, delta).reshape(6, -1)
    # one example: the Fisher block of that example is exactly A (x) G
    _, _, st1 = fisher.kfac_grads_and_stats(
        mlp_apply, params, x[:1], y[:1], likelihood="categorical", fisher="empirical")
    np.testing.assert_allclose(np.kron(st1["l1"].a, st1["l1"].g), jnp.outer(gw[0], gw[0]),
                               rtol=1e-5, atol=1e-12)
    # a batch: K-FAC's block is E[aa^T] (x) E[dd^T], built from the same per-example data
    _, _, st = fisher.kfac_grads_and_stats(
        mlp_apply, params, x, y, likelihood="categorical", fisher="empirical")
    kfac_block = np.kron(st["l1"].a, st["l1"].g)
    np.testing.assert_allclose(kfac_block, np.kron(a1.T @ a1 / 6, delta.T @ delta / 6),
                               rtol=1e-5, atol=1e-12)
    exact_block = gw.T @ gw / 6
    assert np.linalg.norm(kfac_block - exact_block) > 1e-6  # an approximation, not identity


@pytest.mark.parametrize("damping_mode", ["kronecker", "factored"])
def test_kfac_update_equals_dense_preconditioned_gradient(x64, key, damping_mode):
    params = mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(6), (9, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(7), (9,), 0, 4)
    _, grads, stats = jax.jit(lambda p: fisher.kfac_grads_and_stats(
        mlp_apply, p, x, y, likelihood="categorical", fisher="empirical"))(params)
    lam = 0.05
    opt = optim.kfac(1.0, damping=lam, momentum=0.0, damping_mode=damping_mode)
    state = opt.init(params)
    upd, _ = jax.jit(lambda g, s, st: opt.update(g, s, params, kfac_stats=st))(
        grads, state, stats)
    for name in ("l0", "l1"):
        a, g = np.asarray(stats[name].a), np.asarray(stats[name].g)
        gr = np.concatenate([grads[name]["kernel"], grads[name]["bias"][None]], axis=0)
        if damping_mode == "kronecker":
            # row-major vec: vec(A X G) = (A (x) G) vec(X)
            m = np.kron(a, g) + lam * np.eye(a.shape[0] * g.shape[0])
            d = np.linalg.solve(m, gr.reshape(-1)).reshape(gr.shape)
        else:
            pi = np.sqrt((np.trace(a) / a.shape[0]) / (np.trace(g) / g.shape[0]))
            d = np.linalg.solve(a + pi * np.sqrt(lam) * np.eye(a.shape[0]), gr)
            d = d @ np.linalg.inv(g + np.sqrt(lam) / pi * np.eye(g.shape[0]))
        np.testing.assert_allclose(-upd[name]["kernel"], d[:-1], rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(-upd[name]["bias"], d[-1], rtol=1e-6, atol=1e-10)


def test_natural_gradient_logistic_regression_equals_dense_solve(x64):
    x = jax.random.normal(jax.random.key(0), (40, 5), jnp.float64)
    y = (jax.random.uniform(jax.random.key(1), (40, 1)) < 0.5).astype(jnp.float64)
    w = {"w": 0.3 * jax.random.normal(jax.random.key(2), (5, 1), jnp.float64),
         "b": jnp.zeros((1,), jnp.float64)}
    apply = lambda p, xb: xb @ p["w"] + p["b"]
    loss = lambda p: lk.mean_nll("bernoulli", apply(p, x), y)
    g = jax.grad(loss)(w)
    lam = 1e-3
    opt = optim.natural_gradient(1.0, damping=lam, likelihood="bernoulli", max_iters=10, tol=1e-12)
    state = opt.init(w)
    upd, state = jax.jit(lambda g, s: opt.update(g, s, w, apply_fn=apply, inputs=x))(g, state)
    # dense Fisher of logistic regression: (1/N) sum s(1-s) [x,1][x,1]^T
    s = jax.nn.sigmoid(apply(w, x))[:, 0]
    xa = jnp.concatenate([jnp.ones((40, 1)), x], axis=1)  # ravel order: b, then w
    f = (xa * (s * (1 - s))[:, None]).T @ xa / 40
    gflat = ravel_pytree(g)[0]
    ref = np.linalg.solve(f + lam * np.eye(6), gflat)
    np.testing.assert_allclose(-ravel_pytree(upd)[0], ref, rtol=1e-8)
    assert int(state[0].cg_iters) <= 6


def _nnx_mlp():
    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([nnx.Linear(4, 8, rngs=rngs), nnx.Linear(8, 3, rngs=rngs)])

        def __call__(self, x):
            return self.blocks[1](jnp.tanh(self.blocks[0](x)))

    return MLP(nnx.Rngs(0))


@pytest.mark.standard_promotion
def test_nnx_model_layers_are_found_and_training_lowers_loss():
    model = _nnx_mlp()
    x = jax.random.normal(jax.random.key(0), (64, 4))
    y = jnp.argmax(x[:, :3] + 0.3 * x[:, 1:], axis=1)
    graphdef, params = nnx.split(model, nnx.Param)
    apply = lambda p, xb: nnx.merge(graphdef, p)(xb)
    _, _, stats = fisher.kfac_grads_and_stats(apply, params, x, y, fisher="empirical")
    assert list(stats) == ["blocks/0", "blocks/1"]  # the kernels' paths, in order of use
    assert all(type(b) is nnx.Linear for b in model.blocks)  # nothing registered or mutated
    opt = optim.kfac(0.3, damping=1e-2, norm_constraint=1e-2)
    state = opt.init(params)

    @jax.jit
    def step(params, state, k):
        loss, grads, stats = fisher.kfac_grads_and_stats(apply, params, x, y, key=k)
        upd, state = opt.update(grads, state, params, kfac_stats=stats)
        return optax.apply_updates(params, upd), state, loss

    losses = []
    for i in range(30):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses


def test_kfac_stats_axis_name_pmean_equals_full_batch(key):
    """The data-parallel contract: per-shard stats pmean-ed in update == full-batch update."""
    params = mlp_params(key, sizes=(3, 5, 4))
    x = jax.random.normal(jax.random.key(8), (8, 3))
    y = jax.random.randint(jax.random.key(9), (8,), 0, 4)
    _, grads, stats = fisher.kfac_grads_and_stats(
        mlp_apply, params, x, y, fisher="empirical")
    opt = optim.kfac(0.5, damping=1e-2)
    state = opt.init(params)
    full, _ = jax.jit(lambda g, s, st: opt.update(g, s, params, kfac_stats=st))(
        grads, state, stats)

    opt_d = optim.kfac(0.5, damping=1e-2, axis_name="d")

    def shard(xs, ys):
        _, g, st = fisher.kfac_grads_and_stats(mlp_apply, params, xs, ys, fisher="empirical")
        g = jax.lax.pmean(g, "d")
        return opt_d.update(g, state, params, kfac_stats=st)[0]

    sharded = jax.jit(jax.vmap(shard, axis_name="d"))(x.reshape(4, 2, 3), y.reshape(4, 2))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(a[3], b, rtol=2e-4, atol=1e-6)


@pytest.mark.slow
def test_kfac_adaptive_step_axis_name_equals_full_batch(x64, key):
    """Sharded exact quadratic model (products pmean-ed) == full batch, momentum step too."""
    params = mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(27), (8, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(28), (8,), 0, 4)
    opt = optim.kfac(1.0, damping=1e-2, adaptive_step=True)
    opt_d = optim.kfac(1.0, damping=1e-2, adaptive_step=True, axis_name="d")

    def step(o, p, s, xs, ys, mean=lambda g: g):
        _, g, st, lin = fisher.kfac_grads_and_stats(
            mlp_apply, p, xs, ys, fisher="empirical", linearization=True)
        return o.update(mean(g), s, p, kfac_stats=st, linearization=lin)

    full = jax.jit(lambda p, s: step(opt, p, s, x, y))
    sharded = jax.jit(jax.vmap(
        lambda p, s, xs, ys: step(opt_d, p, s, xs, ys, lambda g: jax.lax.pmean(g, "d"))[0],
        in_axes=(None, None, 0, 0), axis_name="d"))
    state = opt.init(params)
    for _ in range(2):  # the second step also solves for the momentum coefficient
        upd, new_state = full(params, state)
        upd_d = sharded(params, state, x.reshape(4, 2, 3), y.reshape(4, 2))
        for a, b in zip(jax.tree.leaves(upd_d), jax.tree.leaves(upd), strict=True):
            np.testing.assert_allclose(a[0], b, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(a[3], b, rtol=1e-9, atol=1e-12)
        params, state = optax.apply_updates(params, upd), new_state


def test_natural_gradient_axis_name_equals_full_batch(key):
    params = mlp_params(key, sizes=(3, 5, 4))
    x = jax.random.normal(jax.random.key(10), (8, 3))
    y = jax.random.randint(jax.random.key(11), (8,), 0, 4)
    loss = lambda p, xb, yb: lk.mean_nll("categorical", mlp_apply(p, xb), yb)
    opt = optim.natural_gradient(1.0, damping=1e-2, max_iters=8)
    state = opt.init(params)
    g = jax.grad(loss)(params, x, y)
    full, _ = jax.jit(lambda g: opt.update(g, state, params, apply_fn=mlp_apply, inputs=x))(g)
    opt_d = optim.natural_gradient(1.0, damping=1e-2, max_iters=8, axis_name="d")

    def shard(xs, ys):
        gs = jax.lax.pmean(jax.grad(loss)(params, xs, ys), "d")
        return opt_d.update(gs, state, params, apply_fn=mlp_apply, inputs=xs)[0]

    sharded = jax.jit(jax.vmap(shard, axis_name="d"))(x.reshape(4, 2, 3), y.reshape(4, 2))
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(full), strict=True):
        np.testing.assert_allclose(a[2], b, rtol=1e-3, atol=1e-5)


def _mlp_apply_through_calls(p, x):
    """``mlp_apply``'s network with its products in a jitted einsum (kernel first) and in a
    ``jax.checkpoint`` block."""
    first = jax.jit(lambda k, h: jnp.einsum("de,nd->ne", k, h))
    h = jnp.tanh(first(p["l0"]["kernel"], x) + p["l0"]["bias"])
    return jax.checkpoint(lambda h, k: h @ k)(h, p["l1"]["kernel"]) + p["l1"]["bias"]


def test_capture_follows_calls_and_skips_kernels_with_other_uses(x64, key):
    params = mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(14), (6, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(15), (6,), 0, 4)
    run = lambda f: fisher.kfac_grads_and_stats(f, params, x, y, fisher="empirical")
    _, grads, ref = run(mlp_apply)
    _, grads_c, stats = run(_mlp_apply_through_calls)
    assert list(stats) == ["l0", "l1"]
    for name in ref:
        np.testing.assert_allclose(stats[name].a, ref[name].a, rtol=1e-12)
        np.testing.assert_allclose(stats[name].g, ref[name].g, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ravel_pytree(grads_c)[0], ravel_pytree(grads)[0], rtol=1e-12)

    # l1's kernel also reaches the output another way: not a layer, no statistics
    other = lambda p, xb: mlp_apply(p, xb) + 0.0 * jnp.sum(p["l1"]["kernel"])
    _, g_other, st_other = run(other)
    assert list(st_other) == ["l0"]
    np.testing.assert_allclose(st_other["l0"].g, ref["l0"].g, rtol=1e-12, atol=1e-15)
    opt = optim.kfac(0.1)
    with pytest.raises(ValueError, match="no entry for dense layer 'l1'"):
        opt.update(g_other, opt.init(params), params, kfac_stats=st_other)


def test_kfac_capture_under_vmap(key):
    params = mlp_params(key, sizes=(3, 5, 4))
    xs = jax.random.normal(jax.random.key(12), (3, 6, 3))
    ys = jax.random.randint(jax.random.key(13), (3, 6), 0, 4)
    f = lambda xb, yb: fisher.kfac_grads_and_stats(mlp_apply, params, xb, yb, fisher="empirical")
    batched = jax.jit(jax.vmap(f))(xs, ys)
    one = jax.jit(f)(xs[2], ys[2])
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one), strict=True):
        np.testing.assert_allclose(a[2], b, rtol=1e-5, atol=1e-6)


def test_newton_schulz_orthogonalizes():
    m = jax.random.normal(jax.random.key(0), (12, 7))
    o = optim.newton_schulz(m, n_steps=5)
    s = jnp.linalg.svd(o, compute_uv=False)
    assert float(s.min()) > 0.6 and float(s.max()) < 1.25
    u, _, vt = jnp.linalg.svd(m, full_matrices=False)
    # same singular vectors as the exact polar factor
    np.testing.assert_allclose(jnp.abs(jnp.sum((u @ vt) * o) / jnp.linalg.norm(o)),
                               jnp.sqrt(7.0), rtol=0.05)


@pytest.mark.standard_promotion
def test_fismo_first_step_matches_formula(x64):
    g = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
    params = {"w": jnp.zeros((5, 3), jnp.float64)}
    beta, gam, mu = 0.9, 0.8, 1e-2
    opt = optim.fismo(1.0, beta=beta, decay=gam, relative_damping=mu, ns_steps=5)
    state = opt.init(params)
    upd, _ = opt.update({"w": g}, state, params)
    # formula, with P0 = I, Q0 = I (inverses from the previous refresh = identity)
    m, n = g.shape
    lft = g @ g.T / n + mu * np.eye(m)
    pt = gam * np.eye(m) + (1 - gam) * lft
    p = m * pt / np.trace(pt)
    rgt = g.T @ g / m + mu * np.eye(n)
    qt = gam * np.eye(n) + (1 - gam) * rgt
    q = n * qt / np.trace(qt)

    def isqrt(a):
        w, v = np.linalg.eigh(a)
        return (v / np.sqrt(w)) @ v.T

    mom = (1 - beta) * isqrt(p) @ g @ isqrt(q)
    ref = isqrt(p) @ np.asarray(optim.newton_schulz(jnp.asarray(mom), 5)) @ isqrt(q)
    # both sides run Newton-Schulz in the compute dtype (float64 here)
    np.testing.assert_allclose(-upd["w"], ref, rtol=1e-4, atol=1e-6)


def test_bad_inputs(key):
    params = mlp_params(key)
    x = jax.random.normal(key, (4, 3))
    y = jnp.zeros((4,), jnp.int32)
    for make in (lambda d: optim.kfac(0.1, damping=d), lambda d: optim.natural_gradient(0.1, d),
                 lambda d: optim.fismo(0.1, relative_damping=d)):
        with pytest.raises(ValueError, match="damping"):
            make(0.0)
        with pytest.raises(ValueError, match="damping"):
            make(-1.0)
    # a model whose only kernel is not used as a layer (scaled first)
    scaled = lambda p, xb: xb @ (2.0 * p["l0"]["kernel"]) + p["l0"]["bias"]
    with pytest.raises(ValueError, match=r"no dense or convolution layer.*\['l0'\] have other"):
        fisher.kfac_grads_and_stats(scaled, params, x, y, fisher="empirical")
    with pytest.raises(ValueError, match="'kernel' leaf"):
        optim.kfac(0.1).init({"w": jnp.ones((3, 3))})
    opt = optim.kfac(0.1)
    st = opt.init(params)
    with pytest.raises(ValueError, match="kfac_stats"):
        opt.update(params, st, params)
    _, _, stats = fisher.kfac_grads_and_stats(mlp_apply, params, x, y, fisher="empirical")
    with pytest.raises(ValueError, match="'l1'"):
        opt.update(params, st, params, kfac_stats={"l0": stats["l0"]})
    with pytest.raises(ValueError, match="key"):
        fisher.kfac_grads_and_stats(mlp_apply, params, x, y)  # sampled Fisher, no key
    with pytest.raises(ValueError, match="labels"):
        fisher.kfac_grads_and_stats(mlp_apply, params, x, None, fisher="empirical")
    ng = optim.natural_gradient(0.1)
    with pytest.raises(ValueError, match="apply_fn"):
        ng.update(params, ng.init(params), params)


def test_kfac_adaptive_step_minimises_exact_quadratic_model(x64, key):
    """alpha, mu solve the 2x2 model: g.a + a^T C u = 0 and g.b + b^T C u = 0 (C = F + lam)."""
    from fisher_models import dense_fisher

    params = mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(20), (10, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(21), (10,), 0, 4)
    lam = 0.125  # exact in float32 (the damping state is float32)
    opt = optim.kfac(1.0, damping=lam, adaptive_step=True)
    state = opt.init(params)

    @jax.jit
    def step(p, s):
        _, g, st, lin = fisher.kfac_grads_and_stats(
            mlp_apply, p, x, y, fisher="empirical", linearization=True)
        return g, *opt.update(g, s, p, kfac_stats=st, linearization=lin)

    for i in range(2):
        prev = ravel_pytree(state.momentum)[0]
        grads, upd, state = step(params, state)
        u = ravel_pytree(upd)[0]
        c = dense_fisher("categorical", mlp_apply, params, x) + lam * np.eye(u.size)
        g = ravel_pytree(grads)[0]
        # u = alpha a + mu b with b = previous update: the model is stationary along u's plane
        np.testing.assert_allclose(g @ u + u @ c @ u, 0.0, atol=1e-9 * float(g @ g))
        if i == 1:
            np.testing.assert_allclose(g @ prev + prev @ c @ u, 0.0,
                                       atol=1e-9 * float(jnp.abs(g) @ jnp.abs(prev)))
        assert float(g @ u) < 0  # a descent step
        params = optax.apply_updates(params, upd)


def test_linearization_matches_jax_jvp_and_gradient(x64, key):
    """The returned linear map is J v at params; its transpose gave the gradient."""
    params = mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(22), (6, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(23), (6,), 0, 4)
    v = jax.tree.map(lambda p: jax.random.normal(jax.random.key(24), p.shape, p.dtype), params)
    for stats_batch in (None, 3):
        loss, grads, _, lin = fisher.kfac_grads_and_stats(
            mlp_apply, params, x, y, fisher="true", key=key, stats_batch=stats_batch,
            linearization=True)
        out, jv = jax.jvp(lambda p: mlp_apply(p, x), (params,), (v,))
        np.testing.assert_allclose(lin.outputs, out, rtol=1e-12)
        np.testing.assert_allclose(lin.jvp(v), jv, rtol=1e-10, atol=1e-12)
        assert lin.likelihood == "categorical"
        ref_loss, ref = jax.value_and_grad(
            lambda p: lk.mean_nll("categorical", mlp_apply(p, x), y))(params)
        np.testing.assert_allclose(loss, ref_loss, rtol=1e-12)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_kfac_adaptive_step_needs_the_linearization(key):
    params = mlp_params(key, sizes=(3, 5, 4))
    x = jax.random.normal(jax.random.key(25), (6, 3))
    y = jax.random.randint(jax.random.key(26), (6,), 0, 4)
    _, grads, stats = fisher.kfac_grads_and_stats(mlp_apply, params, x, y, fisher="empirical")
    opt = optim.kfac(1.0, adaptive_step=True)
    with pytest.raises(ValueError, match="linearization=True"):
        opt.update(grads, opt.init(params), params, kfac_stats=stats)


def test_kfac_rejects_unknown_likelihood_and_unordered_damping_bounds(key):
    params = mlp_params(key, sizes=(3, 4))
    with pytest.raises(ValueError, match="`likelihood` must be one of"):
        fisher.kfac_grads_and_stats(mlp_apply, params, jnp.ones((2, 3)), jnp.zeros(2, int),
                                    likelihood="softmax", fisher="empirical")
    with pytest.raises(ValueError, match=r"`damping_bounds` must be ordered \(low, high\)"):
        optim.kfac(0.1, adaptive_damping=True, damping_bounds=(1.0, 1e-3))
    with pytest.raises(ValueError, match=r"`damping_bounds\[0\]` must be > 0"):
        optim.kfac(0.1, damping_bounds=(0.0, 1.0))
    with pytest.raises(ValueError, match="`stale_ratio` must be >= 1"):
        optim.kfac(0.1, stale_ratio=0.5)


def _tanh_classifier():
    params = mlp_params(jax.random.key(0), sizes=(4, 16, 16, 3))
    x = jax.random.normal(jax.random.key(10), (64, 4))
    y = jnp.argmax(x[:, :3] * x[:, 1:], axis=1)
    return params, x, y


def _kfac_losses(opt, params, x, y, steps):
    @jax.jit
    def step(p, st, k):
        loss, g, s = fisher.kfac_grads_and_stats(mlp_apply, p, x, y, key=k)
        u, st = opt.update(g, st, p, kfac_stats=s)
        return optax.apply_updates(p, u), st, loss

    state, losses = opt.init(params), []
    for i in range(steps):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    return losses


@pytest.mark.slow
def test_stale_inverse_is_refreshed_early_instead_of_diverging():
    params, x, y = _tanh_classifier()
    kw = dict(damping=1e-2, refresh_every=10)
    # the failure mode: inverses from step 0 held for 10 steps while the factors move
    stale = _kfac_losses(optim.kfac(0.1, stale_ratio=None, **kw), params, x, y, 40)
    assert max(stale) > 3 * stale[0], stale
    guarded = _kfac_losses(optim.kfac(0.1, **kw), params, x, y, 40)
    every = _kfac_losses(optim.kfac(0.1, damping=1e-2, refresh_every=1), params, x, y, 40)
    assert max(guarded) <= guarded[0] and guarded[-1] < 1e-2 * guarded[0], guarded
    assert every[-1] < 1e-2 * every[0]


def test_fresh_inverse_meets_the_stale_test_with_equality(x64, key):
    """Right after a refresh, Delta^T (A (x) G + lambda) Delta = g . Delta (kronecker damping)."""
    from subjax.optim import _kfac

    params = mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(6), (9, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(7), (9,), 0, 4)
    _, grads, stats = fisher.kfac_grads_and_stats(mlp_apply, params, x, y, fisher="empirical")
    opt = optim.kfac(1.0, damping=0.05, momentum=0.0)
    upd, state = opt.update(grads, opt.init(params), params, kfac_stats=stats)
    dense = _kfac.find_dense_layers(params)
    fa, fg = jax.tree.leaves(state.factor_a), jax.tree.leaves(state.factor_g)
    delta = [-u for u in jax.tree.leaves(upd)]
    g = jax.tree.leaves(grads)
    quad = _kfac._curvature(delta, dense, fa, fg, jnp.float32(0.05))
    np.testing.assert_allclose(quad, _kfac._vdot(g, delta), rtol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: optim.kfac(0.1, damping=1e-2),
    lambda: optim.fismo(0.05),
    lambda: optim.natural_gradient(0.5),
], ids=["kfac", "fismo", "natural_gradient"])
def test_tree_map_params_on_curvature_states(key, make):
    """optax.tree_map_params reaches every parameter-shaped field of the state."""
    from optax.transforms import MaskedNode

    params = mlp_params(key, sizes=(3, 5, 4))
    opt = make()
    state = opt.init(params)
    masked = lambda v: isinstance(v, MaskedNode)
    specs = jax.tree.map(lambda p: f"spec{p.shape}", params)
    out = optax.tree_map_params(opt, lambda p, s: p if masked(p) else s, state, specs,
                                transform_non_params=lambda _: None, is_leaf=masked)
    leaves = jax.tree.leaves(out)
    assert leaves and all(isinstance(v, str) and v.startswith("spec") for v in leaves), leaves
    # the momentum-like fields carry exactly the parameters' specs
    spec_set = set(jax.tree.leaves(specs))
    assert set(leaves) == spec_set
    # without extra trees, the identity map gives back a state of the same structure
    same = optax.tree_map_params(opt, lambda p: p, state)
    assert jax.tree.structure(same) == jax.tree.structure(state)


def _seq_params(key, d_in=3, d_h=4, n_out=3, dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"proj": {"kernel": jax.random.normal(k1, (d_in, d_h), dtype) / 2,
                     "bias": 0.1 * jax.random.normal(k2, (d_h,), dtype)},
            "head": {"kernel": jax.random.normal(k3, (d_h, n_out), dtype) / 2,
                     "bias": jnp.zeros((n_out,), dtype)}}


def _seq_head(p, h):
    return h.mean(axis=-2) @ p["head"]["kernel"] + p["head"]["bias"]


def _seq_apply(p, x):
    """A dense layer shared over the T positions of (N, T, d) inputs, mean-pooled."""
    h = jnp.tanh(x @ p["proj"]["kernel"] + p["proj"]["bias"])
    pooled = h.mean(axis=1)
    return pooled @ p["head"]["kernel"] + p["head"]["bias"]


@pytest.mark.parametrize("weight_sharing", ["expand", "reduce"])
def test_sequence_factors_equal_their_definitions(x64, key, weight_sharing):
    """Eschenhagen et al. 2023: K-FAC-expand pools all N*T rows; K-FAC-reduce averages the
    inputs and sums the output gradients over each example's T rows first."""
    params = _seq_params(key)
    n, t = 5, 7
    x = jax.random.normal(jax.random.key(30), (n, t, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(31), (n,), 0, 3)
    _, grads, stats = fisher.kfac_grads_and_stats(
        _seq_apply, params, x, y, fisher="empirical", weight_sharing=weight_sharing)
    ref_grads = jax.grad(lambda p: lk.mean_nll("categorical", _seq_apply(p, x), y))(params)
    np.testing.assert_allclose(ravel_pytree(grads)[0], ravel_pytree(ref_grads)[0], rtol=1e-10)

    s = x @ params["proj"]["kernel"] + params["proj"]["bias"]  # (N, T, h) pre-activations

    def nll_one(s_n, y_n):
        return lk.nll("categorical", _seq_head(params, jnp.tanh(s_n))[None], y_n[None])[0]

    delta = jax.vmap(jax.grad(nll_one))(s, y)  # (N, T, h) per-example output gradients
    a = jnp.concatenate([x, jnp.ones((n, t, 1))], axis=-1)  # (N, T, d_in + 1)
    if weight_sharing == "expand":
        a_rows, d_rows = a.reshape(n * t, -1), delta.reshape(n * t, -1)
        a_ref = a_rows.T @ a_rows / (n * t)
        g_ref = d_rows.T @ d_rows / n
    else:
        a_bar, d_sum = a.mean(axis=1), delta.sum(axis=1)
        a_ref = a_bar.T @ a_bar / n
        g_ref = d_sum.T @ d_sum / n
    np.testing.assert_allclose(stats["proj"].a, a_ref, rtol=1e-10)
    np.testing.assert_allclose(stats["proj"].g, g_ref, rtol=1e-9, atol=1e-14)
    # the head sees one row per example: both rules give the plain K-FAC factors
    other = "reduce" if weight_sharing == "expand" else "expand"
    _, _, st_other = fisher.kfac_grads_and_stats(
        _seq_apply, params, x, y, fisher="empirical", weight_sharing=other)
    np.testing.assert_allclose(stats["head"].a, st_other["head"].a, rtol=1e-12)
    np.testing.assert_allclose(stats["head"].g, st_other["head"].g, rtol=1e-12)
    with pytest.raises(ValueError, match="`weight_sharing` must be one of"):
        fisher.kfac_grads_and_stats(_seq_apply, params, x, y, fisher="empirical",
                                    weight_sharing="mean")


def _conv_net():
    class ConvNet(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, kernel_size=(2, 3), strides=(1, 2),
                                 padding=((1, 1), (0, 1)), param_dtype=jnp.float64, rngs=rngs)
            self.head = nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.head(jnp.tanh(self.conv(x)).mean(axis=(1, 2)))

    return ConvNet(nnx.Rngs(0))


def _manual_patches(x, kh, kw, strides, pads):
    """Windows of the padded input, flattened (row, column, channel) like the kernel."""
    xp = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    rows = []
    for i in range(0, xp.shape[1] - kh + 1, strides[0]):
        row = []
        for j in range(0, xp.shape[2] - kw + 1, strides[1]):
            row.append(xp[:, i:i + kh, j:j + kw, :].reshape(x.shape[0], -1))
        rows.append(jnp.stack(row, axis=1))
    return jnp.stack(rows, axis=1)  # (N, H', W', kh * kw * c)


def test_conv_factors_equal_dense_definition_on_patches(x64):
    model = _conv_net()
    graphdef, params = nnx.split(model, nnx.Param)
    apply = lambda p, xb: nnx.merge(graphdef, p)(xb)
    n = 3
    x = jax.random.normal(jax.random.key(40), (n, 4, 5, 2), jnp.float64)
    y = jax.random.randint(jax.random.key(41), (n,), 0, 4)
    _, grads, stats = fisher.kfac_grads_and_stats(apply, params, x, y, fisher="empirical")
    assert list(stats) == ["conv", "head"]

    kernel, bias = model.conv.kernel[...], model.conv.bias[...]
    patches = _manual_patches(x, 2, 3, (1, 2), ((1, 1), (0, 1)))
    # the dense definition: the convolution is patches @ kernel.reshape(-1, c_out) + b
    s = patches @ kernel.reshape(-1, 3) + bias
    np.testing.assert_allclose(s, model.conv(x), rtol=1e-12, atol=1e-12)
    p_rows = patches.reshape(-1, patches.shape[-1])
    a1 = jnp.concatenate([p_rows, jnp.ones((p_rows.shape[0], 1))], axis=1)
    np.testing.assert_allclose(stats["conv"].a, a1.T @ a1 / a1.shape[0], rtol=1e-10)

    def nll_one(s_n, y_n):
        out = model.head(jnp.tanh(s_n).mean(axis=(0, 1)))
        return lk.nll("categorical", out[None], y_n[None])[0]

    delta = jax.vmap(jax.grad(nll_one))(s, y).reshape(-1, 3)  # rows: every output position
    np.testing.assert_allclose(stats["conv"].g, delta.T @ delta / n, rtol=1e-9, atol=1e-14)

    # the preconditioned conv step is the dense damped Kronecker inverse on [W; b]
    lam = 0.05
    opt = optim.kfac(1.0, damping=lam, momentum=0.0)
    upd, _ = opt.update(grads, opt.init(params), params, kfac_stats=stats)
    a, g = np.asarray(stats["conv"].a), np.asarray(stats["conv"].g)
    gk, gb = np.asarray(grads["conv"]["kernel"][...]), np.asarray(grads["conv"]["bias"][...])
    gr = np.concatenate([gk.reshape(-1, 3), gb[None]])
    m = np.kron(a, g) + lam * np.eye(a.shape[0] * g.shape[0])
    d = np.linalg.solve(m, gr.reshape(-1)).reshape(gr.shape)
    np.testing.assert_allclose(-upd["conv"]["kernel"][...], d[:-1].reshape(kernel.shape),
                               rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(-upd["conv"]["bias"][...], d[-1], rtol=1e-6, atol=1e-10)


def test_conv1d_circular_padding_input_factor_is_the_wrapped_patches(x64):
    """The capture reads the padding the traced convolution uses (here Flax's explicit
    wrap-around pad before a VALID convolution)."""
    conv = nnx.Conv(2, 3, kernel_size=(3,), padding="CIRCULAR", param_dtype=jnp.float64,
                    rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(conv, nnx.Param)
    apply = lambda p, xb: nnx.merge(graphdef, p)(xb).mean(axis=1)
    n, length = 4, 5
    x = jax.random.normal(jax.random.key(42), (n, length, 2), jnp.float64)
    y = jax.random.randint(jax.random.key(43), (n,), 0, 3)
    _, grads, stats = fisher.kfac_grads_and_stats(apply, params, x, y, fisher="empirical")
    ref_grads = jax.grad(lambda p: lk.mean_nll("categorical", apply(p, x), y))(params)
    np.testing.assert_allclose(ravel_pytree(grads)[0], ravel_pytree(ref_grads)[0], rtol=1e-10)
    xp = jnp.concatenate([x[:, -1:], x, x[:, :1]], axis=1)  # wrap one position each side
    rows = jnp.stack([xp[:, i:i + 3].reshape(n, -1) for i in range(length)], axis=1)
    rows = jnp.concatenate([rows.reshape(n * length, -1), jnp.ones((n * length, 1))], axis=1)
    np.testing.assert_allclose(stats[""].a, rows.T @ rows / (n * length), rtol=1e-12)
