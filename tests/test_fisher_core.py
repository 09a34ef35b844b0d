"""subjax.fisher: per-example gradients, diagonal Fishers, FVP / GGN products vs dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fisher_models import dense_fisher, flat_jacobian, mlp_apply, mlp_params
from jax.flatten_util import ravel_pytree

from subjax import fisher
from subjax.fisher import _likelihood as lk


def _data(key, n=6, d=3, out=4, likelihood="categorical", dtype=jnp.float64):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, d), dtype)
    if likelihood == "categorical":
        y = jax.random.randint(ky, (n,), 0, out)
    elif likelihood == "bernoulli":
        y = jax.random.uniform(ky, (n, out), dtype)
    else:
        y = jax.random.normal(ky, (n, out), dtype)
    return x, y


def _flat_per_example_grads(likelihood, params, x, y):
    flat, unravel = ravel_pytree(params)
    return jax.jacobian(lambda f: lk.nll(likelihood, mlp_apply(unravel(f), x), y))(flat)


def test_per_example_grads_match_jacobian(x64, key):
    params = mlp_params(key, dtype=jnp.float64)
    x, y = _data(jax.random.key(1))
    loss = lambda p, xb, yb: jnp.mean(lk.nll("categorical", mlp_apply(p, xb), yb))
    g = fisher.per_example_grads(loss, params, x, y)
    flat_g = jax.vmap(lambda t: ravel_pytree(t)[0])(g)
    np.testing.assert_allclose(flat_g, _flat_per_example_grads("categorical", params, x, y),
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_diag_empirical_matches_dense(x64, key, likelihood):
    params = mlp_params(key, dtype=jnp.float64)
    x, y = _data(jax.random.key(2), likelihood=likelihood)
    d = fisher.diag_empirical(mlp_apply, params, x, y, likelihood=likelihood)
    g = _flat_per_example_grads(likelihood, params, x, y)
    np.testing.assert_allclose(ravel_pytree(d)[0], jnp.mean(g**2, axis=0), rtol=1e-10, atol=1e-14)


def test_diag_true_categorical_is_exact_expectation(x64, key):
    params = mlp_params(key, dtype=jnp.float64)
    x, _ = _data(jax.random.key(3))
    d = fisher.diag_true(mlp_apply, params, x, likelihood="categorical")
    dense = dense_fisher("categorical", mlp_apply, params, x)
    np.testing.assert_allclose(ravel_pytree(d)[0], jnp.diag(dense), rtol=1e-10, atol=1e-14)


def test_diag_true_sampled_converges_to_dense(x64, key):
    params = mlp_params(key, dtype=jnp.float64)
    x, _ = _data(jax.random.key(4), likelihood="bernoulli")
    d = fisher.diag_true(mlp_apply, params, x, likelihood="bernoulli",
                         key=jax.random.key(5), num_samples=2000)
    ref = jnp.diag(dense_fisher("bernoulli", mlp_apply, params, x))
    err = jnp.abs(ravel_pytree(d)[0] - ref) / (ref + 1e-3 * jnp.max(ref))
    assert float(jnp.max(err)) < 0.1
    # and a single sample is a different (noisy) estimate, not the exact one
    d1 = fisher.diag_true(mlp_apply, params, x, likelihood="bernoulli", key=jax.random.key(5))
    assert not np.allclose(ravel_pytree(d1)[0], ref, rtol=1e-2)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_fvp_matches_dense_fisher(x64, key, likelihood):
    params = mlp_params(key, dtype=jnp.float64)
    x, _ = _data(jax.random.key(6), likelihood=likelihood)
    dense = dense_fisher(likelihood, mlp_apply, params, x)
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(7), flat.shape, jnp.float64)
    fv = fisher.fvp(mlp_apply, params, x, unravel(v), likelihood=likelihood)
    np.testing.assert_allclose(ravel_pytree(fv)[0], dense @ v, rtol=1e-10, atol=1e-12)


def test_ggn_vp_matches_dense_for_non_exponential_loss(x64, key):
    params = mlp_params(key, dtype=jnp.float64)
    x, y = _data(jax.random.key(8), likelihood="gaussian")
    loss = lambda z, t: jnp.mean(jnp.sum(jnp.log(jnp.cosh(z - t)) + 0.1 * z**4, axis=-1))
    jac, out = flat_jacobian(mlp_apply, params, x)
    h = jax.hessian(lambda z: loss(z, y))(out)  # (N, O, N, O)
    n, o = out.shape
    hd = h.reshape(n * o, n * o)
    j = jac.reshape(n * o, -1)
    dense = j.T @ hd @ j
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(9), flat.shape, jnp.float64)
    gv = fisher.ggn_vp(mlp_apply, loss, params, x, y, unravel(v))
    np.testing.assert_allclose(ravel_pytree(gv)[0], dense @ v, rtol=1e-10, atol=1e-12)


def test_true_fisher_equals_ggn_of_nll(x64, key):
    params = mlp_params(key, dtype=jnp.float64)
    x, y = _data(jax.random.key(10))
    v = jax.tree.map(lambda p: jnp.ones_like(p), params)
    a = fisher.fvp(mlp_apply, params, x, v, likelihood="categorical")
    b = fisher.ggn_vp(mlp_apply, lambda z, t: lk.mean_nll("categorical", z, t), params, x, y, v)
    np.testing.assert_allclose(ravel_pytree(a)[0], ravel_pytree(b)[0], rtol=1e-10, atol=1e-13)


def test_empirical_fvp_matches_dense(x64, key):
    params = mlp_params(key, dtype=jnp.float64)
    x, y = _data(jax.random.key(11))
    g = _flat_per_example_grads("categorical", params, x, y)
    dense = g.T @ g / x.shape[0]
    flat, unravel = ravel_pytree(params)
    v = jax.random.normal(jax.random.key(12), flat.shape, jnp.float64)
    fv = fisher.empirical_fvp(mlp_apply, params, x, y, unravel(v))
    np.testing.assert_allclose(ravel_pytree(fv)[0], dense @ v, rtol=1e-10, atol=1e-12)


def test_fvp_under_jit_and_vmap(key):
    params = mlp_params(key)
    x, _ = _data(jax.random.key(13), dtype=jnp.float32)
    vs = jax.tree.map(lambda p: jax.random.normal(jax.random.key(14), (5,) + p.shape), params)
    batched = jax.jit(jax.vmap(lambda v: fisher.fvp(mlp_apply, params, x, v)))(vs)
    one_fn = jax.jit(lambda v: fisher.fvp(mlp_apply, params, x, v))
    for i in (0, 4):
        vi = jax.tree.map(lambda a, i=i: a[i], vs)
        one = one_fn(vi)
        for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(one), strict=True):
            np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)
    # vmap over independent batches of a Fisher diagonal, and eval_shape
    xs = jnp.stack([x, 2 * x])
    d = jax.jit(jax.vmap(lambda xb: fisher.diag_true(mlp_apply, params, xb)))(xs)
    d1 = jax.jit(lambda xb: fisher.diag_true(mlp_apply, params, xb))(2 * x)
    for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(d1), strict=True):
        np.testing.assert_allclose(a[1], b, rtol=1e-5, atol=1e-7)
    shapes = jax.eval_shape(lambda p: fisher.diag_true(mlp_apply, p, x), params)
    assert jax.tree.map(lambda s: s.shape, shapes) == jax.tree.map(jnp.shape, params)


def test_bad_inputs(key):
    params = mlp_params(key)
    x, y = _data(jax.random.key(15), dtype=jnp.float32)
    with pytest.raises(ValueError, match="labels"):
        fisher.diag_empirical(mlp_apply, params, x, None)
    with pytest.raises(ValueError, match="likelihood"):
        fisher.fvp(mlp_apply, params, x, params, likelihood="poisson")
    with pytest.raises(ValueError, match="key"):
        fisher.diag_true(mlp_apply, params, x, likelihood="bernoulli")
    with pytest.raises(ValueError, match="logits"):  # scalar-per-example outputs
        fisher.diag_true(lambda p, xb: mlp_apply(p, xb)[:, :1], params, x)
    with pytest.raises(ValueError, match="labels"):
        fisher.diag_empirical(mlp_apply, params, x, y[:3])
    with pytest.raises(ValueError, match="`v`"):
        fisher.fvp(mlp_apply, params, x, {"l0": params["l0"]})
    with pytest.raises(ValueError, match="labels"):
        fisher.rank_one(mlp_apply, params, x)


@pytest.mark.parametrize("bad", [5, -1])
def test_out_of_range_class_ids(key, bad):
    params = mlp_params(key, sizes=(3, 5, 3))  # 3 classes
    x, _ = _data(jax.random.key(16), out=3, dtype=jnp.float32)
    y = jnp.zeros((6,), jnp.int32).at[2].set(bad)
    with pytest.raises(ValueError, match=r"`labels`.* class ids in \[0, 3\)"):
        fisher.diag_empirical(mlp_apply, params, x, y)
    # traced labels cannot be checked: the bad example's NLL and gradient are NaN
    d = jax.jit(lambda yb: fisher.diag_empirical(mlp_apply, params, x, yb))(y)
    assert all(bool(jnp.all(jnp.isnan(leaf))) for leaf in jax.tree.leaves(d))
    nll = lk.nll("categorical", mlp_apply(params, x), jax.jit(lambda v: v)(y))
    assert np.isnan(nll[2]) and bool(jnp.all(jnp.isfinite(jnp.delete(nll, 2))))
    # in-range labels are unaffected
    d_ok = jax.jit(lambda yb: fisher.diag_empirical(mlp_apply, params, x, yb))(y.at[2].set(2))
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(d_ok))
