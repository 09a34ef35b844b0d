"""subjax.optim — optax GradientTransformations built on subjax primitives.

Each family re-exports its names in its own block below (one block per family
keeps concurrent edits apart); ``__all__`` is the union of the blocks.
"""

__all__: list[str] = []

# --- Riemannian optimizers (subjax.manifolds) -------------------------------
from subjax._core import full_precision_exports
from subjax.optim._manifold_muon import ManifoldMuonState, manifold_muon  # noqa: E402
from subjax.optim._riemannian import (  # noqa: E402
    RiemannianAdamState,
    RiemannianSGDState,
    manifold_labels,
    riemannian_adam,
    riemannian_sgd,
)

__all__ += [
    "ManifoldMuonState",
    "RiemannianAdamState",
    "RiemannianSGDState",
    "manifold_labels",
    "manifold_muon",
    "riemannian_adam",
    "riemannian_sgd",
]

# --- Natural gradient / K-FAC / FISMO (subjax.fisher) -----------------------
from subjax.optim._fismo import FISMOState, fismo, newton_schulz, scale_by_fismo  # noqa: E402
from subjax.optim._kfac import KFACState, kfac  # noqa: E402
from subjax.optim._natural import NaturalGradientState, natural_gradient  # noqa: E402

__all__ += [
    "FISMOState",
    "KFACState",
    "NaturalGradientState",
    "fismo",
    "kfac",
    "natural_gradient",
    "newton_schulz",
    "scale_by_fismo",
]

# --- Low-rank projected optimizers (GaLore family) --------------------------
from subjax.optim._projected import ProjectedState, galore, projected  # noqa: E402
from subjax.optim._projectors import (  # noqa: E402
    Projector,
    dct_basis,
    make_projector,
)

__all__ += ["ProjectedState", "Projector", "dct_basis", "galore", "make_projector", "projected"]

# --- Continual learning in orthogonal gradient subspaces (CoSO) -------------
from subjax.optim._coso import CoSOState, coso, coso_consolidate  # noqa: E402

__all__ += ["CoSOState", "coso", "coso_consolidate"]

full_precision_exports(globals())
