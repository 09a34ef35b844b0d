"""Row-sharded Sinkhorn on 8 fake devices equals subjax.ot.sinkhorn."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from subjax.ot import PointCloud, cost_matrix, sinkhorn
from subjax.parallel import sharded_sinkhorn

pytestmark = pytest.mark.multidevice


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() == 8
    return Mesh(np.array(jax.devices()), ("rows",))


@pytest.fixture(scope="module")
def problem():
    kx, ky, ka = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (128, 2))
    y = jax.random.normal(ky, (96, 2)) + 1.0
    a = jax.random.uniform(ka, (128,)) + 0.1
    return cost_matrix(x, y), a / jnp.sum(a)


def assert_same(res, ref, atol=2e-6, same_iters=True):
    assert bool(res.converged) and bool(ref.converged)
    if same_iters:
        assert int(res.n_iters) == int(ref.n_iters)
        # the L1 marginal error itself is summed in a different order: float32 noise
        # of ~n * u * mass = 128 * 6e-8 ~ 1e-5 relative to the total mass of 1
        np.testing.assert_allclose(res.errors, ref.errors, atol=2e-6)
    np.testing.assert_allclose(res.f, ref.f, atol=atol)
    np.testing.assert_allclose(res.g, ref.g, atol=atol)
    np.testing.assert_allclose(res.reg_ot_cost, ref.reg_ot_cost, rtol=1e-5)
    # the result is a transport plan with the requested marginals
    ea, eb = res.marginal_errors()
    assert float(ea + eb) < 2e-4


@pytest.mark.parametrize("kw", [
    # tol well above the float32 noise floor of the marginal error (~1e-5 here), so
    # both solvers stop at the same sweep
    dict(epsilon=0.05, tol=1e-4),
    dict(epsilon=0.05, tol=1e-4, rho_a=1.0, rho_b=1.0),
    pytest.param(dict(epsilon=0.01, tol=1e-4, epsilon_scaling=0.8), marks=pytest.mark.slow),
], ids=["balanced", "unbalanced", "eps_scaling"])
def test_sharded_sinkhorn_equals_single_device(mesh, problem, kw):
    c, a = problem
    res = sharded_sinkhorn(c, a, None, mesh=mesh, axis_name="rows", **kw)
    ref = sinkhorn(c, a, None, **kw)
    if "rho_a" in kw:  # unbalanced: marginals are only softly matched
        assert bool(res.converged) and int(res.n_iters) == int(ref.n_iters)
        np.testing.assert_allclose(res.f, ref.f, atol=2e-6)
        np.testing.assert_allclose(res.g, ref.g, atol=2e-6)
    else:
        # with epsilon scaling the stopping sweep may move by a few (rounding near tol)
        assert_same(res, ref, atol=2e-5 if "epsilon_scaling" in kw else 2e-6,
                    same_iters="epsilon_scaling" not in kw)
    assert res.f.sharding.spec == P("rows")
    assert res.f.addressable_shards[0].data.shape == (16,)


@pytest.mark.slow
def test_sharded_sinkhorn_gradients(mesh, problem):
    """Implicit differentiation through the sharded solver equals the single-device one."""
    c, a = problem

    def obj(solver, **kw):
        return lambda c: jnp.sum(jnp.square(solver(c, a, None, 0.05, tol=1e-5, **kw).f))

    g8 = jax.grad(obj(sharded_sinkhorn, mesh=mesh, axis_name="rows"))(c)
    g1 = jax.grad(obj(sinkhorn))(c)
    np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(g1))))


def test_bad_inputs(mesh, problem):
    c, a = problem
    with pytest.raises(ValueError, match=r"124 rows of `cost` are not divisible by the size 8 "
                                         r"of mesh axis 'rows'"):
        sharded_sinkhorn(c[:124], mesh=mesh, axis_name="rows")
    with pytest.raises(ValueError, match=r"axis_name='data' is not an axis of the mesh"):
        sharded_sinkhorn(c, mesh=mesh, axis_name="data")
    with pytest.raises(ValueError, match="same total mass"):
        sharded_sinkhorn(c, a * 2, None, mesh=mesh, axis_name="rows")
    with pytest.raises(ValueError, match="epsilon"):
        sharded_sinkhorn(c, epsilon=-1.0, mesh=mesh, axis_name="rows")
    with pytest.raises(TypeError, match="PointCloud"):
        sharded_sinkhorn(PointCloud(jnp.ones((8, 2)), jnp.ones((8, 2))), mesh=mesh,
                         axis_name="rows")


def test_traceable_under_eval_shape_and_vmap(mesh):
    c = jax.ShapeDtypeStruct((3, 64, 24), jnp.float32)
    f = lambda c: sharded_sinkhorn(c, epsilon=0.1, mesh=mesh, axis_name="rows").f
    assert jax.eval_shape(jax.vmap(f), c).shape == (3, 64)
    assert jax.eval_shape(jax.jit(f), jax.ShapeDtypeStruct((64, 24), jnp.float32)).shape == (64,)
