"""Orthonormalisation used by the manifolds (delegates to ``subjax.linalg`` when available)."""

from __future__ import annotations

import jax.numpy as jnp

from subjax.manifolds._base import Array, as_work


def _householder_orthonormalize(x: Array) -> Array:
    """Q factor of the thin QR of ``x`` (batched) with the sign fix ``diag(R) >= 0``."""
    xw = as_work(x)
    q, r = jnp.linalg.qr(xw, mode="reduced")
    d = jnp.diagonal(r, axis1=-2, axis2=-1)
    s = jnp.where(d < 0, -jnp.ones_like(d), jnp.ones_like(d))
    return (q * s[..., None, :]).astype(x.dtype)


def orthonormalize(x: Array) -> Array:
    """Orthonormal basis of the columns of ``x`` (same span, ``Q`` of ``QR`` with ``R_ii >= 0``)."""
    try:  # the shared primitive, once the linalg family provides it
        from subjax.linalg import orthonormalize as _lin_orth  # type: ignore[attr-defined]
    except ImportError:
        return _householder_orthonormalize(x)
    return _lin_orth(x)
