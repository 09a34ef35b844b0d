"""Tests for the LoRA utilities on Flax's nnx.LoRA / nnx.LoRALinear."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from flax import nnx

import subjax.nn as snn
from subjax.linalg import principal_angles

# Flax's layers are not strict-promotion clean
pytestmark = pytest.mark.standard_promotion


def _layer(seed=0, d_in=12, d_out=8, r=3, dtype=jnp.float32):
    layer = nnx.LoRALinear(d_in, d_out, lora_rank=r, rngs=nnx.Rngs(seed),
                           param_dtype=dtype, lora_param_dtype=dtype)
    k = jax.random.key(seed + 100)
    layer.lora.lora_b[...] = 0.3 * jax.random.normal(k, (r, d_out), dtype)
    layer.bias[...] = jax.random.normal(jax.random.fold_in(k, 1), (d_out,), dtype)
    return layer


def test_pissa_init_is_top_singular_split(key):
    layer = _layer()
    w0 = np.asarray(layer.kernel[...] + layer.lora.lora_a[...] @ layer.lora.lora_b[...])
    x = jax.random.normal(key, (5, 12))
    y0 = layer(x)
    layer.lora.lora_b[...] = jnp.zeros_like(layer.lora.lora_b[...])  # plain base
    w_base = np.asarray(layer.kernel[...])
    snn.pissa_init(layer)
    a, b = np.asarray(layer.lora.lora_a[...]), np.asarray(layer.lora.lora_b[...])
    u, s, vt = np.linalg.svd(w_base, full_matrices=False)
    np.testing.assert_allclose(a @ b, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
    # residual in the base: function unchanged
    np.testing.assert_allclose(np.asarray(layer.kernel[...]) + a @ b, w_base, atol=1e-5)
    # A^T A = B B^T = Sigma_r (balanced factors)
    np.testing.assert_allclose(a.T @ a, np.diag(s[:3]), atol=1e-4)
    np.testing.assert_allclose(b @ b.T, np.diag(s[:3]), atol=1e-4)
    assert not np.allclose(y0, 0)
    del w0


def test_pissa_on_wrapped_lora_module():
    base = nnx.Linear(10, 7, rngs=nnx.Rngs(1))
    wrapper = nnx.LoRA(10, 2, 7, base_module=base, rngs=nnx.Rngs(2))
    x = jnp.ones((4, 10))
    y0 = wrapper(x)  # lora_b = 0 -> the base
    snn.pissa_init(wrapper)
    np.testing.assert_allclose(wrapper(x), y0, atol=1e-5)
    assert snn.lora_rank(wrapper) == 2


def test_merge_unmerge_round_trip_exact_on_representable_values():
    # dyadic entries: W + A B and (W + A B) - A B are computed without rounding,
    # so the round trip must be bit-exact
    layer = nnx.LoRALinear(6, 5, lora_rank=2, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    layer.kernel[...] = jnp.asarray(rng.integers(-8, 8, (6, 5)) / 8.0, jnp.float32)
    layer.lora.lora_a[...] = jnp.asarray(rng.integers(-4, 4, (6, 2)) / 4.0, jnp.float32)
    layer.lora.lora_b[...] = jnp.asarray(rng.integers(-4, 4, (2, 5)) / 4.0, jnp.float32)
    layer.bias[...] = jnp.asarray(rng.integers(-4, 4, (5,)) / 2.0, jnp.float32)
    merged = snn.merge_lora(layer)
    assert type(merged) is nnx.Linear
    x = jnp.asarray(rng.integers(-4, 4, (3, 6)), jnp.float32)
    np.testing.assert_array_equal(merged(x), layer(x))
    back = snn.unmerge_lora(merged, layer.lora.lora_a[...], layer.lora.lora_b[...])
    assert isinstance(back, nnx.LoRALinear)
    np.testing.assert_array_equal(back.kernel[...], layer.kernel[...])
    np.testing.assert_array_equal(back.lora.lora_a[...], layer.lora.lora_a[...])
    np.testing.assert_array_equal(back.lora.lora_b[...], layer.lora.lora_b[...])
    np.testing.assert_array_equal(back.bias[...], layer.bias[...])
    np.testing.assert_array_equal(back(x), layer(x))


def test_merge_unmerge_round_trip_general_values(key):
    layer = _layer()
    merged = snn.merge_lora(layer)
    x = jax.random.normal(key, (4, 12))
    np.testing.assert_allclose(merged(x), layer(x), rtol=1e-5, atol=1e-5)
    back = snn.unmerge_lora(merged, layer.lora.lora_a[...], layer.lora.lora_b[...])
    w = np.asarray(layer.kernel[...])
    ulp = np.spacing(np.float32(np.max(np.abs(np.asarray(merged.kernel[...])))))
    assert np.max(np.abs(np.asarray(back.kernel[...]) - w)) <= 4 * ulp
    # merging the unmerged layer gives the merged kernel again
    np.testing.assert_allclose(snn.merge_lora(back).kernel[...], merged.kernel[...], atol=4 * ulp)


def test_lora_optimizer_updates_only_adapter(key):
    model = _layer()
    base_before = np.asarray(model.kernel[...])
    bias_before = np.asarray(model.bias[...])
    a_before = np.asarray(model.lora.lora_a[...])
    opt = snn.lora_optimizer(model, optax.adam(1e-2))
    x = jax.random.normal(key, (32, 12))
    y = jax.random.normal(jax.random.fold_in(key, 1), (32, 8))

    def loss(m):
        return jnp.mean((m(x) - y) ** 2)

    @nnx.jit
    def step(m, o):
        lval, g = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))(m)
        o.update(m, g)
        return lval

    l0 = float(loss(model))
    for _ in range(30):
        step(model, opt)
    assert float(loss(model)) < l0
    np.testing.assert_array_equal(model.kernel[...], base_before)
    np.testing.assert_array_equal(model.bias[...], bias_before)
    assert not np.allclose(model.lora.lora_a[...], a_before)
    leaves = jax.tree.leaves(snn.lora_state(model))
    assert len(leaves) == 2


def _covs(key, d=8, n=400):
    k1, k2, k3 = jax.random.split(key, 3)
    a1 = jax.random.normal(k1, (d, d)) * jnp.linspace(2.0, 0.2, d)
    a2 = jax.random.normal(k2, (d, d)) * jnp.linspace(0.2, 2.0, d)
    x1 = jax.random.normal(k3, (n, d)) @ a1
    x2 = jax.random.normal(jax.random.fold_in(k3, 1), (n, d)) @ a2
    return x1.T @ x1 / n, x2.T @ x2 / n


def test_sclora_difference_solves_eigenproblem(x64, key):
    c_ft, c_keep = _covs(key)
    sub = snn.sclora_subspace(c_ft, c_keep, 3, beta=0.3)
    m = 0.7 * np.asarray(c_ft) - 0.3 * np.asarray(c_keep)
    evals, evecs = scipy.linalg.eigh(m)
    np.testing.assert_allclose(sub.eigenvalues, evals[::-1][:3], rtol=1e-10)
    ang = principal_angles(sub.basis, jnp.asarray(evecs[:, ::-1][:, :3]))
    assert float(jnp.max(ang)) < 1e-6
    np.testing.assert_allclose(m @ sub.eigenvectors, sub.eigenvectors * sub.eigenvalues,
                               atol=1e-10)


def test_sclora_generalized_solves_eigenproblem(x64, key):
    c_ft, c_keep = _covs(key)
    sub = snn.sclora_subspace(c_ft, c_keep, 3, method="generalized", ridge=1e-8)
    b = np.asarray(c_keep) + 1e-8 * np.trace(np.asarray(c_keep)) / 8 * np.eye(8)
    evals, evecs = scipy.linalg.eigh(np.asarray(c_ft), b)
    np.testing.assert_allclose(sub.eigenvalues, evals[::-1][:3], rtol=1e-9)
    v = np.asarray(sub.eigenvectors)
    np.testing.assert_allclose(np.asarray(c_ft) @ v, b @ v * np.asarray(sub.eigenvalues),
                               atol=1e-8 * np.max(evals))
    ang = principal_angles(sub.basis, jnp.linalg.qr(jnp.asarray(evecs[:, ::-1][:, :3]))[0])
    assert float(jnp.max(ang)) < 1e-6


def test_sclora_init_keeps_function_and_constrains_outputs(key):
    layer = _layer(d_in=12, d_out=8, r=3)
    layer.lora.lora_b[...] = jnp.zeros_like(layer.lora.lora_b[...])
    x = jax.random.normal(key, (6, 12))
    y0 = layer(x)
    x_ft = jax.random.normal(jax.random.fold_in(key, 1), (200, 12))
    x_keep = jax.random.normal(jax.random.fold_in(key, 2), (200, 12)) * jnp.linspace(3, 0, 12)
    sub = snn.sclora_init(layer, x_ft, x_keep, beta=0.5)
    np.testing.assert_allclose(layer(x), y0, atol=1e-4)
    # the adapter's output lies in span(V): (I - V V^T) B^T = 0
    v = np.asarray(sub.basis)
    b = np.asarray(layer.lora.lora_b[...])
    np.testing.assert_allclose(b.T - v @ (v.T @ b.T), 0.0, atol=1e-5)


def test_lora_bad_inputs(key):
    with pytest.raises(TypeError, match="layer"):
        snn.pissa_init(nnx.Linear(3, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(TypeError, match="layer"):
        snn.pissa_init(nnx.LoRA(3, 2, 4, rngs=nnx.Rngs(0)))
    c = jnp.eye(4)
    with pytest.raises(ValueError, match="rank"):
        snn.sclora_subspace(c, c, 5)
    with pytest.raises(ValueError, match="method"):
        snn.sclora_subspace(c, c, 2, method="svd")
    with pytest.raises(ValueError, match="beta"):
        snn.sclora_subspace(c, c, 2, beta=1.5)
    with pytest.raises(ValueError, match="c_keep"):
        snn.sclora_subspace(c, jnp.eye(3), 2)
    layer = _layer()
    with pytest.raises(ValueError, match="x_ft"):
        snn.sclora_init(layer, jnp.ones((5, 3)), jnp.ones((5, 12)))
    merged = snn.merge_lora(layer)
    with pytest.raises(ValueError, match="lora_b"):
        snn.unmerge_lora(merged, layer.lora.lora_a[...], jnp.ones((3, 9)))
