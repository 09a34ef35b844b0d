"""Restarted GMRES and GCRO-DR (GMRES with a recycled deflation space) for general systems."""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import (
    LoopOutput,
    fixed_point_loop,
    floating_array,
    positive,
    record,
    static_int,
)
from subjax.linalg import _validate as V
from subjax.linalg._recycle import RecycledCGResult, whitening

__all__ = ["GCRODRResult", "GMRESResult", "gcro_dr", "gmres"]


class GMRESResult(NamedTuple):
    """Result of :func:`gmres`.

    The fields of :class:`CGResult`: ``x``; ``converged``, the true residual
    ``||b - A x|| <= tol ||b||``; ``n_iters``, Arnoldi steps run (products with
    ``A`` inside the cycles; the residual recomputed at each restart is not
    counted); ``residual_norm``, the final ``||b - A x||`` (recomputed); ``errors``,
    the ``(max_iters,)`` relative residual estimates after each step, padded with -1.
    """

    x: jax.Array
    converged: jax.Array
    n_iters: jax.Array
    residual_norm: jax.Array
    errors: jax.Array


class GCRODRResult(RecycledCGResult):
    """Result of :func:`gcro_dr`: the fields of :class:`GMRESResult` and ``recycle``.

    ``recycle`` is the ``(n, k)`` recycled basis ``U``: an approximate invariant
    subspace of ``A`` for the ``k`` harmonic Ritz values of smallest magnitude (zero
    columns where fewer than ``k`` directions were found). Pass it as ``recycle`` to
    the next solve of the sequence.
    """

    __slots__ = ()


def _prepare(a, b, x0, restart, tol, max_iters, what):
    op, b = V.square_system(a, b, what)
    n = b.shape[0]
    restart = min(static_int(restart, "restart", 1), n)
    max_iters = 10 * n if max_iters is None else static_int(max_iters, "max_iters", 1)
    positive(tol, "tol")
    if x0 is None:
        x0 = jnp.zeros_like(b)
    else:
        x0 = floating_array(x0, "x0", ndim=1)
        if x0.shape != b.shape:
            raise ValueError(f"`x0` must have shape {b.shape}, got {x0.shape}")
    return op, b, x0.astype(b.dtype), restart, jnp.asarray(tol, b.dtype), max_iters


def gmres(
    a,
    b: jax.Array,
    *,
    x0: jax.Array | None = None,
    restart: int = 30,
    tol: float | jax.Array = 1e-5,
    max_iters: int | None = None,
) -> GMRESResult:
    r"""Solve ``A x = b`` for a general square ``A`` by restarted GMRES(``restart``).

    Each cycle builds an Arnoldi basis of up to ``restart`` vectors (classical
    Gram–Schmidt applied twice) from the current residual and minimises
    ``||b - A x||`` over it (Givens rotations give the residual after every
    step, so a cycle stops as soon as the estimate meets ``tol``). The residual
    is recomputed as ``b - A x`` at every restart, and ``converged`` is the test
    on that true residual. The same cycle, with a deflation space added, is
    :func:`gcro_dr`.

    Args:
      a: ``(n, n)`` array, BCOO matrix or :class:`LinearOperator`.
      b: ``(n,)`` right-hand side.
      x0: initial guess (default zeros).
      restart: Arnoldi vectors per cycle (static; at most ``n``).
      tol: relative residual tolerance, ``> 0`` (may be traced).
      max_iters: cap on the Arnoldi steps over all cycles (static; default ``10 n``).

    Returns:
      :class:`GMRESResult` ``(x, converged, n_iters, residual_norm, errors)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import gmres
      >>> a = jnp.array([[3.0, 1.0], [-1.0, 2.0]])
      >>> res = gmres(a, jnp.array([1.0, 0.0]), tol=1e-6)
      >>> bool(res.converged), [round(float(v), 4) for v in res.x]
      (True, [0.2857, 0.1429])

    References:
      Saad, Schultz, "GMRES: a generalized minimal residual algorithm for solving
      nonsymmetric linear systems", SIAM J. Sci. Stat. Comput. 1986.
    """
    op, b, x0, restart, tol, max_iters = _prepare(a, b, x0, restart, tol, max_iters, "gmres")
    u = jnp.zeros((b.shape[0], 0), b.dtype)
    x, converged, n_iters, rnorm, errors, _ = _gcrodr_impl(
        op, b, x0, u, tol, steps=restart, max_iters=max_iters)
    return GMRESResult(x, converged, n_iters, rnorm, errors)


