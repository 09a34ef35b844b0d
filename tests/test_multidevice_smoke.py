"""The multi-device suite runs in its own process with 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

pytestmark = pytest.mark.multidevice


def test_eight_devices_and_psum():
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = jnp.arange(32.0)

    def f(xs):
        return jax.lax.psum(jnp.sum(xs), "data")

    total = jax.shard_map(f, mesh=mesh, in_specs=P("data"), out_specs=P())(x)
    np.testing.assert_allclose(total, np.arange(32.0).sum())


def test_subprocess_helper_sees_devices(fake_devices):
    out = fake_devices("import jax; print(jax.device_count())", n=4)
    assert out.strip() == "4"
