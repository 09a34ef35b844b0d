"""Subspace geometry: principal angles, distances, projections and residuals."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subjax._core import compute_dtype
from subjax.linalg._orth import orthonormalize

__all__ = [
    "principal_angles",
    "subspace_distance",
    "project",
    "project_complement",
    "residual_norms",
]

DISTANCES = ("projection", "chordal", "geodesic")


def _check_pair(q1, q2):
    q1 = jnp.asarray(q1)
    q2 = jnp.asarray(q2)
    for name, q in (("q1", q1), ("q2", q2)):
        if q.ndim < 2:
            raise ValueError(f"`{name}` must have shape (..., n, k), got {q.shape}")
        if not jnp.issubdtype(q.dtype, jnp.floating):
            raise TypeError(f"`{name}` must have a real floating dtype, got {q.dtype}")
        if q.shape[-1] > q.shape[-2]:
            raise ValueError(f"`{name}` has more columns than rows: {q.shape}")
    if q1.shape[-2] != q2.shape[-2]:
        raise ValueError(
            f"`q1` and `q2` must have the same number of rows, got {q1.shape} and {q2.shape}"
        )
    if q1.dtype != q2.dtype:
        raise TypeError(f"`q1` and `q2` must have the same dtype, got {q1.dtype} and {q2.dtype}")
    return q1, q2


def principal_angles(q1: jax.Array, q2: jax.Array, *, orthonormal: bool = True) -> jax.Array:
    r"""Principal angles ``0 <= theta_1 <= ... <= theta_p <= pi/2`` between two subspaces.

    With orthonormal bases ``Q_1`` (``n x k1``), ``Q_2`` (``n x k2``), ``p = min(k1,
    k2)``: ``cos theta_i`` are the singular values of ``Q_1^T Q_2`` and ``sin
    theta_i`` those of ``(I - Q_1 Q_1^T) Q_2`` (for ``k2 <= k1``). Small angles are
    taken from the sines and large ones from the cosines, which keeps full
    relative accuracy at both ends (Björck & Golub 1973; Knyazev & Argentati 2002).
    Batched over leading dimensions.

    Args:
      q1: ``(..., n, k1)`` basis.
      q2: ``(..., n, k2)`` basis.
      orthonormal: set False to orthonormalize the inputs first (Householder).

    Returns:
      ``(..., min(k1, k2))`` angles in radians, ascending.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import principal_angles
      >>> e = jnp.eye(3)
      >>> q2 = jnp.stack([jnp.array([1.0, 0.0, 1.0]) / jnp.sqrt(2.0), e[1]], axis=1)
      >>> [round(float(t), 4) for t in principal_angles(e[:, :2], q2)]
      [0.0, 0.7854]

    References:
      Björck, Golub, "Numerical methods for computing angles between linear
      subspaces", 1973. Knyazev, Argentati, "Principal angles between subspaces in
      an A-based scalar product", 2002.
    """
    q1, q2 = _check_pair(q1, q2)
    if not orthonormal:
        q1 = orthonormalize(q1, "householder")
        q2 = orthonormalize(q2, "householder")
    dt = q1.dtype
    ct = compute_dtype(dt)
    q1 = q1.astype(ct)
    q2 = q2.astype(ct)
    if q2.shape[-1] > q1.shape[-1]:
        q1, q2 = q2, q1
    p = q2.shape[-1]
    c = jnp.swapaxes(q1, -1, -2) @ q2  # (..., k1, k2)
    cos = jnp.linalg.svd(c, compute_uv=False)  # descending
    perp = q2 - q1 @ c
    sin = jnp.linalg.svd(perp, compute_uv=False)  # descending, (..., k2)
    sin = jnp.flip(sin, axis=-1)  # ascending: pairs with descending cos
    cos = jnp.clip(cos[..., :p], -1.0, 1.0)
    sin = jnp.clip(sin[..., :p], -1.0, 1.0)
    half = jnp.asarray(0.5, ct)
    theta = jnp.where(cos * cos < half, jnp.arccos(cos), jnp.arcsin(sin))
    return theta.astype(dt)


def subspace_distance(
    q1: jax.Array, q2: jax.Array, *, metric: str = "projection", orthonormal: bool = True
) -> jax.Array:
    r"""Distance between the subspaces spanned by ``q1`` and ``q2`` (equal dimension).

    From the principal angles ``theta``:

    - ``"projection"``: ``sin theta_max = ||Q_1 Q_1^T - Q_2 Q_2^T||_2``;
    - ``"chordal"``: ``||sin theta||_2 = ||Q_1 Q_1^T - Q_2 Q_2^T||_F / sqrt 2``;
    - ``"geodesic"``: ``||theta||_2``, the Grassmann (arc-length) distance.

    Args:
      q1, q2: ``(..., n, k)`` bases.
      metric: ``"projection"``, ``"chordal"`` or ``"geodesic"``.
      orthonormal: set False to orthonormalize the inputs first.

    Returns:
      ``(...)`` distances.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import subspace_distance
      >>> e = jnp.eye(3)
      >>> round(float(subspace_distance(e[:, :1], e[:, 1:2], metric="geodesic")), 4)
      1.5708

    References:
      Edelman, Arias, Smith, "The geometry of algorithms with orthogonality
      constraints", 1998 (Table 4.3).
    """
    if metric not in DISTANCES:
        raise ValueError(f"`metric` must be one of {DISTANCES}, got {metric!r}")
    q1, q2 = _check_pair(q1, q2)
    if q1.shape[-1] != q2.shape[-1]:
        raise ValueError(
            f"`q1` and `q2` must span subspaces of equal dimension, got {q1.shape[-1]} "
            f"and {q2.shape[-1]} columns"
        )
    theta = principal_angles(q1, q2, orthonormal=orthonormal)
    if metric == "projection":
        return jnp.sin(theta[..., -1])
    if metric == "chordal":
        return jnp.sqrt(jnp.sum(jnp.square(jnp.sin(theta)), axis=-1))
    return jnp.sqrt(jnp.sum(jnp.square(theta), axis=-1))


def _check_xq(x, q):
    x = jnp.asarray(x)
    q = jnp.asarray(q)
    if q.ndim < 2:
        raise ValueError(f"`q` must have shape (..., n, k), got {q.shape}")
    if x.ndim < 1:
        raise ValueError(f"`x` must have shape (..., n) or (..., n, j), got {x.shape}")
    if x.dtype != q.dtype:
        raise TypeError(f"`x` and `q` must have the same dtype, got {x.dtype} and {q.dtype}")
    return x, q


def project(x: jax.Array, q: jax.Array) -> jax.Array:
    r"""Orthogonal projection ``Q Q^T x`` onto ``span(Q)`` (``Q`` orthonormal).

    Args:
      x: ``(n,)`` vector or ``(n, j)`` matrix (leading batch dims allowed when ``q``
        has them too).
      q: ``(n, k)`` orthonormal basis.

    Returns:
      Array shaped like ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import project
      >>> project(jnp.array([1.0, 2.0, 3.0]), jnp.eye(3)[:, :2]).tolist()
      [1.0, 2.0, 0.0]
    """
    x, q = _check_xq(x, q)
    if x.ndim == 1:
        if x.shape[0] != q.shape[-2]:
            raise ValueError(f"`x` has {x.shape[0]} rows, `q` has {q.shape[-2]}")
        return q @ (jnp.swapaxes(q, -1, -2) @ x)
    if x.shape[-2] != q.shape[-2]:
        raise ValueError(f"`x` has {x.shape[-2]} rows, `q` has {q.shape[-2]}")
    return q @ (jnp.swapaxes(q, -1, -2) @ x)


def project_complement(x: jax.Array, q: jax.Array) -> jax.Array:
    r"""Projection onto the orthogonal complement: ``x - Q Q^T x``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import project_complement
      >>> project_complement(jnp.array([1.0, 2.0, 3.0]), jnp.eye(3)[:, :2]).tolist()
      [0.0, 0.0, 3.0]
    """
    return jnp.asarray(x) - project(x, q)


def residual_norms(x: jax.Array, q: jax.Array, *, relative: bool = False) -> jax.Array:
    r"""Norms of the residuals ``||x_j - Q Q^T x_j||`` of each column (or of a vector).

    The SubspaceAD anomaly score: distance of a sample from a PCA subspace.

    Args:
      x: ``(n,)`` vector or ``(n, j)`` matrix of column samples.
      q: ``(n, k)`` orthonormal basis.
      relative: divide by ``||x_j||`` (0 for zero columns).

    Returns:
      ``()`` for a vector, ``(j,)`` for a matrix.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import residual_norms
      >>> x = jnp.array([[3.0, 0.0], [4.0, 1.0], [0.0, 0.0]])
      >>> residual_norms(x, jnp.eye(3)[:, :1]).tolist()
      [4.0, 1.0]
    """
    x = jnp.asarray(x)
    r = project_complement(x, q)
    nr = jnp.sqrt(jnp.sum(jnp.square(r), axis=-2 if x.ndim > 1 else -1))
    if relative:
        nx = jnp.sqrt(jnp.sum(jnp.square(x), axis=-2 if x.ndim > 1 else -1))
        nr = jnp.where(nx > 0, nr / jnp.where(nx > 0, nx, jnp.ones_like(nx)), jnp.zeros_like(nr))
    return nr
