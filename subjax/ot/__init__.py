"""subjax.ot — entropic optimal transport: Sinkhorn, Sinkhorn–Newton, sparse Newton (SNS).

Public API:

- :func:`cost_matrix`, :class:`PointCloud` — ground costs (dense or blockwise).
- :func:`sinkhorn` — log-domain Sinkhorn, epsilon scaling, unbalanced (KL) variant.
- :func:`sinkhorn_newton` — Newton on the dual, matrix-free CG.
- :func:`sparse_newton_sinkhorn` — SNS: Sinkhorn warm-up + sparsified-Hessian Newton.
- :class:`OTResult` — the common result (potentials, plan, costs, diagnostics).
- :func:`lse_row_update` — the factored log-domain half-step (for row-sharded solvers).
- :func:`dual_objective` — the entropic dual ``D(f, g)``.
"""

from subjax.ot._common import OTResult, dual_objective
from subjax.ot._costs import PointCloud, cost_matrix, lse_row_update
from subjax.ot._newton import sinkhorn_newton, sparse_newton_sinkhorn
from subjax.ot._sinkhorn import sinkhorn

__all__ = [
    "OTResult",
    "PointCloud",
    "cost_matrix",
    "dual_objective",
    "lse_row_update",
    "sinkhorn",
    "sinkhorn_newton",
    "sparse_newton_sinkhorn",
]
