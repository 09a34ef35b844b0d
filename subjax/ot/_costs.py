"""Ground costs between point clouds and the log-domain Sinkhorn half-step.

The named costs (and user callables) are evaluated here for a block of rows;
the geometries of :mod:`subjax.ot._geometry` call :func:`pairwise` block by
block. :func:`lse_row_update` is the only place Sinkhorn touches the cost.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import exact_matmul

__all__ = ["cost_matrix", "lse_row_update"]

_NAMED_COSTS = ("sqeuclidean", "euclidean", "l1")


def check_cost_name(cost) -> None:
    if callable(cost):
        return
    if cost not in _NAMED_COSTS:
        raise ValueError(
            f"argument `cost` must be one of {_NAMED_COSTS} or a callable "
            f"c(x_i, y_j) -> scalar, got {cost!r}"
        )


def _sqdist(x: jax.Array, y: jax.Array) -> jax.Array:
    # Matmul form |x|^2 + |y|^2 - 2 x.y: one GEMM, clamped at 0 against rounding.
    xx = jnp.sum(x * x, axis=-1)
    yy = jnp.sum(y * y, axis=-1)
    d = xx[:, None] + yy[None, :] - 2 * exact_matmul(x, y.T)
    return jnp.maximum(d, 0)


def _safe_sqrt(d: jax.Array) -> jax.Array:
    # sqrt with a finite (zero) derivative at 0: coincident points do not give NaN grads.
    pos = d > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d, 1)), 0)


def pairwise(x: jax.Array, y: jax.Array, cost) -> jax.Array:
    if cost == "sqeuclidean":
        return _sqdist(x, y)
    if cost == "euclidean":
        return _safe_sqrt(_sqdist(x, y))
    if cost == "l1":
        return jnp.sum(jnp.abs(x[:, None, :] - y[None, :, :]), axis=-1)
    fn: Callable = cost
    return jax.vmap(lambda xi: jax.vmap(lambda yj: fn(xi, yj))(y))(x)


def check_points(x, y) -> tuple[jax.Array, jax.Array]:
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim == 1:
        x = x[:, None]
    if y.ndim == 1:
        y = y[:, None]
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(
            f"arguments `x` and `y` must be point clouds of shape (n, d) and (m, d), "
            f"got shapes {x.shape} and {y.shape}"
        )
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"arguments `x` and `y` must have the same dimension d, got {x.shape} and {y.shape}"
        )
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype != y.dtype:
        raise TypeError(
            f"arguments `x` and `y` must share one floating dtype, got {x.dtype} and {y.dtype}"
        )
    return x, y


def cost_matrix(x: jax.Array, y: jax.Array, cost: str | Callable = "sqeuclidean") -> jax.Array:
    r"""Dense ground-cost matrix between two point clouds.

    .. math:: C_{ij} = c(x_i, y_j),\quad c \in \{\|x-y\|_2^2,\ \|x-y\|_2,\ \|x-y\|_1\}
       \text{ or a user callable.}

    Args:
      x: ``(n, d)`` points (a 1-D array is read as ``(n, 1)``).
      y: ``(m, d)`` points, same dtype.
      cost: ``"sqeuclidean"`` (default), ``"euclidean"``, ``"l1"`` or a callable
        ``c(x_i, y_j) -> scalar`` (vmapped over both clouds).

    Returns:
      ``(n, m)`` cost matrix in the dtype of ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.ot import cost_matrix
      >>> cost_matrix(jnp.array([[0.0], [1.0]]), jnp.array([[0.0], [3.0]]), "l1")
      Array([[0., 3.],
             [1., 2.]], dtype=float32)
    """
    check_cost_name(cost)
    x, y = check_points(x, y)
    return pairwise(x, y, cost)


def lse_row_update(cost_rows: jax.Array, g: jax.Array, log_b: jax.Array, epsilon) -> jax.Array:
    r"""Log-domain Sinkhorn half-step for a block of cost rows.

    .. math:: \hat f_i = -\varepsilon \log \sum_j b_j \exp\big((g_j - C_{ij})/\varepsilon\big)

    This is the only place Sinkhorn touches the cost; a row-sharded solver calls
    it on its local rows (the column half-step is the same function applied to
    the transposed cost, or to local columns). Stabilised by the row maximum, so
    it returns finite values for any ``epsilon > 0`` in float32 as long as some
    ``b_j > 0``.

    Args:
      cost_rows: ``(k, m)`` rows of the cost matrix.
      g: ``(m,)`` column potential.
      log_b: ``(m,)`` log of the column weights (``-inf`` for zero weights).
      epsilon: entropic regularisation (scalar).

    Returns:
      ``(k,)`` the unrelaxed row potential ``\hat f`` (balanced update; the
      unbalanced update multiplies it by ``rho / (rho + epsilon)``).
    """
    zmax, s = lse_parts(cost_rows, g, log_b, epsilon)
    return -epsilon * (jnp.log(s) + zmax)


def lse_parts(cost_rows, g, log_b, epsilon):
    """``(zmax, s)`` with ``log sum_j exp(z_ij) = log s_i + zmax_i``,
    ``z_ij = (g_j - C_ij)/eps + log b_j``: the stabilised sum before its log, so
    sums over several blocks of columns combine exactly (rescale ``s`` to the
    largest ``zmax``)."""
    z = (g - cost_rows) * (1 / epsilon) + log_b
    zmax = jnp.max(z, axis=-1)
    zmax = lax.stop_gradient(jnp.where(jnp.isfinite(zmax), zmax, 0))
    s = jnp.sum(jnp.exp(z - zmax[..., None]), axis=-1)
    return zmax, s
