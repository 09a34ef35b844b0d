"""subjax.fisher: merging, EWC penalties, low-rank and rank-1 Fishers vs dense."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from fisher_models import dense_fisher, mlp_apply, mlp_params
from jax.flatten_util import ravel_pytree

from subjax import fisher
from subjax.fisher import _likelihood as lk


def _models(key, k=3):
    return [mlp_params(kk) for kk in jax.random.split(key, k)]


def _flat(t):
    return np.asarray(ravel_pytree(t)[0])


def test_fisher_merge_of_identical_models_is_the_model(key):
    p = mlp_params(key)
    fs = [jax.tree.map(lambda a, s=s: jnp.abs(a) * s + 0.01, p) for s in (1.0, 5.0, 0.1)]
    merged = fisher.fisher_merge([p, p, p], fs, weights=[0.2, 0.5, 0.3])
    np.testing.assert_allclose(_flat(merged), _flat(p), rtol=1e-6, atol=1e-7)


def test_fisher_merge_zero_weight_on_others_gives_that_model(key):
    ps = _models(key)
    fs = [jax.tree.map(lambda a: jnp.abs(a) + 0.1, q) for q in ps]
    merged = fisher.fisher_merge(ps, fs, weights=[0.0, 1.0, 0.0])
    np.testing.assert_allclose(_flat(merged), _flat(ps[1]), rtol=1e-6, atol=1e-7)


def test_fisher_merge_formula_and_floor(key):
    ps = _models(key, 2)
    fs = [jax.tree.map(lambda a: a**2, q) for q in ps]
    merged = fisher.fisher_merge(ps, fs, weights=[1.0, 3.0], floor=1e-3)
    f0 = np.maximum(_flat(fs[0]), 1e-3)
    f1 = np.maximum(_flat(fs[1]), 1e-3)
    ref = (f0 * _flat(ps[0]) + 3 * f1 * _flat(ps[1])) / (f0 + 3 * f1)
    np.testing.assert_allclose(_flat(merged), ref, rtol=1e-5)
    # all-zero Fishers: the floor makes it the weighted average
    zeros = [jax.tree.map(jnp.zeros_like, q) for q in ps]
    np.testing.assert_allclose(_flat(fisher.fisher_merge(ps, zeros, weights=[1.0, 3.0])),
                               _flat(fisher.average(ps, weights=[1.0, 3.0])), rtol=1e-5)


def test_average_and_task_arithmetic(key):
    ps = _models(key, 2)
    base = mlp_params(jax.random.key(7))
    np.testing.assert_allclose(_flat(fisher.average(ps)), (_flat(ps[0]) + _flat(ps[1])) / 2,
                               rtol=1e-6)
    ta = fisher.task_arithmetic(base, ps, scale=0.5)
    np.testing.assert_allclose(_flat(ta), _flat(fisher.average(ps)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_flat(fisher.task_arithmetic(base, ps, scale=0.0)), _flat(base))


def test_merge_bad_inputs(key):
    ps = _models(key, 2)
    with pytest.raises(ValueError, match="fishers"):
        fisher.fisher_merge(ps, ps[:1])
    with pytest.raises(ValueError, match="floor"):
        fisher.fisher_merge(ps, ps, floor=0.0)
    with pytest.raises(ValueError, match="weights"):
        fisher.average(ps, weights=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="params_list"):
        fisher.average([])


def _setup(key):
    params = mlp_params(key, dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (12, 3), jnp.float64)
    y = jax.random.randint(jax.random.key(2), (12,), 0, 4)
    return params, x, y


def test_low_rank_matches_dense_top_eigenpairs(x64, key):
    params, x, _ = _setup(key)
    dense = np.asarray(dense_fisher("categorical", mlp_apply, params, x))
    w, v = np.linalg.eigh(dense)
    lr = jax.jit(lambda p: fisher.low_rank(mlp_apply, p, x, 4, key=jax.random.key(3),
                                           n_steps=6))(params)
    np.testing.assert_allclose(lr.eigenvalues, w[::-1][:4], rtol=1e-6)
    vecs = np.stack([_flat(jax.tree.map(lambda a, j=j: a[j], lr.eigenvectors))
                     for j in range(4)], axis=1)
    np.testing.assert_allclose(np.abs(np.sum(vecs * v[:, ::-1][:, :4], axis=0)), 1.0, rtol=1e-5)


def test_low_rank_bad_sizes_name_params_and_oversample(x64, key):
    params, x, _ = _setup(key)
    n = _flat(params).size
    with pytest.raises(ValueError, match=r"rank \+ oversample .* argument `params`"):
        fisher.low_rank(mlp_apply, params, x, 4, key=key, oversample=n)
    with pytest.raises(ValueError, match="oversample"):
        fisher.low_rank(mlp_apply, params, x, 4, key=key, oversample=-1)
    with pytest.raises(ValueError, match=r"rank=.* argument `params`"):
        fisher.low_rank(mlp_apply, params, x, n + 1, key=key)
    # the default oversample is lowered to fit: rank n - 2 leaves it 2 columns
    lr = fisher.low_rank(mlp_apply, params, x, n - 2, key=key)
    assert lr.eigenvalues.shape == (n - 2,)


def test_rank_one_mean_gradient_and_top(x64, key):
    params, x, y = _setup(key)
    flat, unravel = ravel_pytree(params)
    g = jax.jacobian(lambda f: lk.nll("categorical", mlp_apply(unravel(f), x), y))(flat)
    f_emp = np.asarray(g.T @ g / x.shape[0])
    r1 = jax.jit(lambda p: fisher.rank_one(mlp_apply, p, x, labels=y))(params)
    u = _flat(jax.tree.map(lambda a: a[0], r1.eigenvectors))
    gbar = np.asarray(jnp.mean(g, axis=0))
    np.testing.assert_allclose(u, gbar / np.linalg.norm(gbar), rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(r1.eigenvalues[0], u @ f_emp @ u, rtol=1e-8)
    top = jax.jit(lambda p: fisher.rank_one(mlp_apply, p, x, labels=y, method="top",
                                            key=jax.random.key(4), n_steps=8))(params)
    np.testing.assert_allclose(top.eigenvalues[0], np.linalg.eigvalsh(f_emp)[-1], rtol=1e-6)


def test_ewc_penalty_forms_match_dense(x64, key):
    params, x, y = _setup(key)
    anchor = mlp_params(jax.random.key(9), dtype=jnp.float64)
    d = _flat(params) - _flat(anchor)
    dense = np.asarray(dense_fisher("categorical", mlp_apply, anchor, x))
    diag = jax.jit(lambda a: fisher.diag_true(mlp_apply, a, x))(anchor)
    np.testing.assert_allclose(fisher.ewc_penalty(params, anchor, diag, 2.0),
                               np.sum(np.diag(dense) * d**2), rtol=1e-5)
    fvp = fisher.make_fvp(mlp_apply, anchor, x)
    np.testing.assert_allclose(fisher.ewc_penalty(params, anchor, fvp, 2.0), d @ dense @ d,
                               rtol=1e-5)
    lr = jax.jit(lambda a: fisher.low_rank(mlp_apply, a, x, 3, key=jax.random.key(5),
                                           n_steps=6))(anchor)
    w, v = np.linalg.eigh(dense)
    ref = np.sum(w[::-1][:3] * (v[:, ::-1][:, :3].T @ d) ** 2)
    np.testing.assert_allclose(fisher.ewc_penalty(params, anchor, lr, 2.0), ref, rtol=1e-4)
    # gradient of the penalty pulls towards the anchor: a step along -grad lowers it
    grad = jax.grad(lambda p: fisher.ewc_penalty(p, anchor, diag, 1.0))(params)
    moved = jax.tree.map(lambda p, gi: p - 1e-2 * gi, params, grad)
    assert float(fisher.ewc_penalty(moved, anchor, diag)) < float(
        fisher.ewc_penalty(params, anchor, diag))


def test_merge_weights_summing_to_zero_or_negative(key):
    ps = _models(key, 2)
    with pytest.raises(ValueError, match="`weights` sum to zero"):
        fisher.fisher_merge(ps, ps, weights=[0.0, 0.0])
    with pytest.raises(ValueError, match="`weights` must be >= 0"):
        fisher.fisher_merge(ps, ps, weights=[1.0, -1.0])
    with pytest.raises(ValueError, match="`weights` sum to zero"):
        fisher.average(ps, weights=[1.0, -1.0])
    # an affine (negative-weight) average with a nonzero sum stays allowed
    out = fisher.average(ps, weights=[2.0, -1.0])
    np.testing.assert_allclose(_flat(out), 2 * _flat(ps[0]) - _flat(ps[1]), rtol=1e-5,
                               atol=1e-6)
