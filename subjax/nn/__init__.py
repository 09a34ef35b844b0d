"""subjax.nn — Flax NNX modules and initialisers built on subjax primitives.

Each family re-exports its names in its own block below; ``__all__`` is the
union of the blocks.
"""

__all__: list[str] = []

# --- Manifold-valued layers (GCR head, orthogonal linear) -------------------
from subjax.nn._grassmann import (  # noqa: E402
    GrassmannClassifier,
    ManifoldParam,
    OrthogonalLinear,
    manifolds_of,
)

__all__ += ["GrassmannClassifier", "ManifoldParam", "OrthogonalLinear", "manifolds_of"]

# --- Low-rank / LoRA family --------------------------------------------------
