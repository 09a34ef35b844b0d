"""Matrix-free preconditioned conjugate gradients with implicit differentiation."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from subjax._core import (
    LoopOutput,
    bound_axis_size,
    fixed_point_loop,
    floating_array,
    is_concrete,
    nonnegative,
    positive,
    static_int,
)
from subjax.linalg import _validate as V
from subjax.linalg._operator import LinearOperator, aslinearoperator
from subjax.linalg._orth import psum

__all__ = ["CGResult", "cg"]


class CGResult(NamedTuple):
    """Result of :func:`cg`.

    Attributes:
      x: ``(n,)`` solution.
      converged: ``()`` bool, ``||b - A x|| <= max(tol ||b||, atol)``.
      n_iters: ``()`` int32, iterations run.
      residual_norm: ``()`` final ``||b - A x||`` (recomputed, not the recursive estimate).
      errors: ``(max_iters,)`` relative residual ``||r_t|| / ||b||`` per iteration,
        padded with -1.
    """

    x: jax.Array
    converged: jax.Array
    n_iters: jax.Array
    residual_norm: jax.Array
    errors: jax.Array


def _is_zero(v) -> bool:
    """``v == 0`` when ``v`` can be read now (False for a traced value)."""
    return is_concrete(v) and np.ndim(v) == 0 and float(v) == 0.0


def _as_matvec(a, n, name, axis=None):
    if isinstance(a, LinearOperator) or hasattr(a, "shape"):
        if axis is None:
            op = V.as_operator(a, name, square=True, what="cg")
            if op.shape[0] != n:
                raise ValueError(
                    f"`{name}` has shape {op.shape}, incompatible with `b` of size {n}"
                )
            return op.matvec
        op = V.as_operator(a, name)  # the local row block (n_d, n) of A
        if op.shape[0] != n or op.shape[1] != n * bound_axis_size(axis):
            raise ValueError(
                f"`{name}` must be this device's ({n}, {n * bound_axis_size(axis)}) row block "
                f"(`b` has {n} local rows), got shape {op.shape}"
            )
        return lambda x: op.matvec(lax.all_gather(x, axis, tiled=True))
    if callable(a):
        return a
    raise TypeError(
        f"`{name}` must be an array, BCOO matrix, LinearOperator or callable, "
        f"got {type(a).__name__}"
    )


def _as_precond(m, n, axis=None):
    if m is None:
        return lambda r: r
    if axis is not None and hasattr(m, "shape") and getattr(m, "ndim", 2) != 1:
        raise ValueError(
            "with `axis_name`, `m` must be a local diagonal (n_d,) or a callable on local blocks"
        )
    if isinstance(m, LinearOperator):
        if m.shape != (n, n):
            raise ValueError(f"`m` must have shape ({n}, {n}), got {m.shape}")
        return m.matvec
    if hasattr(m, "shape"):
        if getattr(m, "ndim", 2) == 1:
            d = jnp.asarray(m)
            if d.shape != (n,):
                raise ValueError(f"diagonal `m` must have shape ({n},), got {d.shape}")
            return lambda r: d.astype(r.dtype) * r
        op = aslinearoperator(m, name="m")
        if op.shape != (n, n):
            raise ValueError(f"`m` must have shape ({n}, {n}), got {op.shape}")
        return op.matvec
    if callable(m):
        return m
    raise TypeError(f"`m` must be None, an array, LinearOperator or callable, got {type(m)}")


def cg(
    a,
    b: jax.Array,
    *,
    x0: jax.Array | None = None,
    tol: float | jax.Array = 1e-5,
    atol: float | jax.Array = 0.0,
    max_iters: int | None = None,
    m=None,
    axis_name: str | None = None,
) -> CGResult:
    r"""Solve ``A x = b`` for symmetric positive definite ``A`` by preconditioned CG.

    Iterates until ``||r_t|| <= max(tol ||b||, atol)`` or ``max_iters`` steps. Breakdown
    (``p^T A p <= 0``, i.e. ``A`` not positive definite, or non-finite values) stops
    the loop with ``converged=False``.

    Differentiation is implicit (``lax.custom_linear_solve``): the cotangent of ``x``
    is pulled back by a second CG solve with ``A^T = A``, never by unrolling the
    loop. Gradients flow to ``b`` and to the arrays inside ``a`` (a dense matrix,
    BCOO values, or values a callable closes over).

    Args:
      a: ``(n, n)`` SPD array, BCOO matrix, :class:`LinearOperator`, or a callable
        ``x -> A x``.
      b: ``(n,)`` right-hand side (use ``jax.vmap`` for several).
      x0: initial guess (default zeros).
      tol, atol: relative / absolute residual tolerances (may be traced); ``tol > 0``
        unless ``atol > 0``.
      max_iters: iteration cap (static; default ``10 n``, as scipy); size of ``errors``.
      m: preconditioner approximating ``A^{-1}``: ``(n, n)`` array or operator,
        ``(n,)`` vector (diagonal, e.g. ``1 / diag(A)``), or callable.
      axis_name: mesh axis the rows are split over, inside ``shard_map``: ``b``,
        ``x0``, a diagonal ``m`` and the result are this device's blocks, every inner
        product is ``psum``'d; an array / operator ``a`` is the local ``(n_d, n)``
        row block (its input is gathered), a callable ``a`` or ``m`` maps local
        blocks to local blocks (doing its own communication). The sharded solve
        is forward-only (no implicit gradient).

    Returns:
      :class:`CGResult` ``(x, converged, n_iters, residual_norm, errors)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import cg
      >>> a = jnp.array([[4.0, 1.0], [1.0, 3.0]])
      >>> res = cg(a, jnp.array([1.0, 2.0]), tol=1e-6)
      >>> bool(res.converged), [round(float(v), 4) for v in res.x]
      (True, [0.0909, 0.6364])

    References:
      Hestenes, Stiefel, "Methods of conjugate gradients for solving linear
      systems", 1952. Saad, "Iterative Methods for Sparse Linear Systems", 2003.
    """
    b = floating_array(b, "b")
    if b.ndim != 1:
        raise ValueError(f"`b` must be a vector (n,), got shape {b.shape}; vmap for several")
    n = b.shape[0]
    n_total = n if axis_name is None else n * bound_axis_size(axis_name)
    matvec = _as_matvec(a, n, "a", axis_name)
    precond = _as_precond(m, n, axis_name)
    max_iters = 10 * n_total if max_iters is None else static_int(max_iters, "max_iters", 1)
    nonnegative(atol, "atol")
    if _is_zero(atol):
        positive(tol, "tol")  # with atol = 0 the loop could only stop at an exact solution
    else:
        nonnegative(tol, "tol")
    dt = b.dtype
    if x0 is None:
        x0 = jnp.zeros_like(b)
    else:
        x0 = jnp.asarray(x0)
        if x0.shape != b.shape:
            raise ValueError(f"`x0` must have shape {b.shape}, got {x0.shape}")
        x0 = x0.astype(dt)
    tol = jnp.asarray(tol, dt)
    atol = jnp.asarray(atol, dt)

    def solve(mv, rhs):
        return _pcg(mv, rhs, lax.stop_gradient(x0), precond, tol, atol, max_iters, axis_name)

    def tsolve(mv, rhs):
        return _pcg(mv, rhs, jnp.zeros_like(rhs), precond, tol, atol, max_iters, axis_name)

    if axis_name is not None:
        # No implicit differentiation across devices (custom_linear_solve cannot type
        # the replicated diagnostics next to the row-sharded solution): plain forward.
        x, aux = solve(matvec, b)
    else:
        x, aux = lax.custom_linear_solve(
            matvec, b, solve, transpose_solve=tsolve, symmetric=True, has_aux=True
        )
    converged, n_iters, rnorm, errors = aux
    return CGResult(x, converged, n_iters, rnorm, errors)


class _CGState(NamedTuple):
    x: jax.Array
    r: jax.Array
    p: jax.Array
    rz: jax.Array  # r^T M r
    rnorm: jax.Array
    ok: jax.Array  # no breakdown, everything finite


def _pcg(matvec, b, x0, precond, tol, atol, max_iters, axis=None):
    dt = b.dtype

    def dot(u, v):
        return psum(jnp.vdot(u, v, precision=lax.Precision.HIGHEST), axis)

    def norm(u):
        return jnp.sqrt(dot(u, u))

    bnorm = norm(b)
    thresh = jnp.maximum(tol * bnorm, atol)
    safe_b = jnp.where(bnorm > 0, bnorm, jnp.ones_like(bnorm))
    r = b - matvec(x0)
    z = precond(r)
    rnorm = norm(r)
    state0 = _CGState(x0, r, z, dot(r, z), rnorm, jnp.isfinite(rnorm))

    def step(s, _):
        ap = matvec(s.p)
        pap = dot(s.p, ap)
        good = (pap > 0) & jnp.isfinite(pap)
        alpha = jnp.where(good, s.rz / jnp.where(good, pap, jnp.ones_like(pap)), 0).astype(dt)
        x = s.x + alpha * s.p
        r = s.r - alpha * ap
        z = precond(r)
        rz = dot(r, z)
        beta = rz / jnp.where(s.rz != 0, s.rz, jnp.ones_like(s.rz))
        rnorm = norm(r)
        return _CGState(x, r, z + beta * s.p, rz, rnorm, good & jnp.isfinite(rnorm)), rnorm / safe_b

    def run(state):
        return fixed_point_loop(
            step, state, max_iters=max_iters, dtype=dt,
            stop=lambda s, err: (s.rnorm <= thresh) | ~s.ok,
        )

    def skip(state):  # x0 already solves the system (or b = 0): no step
        return LoopOutput(state, jnp.zeros((), jnp.int32), state.rnorm / safe_b,
                          -jnp.ones((max_iters,), dt))

    out = lax.cond(state0.ok & (rnorm > thresh), run, skip, state0)
    x = out.state.x
    # The recursive residual drifts from b - A x in finite precision: report the true one.
    rnorm = norm(b - matvec(x))
    converged = out.state.ok & (rnorm <= thresh)
    return x, (converged, out.n_iters, rnorm, out.errors)
