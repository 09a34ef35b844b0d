"""subjax: a JAX research engine for subspace methods.

Subpackages (import them explicitly, e.g. ``import subjax.linalg``):

- :mod:`subjax.linalg`    subspace iteration, randomized SVD / eigh, Krylov, subspace geometry
- :mod:`subjax.ot`        Sinkhorn, Sinkhorn–Newton and sparse Newton (SNS) optimal transport
- :mod:`subjax.manifolds` Sphere / Stiefel / Grassmann / SPD manifolds
- :mod:`subjax.fisher`    Fisher and Gauss–Newton curvature, Fisher merging, EWC
- :mod:`subjax.optim`     optax transforms built on the primitives
- :mod:`subjax.nn`        Flax NNX modules and initialisers
- :mod:`subjax.parallel`  ``shard_map`` / multi-device versions and training-step helpers
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
