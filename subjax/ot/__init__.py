"""subjax.ot — entropic optimal transport: Sinkhorn, Sinkhorn–Newton, sparse Newton (SNS).

Public API:

- :func:`cost_matrix` — dense ground costs between point clouds.
- :class:`Dense`, :class:`PointCloud` — geometries: a dense cost, or costs
  evaluated blockwise from two point clouds (never the ``n x m`` matrix).
- :func:`sinkhorn` — log-domain Sinkhorn, epsilon scaling, unbalanced (KL) variant.
- :func:`sinkhorn_newton` — Newton on the dual, matrix-free CG (dense or online).
- :func:`sparse_newton_sinkhorn` — SNS: Sinkhorn warm-up + sparsified-Hessian Newton.
- :func:`solve` — picks the solver (``method="auto"``: Newton for a dense cost,
  SNS for an online point cloud) or runs the one named.
- :class:`OTResult` — the common result (potentials, plan, costs, diagnostics).
- :func:`lse_row_update` — the factored log-domain half-step.
- :func:`dual_objective` — the entropic dual ``D(f, g)``.

Every solver takes ``axis_name`` to run inside ``jax.shard_map`` with the rows
of the geometry split over a mesh axis (see :mod:`subjax.parallel`).
"""

from subjax._core import full_precision_exports
from subjax.ot._common import OTResult, dual_objective
from subjax.ot._costs import cost_matrix, lse_row_update
from subjax.ot._geometry import Dense, PointCloud
from subjax.ot._newton import sinkhorn_newton, sparse_newton_sinkhorn
from subjax.ot._sinkhorn import sinkhorn
from subjax.ot._solve import solve

__all__ = [
    "Dense",
    "OTResult",
    "PointCloud",
    "cost_matrix",
    "dual_objective",
    "lse_row_update",
    "sinkhorn",
    "sinkhorn_newton",
    "solve",
    "sparse_newton_sinkhorn",
]

full_precision_exports(globals())