def gcro_dr(
    a,
    b: jax.Array,
    recycle: jax.Array | None = None,
    *,
    k: int | None = None,
    restart: int = 40,
    x0: jax.Array | None = None,
    tol: float | jax.Array = 1e-5,
    max_iters: int | None = None,
) -> GCRODRResult:
    r"""Solve a general ``A x = b`` by GCRO-DR, recycling a subspace across a sequence.

    GCRO-DR (Parks, de Sturler, Mackey, Johnson, Maiti 2006) keeps ``k`` vectors
    ``U`` with ``A U = C``, ``C^T C = I``. At the start of a solve ``C`` is
    recomputed for this ``A`` (``A U`` orthonormalised, ``U`` transformed alike) and
    the residual is projected out of ``range(C)`` (``x += U C^T r``). Each cycle
    then runs ``restart - k`` Arnoldi steps on ``(I - C C^T) A`` and minimises the
    residual over ``range([U, V])`` (an augmented GMRES: the search space holds
    the recycled vectors next to the new Krylov basis). After every cycle ``U``
    is replaced by the ``k`` harmonic Ritz vectors of ``A`` on that space with the
    smallest harmonic Ritz values in magnitude: the slow, near-singular part of
    the spectrum, which GMRES would otherwise rediscover at every restart and in
    every system of a sequence of slowly varying ``A``. Complex conjugate pairs
    enter as their real and imaginary parts (a real basis of the same space).

    Pass the result's ``recycle`` to the next solve. With ``recycle=None`` the
    first cycle is GMRES(``restart - k``), which builds the first ``U``. Without
    a recycled space the method is :func:`gmres`.

    The harmonic Ritz step solves a small nonsymmetric eigenproblem once per cycle
    (``jnp.linalg.eig``; on GPU, JAX runs it on the host or through cuSOLVER). No
    reverse-mode rule.

    Args:
      a: ``(n, n)`` array, BCOO matrix or :class:`LinearOperator`.
      b: ``(n,)`` right-hand side.
      recycle: ``(n, k)`` basis ``U`` from the previous solve, or None.
      k: recycled dimension (static; default ``recycle``'s columns, else 10).
      restart: basis size ``m`` of a cycle, recycled vectors included (static,
        ``> k``, at most ``n``): each cycle runs ``m - k`` Arnoldi steps.
      x0: initial guess (default zeros).
      tol: relative residual tolerance, ``> 0`` (may be traced).
      max_iters: cap on the Arnoldi steps over all cycles (static; default ``10 n``).

    Returns:
      :class:`GCRODRResult` ``(x, converged, n_iters, residual_norm, errors, recycle)``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import gcro_dr
      >>> d = jnp.linspace(0.01, 1.0, 200)
      >>> a = jnp.diag(d) + 0.01 * jnp.eye(200, k=1)
      >>> first = gcro_dr(a, jnp.ones(200), k=5, restart=20, tol=1e-6)
      >>> second = gcro_dr(a, d, first.recycle, restart=20, tol=1e-6)
      >>> bool(second.converged), int(second.n_iters) < int(first.n_iters)
      (True, True)

    References:
      Parks, de Sturler, Mackey, Johnson, Maiti, "Recycling Krylov subspaces for
      sequences of linear systems", SIAM J. Sci. Comput. 2006. de Sturler, "Nested
      Krylov methods based on GCR", J. Comput. Appl. Math. 1996.
    """
    op, b, x0, restart, tol, max_iters = _prepare(a, b, x0, restart, tol, max_iters,
                                                  "gcro_dr")
    n = b.shape[0]
    recycle, k = V.recycle_basis(recycle, k, n, default=10)
    if k >= restart:
        raise ValueError(f"`k`={k} must be below `restart`={restart} (the cycle's basis size)")
    u = jnp.zeros((n, k), b.dtype) if recycle is None else recycle.astype(b.dtype)
    return GCRODRResult(*_gcrodr_impl(op, b, x0, u, tol, steps=restart - k,
                                      max_iters=max_iters))


class _Arnoldi(NamedTuple):
    v: jax.Array  # (p + 1, n) orthonormal rows (unused rows zero)
    h: jax.Array  # (p + 1, p) Hessenberg matrix of (I - C C^T) A
    bmat: jax.Array  # (k, p) C^T A V
    rot: jax.Array  # (p + 1, p) H after the Givens rotations (upper triangular)
    qrot: jax.Array  # (p + 1, p + 1) product of the Givens rotations so far
    g: jax.Array  # (p + 1,) rotated right-hand side beta e_1
    total: jax.Array  # Arnoldi steps over all cycles
    errors: jax.Array  # (max_iters,) relative residual estimates
    ok: jax.Array


