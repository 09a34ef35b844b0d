"""GrassmannClassifier (GCR head), OrthogonalLinear and manifolds_of."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from subjax.manifolds import Grassmann, Stiefel
from subjax.nn import GrassmannClassifier, OrthogonalLinear, manifolds_of
from subjax.optim import manifold_labels, riemannian_sgd


def test_logits_match_dense_reference_and_init_is_orthonormal():
    head = GrassmannClassifier(12, 5, 3, scale=7.0, rngs=nnx.Rngs(0))
    w = np.asarray(head.weight[...], np.float64)
    assert w.shape == (5, 12, 3)
    np.testing.assert_allclose(np.swapaxes(w, -1, -2) @ w, np.broadcast_to(np.eye(3), (5, 3, 3)),
                               atol=1e-6)
    x = np.asarray(jax.random.normal(jax.random.key(1), (4, 12)), np.float64)
    xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
    ref = 7.0 * np.linalg.norm(np.einsum("bn,cnp->bcp", xn, w), axis=-1)
    out = head(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    # scale-invariant in x, bounded by the scale, invariant to a change of basis of W_c
    np.testing.assert_allclose(head(3.0 * jnp.asarray(x, jnp.float32)), out, rtol=1e-5)
    assert float(jnp.max(out)) <= 7.0 + 1e-5 and float(jnp.min(out)) >= 0
    q = Stiefel(3, 3).random_point(jax.random.key(2), (5,))
    head.weight[...] = head.weight[...] @ q
    np.testing.assert_allclose(head(jnp.asarray(x, jnp.float32)), out, rtol=1e-5)


def test_safe_gradients_at_subspace_dim_one():
    head = GrassmannClassifier(4, 2, 1, scale=5.0, rngs=nnx.Rngs(0))
    w = jnp.zeros((2, 4, 1)).at[0, 0, 0].set(1.0).at[1, 1, 0].set(1.0)
    head.weight[...] = w
    # feature orthogonal to class 1 (zero projection) and the all-zero feature
    x = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])

    def loss(m, x):
        return jnp.sum(m(x))

    g_model, g_x = nnx.grad(loss, argnums=(0, 1))(head, x)
    assert bool(jnp.all(jnp.isfinite(g_model["weight"][...])))
    assert bool(jnp.all(jnp.isfinite(g_x)))
    # where the projection is nonzero the gradient is the analytic one: d|w.x|/dw = sign * x
    np.testing.assert_allclose(g_model["weight"][...][0, :, 0], 5.0 * x[0], atol=1e-6)


def test_orthogonal_linear_and_manifolds_of():
    lin = OrthogonalLinear(8, 3, rngs=nnx.Rngs(0))
    wide = OrthogonalLinear(3, 8, use_bias=False, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (5, 3))
    np.testing.assert_allclose(jnp.linalg.norm(wide(x), axis=-1), jnp.linalg.norm(x, axis=-1),
                               rtol=1e-5)
    assert lin(jnp.ones((2, 8))).shape == (2, 3)
    mans = manifolds_of(lin)
    assert mans["kernel"] == Stiefel(8, 3) and mans["bias"] is None
    assert manifolds_of(wide)["kernel"] == Stiefel(8, 3)


class _Net(nnx.Module):
    def __init__(self, d_in, classes, p, rngs):
        self.body = nnx.Linear(d_in, 16, rngs=rngs)
        self.head = GrassmannClassifier(16, classes, p, scale=8.0, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.tanh(self.body(x)))


@pytest.mark.standard_promotion  # optax.partition / adamw and flax internals
@pytest.mark.parametrize("p", [1, 3])
def test_nnx_model_with_gcr_head_trains_with_mixed_optimizers(p):
    classes = 4
    k1, k2 = jax.random.split(jax.random.key(0))
    centers = 3.0 * jax.random.normal(k1, (classes, 10))
    y = jnp.arange(256) % classes
    x = centers[y] + jax.random.normal(k2, (256, 10))
    model = _Net(10, classes, p, nnx.Rngs(0))
    mans = manifolds_of(model)
    assert mans["head"]["weight"] == Grassmann(16, p)
    tx = optax.partition(
        {"riemannian": riemannian_sgd(0.1, 0.9, manifolds=mans), "euclidean": optax.adamw(1e-2)},
        manifold_labels(mans))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    body0 = model.body.kernel[...]

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    loss0 = float(loss_fn(model))
    for _ in range(150):
        step(model, opt)
    acc = float(jnp.mean(jnp.argmax(model(x), -1) == y))
    assert float(loss_fn(model)) < 0.5 * loss0
    assert acc > 0.95
    assert float(jnp.max(Grassmann(16, p).check(model.head.weight[...]))) < 1e-5
    assert float(jnp.max(jnp.abs(model.body.kernel[...] - body0))) > 1e-2  # adamw moved it


def test_bad_inputs():
    with pytest.raises(ValueError, match="`subspace_dim`=9 exceeds `features`=8"):
        GrassmannClassifier(8, 3, 9, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`classes`"):
        GrassmannClassifier(8, 0, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`scale`"):
        GrassmannClassifier(8, 3, 2, scale=0.0, rngs=nnx.Rngs(0))
    head = GrassmannClassifier(8, 3, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="`x` has 7 features"):
        head(jnp.ones((2, 7)))
