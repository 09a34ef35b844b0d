"""Euclidean space and the unit sphere."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import jax.numpy as jnp

from subjax._core import as_compute, static_int
from subjax.manifolds._base import Array, Manifold, randn


@dataclasses.dataclass(frozen=True)
class Euclidean(Manifold):
    """Flat space of arrays; every operation is the Euclidean one.

    Args:
      point_shape: trailing axes that form one point. ``None`` (default) means the
        whole array is one point, so ``inner`` / ``norm`` / ``dist`` reduce over
        every axis and ``check`` is a scalar.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.manifolds import Euclidean
      >>> float(Euclidean().dist(jnp.zeros(2), jnp.array([3.0, 4.0])))
      5.0
    """

    shape: tuple[int, ...] | None = None
    retractions: ClassVar[tuple[str, ...]] = ("exp",)

    @property
    def point_shape(self) -> tuple[int, ...]:
        return () if self.shape is None else tuple(self.shape)

    @property
    def dim(self) -> int:
        return math.prod(self.point_shape) if self.shape is not None else -1

    def validate_shape(self, x, name: str = "x") -> None:
        if self.shape is not None:
            super().validate_shape(x, name)

    def _reduce(self, a: Array) -> Array:
        if self.shape is None:
            return jnp.sum(a)
        return super()._reduce(a)

    def proj(self, x, u):
        return u

    def exp(self, x, u):
        return x + u

    def log(self, x, y):
        return y - x

    def transport(self, x, y, v):
        return v

    def dist(self, x, y):
        return jnp.sqrt(self._reduce((y - x) ** 2))

    def random_point(self, key, batch_shape=(), dtype=jnp.float32):
        return randn(key, tuple(batch_shape) + self.point_shape, dtype)

    def project_point(self, x):
        return x

    def check(self, x):
        return jnp.zeros(self.batch_shape(x) if self.shape is not None else (), x.dtype)

    def momentum_step(self, x, g, m, lr, beta, nesterov, retraction, refresh=None):
        m_new = beta * as_compute(m) + as_compute(g)
        d = as_compute(g) + beta * m_new if nesterov else m_new
        return -lr * d, m_new


@dataclasses.dataclass(frozen=True)
class Sphere(Manifold):
    """Unit sphere ``S^{n-1} = {x in R^n : ||x|| = 1}`` with the induced metric.

    Retractions: ``"exp"`` (great circle, default) and ``"projection"``
    (``(x + u) / ||x + u||``). ``log`` / ``dist`` are the great-circle ones; transport
    is the projection onto ``T_y``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.manifolds import Sphere
      >>> s = Sphere(3)
      >>> x = s.random_point(jax.random.key(0), (5,))
      >>> x.shape, bool(jnp.all(s.check(x) < 1e-6))
      ((5, 3), True)
    """

    n: int
    retractions: ClassVar[tuple[str, ...]] = ("exp", "projection")

    def __post_init__(self):
        static_int(self.n, "n", 1)

    @property
    def point_shape(self):
        return (self.n,)

    @property
    def dim(self):
        return self.n - 1

    def proj(self, x, u):
        return u - jnp.sum(x * u, axis=-1, keepdims=True) * x

    def exp(self, x, u):
        nu = jnp.linalg.norm(u, axis=-1, keepdims=True)
        safe = jnp.where(nu > 0, nu, jnp.ones_like(nu))
        sinc = jnp.where(nu > 0, jnp.sin(safe) / safe, jnp.ones_like(nu))
        return jnp.cos(nu) * x + sinc * u

    def log(self, x, y):
        c = jnp.clip(jnp.sum(x * y, axis=-1, keepdims=True), -1, 1)
        theta = jnp.arccos(c)
        v = y - c * x
        nv = jnp.linalg.norm(v, axis=-1, keepdims=True)
        safe = jnp.where(nv > 0, nv, jnp.ones_like(nv))
        return jnp.where(nv > 0, theta / safe, jnp.zeros_like(nv)) * v

    def retract(self, x, u, method=None):
        method = self._check_method(method)
        if method == "exp":
            return self.exp(x, u)
        y = x + u
        return y / jnp.linalg.norm(y, axis=-1, keepdims=True)

    def inverse_retract(self, x, y, method=None):
        method = self._check_method(method)
        if method == "exp":
            return self.log(x, y)
        return y / jnp.sum(x * y, axis=-1, keepdims=True) - x

    def dist(self, x, y):
        # atan2 form is accurate for both tiny and near-pi angles
        c = jnp.sum(x * y, axis=-1)
        s = jnp.linalg.norm(y - c[..., None] * x, axis=-1)
        return jnp.arctan2(s, c)

    def random_point(self, key, batch_shape=(), dtype=jnp.float32):
        return self.project_point(randn(key, tuple(batch_shape) + (self.n,), dtype))

    def project_point(self, x):
        xw = as_compute(x)
        return (xw / jnp.linalg.norm(xw, axis=-1, keepdims=True)).astype(x.dtype)

    def check(self, x):
        xw = as_compute(x)
        return jnp.abs(jnp.linalg.norm(xw, axis=-1) - 1).astype(x.dtype)

