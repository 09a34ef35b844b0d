"""Conformance cases for CoSO (continual learning in orthogonal gradient subspaces).

Within one task (no consolidation) CoSO is Adam on a refreshed rank-``r`` gradient
subspace; with ``rank=None`` it is Adam on the gradient projected off the (empty)
memory. ``rank``, the subspace-iteration step counts and the seed stay static
under ``optax.inject_hyperparams``.
"""

from optim_conformance import OptimCase

import subjax.optim as so

_STATIC = ("rank", "subspace_steps", "init_steps", "seed")

CASES = [
    OptimCase("coso.rank2", so.coso,
              {"learning_rate": 3e-2, "rank": 2, "refresh_every": 5}, static_args=_STATIC),
    OptimCase("coso.full", so.coso, {"learning_rate": 3e-2, "rank": None},
              static_args=_STATIC),
]
