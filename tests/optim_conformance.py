"""Registry types for the shared optimizer conformance suite.

The checks and the case type live in :mod:`subjax.testing` (public, so that a
user runs the same checks on their own transform). Every subjax optax transform
registers cases here: a module ``tests/optim_cases_<family>.py`` defines
``CASES: list[OptimCase]``; ``tests/test_optim_conformance.py`` discovers those
modules and runs every check on every case. A case whose check is known to fail
lists it in ``XFAIL: dict[(case name, check name), reason]`` of its module.
"""

from subjax.testing import TransformCase as OptimCase
from subjax.testing import quadratic_batch as default_batch
from subjax.testing import quadratic_loss as default_loss
from subjax.testing import quadratic_params as default_params

__all__ = ["OptimCase", "default_batch", "default_loss", "default_params"]
