"""subjax.linalg — randomized and Krylov linear algebra on matrix-free operators.

Every function accepts a dense ``(m, n)`` array, a ``jax.experimental.sparse.BCOO``
matrix or a :class:`LinearOperator`, works under ``jax.jit`` / ``jax.vmap``, in
float32 and float64. ``docs/linalg.md`` describes the methods.
"""

from subjax._core import full_precision_exports
from subjax.linalg._cg import CGResult, cg
from subjax.linalg._completion import SNNResult, anchor_submatrix, msnn_impute, snn_impute
from subjax.linalg._gcrodr import GCRODRResult, GMRESResult, gcro_dr, gmres
from subjax.linalg._geometry import (
    principal_angles,
    project,
    project_complement,
    residual_norms,
    subspace_distance,
)
from subjax.linalg._joint import JointSVD, joint_svd
from subjax.linalg._lanczos import lanczos_eigh
from subjax.linalg._operator import LinearOperator, aslinearoperator, sparse_rows_operator
from subjax.linalg._orth import ORTH_METHODS, orthonormalize
from subjax.linalg._randomized import (
    EighResult,
    RandomizedSVDResult,
    SubspaceIterationResult,
    randomized_eigh,
    randomized_range_finder,
    randomized_svd,
    subspace_iteration,
)
from subjax.linalg._rank import (
    energy_rank,
    marchenko_pastur_median,
    marchenko_pastur_rank,
    normalized_spectrum_rank,
)
from subjax.linalg._recycle import RecycledCGResult, recycled_cg
from subjax.linalg._weighted import WeightedLowRank, weighted_low_rank

__all__ = [
    "CGResult",
    "EighResult",
    "GCRODRResult",
    "GMRESResult",
    "JointSVD",
    "LinearOperator",
    "ORTH_METHODS",
    "RandomizedSVDResult",
    "RecycledCGResult",
    "SNNResult",
    "SubspaceIterationResult",
    "WeightedLowRank",
    "anchor_submatrix",
    "aslinearoperator",
    "cg",
    "energy_rank",
    "gcro_dr",
    "gmres",
    "joint_svd",
    "lanczos_eigh",
    "marchenko_pastur_median",
    "marchenko_pastur_rank",
    "msnn_impute",
    "normalized_spectrum_rank",
    "orthonormalize",
    "principal_angles",
    "project",
    "project_complement",
    "randomized_eigh",
    "randomized_range_finder",
    "randomized_svd",
    "recycled_cg",
    "residual_norms",
    "snn_impute",
    "sparse_rows_operator",
    "subspace_distance",
    "subspace_iteration",
    "weighted_low_rank",
]

full_precision_exports(globals())
