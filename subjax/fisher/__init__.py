"""subjax.fisher — Fisher information, curvature products, EWC and model merging.

Pure functions over a model function ``apply_fn(params, inputs) -> outputs`` and a
batch; K-FAC statistics of the dense and convolution layers found in a model's trace
(Flax NNX models and pure-JAX functions alike).
Implementation lives in private modules (`_*.py`).
"""

from subjax._core import full_precision_exports
from subjax.fisher._core import (
    LowRankFisher,
    diag_empirical,
    diag_true,
    empirical_fvp,
    fvp,
    ggn_vp,
    low_rank_fvp,
    make_empirical_fvp,
    make_fvp,
    per_example_grads,
)
from subjax.fisher._fwsvd import fisher_weighted_svd
from subjax.fisher._kfac_capture import (
    KFACStats,
    Linearization,
    kfac_grads_and_stats,
)
from subjax.fisher._lowrank import fisher_operator, low_rank, rank_one
from subjax.fisher._merge import average, ewc_loss, ewc_penalty, fisher_merge, task_arithmetic
from subjax.fisher._subspace_merge import subspace_merge

__all__: list[str] = [
    "KFACStats",
    "Linearization",
    "LowRankFisher",
    "average",
    "diag_empirical",
    "diag_true",
    "empirical_fvp",
    "ewc_loss",
    "ewc_penalty",
    "fisher_merge",
    "fisher_operator",
    "fisher_weighted_svd",
    "fvp",
    "ggn_vp",
    "kfac_grads_and_stats",
    "low_rank",
    "low_rank_fvp",
    "make_empirical_fvp",
    "make_fvp",
    "per_example_grads",
    "rank_one",
    "subspace_merge",
    "task_arithmetic",
]

full_precision_exports(globals())
