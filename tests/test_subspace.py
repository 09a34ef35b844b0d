"""Random-subspace training (intrinsic dimension): projections against dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg
from flax import nnx

import subjax.nn as snn


class _MLP(nnx.Module):
    def __init__(self, rngs, dtype=jnp.float32):
        self.a = nnx.Linear(6, 9, param_dtype=dtype, rngs=rngs)
        self.b = nnx.Linear(9, 3, param_dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.b(jnp.tanh(self.a(x)))


def _dense_matrix(sub):
    """The D x d projection of ``sub``: its images of the basis vectors of ``z``."""
    eye = jnp.eye(sub.dim, dtype=sub.z[...].dtype)
    if sub.projection == "dense":
        return np.asarray(jax.vmap(lambda e: sub.basis[...] @ e, out_axes=1)(eye))
    b = sub.basis.get_value()
    return np.asarray(jax.jit(jax.vmap(lambda e: snn.fastfood_project(
        e, b["signs"], b["perm"], b["gauss"], sub.full_dim), out_axes=1))(eye))


def test_walsh_hadamard_matches_scipy():
    x = jax.random.normal(jax.random.key(0), (3, 16))
    h = jnp.asarray(scipy.linalg.hadamard(16).T, jnp.float32)
    np.testing.assert_allclose(snn.walsh_hadamard(x), x @ h, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="power-of-two"):
        snn.walsh_hadamard(jnp.ones(6))


def test_fastfood_matches_its_dense_formula_and_has_unit_columns():
    net = _MLP(nnx.Rngs(0))
    sub = snn.RandomSubspace(net, 7, projection="fastfood", key=jax.random.key(3))
    p = _dense_matrix(sub)
    d_full = sub.full_dim
    n = 1 << (d_full - 1).bit_length()
    b = sub.basis.get_value()
    h = scipy.linalg.hadamard(n) / np.sqrt(n)
    perm = np.eye(n)[np.asarray(b["perm"])]
    g = np.asarray(b["gauss"])
    full = np.sqrt(n) / np.linalg.norm(g) * h @ np.diag(g) @ perm @ h @ np.diag(
        np.asarray(b["signs"]))
    np.testing.assert_allclose(p, full[:d_full, :7], rtol=1e-4, atol=1e-5)
    # columns of the full L x L transform have unit norm; truncating rows to D shrinks them
    np.testing.assert_allclose(np.linalg.norm(full[:, :7], axis=0), 1.0, rtol=1e-5)


def test_dense_projection_has_unit_columns_and_starts_at_theta0():
    net = _MLP(nnx.Rngs(0))
    sub = snn.RandomSubspace(net, 5, key=jax.random.key(1))
    np.testing.assert_allclose(np.linalg.norm(np.asarray(sub.basis[...]), axis=0), 1.0,
                               rtol=1e-5)
    x = jax.random.normal(jax.random.key(2), (4, 6))
    np.testing.assert_allclose(sub(x), net(x), rtol=1e-6)
    assert sub.full_dim == 6 * 9 + 9 + 9 * 3 + 3
    # only z is a parameter
    params = nnx.state(sub, nnx.Param)
    assert [np.shape(v) for v in jax.tree_util.tree_leaves(params)] == [(5,)]


@pytest.mark.parametrize("projection", ["dense", "fastfood"])
def test_gradient_in_z_is_the_projected_full_gradient(projection):
    with jax.enable_x64(True):
        net = _MLP(nnx.Rngs(0), jnp.float64)
        sub = snn.RandomSubspace(net, 6, projection=projection, key=jax.random.key(4))
        assert sub.z[...].dtype == jnp.float64
        sub.z[...] = 0.1 * jax.random.normal(jax.random.key(5), (6,), jnp.float64)
        x = jax.random.normal(jax.random.key(6), (8, 6), jnp.float64)
        p = _dense_matrix(sub)

        def loss_z(m):
            return jnp.sum(m(x) ** 2)

        gz = nnx.jit(nnx.grad(loss_z))(sub).z[...]
        graph, _ = nnx.split(net, nnx.Param)
        theta = sub.parameters()

        def loss_theta(t):
            return jnp.sum(nnx.merge(graph, sub._unravel(t))(x) ** 2)

        np.testing.assert_allclose(gz, p.T @ np.asarray(jax.jit(jax.grad(loss_theta))(theta)),
                                   rtol=1e-8, atol=1e-10)


@pytest.mark.standard_promotion  # optax's Adam is not strict-promotion clean
def test_training_in_the_subspace_lowers_the_loss_under_jit():
    net = _MLP(nnx.Rngs(0))
    sub = snn.RandomSubspace(net, 20, projection="fastfood", key=jax.random.key(7))
    x = jax.random.normal(jax.random.key(8), (32, 6))
    y = jnp.sin(x[:, :3])
    opt = nnx.Optimizer(sub, optax.adam(0.05), wrt=nnx.Param)

    @nnx.jit
    def step(m, o):
        loss, g = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(m)
        o.update(m, g)
        return loss

    first = float(step(sub, opt))
    for _ in range(100):
        last = float(step(sub, opt))
    assert last < 0.5 * first
    # theta0 never moves
    np.testing.assert_array_equal(sub.theta0[...], snn.RandomSubspace(
        net, 20, projection="fastfood", key=jax.random.key(7)).theta0[...])


def test_bad_input_is_named():
    net = _MLP(nnx.Rngs(0))
    with pytest.raises(ValueError, match="dim"):
        snn.RandomSubspace(net, 0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="dim"):
        snn.RandomSubspace(net, 10_000, key=jax.random.key(0))
    with pytest.raises(ValueError, match="projection"):
        snn.RandomSubspace(net, 3, projection="sparse", key=jax.random.key(0))
    bn = nnx.BatchNorm(4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="nnx.Param"):
        snn.RandomSubspace(bn, 2, key=jax.random.key(0))
