"""Row-sharded OT solvers: thin ``shard_map`` wrappers over :mod:`subjax.ot`.

Device ``d`` holds a block of rows of the geometry (rows of a dense cost, or
the source points of a :class:`~subjax.ot.PointCloud`), the matching weights
``a_d`` and potential ``f_d``; the column weights ``b`` and potential ``g`` are
replicated. The solvers themselves run unchanged with ``axis_name``: their
geometry takes column log-sum-exps across the axis (``pmax`` / ``psum`` of the
local ones, ``m`` words), sums ``P^T u`` and every row reduction with ``psum``,
and sums CG's inner products over the axis. Per device: memory ``O(n m / p)`` (dense) or
``O(block_size * m)`` (point cloud), communication ``O(m)`` words per sweep or CG
iteration.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from subjax.ot import OTResult, PointCloud
from subjax.ot import _common as cm
from subjax.ot._newton import prepare_newton
from subjax.ot._sinkhorn import finish, prepare_sinkhorn
from subjax.parallel._data import check_axis

__all__ = ["sharded_sinkhorn", "sharded_sinkhorn_newton"]


def _sharded(prepare, cost, a, b, epsilon, *, mesh, axis_name, rho_a, rho_b, epsilon_scaling,
             epsilon_init, **options):
    n_dev = check_axis(mesh, axis_name)
    # the whole-array checks (mass balance included) before the rows are split
    cost, a, b, epsilon, rho_a, rho_b = cm.validate(
        cost, a, b, epsilon, rho_a, rho_b, epsilon_scaling=epsilon_scaling,
        epsilon_init=epsilon_init)
    n = cost.shape[0]
    if n % n_dev:
        what = "points of `x`" if isinstance(cost, PointCloud) else "rows of `cost`"
        raise ValueError(
            f"the {n} {what} are not divisible by the size {n_dev} of mesh axis "
            f"{axis_name!r}; pad them with rows of zero weight in `a`"
        )
    prep = prepare(cost, a, b, epsilon, rho_a=rho_a, rho_b=rho_b,
                   epsilon_scaling=epsilon_scaling, epsilon_init=epsilon_init,
                   axis_name=axis_name, **options)
    rows, rep = P(axis_name), P()
    if isinstance(cost, PointCloud):
        cost_spec = PointCloud.tree_unflatten((cost.cost, cost.block_size, None), (rows, rep))
    else:
        cost_spec = rows
    # The forward pass runs per device, typed by shard_map's varying-axes check (local
    # rows varying, columns replicated); the implicit backward pass runs on the whole
    # (sharded) arrays.
    forward = jax.shard_map(prep.forward, mesh=mesh,
                            in_specs=(cost_spec, rows, rep, rep, rep, rep),
                            out_specs=(rows, rep, rep))
    return finish(prep, forward)


def sharded_sinkhorn(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    tol: float | jax.Array = 1e-6,
    max_iters: int = 10_000,
    record_every: int = 10,
    epsilon_scaling: float | None = None,
    epsilon_init: float | jax.Array | None = None,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_max_iters: int = 2000,
    implicit_rtol: float = 1e-10,
) -> OTResult:
    r"""Log-domain Sinkhorn with the rows of the geometry split over a mesh axis.

    :func:`subjax.ot.sinkhorn` run inside ``shard_map`` with ``axis_name``: same
    iteration, stopping rule, arguments and :class:`~subjax.ot.OTResult`, so the
    potentials equal the single-device ones up to summation order:

    .. math::
       g_j \leftarrow -\lambda_b \varepsilon \log \sum_{d} \sum_{i \in d}
         a_i e^{(f_i - C_{ij})/\varepsilon}, \qquad
       f_i \leftarrow -\lambda_a \varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon},

    the outer sum over devices ``d`` taken as a stabilised log-sum-exp of the
    local ones. ``f`` comes back row-sharded, ``g`` replicated. Gradients use
    the solver's implicit differentiation on the whole (sharded) arrays.

    Args:
      cost: ``(n, m)`` dense cost or a :class:`~subjax.ot.PointCloud` (its ``x``
        split, ``y`` replicated), ``n`` divisible by ``mesh.shape[axis_name]``.
      a, b: marginals (default uniform); ``a`` is split like the rows.
      epsilon: regularisation ``> 0``.
      mesh, axis_name: where the rows live.
      tol, max_iters, record_every, epsilon_scaling, epsilon_init, rho_a, rho_b,
        implicit_max_iters, implicit_rtol: as in :func:`subjax.ot.sinkhorn`.

    Returns:
      :class:`~subjax.ot.OTResult`.

    Raises:
      ValueError: ``axis_name`` not in ``mesh``, rows not divisible by the axis
        size, or any of :func:`subjax.ot.sinkhorn`'s input errors.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh
      >>> from subjax.ot import cost_matrix, sinkhorn
      >>> from subjax.parallel import sharded_sinkhorn
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
      >>> x = jax.random.normal(jax.random.key(0), (32, 2))
      >>> c = cost_matrix(x, x + 1.0)
      >>> out = sharded_sinkhorn(c, epsilon=0.1, tol=1e-4, mesh=mesh, axis_name="rows")
      >>> ref = sinkhorn(c, epsilon=0.1, tol=1e-4)
      >>> bool(out.converged), int(out.n_iters) == int(ref.n_iters)
      (True, True)

    References:
      Cuturi, "Sinkhorn Distances", 2013. Schmitzer, "Stabilized Sparse Scaling
      Algorithms for Entropy Regularized Transport Problems", 2019.
    """
    return _sharded(prepare_sinkhorn, cost, a, b, epsilon, mesh=mesh, axis_name=axis_name,
                    rho_a=rho_a, rho_b=rho_b, tol=tol, epsilon_scaling=epsilon_scaling,
                    epsilon_init=epsilon_init, max_iters=max_iters, record_every=record_every,
                    implicit_max_iters=implicit_max_iters, implicit_rtol=implicit_rtol)


def sharded_sinkhorn_newton(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    tol: float | jax.Array = 1e-6,
    max_iters: int = 200,
    warmup_steps: int = 5,
    cg_max_iters: int = 500,
    max_backtracks: int = 40,
    epsilon_scaling: float | None = 0.5,
    epsilon_init: float | jax.Array | None = None,
    level_tol: float | jax.Array = 1e-2,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_max_iters: int = 2000,
    implicit_rtol: float = 1e-10,
) -> OTResult:
    r"""Sinkhorn–Newton with the rows of the geometry split over a mesh axis.

    :func:`subjax.ot.sinkhorn_newton` run inside ``shard_map`` with ``axis_name``.
    Each device holds its rows of the plan (dense) or evaluates them blockwise
    (a :class:`~subjax.ot.PointCloud` with ``block_size``: online). The Newton
    system is solved by CG on its Schur complement in the (row-sharded) row
    potential: each CG iteration is a local ``P v``, a local ``P^T u``, one
    ``psum`` of ``m`` words and ``psum``-ed inner products.

    Args:
      cost, a, b, epsilon, mesh, axis_name: as in :func:`sharded_sinkhorn`.
      Others: as in :func:`subjax.ot.sinkhorn_newton`.

    Returns:
      :class:`~subjax.ot.OTResult` (``f`` row-sharded, ``g`` replicated).

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh
      >>> from subjax.ot import cost_matrix
      >>> from subjax.parallel import sharded_sinkhorn_newton
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
      >>> x = jax.random.normal(jax.random.key(0), (32, 2))
      >>> out = sharded_sinkhorn_newton(cost_matrix(x, x + 1.0), epsilon=0.05, tol=1e-5,
      ...                               mesh=mesh, axis_name="rows")
      >>> bool(out.converged)
      True

    References:
      Brauer, Clason, Lorenz, Wirth, "A Sinkhorn-Newton method for entropic
      optimal transport", 2017.
    """
    return _sharded(prepare_newton, cost, a, b, epsilon, mesh=mesh, axis_name=axis_name,
                    rho_a=rho_a, rho_b=rho_b, tol=tol, epsilon_scaling=epsilon_scaling,
                    epsilon_init=epsilon_init, max_iters=max_iters, warmup_steps=warmup_steps,
                    cg_max_iters=cg_max_iters, max_backtracks=max_backtracks,
                    level_tol=level_tol, implicit_max_iters=implicit_max_iters,
                    implicit_rtol=implicit_rtol, sparse=False, budget=0, threshold=0.0)
