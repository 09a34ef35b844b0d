"""Conformance cases for the low-rank projected optimizers.

The default problem's weight is a (6, 4) matrix: rank 2 projects it onto half of
its smaller side, so the loss can only go down if the refreshed subspaces follow
the gradient. ``rank`` and ``natural_history`` fix shapes, so they are static
under ``optax.inject_hyperparams``; everything else numeric is traced.
"""

import optax
from optim_conformance import OptimCase

import subjax.optim as so

_KW = {"learning_rate": 3e-2, "rank": 2, "update_proj_gap": 5}
_STATIC = ("rank",)

CASES = [
    OptimCase("lowrank.galore_subspace", so.galore, {**_KW, "projector": "subspace"},
              static_args=_STATIC),
    OptimCase("lowrank.galore_svd", so.galore, {**_KW, "projector": "svd"},
              static_args=_STATIC),
    OptimCase("lowrank.galore_dct", so.galore, {**_KW, "projector": "dct"},
              static_args=_STATIC),
    OptimCase("lowrank.galore_random", so.galore, {**_KW, "projector": "random"},
              static_args=_STATIC),
    OptimCase(
        "lowrank.natural_galore", so.galore,
        {**_KW, "natural_history": 4, "align": "sign", "weight_decay": 1e-4},
        static_args=("rank", "natural_history"),
    ),
]


def _projected_adam(learning_rate: optax.ScalarOrSchedule, rank=2, refresh_every=5,
                    projector="subspace"):
    """The generic wrapper: ``projected`` around ``optax.adam`` (a learning rate to inject)."""
    return so.projected(optax.adam(learning_rate), rank, refresh_every, projector=projector)


CASES += [
    OptimCase("lowrank.projected_adam", _projected_adam, {"learning_rate": 3e-2},
              static_args=_STATIC),
]
