"""Argument checks specific to the linalg primitives (the generic ones live in the core)."""

from __future__ import annotations

import jax.numpy as jnp

from subjax._core import check_finite_if_concrete, static_int
from subjax.linalg._operator import LinearOperator, aslinearoperator, is_dense


def as_operator(a, name: str = "a", *, square: bool = False, what: str = "") -> LinearOperator:
    """``a`` as a real floating :class:`LinearOperator` (a concrete dense ``a`` must be finite)."""
    if is_dense(a):
        check_finite_if_concrete(a, name)
    op = aslinearoperator(a, name=name)
    if not jnp.issubdtype(op.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a real floating dtype, got {op.dtype}")
    if square and op.shape[0] != op.shape[1]:
        raise ValueError(
            f"`{name}` must be square{(' for ' + what) if what else ''}, got shape {op.shape}"
        )
    return op


def check_rank(rank, op, name: str = "a", oversample: int = 0) -> tuple[int, int]:
    """Static ``rank >= 1`` and ``oversample >= 0`` with ``rank + oversample <= min(m, n)``."""
    rank = static_int(rank, "rank", 1)
    oversample = static_int(oversample, "oversample", 0)
    mn = min(op.shape)
    if rank > mn:
        raise ValueError(f"rank={rank} exceeds min(m, n)={mn} for argument `{name}`")
    if rank + oversample > mn:
        raise ValueError(
            f"rank + oversample = {rank} + {oversample} = {rank + oversample} exceeds "
            f"min(m, n)={mn} for argument `{name}`; lower `oversample`"
        )
    return rank, oversample


def check_basis(q, m: int, name: str, max_cols: int | None = None):
    """A real floating ``(m, k)`` block with ``1 <= k <= max_cols``."""
    q = jnp.asarray(q)
    if q.ndim != 2 or q.shape[0] != m:
        raise ValueError(f"`{name}` must have shape ({m}, k), got {q.shape}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a real floating dtype, got {q.dtype}")
    if q.shape[1] < 1:
        raise ValueError(f"`{name}` must have at least one column, got {q.shape}")
    if max_cols is not None and q.shape[1] > max_cols:
        raise ValueError(f"`{name}` has {q.shape[1]} columns > {max_cols}")
    check_finite_if_concrete(q, name)
    return q
