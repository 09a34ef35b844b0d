"""Sinkhorn–Newton and Sparse Newton Sinkhorn (SNS), dense or online.

Both maximise the concave dual ``D(f, g)`` with damped Newton steps after a short
Sinkhorn warm-up; a step is :func:`_newton_step` on a :class:`NewtonState` run by
the shared fixed-point loop. The Hessian products per CG iteration come from a
:class:`~subjax.ot._common.PlanOperator`:

- dense geometry: the plan ``P`` is computed once per outer step (the plan the
  previous line search accepted) and each CG iteration is two GEMVs; SNS keeps
  the ``k`` largest entries of each row of ``P`` (two sparse products);
- online geometry (a :class:`~subjax.ot.PointCloud` with ``block_size``): the
  plan is never held. Evaluating a point (both marginals, the dual) is one
  blockwise pass; Sinkhorn–Newton recomputes ``P v`` / ``P^T u`` block by block
  in every CG iteration; SNS selects the top-``k`` entries of each row in the
  evaluation pass that starts a continuation level, reads the plan's entries
  there from the potentials at each step (``O(n k)``, the missed mass added
  back as a rank-one term), and falls back to the blockwise exact step (and a
  new selection) only when the sparse step fails its line search.
  Memory ``O((n + m) k + block m)``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import LoopOutput, fixed_point_loop, is_concrete, static_int
from subjax.ot import _common as cm
from subjax.ot._sinkhorn import Prepared, all_finite, finish, guarded_problem, sinkhorn_loop

__all__ = ["sinkhorn_newton", "sparse_newton_sinkhorn"]


SLOW_STEPS = 4  # SNS online: sparse steps in a row without halving the error before an exact one


class Point(NamedTuple):
    """The dual at ``(f, g)``: what a Newton step needs, what the line search returns."""

    f: jax.Array
    g: jax.Array
    plan: Any  # the dense plan (local rows when sharded), or None when online
    rows: jax.Array  # P 1
    cols: jax.Array  # P^T 1
    dual: jax.Array  # D(f, g)
    ga: jax.Array  # grad_f D
    gb: jax.Array  # grad_g D
    err: jax.Array  # |grad D|_1


class NewtonState(NamedTuple):
    eps: jax.Array  # the current level of the epsilon continuation
    point: Point
    pattern: Any  # SNS: (rows, k) column indices of the sparse Hessian, else None
    n_linear: jax.Array  # CG iterations so far
    stalled: jax.Array  # the last line search failed
    slow: Any = 0  # SNS online: consecutive sparse steps that did not halve the error
    cert: Any = None  # the point's certified error (Certified.none() if not evaluated)


class LineSearchState(NamedTuple):
    t: jax.Array
    ok: jax.Array
    point: Point


class Options(NamedTuple):
    """Settings of a Newton run (all static but ``threshold``)."""

    sparse: bool
    materialize: bool
    budget: int
    cg_max_iters: int
    max_backtracks: int
    threshold: Any = 0.0


def evaluate(prob: cm.Problem, f, g, eps, opts: Options, select: bool = False):
    """:class:`Point` at ``(f, g)`` and epsilon ``eps``: one pass over the plan.

    With ``select``, ``(point, pattern)``: SNS's sparsity pattern at the point
    (:func:`sparsity_pattern`) selected in the same pass.
    """
    geom, la, lb = prob.geom, prob.log_a, prob.log_b
    P = pattern = None
    if opts.materialize:
        P = geom.plan(f, g, la, lb, eps)
        op = cm.dense_operator(geom, P)
        rows, cols = op.rows, op.cols
        if select:
            pattern = _select(P, opts.budget)
    elif select:
        rows, cols, pattern = geom.plan_marginals(f, g, la, lb, eps,
                                                  lambda p: _select(p, opts.budget))
    else:
        rows, cols = geom.plan_marginals(f, g, la, lb, eps)
    pe = prob._replace(epsilon=eps)
    dual = cm.dual_value(pe, f, g, geom.row_sum(rows))
    ga, gb, err = cm.marginal_error(pe, f, g, rows, cols)
    pt = Point(f, g, P, rows, cols, dual, ga, gb, err)
    return (pt, pattern) if select else pt


def restart(prob: cm.Problem, pt: Point, eps, opts: Options, select: bool = False):
    """The point at a new continuation level ``eps``: ``g`` re-fitted to ``f`` (one
    column half-sweep, so the column marginal is exact) before evaluating
    (with ``select``, also the new level's sparsity pattern, in the same pass).

    Lowering epsilon at fixed potentials can scale the plan by orders of
    magnitude; Newton would spend several damped steps undoing that."""
    g = cm.lam(prob.rho_b, eps) * prob.geom.col_lse(pt.f, prob.log_a, eps)
    return evaluate(prob, pt.f, g, eps, opts, select)


def _top_k_indices(q, k: int):
    """Column indices of the ``k`` largest entries of each row of ``q``, largest first.

    Two-level selection (XLA's ``top_k`` costs far more per entry than an
    exponential): cut each row into buckets of ``s ~ sqrt(m / k)`` columns, keep
    the ``k`` buckets with the largest maxima (every entry among the row's ``k``
    largest lies in one of them) and select among their ``k s`` entries. Equal to
    ``lax.top_k`` up to the order of ties.
    """
    r, m = q.shape
    s = max(1, round((m / k) ** 0.5))
    n_buckets = -(-m // s)
    if n_buckets <= k or k * s >= m:
        return lax.top_k(q, k)[1]
    pad = jnp.full((r, n_buckets * s - m), -jnp.inf, q.dtype)
    buckets = jnp.concatenate([q, pad], axis=1).reshape(r, n_buckets, s)
    _, top_buckets = lax.top_k(jnp.max(buckets, axis=2), k)  # (r, k)
    cand = jnp.take_along_axis(buckets, top_buckets[:, :, None], axis=1).reshape(r, k * s)
    _, pos = lax.top_k(cand, k)
    return jnp.take_along_axis(top_buckets, pos // s, axis=1) * s + pos % s


def _select(p, budget: int):
    """The pattern of a block of plan rows, selected on a float32 copy (XLA's
    top-k is far slower in float64)."""
    return _top_k_indices(p.astype(jnp.float32), budget)


def sparsity_pattern(prob: cm.Problem, pt: Point, eps, budget: int):
    """Column indices of the ``budget`` largest entries of each row of the plan at
    ``pt`` (one blockwise pass online)."""
    if pt.plan is not None:
        return _select(pt.plan, budget)
    return prob.geom.plan_map(pt.f, pt.g, prob.log_a, prob.log_b, eps,
                              lambda p, _: _select(p, budget))


def sparse_operator(geom, vals, idx, m: int, rows, cols):
    """``P v``, ``P^T u`` of a plan given by ``k`` entries per row.

    With the plan's exact marginals ``rows``, ``cols``, the mass the pattern
    misses (``r = rows - vals 1`` by row, ``c = cols - vals^T 1`` by column) is
    added back as the rank-one plan ``r c^T / sum(r)``: the operator's plan then
    has the exact marginals (so the sparsified Hessian keeps the null direction
    of the exact one) at ``O(n + m)`` more per product.
    """
    ax = geom.axis_name
    psum = (lambda x: x) if ax is None else (lambda x: lax.psum(x, ax))

    def scatter(u):
        return psum(jnp.zeros((m,), vals.dtype).at[idx].add(vals * u[:, None]))

    sparse_mv = lambda v: jnp.sum(vals * v[idx], axis=1)
    r = jnp.maximum(rows - jnp.sum(vals, axis=1), 0)
    c = jnp.maximum(cols - scatter(jnp.ones_like(rows)), 0)
    mass = geom.row_sum(r)
    scale = jnp.where(mass > 0, 1 / jnp.where(mass > 0, mass, 1), 0)
    mv = lambda v: sparse_mv(v) + r * (scale * jnp.vdot(c, v))
    rmv = lambda u: scatter(u) + c * (scale * geom.row_sum(r * u))

    return mv, rmv


def _exact_operator(prob: cm.Problem, pt: Point, eps, opts: Options):
    """The exact Hessian products ``(Pv, PTu, Psq)`` at ``pt``: two GEMVs on the held
    plan, or two blockwise passes over the plan online. ``Psq`` (the Schur-diagonal
    preconditioner of :func:`~subjax.ot._common.newton_solve`, one pass over the
    held plan per step) only with the plan held: online it would cost a pass over
    the plan per step, and in float32 at tolerance 1e-3, where CG stops at a
    loose relative residual, it saved no iterations (the same holds for SNS's
    sparse operator)."""
    if opts.materialize:
        if pt.plan.dtype == jnp.float64 and pt.plan.size >= MIXED_MIN_SIZE:
            return _mixed_operator(prob.geom, pt.plan)
        op = cm.dense_operator(prob.geom, pt.plan)
        return op.matvec, op.rmatvec, op.sq_matvec
    op = cm.plan_operator(prob, pt.f, pt.g, eps, materialize=False)
    return op.matvec, op.rmatvec, None


MIXED_MIN_SIZE = 1 << 18  # float64 plans with this many entries: float32 CG products


def _mixed_operator(geom, P):
    """The products of a float64 plan held in float32 (half the memory traffic of a
    GEMV). Only the Newton direction sees them: it is inexact anyway (CG's relative
    residual is ``>= sqrt(error)``, far above float32's rounding until the error is
    ``1e-12``), while the line search, the marginals and the reported error stay
    in float64."""
    P32 = P.astype(jnp.float32)
    op = cm.dense_operator(geom, P32)
    # Psq stays in float32: its dtype tells newton_solve the products' precision
    return (lambda v: op.matvec(v.astype(jnp.float32)).astype(P.dtype),
            lambda u: op.rmatvec(u.astype(jnp.float32)).astype(P.dtype),
            lambda w: op.sq_matvec(w.astype(jnp.float32)))


def _sparse_operator(prob: cm.Problem, pt: Point, eps, opts: Options, pattern):
    """SNS's Hessian products at ``pt``: the plan's entries at ``pattern``
    (recomputed from the potentials: ``O(n k)``, no pass over the plan; entries
    below ``threshold`` times the largest of their row dropped) plus the missed
    mass as a rank-one term (:func:`sparse_operator`)."""
    geom = prob.geom
    vals = geom.plan_entries(pt.f, pt.g, prob.log_a, prob.log_b, eps, pattern)
    vals = jnp.where(vals >= opts.threshold * jnp.max(vals, axis=1, keepdims=True), vals, 0)
    return (*sparse_operator(geom, vals, pattern, pt.g.shape[0], pt.rows, pt.cols), None)


def _direction(prob: cm.Problem, pt: Point, eps, ops, cg_max_iters):
    """Inexact Newton direction (relative residual ``min(0.1, sqrt(err))``) and slope."""
    a, b, geom = prob.a, prob.b, prob.geom
    tiny = jnp.finfo(pt.f.dtype).tiny
    dr = pt.rows + eps * cm.d2phi(pt.f, a, prob.rho_a)
    dc = pt.cols + eps * cm.d2phi(pt.g, b, prob.rho_b)
    rtol = jnp.minimum(jnp.asarray(0.1, pt.f.dtype), jnp.sqrt(pt.err))
    Pv, PTu, Psq = ops
    df, dg, k = cm.newton_solve(geom, Pv, PTu, dr, dc, eps * pt.ga, eps * pt.gb, rtol,
                                cg_max_iters, prob.balanced, Psq)
    slope_of = lambda df, dg: geom.row_sum(pt.ga * df) + jnp.sum(pt.gb * dg)
    slope = slope_of(df, dg)
    # CG in finite precision on a nearly singular system can return a direction
    # that is not ascent; then take the diagonally scaled gradient (always ascent).
    bad = ~(jnp.isfinite(slope) & (slope > 0))
    df = jnp.where(bad, eps * pt.ga / jnp.maximum(dr, tiny), df)
    dg = jnp.where(bad, eps * pt.gb / jnp.maximum(dc, tiny), dg)
    return df, dg, jnp.where(bad, slope_of(df, dg), slope), k


def _line_search(prob: cm.Problem, pt: Point, df, dg, slope, eps, opts: Options, c1=1e-4):
    """Backtracking (Armijo) on ``D(f + t df, g + t dg)``, ``t = 1, 1/2, ...``.

    Accepts the first ``t`` with a finite dual that increases by ``c1 t slope``.
    Near the solution the increase falls below the rounding of ``D`` (a sum of
    ``n m`` terms); there a step is also accepted if ``D`` does not decrease beyond
    that rounding level and the marginal error decreases.
    Returns ``(ok, point)`` (the old point if not ok).
    """
    dtype = pt.f.dtype
    geom = prob.geom
    mach = jnp.finfo(dtype).eps
    scale = (jnp.abs(pt.dual) + jnp.abs(cm.phi(pt.f, prob.a, prob.rho_a, geom))
             + jnp.abs(cm.phi(pt.g, prob.b, prob.rho_b, None)))
    n_terms = geom.row_sum(jnp.ones_like(pt.f)) + pt.g.shape[0]

    def step(s: LineSearchState, it):
        t = s.t / 2
        new = evaluate(prob, pt.f + t * df, pt.g + t * dg, eps, opts)
        armijo = new.dual >= pt.dual + c1 * t * slope - 16 * mach * scale
        rounding = (new.dual >= pt.dual - 16 * n_terms * mach * scale) & (new.err < pt.err)
        ok = jnp.isfinite(new.dual) & jnp.isfinite(new.err) & (armijo | rounding)
        return LineSearchState(t, ok, new), jnp.zeros((), dtype)

    init = LineSearchState(jnp.asarray(2.0, dtype), jnp.array(False), pt)
    out = fixed_point_loop(step, init, max_iters=opts.max_backtracks + 1,
                           stop=lambda s, _: s.ok, dtype=dtype, history=1,
                           stop_on_nonfinite=False)
    ok = out.state.ok
    return ok, jax.tree_util.tree_map(lambda new, old: jnp.where(ok, new, old),
                                      out.state.point, pt)


def _certify_if_met(prob: cm.Problem, pt: Point, eps, eps_target, tol):
    """The convergence test's evaluation (:func:`~subjax.ot._common.certify`) of a
    point at the target epsilon whose marginal error meets ``tol``; else none."""
    return lax.cond((eps <= eps_target) & (pt.err <= tol),
                    lambda: cm.certify(prob, pt.f, pt.g, eps, pt.plan),
                    lambda: cm.Certified.none(pt.f.dtype))


def _newton_step(prob: cm.Problem, s: NewtonState, opts: Options, eps_target, decay,
                 level_tol, tol):
    """One damped Newton step at the current level, then the continuation."""
    pt, e = s.point, s.eps

    def update(ops):
        df, dg, slope, k = _direction(prob, pt, e, ops, opts.cg_max_iters)
        ok, new = _line_search(prob, pt, df, dg, slope, e, opts)
        return ok, new, k

    refresh = jnp.array(False)
    if opts.sparse:
        ok, new, k = update(_sparse_operator(prob, pt, e, opts, s.pattern))
        # A failed sparse step is replaced by the exact step, and a new pattern is
        # selected. With the plan held, an exact CG product is two GEMVs: the sparse
        # step fails when it does not halve the marginal error. Online it is two
        # passes over the plan: the sparse step fails only when its line search does.
        # Online, after SLOW_STEPS such steps in a row the exact step is taken
        # (a poor pattern would otherwise leave only linear convergence).
        halved = new.err < 0.5 * pt.err
        if opts.materialize:
            refresh = ~(ok & halved)
        else:
            refresh = ~ok | (~halved & (s.slow + 1 >= SLOW_STEPS))
        slow = jnp.where(refresh | halved, 0, s.slow + 1)

        def exact():
            ok2, new2, k2 = update(_exact_operator(prob, pt, e, opts))
            return ok2, new2, k + k2

        ok, new, k = lax.cond(refresh, exact, lambda: (ok, new, k))
    else:
        ok, new, k = update(_exact_operator(prob, pt, e, opts))
        slow = s.slow
    recorded = new.err
    pattern = s.pattern
    keep = lambda: pattern
    if opts.sparse:
        keep = lambda: lax.cond(refresh, lambda: sparsity_pattern(prob, new, e, opts.budget),
                                lambda: pattern)
    if decay is not None:
        # Continuation: once this level is solved to level_tol, move to the next epsilon
        # (a new level's pattern is selected in its restart's evaluation pass).
        advance = (e > eps_target) & (new.err <= level_tol)
        e_next = jnp.where(advance, jnp.maximum(eps_target, e * decay), e)
        if opts.sparse:
            new, pattern = lax.cond(advance, lambda: restart(prob, new, e_next, opts, True),
                                    lambda: (new, keep()))
        else:
            new = lax.cond(advance, lambda: restart(prob, new, e_next, opts), lambda: new)
        slow = jnp.where(advance, 0, slow)
        e = e_next
    else:
        pattern = keep()
    cert = _certify_if_met(prob, new, e, eps_target, tol)
    return NewtonState(e, new, pattern, s.n_linear + k, ~ok, slow, cert), recorded


def newton_run(prob: cm.Problem, *, tol, max_iters: int, warmup_steps: int, opts: Options,
               eps_init, decay, level_tol):
    """Warm-up Sinkhorn, then Newton steps to ``tol`` at ``prob.epsilon``.

    Returns ``(f, g, error, errors, n_iters, converged, n_linear)``.
    """
    eps = prob.epsilon
    dtype = prob.a.dtype

    # Warm-up: Sinkhorn at the first epsilon of the continuation (eps itself if none).
    eps0 = eps if decay is None else jnp.maximum(eps, eps_init)
    warm_tol = jnp.where(eps0 > eps, jnp.maximum(tol, level_tol), tol)
    warm = sinkhorn_loop(prob._replace(epsilon=eps0), jnp.zeros_like(prob.a), tol=warm_tol,
                         max_iters=warmup_steps, history=warmup_steps, certified=False)
    # SNS: the pattern at the warm-up's point is selected in the pass that evaluates it
    pt, pattern = (evaluate(prob, warm.f, warm.g, eps0, opts, True) if opts.sparse
                   else (evaluate(prob, warm.f, warm.g, eps0, opts), None))
    e_start = eps0
    if decay is not None:
        # Warm-up may already meet the level tolerance: step the continuation once.
        advance = (eps0 > eps) & (pt.err <= level_tol)
        e_start = jnp.where(advance, jnp.maximum(eps, eps0 * decay), eps0)
        if opts.sparse:
            pt, pattern = lax.cond(advance, lambda: restart(prob, pt, e_start, opts, True),
                                   lambda: (pt, pattern))
        else:
            pt = lax.cond(advance, lambda: restart(prob, pt, e_start, opts), lambda: pt)
    cert0 = _certify_if_met(prob, pt, e_start, eps, tol)
    init = NewtonState(e_start, pt, pattern, jnp.zeros((), jnp.int32), jnp.array(False),
                       jnp.zeros((), jnp.int32), cert0)
    step = lambda s, it: _newton_step(prob, s, opts, eps, decay, level_tol, tol)
    stop = lambda s, _: (s.cert.met <= tol) | s.stalled
    skip = LoopOutput(init, jnp.zeros((), jnp.int32), pt.err, -jnp.ones((max_iters,), dtype))
    out = lax.cond(
        cert0.met <= tol, lambda: skip,
        lambda: fixed_point_loop(step, init, max_iters=max_iters, stop=stop, dtype=dtype,
                                 history=max_iters, stop_on_nonfinite=False))
    s = out.state
    f, g = s.point.f, s.point.g

    # one history: warm-up sweeps (the last one replaced by the error at the first
    # Newton level), then the Newton steps
    it_w = warm.n_iters
    errors = jnp.concatenate([warm.errors, -jnp.ones((max_iters,), dtype)])
    errors = errors.at[jnp.maximum(it_w - 1, 0)].set(pt.err)
    errors = lax.dynamic_update_slice(errors, out.errors, (it_w,))

    def finish_at_target():
        # Stopped before the continuation reached eps (cap or stall): one Sinkhorn
        # sweep at the target eps makes the potentials consistent with it (finite
        # plan and dual) and gives their honest marginal error.
        run = sinkhorn_loop(prob, f, tol=-jnp.ones((), dtype), max_iters=1)
        return run.f, run.g, run.error, run.met

    def at_target():
        # the reported error is the convergence test's evaluation (made now if the
        # run stopped before its error met tol)
        cert = lax.cond(jnp.isfinite(s.cert.error), lambda: s.cert,
                        lambda: cm.certify(prob, f, g, eps, s.point.plan))
        return f, g, cert.error, cert.met

    f, g, err, met = lax.cond(s.eps > eps, finish_at_target, at_target)
    conv = (met <= tol) & (s.eps <= eps) & all_finite(prob.geom, f, g)
    return f, g, err, errors, it_w + out.n_iters, conv, s.n_linear


def prepare_newton(cost, a, b, epsilon, rho_a, rho_b, *, tol, max_iters, warmup_steps,
                   cg_max_iters, max_backtracks, sparse, budget, threshold, implicit_max_iters,
                   implicit_rtol, epsilon_scaling, epsilon_init, level_tol,
                   axis_name) -> Prepared:
    """Validate a Newton / SNS call and build its forward pass."""
    eps_checked = is_concrete(epsilon)
    cost, a, b, epsilon, rho_a, rho_b = cm.validate(
        cost, a, b, epsilon, rho_a, rho_b, epsilon_scaling=epsilon_scaling,
        epsilon_init=epsilon_init, axis_name=axis_name)
    max_iters = static_int(max_iters, "max_iters", minimum=1)
    warmup_steps = static_int(warmup_steps, "warmup_steps", minimum=1)
    cg_max_iters = static_int(cg_max_iters, "cg_max_iters", minimum=1)
    max_backtracks = static_int(max_backtracks, "max_backtracks", minimum=1)
    implicit_max_iters = static_int(implicit_max_iters, "implicit_max_iters", minimum=1)
    dtype = a.dtype
    tol = jnp.asarray(tol, dtype)
    thr = jnp.asarray(threshold, dtype)
    lvl = jnp.asarray(level_tol, dtype)
    online = cm.to_geometry(cost).is_online
    opts = Options(sparse=sparse, materialize=not online, budget=budget,
                   cg_max_iters=cg_max_iters, max_backtracks=max_backtracks, threshold=thr)

    def forward(cost, a, b, eps, rho_a, rho_b):
        prob, eps_ok = guarded_problem(cost, a, b, eps, rho_a, rho_b, checked=eps_checked,
                                       axis_name=axis_name)
        decay = eps_init = None
        if epsilon_scaling is not None:
            decay = jnp.asarray(epsilon_scaling, dtype)
            eps_init = (0.1 * prob.geom.mean_cost() if epsilon_init is None
                        else jnp.asarray(epsilon_init, dtype))
        f, g, err, errors, it, conv, nlin = newton_run(
            prob, tol=tol, max_iters=max_iters, warmup_steps=warmup_steps, opts=opts,
            eps_init=eps_init, decay=decay,
            level_tol=lvl * prob.geom.row_sum(prob.a))
        return f, g, (err, errors, it, conv, nlin, eps_ok, prob.epsilon)

    implicit = dict(implicit_max_iters=implicit_max_iters, implicit_rtol=implicit_rtol,
                    materialize=not online)
    return Prepared((cost, a, b, epsilon, rho_a, rho_b), forward, implicit)


_SHARED_ARGS = """      cost, a, b, epsilon, rho_a, rho_b, axis_name: as in
        :func:`~subjax.ot.sinkhorn`.
        A :class:`~subjax.ot.PointCloud` with ``block_size`` runs online (never
        holds the plan); other geometries use the dense plan.
      tol: target marginal error ``|P1-a|_1 + |P^T1-b|_1``.
      max_iters: cap on Newton steps (static).
      warmup_steps: cap on Sinkhorn sweeps before Newton (static; stops early at
        tol, or at ``level_tol`` when the continuation starts above epsilon).
      cg_max_iters: cap on CG iterations per step (static).
      max_backtracks: line-search halvings before the step is declared failed.
      epsilon_scaling, epsilon_init, level_tol: epsilon continuation: start at
        ``epsilon_init`` (default 0.1 x mean cost), solve each level to marginal
        error ``level_tol`` (relative to the mass), multiply epsilon by
        ``epsilon_scaling``; ``None`` solves at epsilon directly.
      implicit_max_iters, implicit_rtol: CG settings of the implicit backward pass.
"""


def sinkhorn_newton(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    tol: float | jax.Array = 1e-6,
    max_iters: int = 200,
    warmup_steps: int = 5,
    cg_max_iters: int = 500,
    max_backtracks: int = 40,
    epsilon_scaling: float | None = 0.5,
    epsilon_init: float | jax.Array | None = None,
    level_tol: float | jax.Array = 1e-2,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_max_iters: int = 2000,
    implicit_rtol: float = 1e-10,
    axis_name: str | None = None,
) -> cm.OTResult:
    r"""Sinkhorn–Newton: damped Newton on the entropic dual, matrix-free CG.

    After at most ``warmup_steps`` Sinkhorn sweeps, each step solves

    .. math::
       \frac{1}{\varepsilon}\begin{pmatrix}\mathrm{diag}(P1) & P\\ P^\top & \mathrm{diag}(P^\top 1)
       \end{pmatrix}\begin{pmatrix}\delta f\\ \delta g\end{pmatrix} = \nabla D(f, g)

    by CG on the Schur complement in ``delta g`` (one product with ``P`` and one
    with ``P^T`` per CG iteration; inexact, relative residual
    ``min(0.1, sqrt(error))``). The constant (1, -1) null direction of the
    balanced Hessian is projected out. A backtracking line search keeps ``D``
    increasing; the plan it accepts is the next step's ``P``, so one ``n x m``
    exponential pass per step (more only when it backtracks). Online (a
    :class:`~subjax.ot.PointCloud` with ``block_size``), every CG product
    recomputes the plan block by block instead: exact, memory
    ``O(block_size * m)``, but one exponential pass per CG iteration —
    :func:`sparse_newton_sinkhorn` is the faster online solver.

    Args:
    {args}
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
    return finish(prepare_newton(
        cost, a, b, epsilon, rho_a, rho_b, tol=tol, max_iters=max_iters,
        warmup_steps=warmup_steps, cg_max_iters=cg_max_iters, max_backtracks=max_backtracks,
        sparse=False, budget=0, threshold=0.0, implicit_max_iters=implicit_max_iters,
        implicit_rtol=implicit_rtol, epsilon_scaling=epsilon_scaling, epsilon_init=epsilon_init,
        level_tol=level_tol, axis_name=axis_name), axis_name=axis_name)


def sparse_newton_sinkhorn(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    tol: float | jax.Array = 1e-6,
    max_iters: int = 500,
    warmup_steps: int = 20,
    row_budget: int | None = None,
    threshold: float | jax.Array = 0.0,
    cg_max_iters: int = 1000,
    max_backtracks: int = 40,
    epsilon_scaling: float | None = 0.3,
    epsilon_init: float | jax.Array | None = None,
    level_tol: float | jax.Array = 5e-2,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_max_iters: int = 2000,
    implicit_rtol: float = 1e-10,
    axis_name: str | None = None,
) -> cm.OTResult:
    r"""Sparse Newton Sinkhorn (SNS): Newton with a sparsified Hessian.

    Sinkhorn warm-up, then Newton steps in which the off-diagonal blocks of the
    Hessian use only the ``row_budget`` largest entries of each row of ``P``
    (entries below ``threshold`` times the row maximum dropped too) plus the
    mass they miss as one rank-one term, so the sparsified plan has the exact
    marginals: the Hessian stays positive semi-definite with the exact one's
    null direction. CG products then cost ``O((n + m) * row_budget)``. The
    pattern is selected once per continuation level. With a dense cost a sparse
    step that fails the line search or does not halve the marginal error is
    replaced by the exact Sinkhorn–Newton step. Online (a
    :class:`~subjax.ot.PointCloud` with ``block_size``) only a failed line search
    does, or four sparse steps in a row that do not halve the error (an exact CG
    product is two passes over the plan there); the pattern
    is selected in the pass that evaluates a new level's first point, and each
    line-search trial is one blockwise pass: the plan is never held.

    Args:
      row_budget: entries kept per row (static, ``<= m``; default ``min(64, m)``).
      threshold: relative per-row threshold in [0, 1) (traced).
    {args}
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
    if row_budget is None:
        row_budget = min(64, m) if m else 64
    row_budget = static_int(row_budget, "row_budget", minimum=1)
    if m and row_budget > m:
        raise ValueError(f"argument `row_budget`={row_budget} exceeds the number of columns m={m}")
    return finish(prepare_newton(
        cost, a, b, epsilon, rho_a, rho_b, tol=tol, max_iters=max_iters,
        warmup_steps=warmup_steps, cg_max_iters=cg_max_iters, max_backtracks=max_backtracks,
        sparse=True, budget=row_budget, threshold=threshold,
        implicit_max_iters=implicit_max_iters, implicit_rtol=implicit_rtol,
        epsilon_scaling=epsilon_scaling, epsilon_init=epsilon_init, level_tol=level_tol,
        axis_name=axis_name), axis_name=axis_name)


for _fn in (sinkhorn_newton, sparse_newton_sinkhorn):
    _fn.__doc__ = _fn.__doc__.replace("    {args}\n", _SHARED_ARGS)
del _fn