class _Outer(NamedTuple):
    x: jax.Array
    r: jax.Array  # b - A x, orthogonal to range(C)
    u: jax.Array  # (n, k) with A U = C
    c: jax.Array  # (n, k) orthonormal (zero columns where no direction is held)
    total: jax.Array
    errors: jax.Array
    ok: jax.Array


def _givens(a, b):
    r = jnp.hypot(a, b)
    safe = jnp.where(r > 0, r, jnp.ones_like(r))
    return jnp.where(r > 0, a / safe, 1), jnp.where(r > 0, b / safe, 0), r


def _arnoldi(op, c, r, thresh, safe_b, total, errors, *, steps, max_iters):
    """One cycle's Arnoldi process on ``(I - C C^T) A`` from ``r``; stops at ``thresh``."""
    dt = r.dtype
    n, p = r.shape[0], steps
    beta = jnp.linalg.norm(r)
    v0 = jnp.zeros((p + 1, n), dt).at[0].set(r / jnp.where(beta > 0, beta, 1))
    state = _Arnoldi(v0, jnp.zeros((p + 1, p), dt), jnp.zeros((c.shape[1], p), dt),
                     jnp.zeros((p + 1, p), dt), jnp.eye(p + 1, dtype=dt),
                     jnp.zeros((p + 1,), dt).at[0].set(beta), total, errors, jnp.array(True))
    rows = jnp.arange(p + 1, dtype=jnp.int32)

    def step(s, j):
        w = op.matvec(s.v[j])
        bj = jnp.zeros((c.shape[1],), dt)
        hj = jnp.zeros((p + 1,), dt)
        for _ in range(2):  # classical Gram-Schmidt, twice
            bc = c.T @ w
            w = w - c @ bc
            hv = s.v @ w  # rows past j are zero
            w = w - s.v.T @ hv
            bj, hj = bj + bc, hj + hv
        hnext = jnp.linalg.norm(w)
        # an invariant Krylov space (hnext ~ 0) ends the cycle with the exact minimiser
        live = hnext > jnp.finfo(dt).eps * jnp.maximum(jnp.linalg.norm(hj), beta)
        v = s.v.at[j + 1].set(jnp.where(live, w / jnp.where(live, hnext, 1), 0))
        hcol = hj.at[j + 1].set(hnext)
        h = s.h.at[:, j].set(hcol)

        col = s.qrot @ hcol  # the earlier rotations, as one product
        cs, sn, rr = _givens(col[j], col[j + 1])
        col = jnp.where(rows == j, rr, jnp.where(rows == j + 1, 0, col))
        qj, qj1 = s.qrot[j], s.qrot[j + 1]
        qrot = s.qrot.at[j].set(cs * qj + sn * qj1).at[j + 1].set(-sn * qj + cs * qj1)
        gj = s.g[j]
        g = s.g.at[j].set(cs * gj).at[j + 1].set(-sn * gj)
        err = jnp.abs(g[j + 1]) / safe_b
        ok = s.ok & jnp.isfinite(err) & (rr > 0)
        new = _Arnoldi(v, h, s.bmat.at[:, j].set(bj), s.rot.at[:, j].set(col),
                       qrot, g, s.total + 1,
                       record(s.errors, s.total, err), ok)
        return new, err

    return fixed_point_loop(
        step, state, max_iters=p, dtype=dt, history=1,
        stop=lambda s, err: (err * safe_b <= thresh) | (s.total >= max_iters) | ~s.ok)


def _pair(y):
    """``c`` with ``y c`` orthonormal (two whitening passes; zero columns where rank lacks)."""
    c1 = whitening(y.T @ y)
    y1 = y @ c1
    return c1 @ whitening(y1.T @ y1)


