"""subjax.manifolds — Riemannian manifolds as static, jit-friendly objects.

``Euclidean``, ``Sphere``, ``Stiefel``, ``Grassmann`` (orthonormal-basis
representation) and ``SPD`` (affine-invariant, Bures–Wasserstein and
log-Euclidean metrics). Points are arrays; leading axes are batches of points.
Implementation lives in private modules (`_*.py`).
"""

from subjax.manifolds._base import Manifold, is_manifold
from subjax.manifolds._euclidean import Euclidean, Sphere
from subjax.manifolds._spd import SPD
from subjax.manifolds._stiefel import Grassmann, Stiefel

__all__: list[str] = [
    "Manifold",
    "is_manifold",
    "Euclidean",
    "Sphere",
    "Stiefel",
    "Grassmann",
    "SPD",
]
