"""Seed cases for the conformance suite: optax's own optimizers.

They prove the suite itself is sound (what a well-behaved optax transform
satisfies); subjax families add ``tests/optim_cases_<family>.py``.
"""

import optax
from optim_conformance import OptimCase

CASES = [
    OptimCase("optax.adam", optax.adam, {"learning_rate": 3e-2}),
    OptimCase("optax.sgd_momentum", optax.sgd, {"learning_rate": 1e-2, "momentum": 0.9}),
]
