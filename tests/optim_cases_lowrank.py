"""Conformance cases for the low-rank projected optimizers (issue 7).

The default problem's weight is a (6, 4) matrix: rank 2 projects it onto half of
its smaller side, so the loss can only go down if the refreshed subspaces follow
the gradient.
"""

from optim_conformance import OptimCase

import subjax.optim as so


def _galore(projector, **kw):
    # A factory taking only ``learning_rate``: ``optax.inject_hyperparams`` turns
    # every numeric argument of the factory's signature into a traced array, and
    # ``rank`` / ``update_gap`` must stay static.
    def make(learning_rate):
        return so.galore(learning_rate, rank=2, update_gap=5, projector=projector, **kw)

    return make


CASES = [
    OptimCase("lowrank.galore_subspace", _galore("subspace"), {"learning_rate": 3e-2}),
    OptimCase("lowrank.galore_svd", _galore("svd"), {"learning_rate": 3e-2}),
    OptimCase("lowrank.galore_dct", _galore("dct"), {"learning_rate": 3e-2}),
    OptimCase("lowrank.galore_random", _galore("random"), {"learning_rate": 3e-2}),
    OptimCase(
        "lowrank.natural_galore",
        _galore("subspace", natural_history=4, align="sign", weight_decay=1e-4),
        {"learning_rate": 3e-2},
    ),
]
