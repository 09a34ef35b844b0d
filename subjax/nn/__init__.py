"""subjax.nn — Flax NNX modules and initialisers built on subjax primitives.

Each family re-exports its names in its own block below; ``__all__`` is the
union of the blocks.
"""

__all__: list[str] = []

# --- Manifold-valued layers (GCR head, orthogonal linear) -------------------

# --- Low-rank / LoRA family --------------------------------------------------
