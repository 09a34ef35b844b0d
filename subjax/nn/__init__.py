"""subjax.nn — Flax NNX modules and initialisers built on subjax primitives.

Each family re-exports its names in its own block below; ``__all__`` is the
union of the blocks.
"""

__all__: list[str] = []

# --- Manifold-valued layers (GCR head, orthogonal linear) -------------------
from subjax._core import full_precision_exports
from subjax.nn._grassmann import (  # noqa: E402
    GrassmannClassifier,
    ManifoldParam,
    OrthogonalLinear,
    manifolds_of,
)

__all__ += ["GrassmannClassifier", "ManifoldParam", "OrthogonalLinear", "manifolds_of"]

# --- Low-rank / LoRA family --------------------------------------------------
from subjax.nn._lora import (  # noqa: E402
    SCLoRASubspace,
    lora_optimizer,
    lora_rank,
    lora_state,
    merge_lora,
    pissa_init,
    sclora_init,
    sclora_subspace,
    unmerge_lora,
)
from subjax.nn._lowrank import (  # noqa: E402
    LowRankSparseLinear,
    OrderedDropoutLinear,
    SparseSupport,
)
from subjax.nn._sparse_lowrank import (  # noqa: E402
    ChannelSparseLowRankLinear,
    LostFactors,
    SparseChannels,
    lost_factors,
)
from subjax.nn._spectral import (  # noqa: E402
    IntruderResult,
    intruder_dimensions,
    stable_rank,
    welore_ranks,
)
from subjax.nn._subspace import (  # noqa: E402
    RandomSubspace,
    SubspaceBasis,
    SubspaceOrigin,
    fastfood_project,
    walsh_hadamard,
)

__all__ += [
    "ChannelSparseLowRankLinear",
    "IntruderResult",
    "LostFactors",
    "LowRankSparseLinear",
    "OrderedDropoutLinear",
    "RandomSubspace",
    "SCLoRASubspace",
    "SparseChannels",
    "SparseSupport",
    "SubspaceBasis",
    "SubspaceOrigin",
    "fastfood_project",
    "intruder_dimensions",
    "lora_optimizer",
    "lora_rank",
    "lora_state",
    "lost_factors",
    "merge_lora",
    "pissa_init",
    "sclora_init",
    "sclora_subspace",
    "stable_rank",
    "unmerge_lora",
    "walsh_hadamard",
    "welore_ranks",
]

full_precision_exports(globals())
