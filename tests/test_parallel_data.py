"""Data-parallel training on 8 fake devices equals single-device training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from subjax.parallel import data_parallel, replicate, shard_batch, train_step

pytestmark = pytest.mark.multidevice

N_DEV = 8


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == N_DEV, (
        "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    )
    return Mesh(np.array(jax.devices()), ("data",))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(5, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def flax_problem(n=64, seed=0):
    model = MLP(nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree_util.tree_map(jnp.asarray, nnx.to_pure_dict(params))
    kx, ky = jax.random.split(jax.random.key(seed + 1))
    batch = {"x": jax.random.normal(kx, (n, 5)), "y": jax.random.normal(ky, (n, 3))}

    def loss_fn(p, b):
        state = nnx.State(p)
        m = nnx.merge(graphdef, state)
        return jnp.mean(jnp.sum((m(b["x"]) - b["y"]) ** 2, axis=-1))

    return params, batch, loss_fn


def run(step, params, opt_state, batches):
    losses = []
    for b in batches:
        params, opt_state, loss = step(params, opt_state, b)
        losses.append(float(loss))
    return params, opt_state, np.array(losses)


def batches_for(batch, steps):
    # a different permutation each step, so the shards differ between steps
    return [
        jax.tree_util.tree_map(lambda x, i=i: jnp.roll(x, 7 * i, axis=0), batch)
        for i in range(steps)
    ]


@pytest.mark.standard_promotion
def test_flax_adam_8_devices_equals_1(mesh):
    params, batch, loss_fn = flax_problem()
    opt = optax.adam(1e-2)
    steps = 6
    bs = batches_for(batch, steps)

    single = jax.jit(train_step(loss_fn, opt))
    p1, s1, l1 = run(single, params, opt.init(params), bs)

    step = data_parallel(train_step(loss_fn, opt, axis_name="data"), mesh)
    p8, s8, l8 = run(step, params, opt.init(params), bs)

    np.testing.assert_allclose(l8, l1, rtol=1e-5)
    assert l1[-1] < l1[0]  # it actually trained
    flat1, tree1 = jax.tree_util.tree_flatten(p1)
    flat8, tree8 = jax.tree_util.tree_flatten(p8)
    assert tree1 == tree8
    p0 = jax.tree.leaves(params)
    moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat1, p0, strict=True))
    assert moved > 1e-2
    for a, b in zip(flat8, flat1, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # optimizer state (Adam moments) agrees too
    for a, b in zip(jax.tree.leaves(s8), jax.tree.leaves(s1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    # the step really is sharded: one shard of the batch per device
    sharded = shard_batch(batch, mesh)
    assert len(sharded["x"].addressable_shards) == N_DEV
    assert sharded["x"].addressable_shards[0].data.shape == (64 // N_DEV, 5)
    # over two mesh axes (the FSDP batch): split over their product, rows in order
    mesh2 = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
    both = shard_batch(batch, mesh2, ("data", "fsdp"))
    assert both["x"].sharding.spec == P(("data", "fsdp"))
    assert {s.data.shape for s in both["x"].addressable_shards} == {(64 // N_DEV, 5)}
    np.testing.assert_array_equal(np.asarray(both["x"]), np.asarray(batch["x"]))
    with pytest.raises(ValueError, match="not divisible by the size 8"):
        shard_batch(jax.tree.map(lambda a: a[:12], batch), mesh2, ("data", "fsdp"))


@pytest.mark.standard_promotion
def test_gradient_is_mean_not_sum(mesh):
    # Without the explicit per-shard copy, shard_map's autodiff would psum the
    # gradient (8x too large); check the averaged gradient against jax.grad.
    params, batch, loss_fn = flax_problem()

    def grad_step(p, b):
        p_local = jax.tree_util.tree_map(lambda x: jax.lax.pcast(x, "data", to="varying"), p)
        return jax.lax.pmean(jax.grad(loss_fn)(p_local, b), "data")

    g8 = data_parallel(grad_step, mesh)(params, batch)
    g1 = jax.grad(loss_fn)(params, batch)
    for a, b in zip(jax.tree.leaves(g8), jax.tree.leaves(g1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    # sgd with train_step: one step moves params by exactly -lr * full-batch grad
    opt = optax.sgd(0.5)
    p8, _, _ = data_parallel(train_step(loss_fn, opt, axis_name="data"), mesh)(
        params, opt.init(params), batch
    )
    leaves = (jax.tree.leaves(p8), jax.tree.leaves(params), jax.tree.leaves(g1))
    for new, old, g in zip(*leaves, strict=True):
        np.testing.assert_allclose(new, old - 0.5 * g, rtol=1e-5, atol=1e-6)


@pytest.mark.standard_promotion
def test_two_axis_mesh_and_aux(mesh):
    mesh2 = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
    params, batch, loss_fn = flax_problem(n=32)

    def loss_aux(p, b):
        loss = loss_fn(p, b)
        return loss, {"sq": loss**2, "count": jnp.asarray(b["x"].shape[0])}

    opt = optax.adam(1e-2)
    step4 = data_parallel(train_step(loss_aux, opt, axis_name="data", has_aux=True), mesh2)
    single = jax.jit(train_step(loss_aux, opt, has_aux=True))
    p4, _, (l4, aux4) = step4(params, opt.init(params), batch)
    p1, _, (l1, aux1) = single(params, opt.init(params), batch)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    # aux floats are averaged over shards; the per-shard count is not
    np.testing.assert_allclose(aux4["sq"], jnp.mean(jnp.stack([
        loss_fn(params, jax.tree.map(lambda x, i=i: x[8 * i: 8 * (i + 1)], batch)) ** 2
        for i in range(4)])), rtol=1e-5)
    assert int(aux4["count"]) == 8 and int(aux1["count"]) == 32
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.standard_promotion
def test_pmap_pattern_matches_shard_map(mesh):
    """The same train_step runs under jax.pmap (legacy code) with the same result."""
    params, batch, loss_fn = flax_problem()
    opt = optax.adam(1e-2)
    step_fn = train_step(loss_fn, opt, axis_name="data")
    pstep = jax.pmap(step_fn, axis_name="data", in_axes=(None, None, 0), out_axes=None)
    per_device = jax.tree_util.tree_map(lambda x: x.reshape(N_DEV, -1, *x.shape[1:]), batch)
    pp, _, pl = pstep(params, opt.init(params), per_device)
    sp, _, sl = data_parallel(step_fn, mesh)(params, opt.init(params), batch)
    np.testing.assert_allclose(pl, sl, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(pp), jax.tree.leaves(sp), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_placed_inputs_and_donation(mesh):
    w = jnp.zeros((4,))
    x = jax.random.normal(jax.random.key(0), (16, 4))
    y = x @ jnp.arange(4.0)
    loss = lambda w, b: jnp.mean((b[0] @ w - b[1]) ** 2)
    opt = optax.sgd(0.1)
    step = data_parallel(train_step(loss, opt, axis_name="data"), mesh, donate_argnums=(0,))
    wr, sr = replicate((w, opt.init(w)), mesh)
    b = shard_batch((x, y), mesh)
    assert b[0].sharding.spec == P("data")
    first = None
    for _ in range(30):
        wr, sr, lval = step(wr, sr, b)
        first = float(lval) if first is None else first
    assert float(lval) < 0.1 * first
    assert wr.sharding.is_fully_replicated


def test_bad_inputs(mesh):
    loss = lambda w, b: jnp.mean((b @ w) ** 2)
    opt = optax.sgd(0.1)
    step = data_parallel(train_step(loss, opt, axis_name="data"), mesh)
    w = jnp.ones(3)
    with pytest.raises(ValueError, match=r"batch size 60 .*not divisible.* 8 of mesh axis 'data'"):
        step(w, opt.init(w), jnp.ones((60, 3)))
    with pytest.raises(ValueError, match=r"axis_name='model' is not an axis of the mesh"):
        data_parallel(train_step(loss, opt, axis_name="model"), mesh, axis_name="model")
    with pytest.raises(ValueError, match=r"axis_name='batch' is not an axis"):
        shard_batch(jnp.ones((8, 3)), mesh, "batch")
    with pytest.raises(ValueError, match="scalar leaf"):
        step(w, opt.init(w), jnp.ones(()))
    with pytest.raises(ValueError, match="different leading sizes"):
        data_parallel(lambda w, b: w, mesh)(w, (jnp.ones((8, 3)), jnp.ones((16,))))
    with pytest.raises(TypeError, match="`mesh` must be a jax.sharding.Mesh"):
        data_parallel(lambda w, b: w, "data")
    with pytest.raises(TypeError, match="`optimizer`"):
        train_step(loss, "adam")


def test_forgotten_pmean_is_reported(mesh):
    # a step that returns a per-shard gradient as if it were replicated
    def bad_step(w, b):
        w = jax.lax.pcast(w, "data", to="varying")
        return jax.grad(lambda w: jnp.mean((b @ w) ** 2))(w)

    with pytest.raises(ValueError, match=r"varies across mesh axis 'data'.*pmean"):
        data_parallel(bad_step, mesh)(jnp.ones(3), jnp.ones((16, 3)))
