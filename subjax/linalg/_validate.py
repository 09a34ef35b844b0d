"""Trace-time argument checks shared by the linalg primitives."""

from __future__ import annotations

import operator

import jax
import jax.numpy as jnp

from subjax.linalg._operator import LinearOperator, aslinearoperator, check_finite_if_concrete


def static_int(value, name: str, minimum: int | None = None) -> int:
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(
            f"`{name}` must be a static Python int, got {type(value).__name__}"
        ) from None
    if minimum is not None and v < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {v}")
    return v


def as_operator(a, name: str = "a", *, square: bool = False, what: str = "") -> LinearOperator:
    check_finite_if_concrete(a, name)
    op = aslinearoperator(a, name=name)
    if not jnp.issubdtype(op.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a real floating dtype, got {op.dtype}")
    if square and op.shape[0] != op.shape[1]:
        raise ValueError(
            f"`{name}` must be square{(' for ' + what) if what else ''}, got shape {op.shape}"
        )
    return op


def check_rank(rank, op: LinearOperator, name: str = "a", oversample: int = 0) -> tuple[int, int]:
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


def check_key(key, name: str = "key"):
    if key is None:
        raise TypeError(f"`{name}` is required (a jax.random key)")
    if not isinstance(key, jax.Array):
        raise TypeError(f"`{name}` must be a jax.random key, got {type(key).__name__}")
    return key


def check_basis(q, m: int, name: str, max_cols: int | None = None):
    q = jnp.asarray(q)
    if q.ndim != 2 or q.shape[0] != m:
        raise ValueError(f"`{name}` must have shape ({m}, k), got {q.shape}")
    if not jnp.issubdtype(q.dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a real floating dtype, got {q.dtype}")
    if q.shape[1] < 1:
        raise ValueError(f"`{name}` must have at least one column, got {q.shape}")
    if max_cols is not None and q.shape[1] > max_cols:
        raise ValueError(f"`{name}` has {q.shape[1]} columns > {max_cols}")
    return q
