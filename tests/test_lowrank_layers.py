"""Tests for SLTrain / Maestro layers and the spectral tools."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import subjax.nn as snn


def test_low_rank_sparse_linear_structure_and_forward(key):
    layer = snn.LowRankSparseLinear(20, 10, rank=3, density=0.1, rngs=nnx.Rngs(0))
    idx = np.asarray(layer.support[...])
    assert idx.shape == (20,) and len(set(idx.tolist())) == 20  # distinct positions
    s = np.asarray(layer.sparse_kernel())
    assert np.count_nonzero(s) == 20
    np.testing.assert_array_equal(s.reshape(-1)[idx], np.asarray(layer.values[...]))
    x = jax.random.normal(key, (4, 20))
    w = np.asarray(layer.a[...]) @ np.asarray(layer.b[...]) + s
    np.testing.assert_allclose(layer(x), np.asarray(x) @ w + np.asarray(layer.bias[...]),
                               rtol=1e-5, atol=1e-5)
    # trainable: low-rank factors, sparse values, bias; the support is not a Param
    n_params = sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert n_params == 3 * (20 + 10) + 20 + 10


@pytest.mark.standard_promotion
def test_low_rank_sparse_support_fixed_under_training(key):
    layer = snn.LowRankSparseLinear(16, 8, rank=2, density=0.1, rngs=nnx.Rngs(1))
    support = np.asarray(layer.support[...])
    opt = nnx.Optimizer(layer, optax.adam(1e-2), wrt=nnx.Param)
    x = jax.random.normal(key, (64, 16))
    y = x @ jax.random.normal(jax.random.fold_in(key, 1), (16, 8))

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m, o):
        o.update(m, nnx.grad(loss)(m))

    l0 = float(loss(layer))
    for _ in range(40):
        step(layer, opt)
    assert float(loss(layer)) < 0.8 * l0
    np.testing.assert_array_equal(layer.support[...], support)
    assert np.count_nonzero(np.asarray(layer.sparse_kernel())) <= support.size


def test_ordered_dropout_keep_matches_truncated_kernel(key):
    layer = snn.OrderedDropoutLinear(10, 6, rank=5, use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(key, (3, 10))
    for k in range(1, 6):
        np.testing.assert_allclose(layer(x, keep=k), x @ layer.kernel(k), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(layer(x), x @ layer.kernel(), rtol=1e-5, atol=1e-6)
    # sampled keep stays in [k_min, rank]
    ks = [int(layer.sample_keep(nnx.Rngs(dropout=i))) for i in range(40)]
    assert min(ks) >= 1 and max(ks) <= 5 and len(set(ks)) > 2


@pytest.mark.slow
@pytest.mark.standard_promotion
def test_ordered_dropout_orders_components_like_svd(key):
    # Fit a linear map with a decaying spectrum. With ordered dropout the first k
    # components are (close to) the best rank-k approximation; trained without
    # it, truncation to k components loses much more.
    d, r = 12, 6
    k1, k2, k3 = jax.random.split(key, 3)
    u, _ = jnp.linalg.qr(jax.random.normal(k1, (d, d)))
    v, _ = jnp.linalg.qr(jax.random.normal(k2, (d, d)))
    s = jnp.array([6.0, 4.0, 2.5, 1.5, 1.0, 0.6] + [0.0] * (d - 6))
    w_true = (u * s) @ v.T
    x = jax.random.normal(k3, (256, d))
    y = x @ w_true

    def train(ordered: bool):
        layer = snn.OrderedDropoutLinear(d, d, rank=r, use_bias=False, rngs=nnx.Rngs(0))
        opt = nnx.Optimizer(layer, optax.adam(2e-2), wrt=nnx.Param)

        @nnx.jit
        def step(m, o, i):
            def loss(m):
                rngs = (nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(7), i))
                        if ordered else None)
                return jnp.mean((m(x, rngs=rngs) - y) ** 2)

            o.update(m, nnx.grad(loss)(m))

        for i in range(1500):
            step(layer, opt, i)
        return layer

    def trunc_err(layer, k):
        return float(jnp.linalg.norm(layer.kernel(k) - w_true))

    best2 = float(jnp.linalg.norm(s[2:]))  # Eckart–Young rank-2 error
    od, plain = train(True), train(False)
    assert trunc_err(od, 2) < 1.25 * best2
    assert trunc_err(plain, 2) > 1.5 * trunc_err(od, 2)
    assert trunc_err(od, r) < 0.1 * float(jnp.linalg.norm(w_true))  # still fits at full rank


def test_stable_rank_values(key):
    assert abs(float(snn.stable_rank(jnp.outer(jnp.arange(1.0, 5.0), jnp.ones(3)))) - 1) < 1e-5
    assert abs(float(snn.stable_rank(jnp.eye(7))) - 7) < 1e-5
    w = jax.random.normal(key, (3, 9, 5))
    s = np.linalg.svd(np.asarray(w), compute_uv=False)
    np.testing.assert_allclose(snn.stable_rank(w), (s**2).sum(-1) / s[:, 0] ** 2, rtol=1e-5)


def test_welore_ranks_non_uniform(key):
    k1, k2 = jax.random.split(key)
    low = jax.random.normal(k1, (30, 2)) @ jax.random.normal(k2, (2, 20))  # rank 2
    flat = jnp.eye(20)  # flat spectrum
    ranks = snn.welore_ranks({"low": low, "flat": flat, "bias": jnp.ones(3)}, threshold=0.05)
    assert int(ranks["low"]) == 2 and int(ranks["flat"]) == 20 and ranks["bias"] is None
    with pytest.raises(ValueError, match="threshold"):
        snn.welore_ranks({"w": flat}, threshold=0.0)


def test_intruder_dimensions(key):
    k1, k2, k3 = jax.random.split(key, 3)
    w0 = jax.random.normal(k1, (40, 30)) / jnp.sqrt(40.0)
    # full-rank-like small update: no intruders
    same = snn.intruder_dimensions(w0, w0 + 1e-3 * jax.random.normal(k2, (40, 30)), top_k=5)
    assert int(same.count) == 0
    # a large rank-1 update along a random direction becomes the top singular vector
    # and is far from every pre-trained singular vector: one intruder
    u = jax.random.normal(k3, (40,))
    u = u / jnp.linalg.norm(u)
    w1 = w0 + 10.0 * jnp.outer(u, jax.random.normal(k2, (30,)) / jnp.sqrt(30.0))
    res = snn.intruder_dimensions(w0, w1, top_k=5, epsilon=0.5)
    assert int(res.count) == 1 and bool(res.is_intruder[0])
    assert res.max_similarity.shape == (5,)
    # jit / vmap
    f = jax.jit(jax.vmap(lambda a, b: snn.intruder_dimensions(a, b, top_k=3).count))
    assert f(jnp.stack([w0, w0]), jnp.stack([w0, w1])).tolist() == [0, 1]
    with pytest.raises(ValueError, match="same shape"):
        snn.intruder_dimensions(w0, w0.T)
    with pytest.raises(ValueError, match="top_k"):
        snn.intruder_dimensions(w0, w0, top_k=31)


def test_layer_bad_inputs():
    with pytest.raises(ValueError, match="rank"):
        snn.LowRankSparseLinear(4, 3, rank=5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="density"):
        snn.LowRankSparseLinear(4, 3, rank=2, density=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="k_min"):
        snn.OrderedDropoutLinear(4, 3, rank=2, k_min=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="in_features"):
        snn.OrderedDropoutLinear(0, 3, rank=2, rngs=nnx.Rngs(0))
