"""Ground costs: dense matrices, point clouds, blockwise evaluation.

A *geometry* is either a dense cost matrix ``C`` (a 2-D array) or a
:class:`PointCloud` whose costs ``C_ij = c(x_i, y_j)`` are evaluated on the fly,
``block_size`` rows at a time, so that Sinkhorn never holds the n x m matrix.

The log-domain Sinkhorn half-step is factored as :func:`lse_row_update`, a
function of a *block of cost rows*; a row-sharded Sinkhorn (each device holding
rows of ``C``) reuses it unchanged.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["PointCloud", "cost_matrix", "lse_row_update"]

_NAMED_COSTS = ("sqeuclidean", "euclidean", "l1")


def _check_cost_name(cost) -> None:
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
    d = xx[:, None] + yy[None, :] - 2 * (x @ y.T)
    return jnp.maximum(d, 0)


def _safe_sqrt(d: jax.Array) -> jax.Array:
    # sqrt with a finite (zero) derivative at 0: coincident points do not give NaN grads.
    pos = d > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d, 1)), 0)


def _pairwise(x: jax.Array, y: jax.Array, cost) -> jax.Array:
    if cost == "sqeuclidean":
        return _sqdist(x, y)
    if cost == "euclidean":
        return _safe_sqrt(_sqdist(x, y))
    if cost == "l1":
        return jnp.sum(jnp.abs(x[:, None, :] - y[None, :, :]), axis=-1)
    fn: Callable = cost
    return jax.vmap(lambda xi: jax.vmap(lambda yj: fn(xi, yj))(y))(x)


def _check_points(x, y) -> tuple[jax.Array, jax.Array]:
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
    _check_cost_name(cost)
    x, y = _check_points(x, y)
    return _pairwise(x, y, cost)


@jax.tree_util.register_pytree_node_class
class PointCloud:
    r"""Costs between two point clouds, evaluated blockwise on demand.

    Sinkhorn on a ``PointCloud`` never materialises the ``n x m`` matrix: each
    half-step computes ``block_size`` rows of costs at a time (memory
    ``O(block_size * m)``). Newton solvers and :meth:`OTResult.plan` need the dense
    matrix and build it with :meth:`dense`.

    Args:
      x: ``(n, d)`` source points.
      y: ``(m, d)`` target points (same dtype).
      cost: ``"sqeuclidean"``, ``"euclidean"``, ``"l1"`` or a callable ``c(xi, yj)``.
      block_size: rows per block (static). ``None``: whole matrix at once.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.ot import PointCloud
      >>> pc = PointCloud(jnp.zeros((3, 2)), jnp.ones((4, 2)), block_size=2)
      >>> pc.shape, float(pc.dense()[0, 0])
      ((3, 4), 2.0)
    """

    def __init__(self, x, y, cost: str | Callable = "sqeuclidean", block_size: int | None = None):
        _check_cost_name(cost)
        if block_size is not None and (not isinstance(block_size, int) or block_size < 1):
            raise ValueError(
                f"argument `block_size` must be a positive int or None, got {block_size!r}")
        self.x, self.y = _check_points(x, y)
        self.cost = cost
        self.block_size = block_size

    def tree_flatten(self):
        return (self.x, self.y), (self.cost, self.block_size)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.x, obj.y = children
        obj.cost, obj.block_size = aux
        return obj

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[0], self.y.shape[0])

    @property
    def dtype(self):
        return self.x.dtype

    def dense(self) -> jax.Array:
        """The dense ``(n, m)`` cost matrix."""
        return _pairwise(self.x, self.y, self.cost)

    def transpose(self) -> PointCloud:
        return PointCloud.tree_unflatten((self.cost, self.block_size), (self.y, self.x))

    def map_rows(self, fn: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
        """``fn(cost_row_block, row_index_block)`` over blocks of cost rows, stacked.

        ``fn`` maps a ``(k, m)`` block of rows of ``C`` and the ``(k,)`` indices of
        those rows to a ``(k, ...)`` array.
        """
        n = self.x.shape[0]
        if self.block_size is None or self.block_size >= n:
            return fn(self.dense(), jnp.arange(n))

        def one(args):
            xi, i = args
            row = _pairwise(xi[None, :], self.y, self.cost)
            return fn(row, i[None])[0]

        return lax.map(one, (self.x, jnp.arange(n)), batch_size=self.block_size)

    def __repr__(self) -> str:
        return f"PointCloud(shape={self.shape}, cost={self.cost!r}, block_size={self.block_size})"


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
    z = (g - cost_rows) * (1 / epsilon) + log_b
    zmax = jnp.max(z, axis=-1, keepdims=True)
    zmax = lax.stop_gradient(jnp.where(jnp.isfinite(zmax), zmax, 0))
    s = jnp.sum(jnp.exp(z - zmax), axis=-1)
    return -epsilon * (jnp.log(s) + zmax[..., 0])
