r"""Geometries: where the cost lives, and every reduction of the plan over it.

A geometry holds a cost ``C`` (``n x m``) and owns every operation a solver needs
from it: the row and column log-sum-exp half-steps of Sinkhorn, the plan
products ``P v`` and ``P^T u``, row-wise reductions of the plan (marginals,
top-k entries, ``<C, P>``) and the dense matrix when asked. The plan

.. math:: P_{ij} = a_i b_j \exp\big((f_i + g_j - C_{ij})/\varepsilon\big)

has its exponent written once (:func:`log_plan`). Solvers never branch on the
kind of geometry:

- :class:`Dense` keeps ``C`` and ``C^T`` so both half-steps reduce rows;
- :class:`PointCloud` evaluates ``C_ij = c(x_i, y_j)`` ``block_size`` rows at a
  time (memory ``O(block_size * m)``);
- a geometry built with ``axis_name`` holds one block of rows per device of a
  ``shard_map`` axis; its column reductions combine across the axis (a
  log-sum-exp of the local log-sum-exps, ``psum`` of ``P^T u``) and
  :meth:`Geometry.row_sum` sums row-indexed vectors across it.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import exact_matmul, static_int
from subjax.ot._costs import check_cost_name, check_points, lse_parts, lse_row_update, pairwise

__all__ = ["Dense", "Geometry", "PointCloud", "log_plan", "to_geometry"]


def log_plan(cost_rows, f_rows, g, log_a_rows, log_b, eps):
    """``log P`` for a block of rows: ``(f_i + g_j - C_ij)/eps + log a_i + log b_j``.

    ``g``, ``log_b`` are ``(m,)`` (all columns) or shaped like ``cost_rows``
    (the columns picked in each row).
    """
    return (f_rows[:, None] + g - cost_rows) * (1 / eps) + log_a_rows[:, None] + log_b


def _rows(x, idx):
    return x if idx is None else x[idx]


def _entry_rounding(z0, za, z):
    """``K`` of a plan entry without the rounding of its cost and of ``f_i + g_j``:
    ``z0 = w / eps`` (the division and the product, ``3 |z0|``), the additions of
    ``log a_i`` (``|za|``) and ``log b_j`` (``|z|``), and the exponential (1)."""
    return 3 * jnp.abs(z0) + jnp.abs(za) + jnp.abs(z) + 1


def certify_log_plan(cost_rows, f_rows, g, log_a_rows, log_b, eps, kappa):
    r"""``(log P, u K)`` for a block of rows, ``log P`` evaluated as in
    :func:`log_plan` but with ``w = f_i + g_j - C_ij`` rounded once (the rounding
    of ``f_i + g_j`` is recovered exactly and added back, two-sum).

    ``u K_ij`` bounds, to first order, the error of the evaluated ``log P_ij``, so
    the relative error of the entry: ``w`` (``u |w|``, ``|w| / eps = |z0|``), ``1/eps``
    and the product (``2 u |z0|``), the additions of ``log a_i`` and ``log b_j``,
    the exponential (``u``), and the cost itself, evaluated to ``kappa u |C_ij|``
    (0 for costs given as numbers).
    """
    f2 = f_rows[:, None]
    s = f2 + g
    gb = s - f2
    lo = (f2 - (s - gb)) + (g - gb)  # s + lo = f_i + g_j exactly
    w = (s - cost_rows) + lo
    z0 = w * (1 / eps)
    za = z0 + log_a_rows[:, None]
    z = za + log_b
    k = _entry_rounding(z0, za, z) + kappa * jnp.abs(cost_rows) * (1 / eps)
    return z, k


def held_plan_slack(p, cost_rows, f_rows, g, log_a_rows, log_b, eps):
    """``sum_j p_ij K_ij`` for each row of a plan evaluated by :func:`log_plan` from
    costs given as numbers: as :func:`certify_log_plan`'s ``K`` with the rounding of
    ``f_i + g_j`` (``u |f_i + g_j|``) in place of its two-sum."""
    s = f_rows[:, None] + g
    z0 = (s - cost_rows) * (1 / eps)
    za = z0 + log_a_rows[:, None]
    k = jnp.abs(s) * (1 / eps) + _entry_rounding(z0, za, za + log_b)
    return jnp.sum(jnp.where(p > 0, p * k, 0), axis=1)


class Geometry:
    """A cost ``C`` and the plan reductions over it (see the module docstring).

    Subclasses provide :meth:`map_rows`, :meth:`transpose`, :meth:`dense`,
    :meth:`entries`, ``shape`` and ``dtype`` (and :meth:`map_blocks` when they
    run blockwise);
    everything else is written here once.
    ``axis_name`` (set by :func:`to_geometry`) names the ``shard_map`` axis the
    rows are split over, or is ``None``.
    """

    axis_name: str | None = None

    # ----------------------------------------------------------- to implement
    def map_rows(self, fn: Callable) -> jax.Array:
        """``fn(cost_rows, idx)`` over blocks of rows of ``C``, outputs stacked by row.

        ``idx`` holds the block's row indices, or is ``None`` for all rows at once.
        """
        raise NotImplementedError

    def transpose(self) -> Geometry:
        raise NotImplementedError

    def dense(self) -> jax.Array:
        raise NotImplementedError

    def map_blocks(self, fn: Callable, accurate: bool = False):
        """``fn(cost_rows, idx) -> (per_row, partial)`` over blocks of rows of ``C``.

        Returns ``(per_row, total)``: the ``per_row`` outputs stacked by row and the
        ``partial`` outputs (e.g. column sums of a block) summed over the blocks of
        this device. ``idx`` holds the block's row indices, or is ``None`` for all
        rows at once. ``accurate``: costs evaluated in the geometry's most accurate
        form (:attr:`cost_kappa`), where it has one.
        """
        return fn(self.dense(), None)

    @property
    def cost_kappa(self) -> float:
        """``kappa`` with ``|C_computed - C| <= kappa u |C|`` for the costs of an
        ``accurate`` pass (``u`` the unit roundoff); 0 when the costs are given."""
        return 0.0

    @property
    def is_online(self) -> bool:
        """True when reductions run block by block (the plan is never held)."""
        return False

    # ----------------------------------------------------------- reductions
    def row_sum(self, x) -> jax.Array:
        """``sum_i x_i`` of a row-indexed array (across the axis when sharded)."""
        s = jnp.sum(x)
        return s if self.axis_name is None else lax.psum(s, self.axis_name)

    def row_lse(self, g, log_b, eps) -> jax.Array:
        r"""``-eps log sum_j b_j exp((g_j - C_ij)/eps)`` for every row ``i``."""
        return self.map_rows(lambda c, _: lse_row_update(c, g, log_b, eps))

    def col_lse(self, f, log_a, eps) -> jax.Array:
        r"""``-eps log sum_i a_i exp((f_i - C_ij)/eps)`` for every column ``j``."""
        tr = self.transpose()
        if self.axis_name is None:
            return tr.row_lse(f, log_a, eps)
        # the local stabilised sums, rescaled to the largest maximum over devices
        zmax, s = tr.map_rows(lambda c, _: lse_parts(c, f, log_a, eps))
        top = lax.pmax(zmax, self.axis_name)
        s = lax.psum(s * jnp.exp(zmax - top), self.axis_name)
        return -eps * (jnp.log(s) + top)

    def plan_map(self, f, g, log_a, log_b, eps, fn: Callable) -> jax.Array:
        """``fn(plan_rows, cost_rows)`` over blocks of rows of the plan, stacked by row."""
        def block(c, idx):
            p = jnp.exp(log_plan(c, _rows(f, idx), g, _rows(log_a, idx), log_b, eps))
            return fn(p, c)
        return self.map_rows(block)

    def plan_marginals(self, f, g, log_a, log_b, eps, row_fn: Callable | None = None):
        """``(P 1, P^T 1)`` in one pass over the rows of the plan.

        With ``row_fn``, ``(P 1, P^T 1, row_fn(plan_rows))`` from the same pass
        (the per-row outputs stacked by row).
        """
        def block(c, idx):
            p = jnp.exp(log_plan(c, _rows(f, idx), g, _rows(log_a, idx), log_b, eps))
            per_row = jnp.sum(p, axis=1) if row_fn is None else (jnp.sum(p, axis=1), row_fn(p))
            return per_row, jnp.sum(p, axis=0)

        per_row, cols = self.map_blocks(block)
        if self.axis_name is not None:
            cols = lax.psum(cols, self.axis_name)
        if row_fn is None:
            return per_row, cols
        return per_row[0], cols, per_row[1]

    def certify_marginals(self, f, g, log_a, log_b, eps):
        """``(P 1, P^T 1, slack)`` in one pass with accurate costs and the plan's
        exponent of :func:`certify_log_plan`: ``slack = sum_ij p_ij K_ij`` over all
        rows (across the axis when sharded), so ``2 u slack`` bounds to first order
        how far the evaluated marginals' L1 error can be from the exact one of the
        same potentials."""
        kappa = self.cost_kappa

        def block(c, idx):
            z, k = certify_log_plan(c, _rows(f, idx), g, _rows(log_a, idx), log_b, eps, kappa)
            p = jnp.exp(z)
            slack = jnp.sum(jnp.where(p > 0, p * k, 0), axis=1)
            return (jnp.sum(p, axis=1), slack), jnp.sum(p, axis=0)

        (rows, slack), cols = self.map_blocks(block, accurate=True)
        if self.axis_name is not None:
            cols = lax.psum(cols, self.axis_name)
        return rows, cols, self.row_sum(slack)

    def plan_entries(self, f, g, log_a, log_b, eps, cols) -> jax.Array:
        """``P[i, cols[i, l]]`` for an ``(n, k)`` array of column indices (``O(n k)``)."""
        return jnp.exp(log_plan(self.entries(cols), f, g[cols], log_a, log_b[cols], eps))

    def plan_matvec(self, f, g, log_a, log_b, eps, v) -> jax.Array:
        """``P @ v`` (``v`` of shape ``(m,)`` or ``(m, k)``) without the dense plan."""
        return self.plan_map(f, g, log_a, log_b, eps, lambda p, _: exact_matmul(p, v))

    def plan_rmatvec(self, f, g, log_a, log_b, eps, u) -> jax.Array:
        """``P^T @ u`` (``u`` of shape ``(n,)`` or ``(n, k)``) without the dense plan."""
        out = self.transpose().plan_matvec(g, f, log_b, log_a, eps, u)
        return out if self.axis_name is None else lax.psum(out, self.axis_name)

    def plan(self, f, g, log_a, log_b, eps) -> jax.Array:
        """The dense plan (its local rows when sharded)."""
        return jnp.exp(log_plan(self.dense(), f, g, log_a, log_b, eps))

    def transport_cost(self, f, g, log_a, log_b, eps) -> jax.Array:
        """``<C, P>``, blockwise."""
        rows = self.plan_map(f, g, log_a, log_b, eps, lambda p, c: jnp.sum(p * c, axis=1))
        return self.row_sum(rows)

    def mean_cost(self) -> jax.Array:
        n, m = self.shape
        total = self.row_sum(self.map_rows(lambda c, _: jnp.sum(c, axis=1)))
        size = float(n) * float(m)  # a Python int n * m overflows int32 past 46,341^2
        if self.axis_name is not None:
            size = lax.psum(jnp.asarray(size, total.dtype), self.axis_name)
        return total / size


@jax.tree_util.register_pytree_node_class
class Dense(Geometry):
    """A dense ``(n, m)`` cost matrix, kept in both layouts.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.ot import Dense
      >>> geom = Dense(jnp.array([[0.0, 1.0], [1.0, 0.0]]))
      >>> geom.shape, float(geom.mean_cost())
      ((2, 2), 0.5)
    """

    def __init__(self, cost, cost_t=None, axis_name: str | None = None):
        self.cost = cost
        self.cost_t = cost.T if cost_t is None else cost_t
        self.axis_name = axis_name

    def tree_flatten(self):
        return (self.cost, self.cost_t), self.axis_name

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, axis_name=aux)

    @property
    def shape(self) -> tuple[int, int]:
        return self.cost.shape

    @property
    def dtype(self):
        return self.cost.dtype

    def dense(self):
        return self.cost

    def entries(self, cols):
        """``C[i, cols[i, l]]``."""
        return jnp.take_along_axis(self.cost, cols, axis=1)

    def transpose(self) -> Dense:
        return Dense(self.cost_t, self.cost)

    def map_rows(self, fn):
        return fn(self.cost, None)


@jax.tree_util.register_pytree_node_class
class PointCloud(Geometry):
    r"""Costs between two point clouds, evaluated blockwise on demand.

    Every solver reduction over a ``PointCloud`` (Sinkhorn half-steps, plan
    products, marginals, top-k rows of the plan, ``<C, P>``) computes
    ``block_size`` rows of costs at a time (column passes: blocks of as many
    entries): memory ``O(block_size * m)``, never the ``n x m`` matrix.
    :meth:`dense` builds the matrix when asked (the dense-product Newton solver
    and :meth:`OTResult.plan` do).

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

    def __init__(self, x, y, cost: str | Callable = "sqeuclidean", block_size: int | None = None,
                 axis_name: str | None = None):
        check_cost_name(cost)
        if block_size is not None:
            block_size = static_int(block_size, "block_size", minimum=1)
        self.x, self.y = check_points(x, y)
        self.cost = cost
        self.block_size = block_size
        self.axis_name = axis_name

    def tree_flatten(self):
        return (self.x, self.y), (self.cost, self.block_size, self.axis_name)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.x, obj.y = children
        obj.cost, obj.block_size, obj.axis_name = aux
        return obj

    @property
    def shape(self) -> tuple[int, int]:
        return (self.x.shape[0], self.y.shape[0])

    @property
    def dtype(self):
        return self.x.dtype

    def dense(self) -> jax.Array:
        """The dense ``(n, m)`` cost matrix."""
        return pairwise(self.x, self.y, self.cost)

    def transpose(self) -> PointCloud:
        """The cloud with ``x`` and ``y`` swapped. Its blocks hold as many entries as
        the rows' blocks (``block_size * m // n`` columns of ``n``), so the column
        passes stay within the same memory when ``n != m``."""
        bs = self.block_size
        if bs is not None:
            n, m = self.shape
            bs = max(1, bs * m // n)
        return PointCloud.tree_unflatten((self.cost, bs, None), (self.y, self.x))

    def entries(self, cols):
        """``C[i, cols[i, l]] = c(x_i, y_{cols[i, l]})`` without the cost matrix."""
        return jax.vmap(lambda xi, yi: pairwise(xi[None], yi, self.cost)[0])(self.x, self.y[cols])

    @property
    def is_online(self) -> bool:
        return self.block_size is not None and self.block_size < self.x.shape[0]

    def with_axis(self, axis_name) -> PointCloud:
        return PointCloud.tree_unflatten((self.cost, self.block_size, axis_name),
                                         (self.x, self.y))

    def map_rows(self, fn):
        return self.map_blocks(lambda c, idx: (fn(c, idx), ()))[0]

    @property
    def cost_kappa(self) -> float:
        # accurate_pairwise: see _sq_kappa; the square root halves the relative
        # error and adds one u; |x - y|_1 sums d rounded differences: d u. A user
        # callable's own rounding is not known: 0.
        sq = _sq_kappa(self.x.shape[1])
        kappa = {"sqeuclidean": sq, "euclidean": sq / 2 + 1, "l1": float(self.x.shape[1])}
        return kappa.get(self.cost, 0.0) if isinstance(self.cost, str) else 0.0

    def map_blocks(self, fn, accurate: bool = False):
        n, bs = self.x.shape[0], self.block_size
        costs = accurate_pairwise if accurate else pairwise
        if not self.is_online:
            return fn(costs(self.x, self.y, self.cost), None)
        block = lambda xb, idx: fn(costs(xb, self.y, self.cost), idx)
        full = n // bs
        xs = (self.x[:full * bs].reshape(full, bs, -1), jnp.arange(full * bs).reshape(full, bs))
        # zeros typed like one block's partial sums, their varying mesh axes included
        # (inside shard_map); the traced block is dead code after this
        _, part0 = block(*jax.tree_util.tree_map(lambda v: v[0], xs))
        zeros = jax.tree_util.tree_map(jnp.zeros_like, part0)

        def body(total, args):
            rows, part = block(*args)
            return jax.tree_util.tree_map(jnp.add, total, part), rows

        total, rows = lax.scan(body, zeros, xs)
        rows = jax.tree_util.tree_map(lambda r: r.reshape(full * bs, *r.shape[2:]), rows)
        if n % bs:  # the last, shorter block
            rest, part = block(self.x[full * bs:], jnp.arange(full * bs, n))
            rows = jax.tree_util.tree_map(lambda u, v: jnp.concatenate([u, v]), rows, rest)
            total = jax.tree_util.tree_map(jnp.add, total, part)
        return rows, total

    def __repr__(self) -> str:
        return f"PointCloud(shape={self.shape}, cost={self.cost!r}, block_size={self.block_size})"


TREE_MAX_DIM = 64  # accurate_pairwise sums at most this many coordinates as a tree


def _sq_kappa(d: int) -> float:
    """``kappa`` of :func:`accurate_pairwise`'s squared distance in dimension ``d``:
    each difference and its square round (``3 u`` relative), then the sum of the
    ``d`` non-negative squares (``ceil(log2 d)`` levels of a tree, or ``d - 1``
    sequential additions past :data:`TREE_MAX_DIM`)."""
    levels = (d - 1).bit_length() if d <= TREE_MAX_DIM else d - 1
    return 3.0 + levels


def accurate_pairwise(x, y, cost):
    """:func:`pairwise` with the squared distances summed from the coordinate
    differences, as a tree (error ``kappa u`` relative to the cost itself, see
    :func:`_sq_kappa`, where the matrix form ``|x|^2 + |y|^2 - 2 x.y`` errs by ``u``
    times ``|x|^2 + |y|^2``)."""
    if cost not in ("sqeuclidean", "euclidean"):
        return pairwise(x, y, cost)
    d = x.shape[1]
    if d <= TREE_MAX_DIM:
        terms = [jnp.square(x[:, None, k] - y[None, :, k]) for k in range(d)]
        while len(terms) > 1:
            pairs = [terms[i] + terms[i + 1] for i in range(0, len(terms) - 1, 2)]
            terms = pairs + terms[len(pairs) * 2:]
        sq = terms[0]
    else:
        sq = jnp.sum(jnp.square(x[:, None, :] - y[None, :, :]), axis=-1)
    return sq if cost == "sqeuclidean" else jnp.sqrt(sq)


def to_geometry(cost, axis_name: str | None = None) -> Geometry:
    """A :class:`Geometry` for ``cost`` (a geometry or a dense matrix), rows on ``axis_name``."""
    if isinstance(cost, PointCloud):
        return cost if axis_name is None else cost.with_axis(axis_name)
    if isinstance(cost, Dense):
        return cost if axis_name is None else Dense(cost.cost, cost.cost_t, axis_name)
    return Dense(cost, axis_name=axis_name)
