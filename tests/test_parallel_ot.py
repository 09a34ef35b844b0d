"""Row-sharded Sinkhorn and Sinkhorn-Newton on 8 fake devices equal the single-device
subjax.ot solvers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from subjax.ot import PointCloud, cost_matrix, sinkhorn, sinkhorn_newton
from subjax.parallel import sharded_sinkhorn, sharded_sinkhorn_newton

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


def assert_truthful(res, tol, atol=1e-6):
    """Converged, and (balanced) the reported error is the recomputed marginal error
    (up to float32 rounding of the plan, ~ u |C| / eps relative per entry)."""
    assert bool(res.converged)
    assert float(res.error) <= tol
    if res.rho_a is None:
        ea, eb = res.marginal_errors()
        np.testing.assert_allclose(float(res.error), float(ea + eb), atol=atol)


def assert_same_sweeps(res, ref, atol=2e-6):
    """The same number of sweeps gives the same iterates up to summation order."""
    assert int(res.n_iters) == int(ref.n_iters)
    # the L1 marginal error is summed in a different order: float32 noise
    # of ~n * u * mass = 128 * 6e-8 ~ 1e-5 relative to the total mass of 1
    # (at small epsilon the rounding of f enters as exp(df / eps): atol scales with it)
    np.testing.assert_allclose(res.errors, ref.errors, atol=atol, rtol=1e-5)
    # potentials up to |f| ~ 8: a few float32 ulps (1e-6 relative) on top of atol
    np.testing.assert_allclose(res.f, ref.f, atol=atol, rtol=1e-6)
    np.testing.assert_allclose(res.g, ref.g, atol=atol, rtol=1e-6)
    np.testing.assert_allclose(res.reg_ot_cost, ref.reg_ot_cost, rtol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(epsilon=0.05),
    dict(epsilon=0.05, rho_a=1.0, rho_b=1.0),
    pytest.param(dict(epsilon=0.01, epsilon_scaling=0.8), marks=pytest.mark.slow),
], ids=["balanced", "unbalanced", "eps_scaling"])
def test_sharded_sinkhorn_equals_single_device(mesh, problem, kw):
    c, a = problem
    # a fixed number of sweeps (tol = 0 is never met): identical iterations
    fixed = dict(kw, tol=0.0, max_iters=300)
    res = sharded_sinkhorn(c, a, None, mesh=mesh, axis_name="rows", **fixed)
    ref = sinkhorn(c, a, None, **fixed)
    assert not bool(res.converged) and not bool(ref.converged)
    assert_same_sweeps(res, ref, atol=2e-5 if "epsilon_scaling" in kw else 2e-6)
    assert res.f.sharding.spec == P("rows")
    assert res.f.addressable_shards[0].data.shape == (16,)
    # to a tolerance: the reported error includes the column marginal, whose float32
    # rounding (~2e-6 here, summed in another order on 8 devices) can move the sweep
    # at which the error crosses tol by one
    res = sharded_sinkhorn(c, a, None, mesh=mesh, axis_name="rows", tol=1e-4, **kw)
    ref = sinkhorn(c, a, None, tol=1e-4, **kw)
    assert abs(int(res.n_iters) - int(ref.n_iters)) <= 1
    # epsilon 0.01: u |C| / eps ~ 6e-8 * 8 / 0.01 ~ 5e-5 relative, on an error of 1e-4
    atol = 1e-5 if "epsilon_scaling" in kw else 1e-6
    assert_truthful(res, 1e-4, atol)
    assert_truthful(ref, 1e-4, atol)


@pytest.mark.slow
def test_sharded_sinkhorn_gradients(mesh, problem):
    """Implicit differentiation through the sharded solver equals the single-device one."""
    c, a = problem

    b = jnp.full((96,), 1 / 96)

    def obj(solver, **kw):
        def fun(c, a, b, eps):
            o = solver(c, a, b, eps, tol=1e-5, **kw)
            return jnp.sum(jnp.square(o.f)) + jnp.sum(o.g * jnp.arange(96.0)) + o.reg_ot_cost
        return jax.grad(fun, argnums=(0, 1, 2, 3))

    # cost and a are split over the devices, b and epsilon replicated: their
    # cotangents are summed across the axis exactly once
    g8 = obj(sharded_sinkhorn, mesh=mesh, axis_name="rows")(c, a, b, 0.05)
    g1 = obj(sinkhorn)(c, a, b, 0.05)
    for x8, x1 in zip(g8, g1, strict=True):
        np.testing.assert_allclose(x8, x1, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(x1))))


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
    with pytest.raises(ValueError, match="12 points of `x` are not divisible"):
        sharded_sinkhorn(PointCloud(jnp.ones((12, 2)), jnp.ones((8, 2))), mesh=mesh,
                         axis_name="rows")
    with pytest.raises(ValueError, match="epsilon"):
        sharded_sinkhorn_newton(c, epsilon=0.0, mesh=mesh, axis_name="rows")


def test_sharded_negative_epsilon_under_jit(mesh, problem):
    c, a = problem
    out = jax.jit(lambda e: sharded_sinkhorn(c, a, None, e, tol=1e-4, mesh=mesh,
                                             axis_name="rows"))(-0.05)
    assert not bool(out.converged) and not np.isfinite(float(out.error))
    assert bool(jnp.all(jnp.isfinite(out.f))) and bool(jnp.all(jnp.isfinite(out.g)))
    assert bool(jnp.all(jnp.isfinite(out.plan())))


def test_sharded_pointcloud_equals_single_device(mesh, problem):
    """Rows of a point cloud split over the devices, evaluated blockwise on each."""
    kx, ky = jax.random.split(jax.random.key(1))
    x = jax.random.normal(kx, (128, 2))
    y = jax.random.normal(ky, (96, 2)) + 1.0
    pc = PointCloud(x, y, block_size=4)
    kw = dict(epsilon=0.1, tol=0.0, max_iters=200)
    res = sharded_sinkhorn(pc, mesh=mesh, axis_name="rows", **kw)
    ref = sinkhorn(cost_matrix(x, y), **kw)
    assert_same_sweeps(res, ref)
    assert res.f.sharding.spec == P("rows")


@pytest.mark.parametrize("online", [False, True], ids=["dense", "online"])
def test_sharded_newton_equals_single_device(mesh, problem, online):
    c, a = problem
    kw = dict(epsilon=0.02, tol=1e-4)
    if online:
        kx, ky = jax.random.split(jax.random.key(0))
        x = jax.random.normal(kx, (128, 2))
        y = jax.random.normal(ky, (96, 2)) + 1.0
        np.testing.assert_allclose(cost_matrix(x, y), c)
        geom = PointCloud(x, y, block_size=8)
    else:
        geom = c
    res = sharded_sinkhorn_newton(geom, a, None, mesh=mesh, axis_name="rows", **kw)
    ref = sinkhorn_newton(c, a, None, **kw)
    assert_truthful(res, 1e-4)
    assert_truthful(ref, 1e-4)
    assert int(res.n_linear_iters) > 0
    # both solve the problem to tol 1e-4: the potentials agree to what that pins down
    shift = res.f[0] - ref.f[0]
    np.testing.assert_allclose(res.f - shift, ref.f, atol=2e-3)
    np.testing.assert_allclose(res.g + shift, ref.g, atol=2e-3)
    np.testing.assert_allclose(res.reg_ot_cost, ref.reg_ot_cost, rtol=1e-4)
    assert res.f.sharding.spec == P("rows")


def test_traceable_under_eval_shape_and_vmap(mesh):
    c = jax.ShapeDtypeStruct((3, 64, 24), jnp.float32)
    f = lambda c: sharded_sinkhorn(c, epsilon=0.1, mesh=mesh, axis_name="rows").f
    assert jax.eval_shape(jax.vmap(f), c).shape == (3, 64)
    assert jax.eval_shape(jax.jit(f), jax.ShapeDtypeStruct((64, 24), jnp.float32)).shape == (64,)
