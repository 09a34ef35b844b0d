"""LOST's channel-sparse low-rank layer and SLTrain's layer against dense references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import subjax.nn as snn


def _w(shape=(9, 7), seed=0):
    return np.random.default_rng(seed).normal(size=shape)


def test_lost_factors_are_the_truncated_svd_and_the_largest_residual_columns(x64):
    w = _w()
    f = snn.lost_factors(jnp.asarray(w, jnp.float64), rank=3, channels=2)
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    best = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(np.asarray(f.a @ f.b), best, atol=1e-12)
    # balanced factors: A^T A = B B^T = diag(s_r)
    np.testing.assert_allclose(np.asarray(f.a.T @ f.a), np.diag(s[:3]), atol=1e-12)
    np.testing.assert_allclose(np.asarray(f.b @ f.b.T), np.diag(s[:3]), atol=1e-12)
    resid = w - best
    want = np.sort(np.argsort(-np.linalg.norm(resid, axis=0))[:2])
    np.testing.assert_array_equal(np.asarray(f.channels), want)
    np.testing.assert_allclose(np.asarray(f.values), resid[:, want], atol=1e-12)
    # the kept channels are reproduced exactly, the others by the rank-3 approximation
    dense = best.copy()
    dense[:, want] += resid[:, want]
    np.testing.assert_allclose(dense[:, want], w[:, want], atol=1e-12)
    assert f.a.dtype == jnp.float64
    # full rank and every channel: nothing left over
    g = snn.lost_factors(jnp.asarray(w, jnp.float64), rank=7, channels=0)
    np.testing.assert_allclose(np.asarray(g.a @ g.b), w, atol=1e-12)
    assert g.values.shape == (9, 0)


def test_lost_factors_bad_arguments():
    w = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="rank"):
        snn.lost_factors(w, rank=4, channels=0)
    with pytest.raises(ValueError, match="channels"):
        snn.lost_factors(w, rank=1, channels=4)
    with pytest.raises(ValueError, match="channels"):
        snn.lost_factors(w, rank=1, channels=-1)
    with pytest.raises(ValueError, match="kernel"):
        snn.lost_factors(jnp.ones(3), rank=1, channels=0)
    with pytest.raises(TypeError, match="kernel"):
        snn.lost_factors(jnp.ones((4, 3), jnp.int32), rank=1, channels=0)


def test_channel_sparse_layer_forward_kernel_and_parameter_count():
    layer = snn.ChannelSparseLowRankLinear(12, 10, rank=3, channels=4, rngs=nnx.Rngs(2))
    a, b = np.asarray(layer.a[...]), np.asarray(layer.b[...])
    idx, vals = np.asarray(layer.support[...]), np.asarray(layer.values[...])
    s = np.zeros((12, 10), np.float32)
    s[:, idx] = vals
    rng = np.random.default_rng(1)
    layer.bias[...] = jnp.asarray(rng.normal(size=10), jnp.float32)
    x = rng.normal(size=(5, 12)).astype(np.float32)
    y, sk, k = nnx.jit(lambda m, x: (m(x), m.sparse_kernel(), m.kernel()))(layer, x)
    np.testing.assert_array_equal(np.asarray(sk), s)
    np.testing.assert_allclose(np.asarray(k), a @ b + s, rtol=1e-6, atol=1e-6)
    want = x @ (a @ b + s) + np.asarray(layer.bias[...])
    np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
    # trained numbers: r (in + out) + k in + bias; the channel indices are not a Param
    n = sum(p.size for p in jax.tree.leaves(nnx.state(layer, nnx.Param)))
    assert n == 3 * (12 + 10) + 4 * 12 + 10
    assert len(jax.tree.leaves(nnx.state(layer, snn.SparseChannels))) == 1
    # the initial kernel is the SVD split of a fan-in scaled Gaussian draw
    assert 0.5 < np.var(np.asarray(k)) * 12 < 2.0


def test_channel_sparse_layer_gradients_are_the_dense_gradient_restricted(x64):
    layer = snn.ChannelSparseLowRankLinear(8, 6, rank=2, channels=3, use_bias=False,
                                           param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x, t = jnp.asarray(rng.normal(size=(7, 8))), jnp.asarray(rng.normal(size=(7, 6)))

    def loss(m):
        return 0.5 * jnp.sum((m(x) - t) ** 2)

    @nnx.jit
    def grads(m):  # the layer's gradients and the dense-kernel gradient, one compile
        return nnx.grad(loss)(m), jax.grad(lambda w: 0.5 * jnp.sum((x @ w - t) ** 2))(
            m.kernel())

    g, gw = grads(layer)
    idx = np.asarray(layer.support[...])
    a, b = np.asarray(layer.a[...]), np.asarray(layer.b[...])
    gw = np.asarray(gw)
    np.testing.assert_allclose(g["values"][...], gw[:, idx], rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g["a"][...], gw @ b.T, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(g["b"][...], a.T @ gw, rtol=1e-10, atol=1e-10)


def test_channel_sparse_layer_no_channels_is_pure_low_rank_and_jits():
    layer = snn.ChannelSparseLowRankLinear(6, 5, rank=2, channels=0, rngs=nnx.Rngs(1))
    x = np.random.default_rng(0).normal(size=(2, 3, 6)).astype(np.float32)
    out = nnx.jit(lambda m, x: m(x))(layer, x)
    want = x @ (np.asarray(layer.a[...]) @ np.asarray(layer.b[...]))
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-6)
    assert layer.values[...].shape == (6, 0)
    with pytest.raises(ValueError, match="in_features"):
        snn.ChannelSparseLowRankLinear(0, 5, rank=1, channels=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels"):
        snn.ChannelSparseLowRankLinear(6, 5, rank=1, channels=6, rngs=nnx.Rngs(0))


def test_sltrain_layer_gradient_of_values_is_the_dense_gradient_on_its_support(x64):
    layer = snn.LowRankSparseLinear(8, 6, rank=2, density=0.25, use_bias=False,
                                    param_dtype=jnp.float64, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(0)
    x, t = jnp.asarray(rng.normal(size=(7, 8))), jnp.asarray(rng.normal(size=(7, 6)))

    @nnx.jit
    def grads(m):
        return (nnx.grad(lambda m: 0.5 * jnp.sum((m(x) - t) ** 2))(m),
                jax.grad(lambda w: 0.5 * jnp.sum((x @ w - t) ** 2))(m.kernel()))

    g, gw = grads(layer)
    np.testing.assert_allclose(g["values"][...],
                               np.asarray(gw).reshape(-1)[np.asarray(layer.support[...])],
                               rtol=1e-10, atol=1e-10)
