"""Deflated CG with a recycled subspace, for sequences of related SPD systems."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import (
    fixed_point_loop,
    positive,
    static_int,
)
from subjax.linalg import _validate as V
from subjax.linalg._orth import orth_robust

__all__ = ["RecycledCGResult", "recycled_cg"]


class RecycledCGResult(NamedTuple):
    """Result of :func:`recycled_cg`.

    Attributes:
      x: ``(n,)`` solution.
      converged: ``()`` bool, the true residual ``||b - A x|| <= tol ||b||``.
      n_iters: ``()`` int32, CG iterations run (not counting the deflation solve).
      residual_norm: ``()`` final ``||b - A x||``.
      errors: ``(max_iters,)`` relative (recursive) residual per iteration, padded with -1.
      recycle: ``(n, k)`` orthonormal basis of the approximate eigenvectors of the
        ``k`` smallest eigenvalues of ``A``, to pass as ``recycle`` to the next solve.
    """

    x: jax.Array
    converged: jax.Array
    n_iters: jax.Array
    residual_norm: jax.Array
    errors: jax.Array
    recycle: jax.Array


class _State(NamedTuple):
    x: jax.Array
    r: jax.Array
    p: jax.Array
    rr: jax.Array
    ok: jax.Array
    dirs: jax.Array  # (s, n) first search directions (rows), kept for the subspace update
    adirs: jax.Array  # A dirs


def recycled_cg(
    a,
    b: jax.Array,
    recycle: jax.Array | None = None,
    *,
    k: int | None = None,
    n_store: int | None = None,
    tol: float | jax.Array = 1e-5,
    max_iters: int | None = None,
) -> RecycledCGResult:
    r"""Solve SPD ``A x = b`` by CG deflated with a recycled subspace ``W``.

    Deflated CG (Saad, Yeung, Erhel, Guyomarc'h 2000): the component of ``x`` in
    ``span(W)`` is solved exactly first, ``x_0 = W (W^T A W)^{-1} W^T b``, and every
    search direction is kept ``A``-orthogonal to ``W``
    (``p <- p - W (W^T A W)^{-1} (A W)^T r``), so CG runs on ``A`` with the
    eigenvalues captured by ``W`` removed from its spectrum: for ``W`` spanning the
    ``k`` smallest eigenvectors the convergence rate depends on
    ``lambda_max / lambda_{k+1}`` instead of ``lambda_max / lambda_1``.

    The first ``n_store`` search directions are stored; at the end a Rayleigh–Ritz
    step on ``span[W, P]`` (``G y = theta F y`` with ``G = Z^T A Z``,
    ``F = Z^T Z``) keeps the ``k`` smallest Ritz vectors as the next ``recycle``.
    Pass the result's ``recycle`` to the next solve of a *sequence* of related
    systems (slowly varying ``A``): each solve both uses and refines the subspace
    (Parks, de Sturler et al. 2006 call this subspace recycling). With
    ``recycle=None`` the first solve is plain CG that only builds the subspace.

    Args:
      a: ``(n, n)`` SPD array, BCOO matrix or :class:`LinearOperator`.
      b: ``(n,)`` right-hand side.
      recycle: ``(n, k)`` basis from the previous solve, or None.
      k: recycled dimension (static; default ``recycle``'s columns, else 8).
      n_store: search directions kept for the update (static; default ``4 k``). More
        directions refine the recycled space in fewer solves.
      tol: relative residual tolerance, ``> 0`` (may be traced).
      max_iters: iteration cap (static; default ``10 n``).

    Returns:
      :class:`RecycledCGResult`.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import recycled_cg
      >>> a = jnp.diag(jnp.linspace(0.01, 1.0, 200))
      >>> first = recycled_cg(a, jnp.ones(200), k=4, tol=1e-6)
      >>> second = recycled_cg(a, jnp.arange(200.0) / 200, first.recycle, tol=1e-6)
      >>> bool(second.converged), int(second.n_iters) < int(first.n_iters)
      (True, True)

    References:
      Saad, Yeung, Erhel, Guyomarc'h, "A deflated version of the conjugate gradient
      algorithm", SIAM J. Sci. Comput. 2000. Parks, de Sturler, Mackey, Johnson,
      Maiti, "Recycling Krylov subspaces for sequences of linear systems", SIAM J.
      Sci. Comput. 2006.
    """
    op, b = V.square_system(a, b, "recycled_cg")
    n = b.shape[0]
    recycle, k = V.recycle_basis(recycle, k, n, default=8)
    n_store = 4 * k if n_store is None else static_int(n_store, "n_store", 1)
    max_iters = 10 * n if max_iters is None else static_int(max_iters, "max_iters", 1)
    if k + n_store > n:
        raise ValueError(f"k + n_store = {k + n_store} exceeds n={n}; lower `k` or `n_store`")
    positive(tol, "tol")
    tol = jnp.asarray(tol, b.dtype)
    if recycle is None:
        recycle = jnp.zeros((n, k), b.dtype)  # no deflation on the first solve
    return _recycled_cg_impl(op, b, recycle.astype(b.dtype), tol, n_store=n_store,
                             max_iters=max_iters)


@functools.partial(jax.jit, static_argnames=("n_store", "max_iters"))
def _recycled_cg_impl(op, b, w, tol, *, n_store, max_iters):
    dt = b.dtype
    n, k = w.shape
    aw = op.matmat(w)
    waw = w.T @ aw
    waw = (waw + waw.T) * jnp.asarray(0.5, dt)
    # A zero (or degenerate) recycle block deflates nothing: regularise its Gram.
    eye = jnp.eye(k, dtype=dt)
    active = jnp.diagonal(waw) > 0
    waw = jnp.where(active[:, None] & active[None, :], waw, eye)
    # The (k, k) inverse once, so the loop body is GEMVs only (no per-iteration
    # triangular solves); zero rows / columns for inactive directions.
    winv = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(waw), eye)
    winv = jnp.where(active[:, None] & active[None, :], winv, 0)

    def coarse(v):  # W (W^T A W)^{-1} v
        return w @ (winv @ v)

    def deflate(r):  # r - W (W^T A W)^{-1} (A W)^T r
        return r - coarse(aw.T @ r)

    bnorm = jnp.linalg.norm(b)
    safe_b = jnp.where(bnorm > 0, bnorm, jnp.ones_like(bnorm))
    x0 = coarse(w.T @ b)
    r0 = b - op.matvec(x0)
    p0 = deflate(r0)
    rr0 = jnp.vdot(r0, r0)
    store = jnp.zeros((n_store, n), dt)
    state0 = _State(x0, r0, p0, rr0, jnp.isfinite(rr0), store, store)

    def step(s, it):
        ap = op.matvec(s.p)
        pap = jnp.vdot(s.p, ap)
        good = (pap > 0) & jnp.isfinite(pap)
        alpha = jnp.where(good, s.rr / jnp.where(good, pap, jnp.ones_like(pap)), 0).astype(dt)
        x = s.x + alpha * s.p
        r = s.r - alpha * ap
        rr = jnp.vdot(r, r)
        beta = rr / jnp.where(s.rr > 0, s.rr, jnp.ones_like(s.rr))
        p = deflate(r) + beta * s.p
        slot = jnp.where(it < n_store, it, n_store)  # past the end: dropped, in place
        dirs = s.dirs.at[slot].set(s.p, mode="drop")
        adirs = s.adirs.at[slot].set(ap, mode="drop")
        ok = good & jnp.isfinite(rr)
        return _State(x, r, p, rr, ok, dirs, adirs), jnp.sqrt(rr) / safe_b

    out = fixed_point_loop(step, state0, max_iters=max_iters, dtype=dt,
                           stop=lambda s, err: (err <= tol) | ~s.ok)
    s = out.state
    rnorm = jnp.linalg.norm(b - op.matvec(s.x))
    converged = s.ok & (rnorm <= tol * bnorm) & jnp.isfinite(rnorm)
    new_w = _update_recycle(w, aw, s.dirs.T, s.adirs.T, k)
    return RecycledCGResult(s.x, converged, out.n_iters, rnorm, out.errors, new_w)


def whitening(gram, rtol=None):
    """``c`` with ``c^T gram c = I`` on the kept directions and zero columns elsewhere.

    ``gram = Y^T Y`` of a tall ``Y`` gives ``Y c`` with orthonormal (or zero)
    columns: ``gram = V diag(f) V^T``, ``c = V diag(f^{-1/2})`` over the
    eigenvalues ``f > rtol * max(f)`` (default ``16 k`` unit roundoffs for a
    ``(k, k)`` Gram matrix), zero over the rest. Only the small ``(k, k)``
    problem is solved; the tall products stay GEMMs.
    """
    dt = gram.dtype
    if rtol is None:
        rtol = 16 * gram.shape[0] * jnp.finfo(dt).eps
    f, v = jnp.linalg.eigh((gram + gram.T) * jnp.asarray(0.5, dt))
    keep = f > jnp.max(f) * rtol
    scale = jnp.where(keep, lax.rsqrt(jnp.where(keep, f, 1)), 0)
    return v * scale[None, :]


def _update_recycle(w, aw, dirs, adirs, k):
    """The ``k`` smallest Ritz vectors of ``A`` on ``span[W, P]`` (orthonormal columns).

    Rayleigh–Ritz without a tall factorization: ``F = Z^T Z = V diag(f) V^T``
    gives the basis ``B = Z V f^{-1/2}`` (directions with ``f`` below ``sqrt(u)``
    times the largest dropped: unused slots, dependent directions), and the Ritz
    problem is the small ``B^T A B``. Only GEMMs touch ``n``-sized data.
    """
    z = jnp.concatenate([w, dirs], axis=1)
    az = jnp.concatenate([aw, adirs], axis=1)
    c = whitening(z.T @ z, jnp.sqrt(jnp.finfo(z.dtype).eps))  # B = Z c
    keep = jnp.any(c != 0, axis=0)
    g = c.T @ (z.T @ az) @ c
    g = (g + g.T) * jnp.asarray(0.5, g.dtype)
    # dropped directions get a huge Ritz value so they are never kept
    big = jnp.max(jnp.abs(g)) * 1e3 + 1
    _, y = jnp.linalg.eigh(g + jnp.diag(jnp.where(keep, 0, big)))
    return orth_robust(z @ (c @ y[:, :k]))[0]