def _harmonic_ritz(u, c, s: _Arnoldi, j):
    """The next ``(U, C)``: harmonic Ritz vectors of ``A`` on ``range([U, V_j])``.

    With ``W = [U D, V_j]`` (``D`` scaling ``U`` to unit columns) and
    ``A W = [C, V_{j+1}] G``, ``G = [[D, B], [0, H]]``, the harmonic Ritz pairs
    solve ``G^T G z = theta G^T [C, V]^T W z``; those of smallest ``|theta|`` are
    the eigenvectors of ``(G^T G)^{-1} G^T [C, V]^T W`` of largest modulus.
    Unused Arnoldi columns are zero in ``G`` and ``W``: an identity on their
    diagonal of ``G^T G`` gives them the eigenvalue zero, never kept.
    """
    dt = u.dtype
    k = u.shape[1]
    p = s.h.shape[1]
    un = jnp.linalg.norm(u, axis=0)
    held = un > 0
    d = jnp.where(held, 1 / jnp.where(held, un, 1), 1)
    ut = u * jnp.where(held, d, 0)[None, :]
    active = jnp.arange(p, dtype=jnp.int32) < j
    top = jnp.concatenate([jnp.diag(d), s.bmat], axis=1)
    bottom = jnp.concatenate([jnp.zeros((p + 1, k), dt), s.h], axis=1)
    g = jnp.concatenate([top, bottom], axis=0)  # (k + p + 1, k + p)
    vtv = jnp.where(active[None, :], jnp.eye(p + 1, p, dtype=dt), 0)
    wt = jnp.concatenate([
        jnp.concatenate([c.T @ ut, jnp.zeros((k, p), dt)], axis=1),
        jnp.concatenate([s.v @ ut, vtv], axis=1),
    ], axis=0)  # [C, V]^T W
    idle = jnp.concatenate([jnp.zeros((k,), bool), ~active])
    gg = g.T @ g + jnp.diag(idle.astype(dt))
    mat = jnp.linalg.solve(gg, g.T @ wt)
    mu, z = jnp.linalg.eig(mat)
    order = jnp.argsort(-jnp.abs(mu))[:k]
    mu, z = mu[order], z[:, order]
    amu = jnp.abs(mu)
    keep = amu > jnp.max(amu) * jnp.finfo(dt).eps * (k + p)
    # a real basis of the same space: Re z for real values and the first of a
    # conjugate pair, Im z for the second
    pk = jnp.where(keep[None, :] & (jnp.imag(mu) >= 0)[None, :], jnp.real(z),
                   jnp.where(keep[None, :], jnp.imag(z), 0)).astype(dt)
    gp = g @ pk
    cw = _pair(gp)
    y = ut @ pk[:k] + s.v[:p].T @ pk[k:]
    q = gp @ cw
    return y @ cw, c @ q[:k] + s.v.T @ q[k:]


@functools.partial(jax.jit, static_argnames=("steps", "max_iters"))
def _gcrodr_impl(op, b, x0, u, tol, *, steps, max_iters):
    dt = b.dtype
    k = u.shape[1]
    bnorm = jnp.linalg.norm(b)
    thresh = tol * bnorm
    safe_b = jnp.where(bnorm > 0, bnorm, jnp.ones_like(bnorm))

    def project(x, r, u, c):  # x += U C^T r, r -= C C^T r  (A U = C)
        if not k:
            return x, r
        t = c.T @ r
        return x + u @ t, r - c @ t

    if k:
        au = op.matmat(u)
        cw = _pair(au)
        u, c = u @ cw, au @ cw
    else:
        c = u
    x, r = project(x0, b - op.matvec(x0), u, c)
    rnorm = jnp.linalg.norm(r)
    state0 = _Outer(x, r, u, c, jnp.zeros((), jnp.int32), -jnp.ones((max_iters,), dt),
                    jnp.isfinite(rnorm))

    def cycle(s, _):
        inner = _arnoldi(op, s.c, s.r, thresh, safe_b, s.total, s.errors, steps=steps,
                         max_iters=max_iters)
        a, j = inner.state, inner.n_iters
        active = jnp.arange(steps, dtype=jnp.int32) < j
        tri = jnp.where(active[:, None] & active[None, :], a.rot[:steps], 0)
        tri = tri + jnp.diag(jnp.where(active & (jnp.diagonal(tri) != 0), 0, 1).astype(dt))
        y2 = jax.scipy.linalg.solve_triangular(tri, jnp.where(active, a.g[:steps], 0))
        x = s.x + a.v[:steps].T @ y2
        u, c = s.u, s.c
        if k:
            x = x - u @ (a.bmat @ y2)  # the recycled part of the minimiser: -D^{-1} B y2
            u, c = _harmonic_ritz(u, c, a, j)
        x, r = project(x, b - op.matvec(x), u, c)
        rnorm = jnp.linalg.norm(r)
        ok = a.ok & jnp.isfinite(rnorm)
        return _Outer(x, r, u, c, a.total, a.errors, ok), rnorm / safe_b

    def run(state):
        return fixed_point_loop(
            cycle, state, max_iters=max_iters, dtype=dt, history=1,
            stop=lambda s, err: (err * safe_b <= thresh) | (s.total >= max_iters) | ~s.ok)

    def skip(state):  # x0 (with the recycled correction) already solves the system
        return LoopOutput(state, jnp.zeros((), jnp.int32), rnorm / safe_b, -jnp.ones((1,), dt))

    out = lax.cond(state0.ok & (rnorm > thresh), run, skip, state0)
    s = out.state
    rnorm = jnp.linalg.norm(b - op.matvec(s.x))
    converged = s.ok & (rnorm <= thresh) & jnp.isfinite(rnorm)
    return s.x, converged, s.total, rnorm, s.errors, s.u
