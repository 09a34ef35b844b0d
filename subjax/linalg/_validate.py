"""Argument checks specific to the linalg primitives (the generic ones live in the core)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subjax._core import (
    bound_axis_size,
    check_finite_if_concrete,
    floating_array,
    is_concrete,
    optional_static_int,
    static_int,
)
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


def global_shape(op: LinearOperator, axis_name) -> tuple[int, int]:
    """``(m, n)`` of the whole matrix whose row block ``op`` is (``op.shape`` without an axis)."""
    m, n = op.shape
    if axis_name is None:
        return m, n
    return m * bound_axis_size(axis_name), n


@jax.jit
def _asymmetry_device(a):
    a = a / jnp.maximum(jnp.max(jnp.abs(a)), jnp.finfo(a.dtype).tiny)
    return jnp.linalg.norm(a - a.T) / jnp.maximum(jnp.linalg.norm(a), jnp.finfo(a.dtype).tiny)


def as_symmetric_operator(a, axis_name, name: str = "a") -> LinearOperator:
    """:func:`as_operator` for an eigensolver: square (as a whole), symmetric when checkable.

    A concrete dense ``a`` is checked for symmetry on its device (one scalar read
    back); operators and traced arrays are checked by the solver instead, which
    reports an asymmetric projection through ``converged=False``.
    """
    op = as_operator(a, name)
    m, n = global_shape(op, axis_name)
    if m != n:
        raise ValueError(
            f"`{name}` must be square for an eigendecomposition, got shape {(m, n)}"
            + ("" if axis_name is None else f" (row blocks of {op.shape} over {axis_name!r})")
        )
    if axis_name is None and is_dense(a) and is_concrete(a):
        try:
            asym = float(_asymmetry_device(jnp.asarray(op.operands[0])))
        except jax.errors.ConcretizationTypeError:  # inside an outer trace
            return op
        if asym > float(jnp.sqrt(jnp.finfo(op.dtype).eps)):
            raise ValueError(
                f"`{name}` must be symmetric: ||a - a^T||_F / ||a||_F = {asym:.2g}"
            )
    return op


def default_oversample(rank: int) -> int:
    """Extra test vectors when the caller gives none: at least 8, rounded up so that the
    block ``rank + oversample`` is a whole number of 8-column panels.

    Matrix-product kernels work on panels of 8 (or 16) columns; a block of 42 columns
    costs XLA's CPU GEMM more than one of 48, so the rounding is free accuracy.
    """
    return 8 + (-(rank + 8)) % 8


def check_rank(rank, shape, name: str = "a", oversample: int | None = 0) -> tuple[int, int]:
    """Static ``rank >= 1`` and ``oversample >= 0`` with ``rank + oversample <= min(shape)``.

    ``oversample=None`` is :func:`default_oversample`, lowered to fit ``min(shape)``.
    """
    rank = static_int(rank, "rank", 1)
    mn = min(shape)
    if rank > mn:
        raise ValueError(f"rank={rank} exceeds min(m, n)={mn} for argument `{name}`")
    if oversample is None:
        return rank, min(default_oversample(rank), mn - rank)
    oversample = static_int(oversample, "oversample", 0)
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


def square_system(a, b, what: str):
    """``(op, b)`` for a solver of ``A x = b``: ``b`` a real vector, ``a`` square and matching."""
    b = floating_array(b, "b", ndim=1)
    op = as_operator(a, "a", square=True, what=what)
    if op.shape[0] != b.shape[0]:
        raise ValueError(f"`a` has shape {op.shape}, incompatible with `b` of size {b.shape[0]}")
    return op, b


def recycle_basis(recycle, k, n: int, default: int):
    """``(recycle, k)`` of a recycling solver: ``k`` from ``recycle``'s columns when given."""
    k = optional_static_int(k, "k", 1)
    if recycle is not None:
        recycle = check_basis(recycle, n, "recycle", max_cols=n)
        if k is not None and k != recycle.shape[1]:
            raise ValueError(f"`k`={k} differs from the {recycle.shape[1]} columns of `recycle`")
        k = recycle.shape[1]
    return recycle, default if k is None else k
