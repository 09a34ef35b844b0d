"""Sinkhorn–Newton and Sparse Newton Sinkhorn (SNS).

Both maximise the concave dual ``D(f, g)`` with damped Newton steps after a short
Sinkhorn warm-up. Per outer step the plan ``P`` is computed once (the only
``n x m`` exponentials of the step: the plan accepted by the previous line search
is reused) and every CG iteration costs one product with ``P`` and one with
``P^T`` (dense: two GEMVs; SNS: two sparse products with the ``k`` largest entries
of each row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from subjax.ot import _common as cm
from subjax.ot._sinkhorn import sinkhorn_sweeps

__all__ = ["sinkhorn_newton", "sparse_newton_sinkhorn"]


def _line_search(C, f, g, P, df, dg, D, err, slope, log_a, log_b, a, b, eps, rho_a, rho_b,
                 max_backtracks, c1=1e-4):
    """Backtracking (Armijo) on ``D(f + t df, g + t dg)``, ``t = 1, 1/2, ...``.

    Accepts the first ``t`` with a finite dual that increases by ``c1 t slope``.
    Near the solution the increase falls below the rounding of ``D`` (a sum of
    ``n m`` terms); there a step is also accepted if ``D`` does not decrease beyond
    that rounding level and the marginal error ``err`` decreases.
    Returns ``(ok, f, g, P, D)`` (the old point if not ok).
    """
    dtype = f.dtype
    mach = jnp.finfo(dtype).eps

    def trial(t):
        ft, gt = f + t * df, g + t * dg
        Pt = cm.plan_dense(C, ft, gt, log_a, log_b, eps)
        Dt = cm.dual_value(ft, gt, jnp.sum(Pt), a, b, eps, rho_a, rho_b)
        et = (jnp.sum(jnp.abs(cm.dphi(ft, a, rho_a) - jnp.sum(Pt, axis=1)))
              + jnp.sum(jnp.abs(cm.dphi(gt, b, rho_b) - jnp.sum(Pt, axis=0))))
        return ft, gt, Pt, Dt, et

    scale = jnp.abs(D) + jnp.abs(cm.phi(f, a, rho_a)) + jnp.abs(cm.phi(g, b, rho_b))
    n_terms = P.shape[0] + P.shape[1]

    def accept(t, Dt, et):
        armijo = Dt >= D + c1 * t * slope - 16 * mach * scale
        rounding = (Dt >= D - 16 * n_terms * mach * scale) & (et < err)
        return jnp.isfinite(Dt) & jnp.isfinite(et) & (armijo | rounding)

    t0 = jnp.ones((), dtype)
    ft, gt, Pt, Dt, et = trial(t0)

    def cond(s):
        k, t, ok, *_ = s
        return ~ok & (k < max_backtracks)

    def body(s):
        k, t, _, *_ = s
        t = t / 2
        ft, gt, Pt, Dt, et = trial(t)
        return k + 1, t, accept(t, Dt, et), ft, gt, Pt, Dt

    init = (jnp.zeros((), jnp.int32), t0, accept(t0, Dt, et), ft, gt, Pt, Dt)
    _, _, ok, ft, gt, Pt, Dt = lax.while_loop(cond, body, init)
    keep = lambda new, old: jnp.where(ok, new, old)
    return ok, keep(ft, f), keep(gt, g), keep(Pt, P), keep(Dt, D)


def _sparsify(P, budget, threshold):
    """Top-``budget`` entries of each row of ``P`` (those ``< threshold * row max``
    zeroed). The selection runs on a float32 copy (XLA's top-k is far slower in
    float64); values are gathered at full precision."""
    _, idx = lax.top_k(P.astype(jnp.float32), budget)
    vals = jnp.take_along_axis(P, idx, axis=1)
    keep = vals >= threshold * vals[:, :1]
    return jnp.where(keep, vals, 0), idx


def _newton(cost, a, b, eps, rho_a, rho_b, *, tol, max_iterations, warmup_iterations,
            cg_maxiter, max_backtracks, sparse, budget, threshold, history, eps_init, decay,
            level_tol):
    dtype = a.dtype
    geom = cm._to_geom(cost)
    C = geom.dense()
    m = C.shape[1]
    log_a, log_b = cm.safe_log(a), cm.safe_log(b)
    balanced = rho_a is None

    # Warm-up: Sinkhorn at the first epsilon of the continuation (eps itself if none).
    eps0 = eps if decay is None else jnp.maximum(eps, eps_init)
    warm_tol = jnp.where(eps0 > eps, jnp.maximum(tol, level_tol), tol)
    f, g, _, it, errors = sinkhorn_sweeps(
        geom, a, b, eps0, rho_a, rho_b, jnp.zeros_like(a), warm_tol, warmup_iterations, 1,
        history)

    def at_eps(f, g, e):
        P = cm.plan_dense(C, f, g, log_a, log_b, e)
        D = cm.dual_value(f, g, jnp.sum(P), a, b, e, rho_a, rho_b)
        return (P, D, *grads(f, g, P))

    def grads(f, g, P):
        r, c = jnp.sum(P, axis=1), jnp.sum(P, axis=0)
        ga, gb = cm.dphi(f, a, rho_a) - r, cm.dphi(g, b, rho_b) - c
        e = jnp.sum(jnp.abs(ga)) + jnp.sum(jnp.abs(gb))
        return r, c, ga, gb, jnp.where(jnp.isnan(e), jnp.inf, e)

    def direction(e, f, g, r, c, ga, gb, err, Pv, PTu):
        dr = r + e * cm.d2phi(f, a, rho_a)
        dc = c + e * cm.d2phi(g, b, rho_b)
        rtol = jnp.minimum(jnp.asarray(0.1, dtype), jnp.sqrt(err))
        df, dg, k = cm.newton_solve(Pv, PTu, dr, dc, e * ga, e * gb, rtol, cg_maxiter,
                                    balanced)
        slope = jnp.vdot(ga, df) + jnp.vdot(gb, dg)
        # CG in finite precision on a nearly singular system can return a direction
        # that is not ascent; then take the diagonally scaled gradient (always ascent).
        bad = ~(jnp.isfinite(slope) & (slope > 0))
        df = jnp.where(bad, e * ga / jnp.maximum(dr, jnp.finfo(dtype).tiny), df)
        dg = jnp.where(bad, e * gb / jnp.maximum(dc, jnp.finfo(dtype).tiny), dg)
        slope = jnp.where(bad, jnp.vdot(ga, df) + jnp.vdot(gb, dg), slope)
        return df, dg, slope, k

    def dense_step(e, P, f, g, r, c, ga, gb, err, D):
        df, dg, slope, k = direction(e, f, g, r, c, ga, gb, err,
                                     lambda v: P @ v, lambda u: u @ P)
        ok, f2, g2, P2, D2 = _line_search(C, f, g, P, df, dg, D, err, slope, log_a, log_b, a, b, e,
                                          rho_a, rho_b, max_backtracks)
        return ok, f2, g2, P2, D2, k

    def sparse_step(e, P, f, g, r, c, ga, gb, err, D):
        vals, idx = _sparsify(P, budget, threshold)
        Pv = lambda v: jnp.sum(vals * v[idx], axis=1)
        PTu = lambda u: jnp.zeros((m,), dtype).at[idx].add(vals * u[:, None])
        df, dg, slope, k = direction(e, f, g, r, c, ga, gb, err, Pv, PTu)
        ok, f2, g2, P2, D2 = _line_search(C, f, g, P, df, dg, D, err, slope, log_a, log_b, a, b, e,
                                          rho_a, rho_b, max_backtracks)

        def fallback():
            res = dense_step(e, P, f, g, r, c, ga, gb, err, D)
            return (*res[:5], res[5] + k)

        # "Fails to improve": line search failed, or the marginal error did not halve.
        improved = ok & (grads(f2, g2, P2)[-1] < 0.5 * err)
        return lax.cond(improved, lambda: (ok, f2, g2, P2, D2, k), fallback)

    step = sparse_step if sparse else dense_step
    total_cap = warmup_iterations + max_iterations

    def cond(s):
        it, e, *_, err, _, _, stalled = s
        done = (e <= eps) & (err <= tol)
        return ~done & ~stalled & (it < total_cap)

    def body(s):
        it, e, f, g, P, D, r, c, ga, gb, err, errors, nlin, _ = s
        ok, f, g, P, D, k = step(e, P, f, g, r, c, ga, gb, err, D)
        r, c, ga, gb, err = grads(f, g, P)
        errors = cm.record(errors, it, err, 1)
        # Continuation: once this level is solved to level_tol, move to the next epsilon.
        advance = (e > eps) & (err <= level_tol)
        e_next = jnp.where(advance, jnp.maximum(eps, e * decay), e) if decay is not None else e
        P, D, r, c, ga, gb, err = lax.cond(
            advance, lambda: at_eps(f, g, e_next), lambda: (P, D, r, c, ga, gb, err))
        return it + 1, e_next, f, g, P, D, r, c, ga, gb, err, errors, nlin + k, ~ok

    e_start = eps0
    st = at_eps(f, g, eps0)
    if decay is not None:
        # Warm-up may already meet the level tolerance: step the continuation once.
        advance = (eps0 > eps) & (st[-1] <= level_tol)
        e_start = jnp.where(advance, jnp.maximum(eps, eps0 * decay), eps0)
        st = lax.cond(advance, lambda: at_eps(f, g, e_start), lambda: st)
    P, D, r, c, ga, gb, err = st
    errors = cm.record(errors, jnp.maximum(it - 1, 0), err, 1)
    init = (it, e_start, f, g, P, D, r, c, ga, gb, err, errors, jnp.zeros((), jnp.int32),
            jnp.array(False))
    s = lax.while_loop(cond, body, init)
    it, e, f, g, _, _, _, _, _, _, err, errors, nlin, _ = s

    def finish_at_target():
        # Stopped before the continuation reached eps (cap or stall): one Sinkhorn
        # sweep at the target eps makes the potentials consistent with it (finite
        # plan and dual) and gives their honest marginal error.
        never = -jnp.ones((), dtype)
        f2, g2, err2, _, _ = sinkhorn_sweeps(geom, a, b, eps, rho_a, rho_b, f, never, 1, 1, 1)
        return f2, g2, err2

    f, g, err = lax.cond(e > eps, finish_at_target, lambda: (f, g, err))
    finite = jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g))
    return f, g, (err, errors, it, (err <= tol) & (e <= eps) & finite, nlin)


def _solve(cost, a, b, epsilon, rho_a, rho_b, *, tol, max_iterations, warmup_iterations,
           cg_maxiter, max_backtracks, sparse, budget, threshold, implicit_maxiter,
           implicit_rtol, epsilon_scaling, epsilon_init, level_tol):
    if (rho_a is None) != (rho_b is None):
        raise ValueError("arguments `rho_a` and `rho_b` must both be given (unbalanced) or "
                         "both be None (balanced)")
    cost, a, b, epsilon, rho_a, rho_b = cm.validate(cost, a, b, epsilon, rho_a, rho_b)
    max_iterations = cm.check_positive_int(max_iterations, "max_iterations")
    warmup_iterations = cm.check_positive_int(warmup_iterations, "warmup_iterations")
    cg_maxiter = cm.check_positive_int(cg_maxiter, "cg_maxiter")
    max_backtracks = cm.check_positive_int(max_backtracks, "max_backtracks")
    dtype = a.dtype
    history = warmup_iterations + max_iterations
    tol = jnp.asarray(tol, dtype)
    thr = jnp.asarray(threshold, dtype)

    if epsilon_scaling is not None and not (0 < float(epsilon_scaling) < 1):
        raise ValueError(f"argument `epsilon_scaling` must be in (0, 1) or None, "
                         f"got {epsilon_scaling!r}")
    lvl = jnp.asarray(level_tol, dtype)

    def forward(cost, a, b, eps, rho_a, rho_b):
        decay = eps_init = None
        if epsilon_scaling is not None:
            decay = jnp.asarray(epsilon_scaling, dtype)
            eps_init = (0.1 * cm.mean_cost(cm._to_geom(cost)) if epsilon_init is None
                        else jnp.asarray(epsilon_init, dtype))
        f, g, aux = _newton(cost, a, b, eps, rho_a, rho_b, tol=tol,
                            max_iterations=max_iterations, warmup_iterations=warmup_iterations,
                            cg_maxiter=cg_maxiter, max_backtracks=max_backtracks, sparse=sparse,
                            budget=budget, threshold=thr, history=history, eps_init=eps_init,
                            decay=decay, level_tol=lvl * jnp.sum(a))
        return f, g, aux

    f, g, (err, errors, it, conv, nlin) = cm.with_implicit_diff(
        forward, cost, a, b, epsilon, rho_a, rho_b, implicit_maxiter, implicit_rtol)
    return cm.make_result(f, g, cost, a, b, epsilon, rho_a, rho_b, err, errors, it, conv, nlin)


def sinkhorn_newton(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    tol: float | jax.Array = 1e-6,
    max_iterations: int = 200,
    warmup_iterations: int = 20,
    cg_maxiter: int = 500,
    max_backtracks: int = 40,
    epsilon_scaling: float | None = 0.5,
    epsilon_init: float | jax.Array | None = None,
    level_tol: float | jax.Array = 1e-2,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_maxiter: int = 2000,
    implicit_rtol: float = 1e-10,
) -> cm.OTResult:
    r"""Sinkhorn–Newton: damped Newton on the entropic dual, matrix-free CG.

    After ``warmup_iterations`` Sinkhorn sweeps, each step solves

    .. math::
       \frac{1}{\varepsilon}\begin{pmatrix}\mathrm{diag}(P1) & P\\ P^\top & \mathrm{diag}(P^\top 1)
       \end{pmatrix}\begin{pmatrix}\delta f\\ \delta g\end{pmatrix} = \nabla D(f, g)

    by CG on the Schur complement in ``delta f`` (one product with ``P`` and one
    with ``P^T`` per CG iteration; inexact, relative residual
    ``min(0.1, sqrt(error))``). The constant (1, -1) null direction of the
    balanced Hessian is projected out of the CG residuals. A backtracking line
    search keeps ``D`` increasing; the plan it accepts is the next step's ``P``,
    so one ``n x m`` exponential pass per step (more only when it backtracks).

    Args:
      cost, a, b, epsilon, rho_a, rho_b: as in :func:`~subjax.ot.sinkhorn`
        (point clouds are materialised densely).
      tol: target marginal error ``|P1-a|_1 + |P^T1-b|_1``.
      max_iterations: cap on Newton steps (static).
      warmup_iterations: Sinkhorn sweeps before Newton (static; stops early at tol).
      cg_maxiter: cap on CG iterations per step (static).
      max_backtracks: line-search halvings before the step is declared failed.
      implicit_maxiter, implicit_rtol: CG settings of the implicit backward pass.

    Returns:
      :class:`~subjax.ot.OTResult` (``errors`` recorded every outer iteration,
      warm-up sweeps included; ``n_linear_iters`` the CG iterations).

    Example:
      >>> import jax
      >>> from subjax.ot import sinkhorn_newton, cost_matrix
      >>> x = jax.random.normal(jax.random.key(0), (50, 2))
      >>> out = sinkhorn_newton(cost_matrix(x, x + 1.0), epsilon=0.05, tol=1e-5)
      >>> bool(out.converged)
      True

    References:
      Brauer, Clason, Lorenz, Wirth, "A Sinkhorn-Newton method for entropic
      optimal transport", 2017.
    """
    return _solve(cost, a, b, epsilon, rho_a, rho_b, tol=tol, max_iterations=max_iterations,
                  warmup_iterations=warmup_iterations, cg_maxiter=cg_maxiter,
                  max_backtracks=max_backtracks, sparse=False, budget=0, threshold=0.0,
                  implicit_maxiter=implicit_maxiter, implicit_rtol=implicit_rtol,
                  epsilon_scaling=epsilon_scaling, epsilon_init=epsilon_init,
                  level_tol=level_tol)


def sparse_newton_sinkhorn(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    tol: float | jax.Array = 1e-6,
    max_iterations: int = 500,
    warmup_iterations: int = 20,
    row_budget: int = 16,
    threshold: float | jax.Array = 0.0,
    cg_maxiter: int = 1000,
    max_backtracks: int = 40,
    epsilon_scaling: float | None = 0.5,
    epsilon_init: float | jax.Array | None = None,
    level_tol: float | jax.Array = 1e-2,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_maxiter: int = 2000,
    implicit_rtol: float = 1e-10,
) -> cm.OTResult:
    r"""Sparse Newton Sinkhorn (SNS): Newton with a sparsified Hessian.

    Sinkhorn warm-up, then Newton steps in which the off-diagonal blocks of the
    Hessian use only the ``row_budget`` largest entries of each row of ``P``
    (entries below ``threshold`` times the row maximum dropped too); the diagonal
    blocks ``diag(P1), diag(P^T1)`` stay exact, so the sparsified Hessian remains
    positive semi-definite. CG products then cost ``O(n * row_budget)``. If the
    sparse step fails the line search, the dense Sinkhorn–Newton step is taken.

    Args:
      row_budget: entries kept per row (static, ``<= m``).
      threshold: relative per-row threshold in [0, 1) (traced).
      Others: as in :func:`~subjax.ot.sinkhorn_newton`.

    Returns:
      :class:`~subjax.ot.OTResult`.

    Example:
      >>> import jax
      >>> from subjax.ot import sparse_newton_sinkhorn, cost_matrix
      >>> x = jax.random.normal(jax.random.key(0), (50, 2))
      >>> out = sparse_newton_sinkhorn(cost_matrix(x, x + 1.0), epsilon=0.05, tol=1e-5)
      >>> bool(out.converged)
      True

    References:
      Tang, Shavlovsky, Rahmanian, Tardini, Thekumparampil, Xiao, Ying,
      "Accelerating Sinkhorn Algorithm with Sparse Newton Iterations", ICLR 2024.
    """
    shape = cost.shape if hasattr(cost, "shape") else jnp.shape(cost)
    m = shape[1] if len(shape) == 2 else 0
    row_budget = cm.check_positive_int(row_budget, "row_budget")
    if m and row_budget > m:
        raise ValueError(f"argument `row_budget`={row_budget} exceeds the number of columns m={m}")
    return _solve(cost, a, b, epsilon, rho_a, rho_b, tol=tol, max_iterations=max_iterations,
                  warmup_iterations=warmup_iterations, cg_maxiter=cg_maxiter,
                  max_backtracks=max_backtracks, sparse=True, budget=row_budget,
                  threshold=threshold, implicit_maxiter=implicit_maxiter,
                  implicit_rtol=implicit_rtol, epsilon_scaling=epsilon_scaling,
                  epsilon_init=epsilon_init, level_tol=level_tol)
