"""Data-parallel training with subjax optimizers (riemannian_sgd, kfac) equals 1 device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from subjax import fisher
from subjax.manifolds import Stiefel
from subjax.nn import OrthogonalLinear, manifolds_of
from subjax.optim import kfac, riemannian_sgd
from subjax.parallel import data_parallel, train_step

pytestmark = [pytest.mark.multidevice, pytest.mark.standard_promotion]


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return Mesh(np.array(jax.devices()), ("data",))


def data(n=64, d=8, classes=3, seed=1):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, d))
    y = jax.random.randint(ky, (n,), 0, classes)
    return {"x": x, "y": y}


def xent(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))


def run(step, params, state, batch, steps):
    losses = []
    for i in range(steps):
        b = jax.tree.map(lambda a, i=i: jnp.roll(a, 5 * i, axis=0), batch)
        params, state, loss = step(params, state, b)
        losses.append(float(loss))
    return params, state, np.array(losses)


def assert_trees_close(a, b, rtol, atol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


class OrthoNet(nnx.Module):
    def __init__(self, rngs):
        self.proj = OrthogonalLinear(8, 4, rngs=rngs)  # kernel on Stiefel(8, 4)
        self.head = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.proj(x)))


def test_riemannian_sgd_data_parallel_equals_single_device(mesh):
    model = OrthoNet(nnx.Rngs(0))
    manifolds = manifolds_of(model)
    graphdef, params = nnx.split(model, nnx.Param)
    opt = riemannian_sgd(0.3, momentum=0.9, manifolds=manifolds)

    def loss_fn(p, b):
        return xent(nnx.merge(graphdef, p)(b["x"]), b["y"])

    batch = data()
    p1, s1, l1 = run(jax.jit(train_step(loss_fn, opt)), params, opt.init(params), batch, 5)
    step8 = data_parallel(train_step(loss_fn, opt, axis_name="data"), mesh)
    p8, s8, l8 = run(step8, params, opt.init(params), batch, 5)

    assert l1[-1] < l1[0]
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert_trees_close(p8, p1, rtol=1e-5, atol=1e-6)
    assert_trees_close(s8, s1, rtol=1e-4, atol=1e-6)
    # the Stiefel constraint holds on the data-parallel result
    w = nnx.to_pure_dict(p8)["proj"]["kernel"]
    assert float(Stiefel(8, 4).check(jnp.asarray(w))) < 1e-5


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def test_kfac_data_parallel_equals_single_device(mesh):
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    def grad_fn(p, b):
        loss, grads, stats = fisher.kfac_grads_and_stats(
            apply_fn, p, b["x"], b["y"], likelihood="categorical", fisher="empirical")
        return loss, grads, {"kfac_stats": stats}

    batch = data()
    kw = dict(damping=0.1, refresh_every=2, norm_constraint=1e-2)
    opt1 = kfac(0.2, **kw)
    opt8 = kfac(0.2, axis_name="data", **kw)
    p1, s1, l1 = run(jax.jit(train_step(None, opt1, grad_fn=grad_fn)), params,
                     opt1.init(params), batch, 5)
    # default check_vma=True: kfac_grads_and_stats marks its zero output-gradient
    # probes as varying over the batch axis, so their cotangents stay per-shard
    step8 = data_parallel(train_step(None, opt8, axis_name="data", grad_fn=grad_fn), mesh)
    p8, s8, l8 = run(step8, params, opt8.init(params), batch, 5)

    assert l1[-1] < l1[0]
    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert_trees_close(p8, p1, rtol=1e-4, atol=1e-5)
    # the curvature factors (running averages of the averaged statistics) and the
    # momentum agree too (eigenvectors are compared through the factors they
    # diagonalize: individual eigenvectors of close eigenvalues are ill-determined)
    (k8,) = [s for s in jax.tree.leaves(s8, is_leaf=lambda x: hasattr(x, "factor_a"))
             if hasattr(s, "factor_a")]
    (k1,) = [s for s in jax.tree.leaves(s1, is_leaf=lambda x: hasattr(x, "factor_a"))
             if hasattr(s, "factor_a")]
    for field in ("factor_a", "factor_g", "momentum", "count"):
        assert_trees_close(getattr(k8, field), getattr(k1, field), rtol=1e-4, atol=1e-6)

    # control: without axis_name the optimizer keeps per-shard statistics and the
    # 8-shard run is *not* the 1-device run (so the equality above is not automatic)
    opt_local = kfac(0.2, **kw)
    # (its state is per-shard by construction, so the replicated-output check is off)
    step_local = data_parallel(train_step(None, opt_local, axis_name="data", grad_fn=grad_fn),
                               mesh, check_vma=False)
    pl, _, _ = run(step_local, params, opt_local.init(params), batch, 5)
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(pl), jax.tree.leaves(p1), strict=True))
    assert diff > 1e-3
