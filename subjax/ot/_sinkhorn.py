"""Log-domain Sinkhorn with epsilon scaling and KL-relaxed (unbalanced) marginals."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import fixed_point_loop, is_concrete, static_int
from subjax.ot import _common as cm
from subjax.ot._geometry import to_geometry

__all__ = ["sinkhorn"]


class SinkhornState(NamedTuple):
    """State of the Sinkhorn loop.

    ``(f_pair, g)`` is the certified pair: ``g`` is the exact column update for
    ``f_pair`` and ``row_err`` the row marginal error of the pair. ``f`` is the
    next row potential (the row update for ``g``).
    """

    f: jax.Array
    f_pair: jax.Array
    g: jax.Array
    eps: jax.Array
    row_err: jax.Array
    cert: cm.Certified  # the pair's certified error, or Certified.none() if not evaluated


class SinkhornRun(NamedTuple):
    f: jax.Array
    g: jax.Array
    error: jax.Array
    n_iters: jax.Array
    errors: jax.Array
    at_target: jax.Array
    met: jax.Array  # error plus its rounding bound (the convergence test)


def _nan_to_inf(x):
    return jnp.where(jnp.isnan(x), jnp.inf, x)


def column_error(prob: cm.Problem, f, g, eps):
    """``|phi_b'(g) - P^T 1|_1`` at ``(f, g)``: one column pass over the geometry."""
    cols = prob.geom.plan_rmatvec(f, g, prob.log_a, prob.log_b, eps, jnp.ones_like(f))
    return _nan_to_inf(jnp.sum(jnp.abs(cm.dphi(g, prob.b, prob.rho_b) - cols)))


def sinkhorn_loop(prob: cm.Problem, f0, *, tol, max_iters: int, record_every: int = 1,
                  history: int | None = None, eps_init=None, decay=None,
                  certified: bool = True) -> SinkhornRun:
    """The Sinkhorn sweeps on :func:`subjax._core.fixed_point_loop`.

    One sweep: ``g <- T_g(f)`` (columns exact), then ``f_hat <- T_f(g)``. The row
    marginal of ``(f, g)`` is ``a_i exp((f_i - f_hat_i)/eps)``, so its error costs
    nothing extra. Once it meets ``tol`` at the target epsilon, the pair's error is
    evaluated by one pass over the plan (:func:`~subjax.ot._common.certify`, both
    marginals), and the loop stops when that error plus its rounding bound is
    ``<= tol``; the returned ``error`` is always that evaluation. With
    ``certified=False`` (a warm-up) the pass measures the column error only, with
    the matrix-form costs, and the loop stops when row + column error ``<= tol``.
    With epsilon scaling, sweep ``t`` uses ``max(eps, eps_init * decay**t)`` and
    stopping counts only at the target.
    """
    a, b, eps_t = prob.a, prob.b, prob.epsilon
    geom, log_a, log_b = prob.geom, prob.log_a, prob.log_b
    dtype = a.dtype
    none = cm.Certified.none(dtype)

    def eps_at(it):
        if decay is None:
            return eps_t
        return jnp.maximum(eps_t, eps_init * decay ** it.astype(dtype))

    def at_target(eps):
        return jnp.array(True) if decay is None else eps <= eps_t

    def check(f, g, eps, row):
        if certified:
            return cm.certify(prob, f, g, eps)
        return cm.Certified(row + column_error(prob, f, g, eps), jnp.zeros((), dtype))

    def step(s: SinkhornState, it):
        eps = eps_at(it)
        g = cm.lam(prob.rho_b, eps) * geom.col_lse(s.f, log_a, eps)
        f_hat = geom.row_lse(g, log_b, eps)
        # grad_f D at (f, g):  phi_a'(f) - P1,  P1 = a exp((f - f_hat)/eps)
        ratio = jnp.exp((s.f - f_hat) / eps)
        grad = jnp.where(a > 0, cm.dphi(s.f, a, prob.rho_a) - a * ratio, 0)
        row = _nan_to_inf(geom.row_sum(jnp.abs(grad)))
        cert = lax.cond((row <= tol) & at_target(eps), lambda: check(s.f, g, eps, row),
                        lambda: none)
        err = jnp.where(jnp.isfinite(cert.error), cert.error, row)
        return SinkhornState(cm.lam(prob.rho_a, eps) * f_hat, s.f, g, eps, row, cert), err

    init = SinkhornState(f0, f0, jnp.zeros(b.shape, dtype), jnp.asarray(eps_t, dtype),
                         jnp.array(jnp.inf, dtype), none)
    out = fixed_point_loop(step, init, max_iters=max_iters,
                           stop=lambda s, _: at_target(s.eps) & (s.cert.met <= tol),
                           dtype=dtype, record_every=record_every, history=history,
                           stop_on_nonfinite=False)
    s = out.state
    cert = lax.cond(jnp.isfinite(s.cert.error), lambda: s.cert,
                    lambda: check(s.f_pair, s.g, s.eps, s.row_err))
    return SinkhornRun(s.f_pair, s.g, cert.error, out.n_iters, out.errors, at_target(s.eps),
                       cert.met)


def guarded_problem(cost, a, b, eps, rho_a, rho_b, *, checked: bool, axis_name=None):
    """The :class:`Problem` to run, and whether its epsilon is valid.

    A traced epsilon (``checked=False``) that is not finite and positive is
    replaced by the mean cost so the run stays finite; the solver then reports
    ``converged=False`` and ``error=inf``.
    """
    geom = to_geometry(cost, axis_name)
    if checked:
        return cm.Problem(geom, a, b, eps, rho_a, rho_b), jnp.array(True)
    ok, eps_run = cm.epsilon_guard(eps, geom.mean_cost())
    return cm.Problem(geom, a, b, eps_run, rho_a, rho_b), ok


class Prepared(NamedTuple):
    """A validated solver call, before it runs.

    ``forward(cost, a, b, epsilon, rho_a, rho_b) -> (f, g, aux)`` runs the solver
    (inside ``shard_map`` when it was prepared with ``axis_name``); ``implicit``
    holds the settings of the backward pass.
    """

    args: tuple  # (cost, a, b, epsilon, rho_a, rho_b), validated
    forward: Callable
    implicit: dict


def finish(prep: Prepared, forward: Callable | None = None, axis_name=None) -> cm.OTResult:
    """Run ``forward`` (default ``prep.forward``) with implicit differentiation.

    ``axis_name`` is the row axis the backward pass runs on (``None``: on the
    whole arrays, which is how :mod:`subjax.parallel` differentiates its
    ``shard_map``-ed forward passes).
    """
    cost, a, b, epsilon, rho_a, rho_b = prep.args
    f, g, (err, errors, it, conv, nlin, eps_ok, eps_run) = cm.with_implicit_diff(
        prep.forward if forward is None else forward, *prep.args, axis_name=axis_name,
        **prep.implicit)
    eps = jnp.where(eps_ok, epsilon, eps_run)
    err = jnp.where(eps_ok, err, jnp.inf)
    return cm.make_result(f, g, cost, a, b, eps, rho_a, rho_b, err, errors, it,
                          conv & eps_ok, nlin)


def all_finite(geom, f, g):
    bad = geom.row_sum(jnp.sum(~jnp.isfinite(f))) + jnp.sum(~jnp.isfinite(g))
    return bad == 0


def sinkhorn(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    tol: float | jax.Array = 1e-6,
    max_iters: int = 10_000,
    record_every: int = 10,
    epsilon_scaling: float | None = None,
    epsilon_init: float | jax.Array | None = None,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_max_iters: int = 2000,
    implicit_rtol: float = 1e-10,
    axis_name: str | None = None,
) -> cm.OTResult:
    r"""Log-domain Sinkhorn for (unbalanced) entropic optimal transport.

    Alternating exact maximisation of the dual ``D(f, g)`` (see
    :class:`~subjax.ot.OTResult`):

    .. math::
       g_j \leftarrow -\lambda_b\,\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon},\qquad
       f_i \leftarrow -\lambda_a\,\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon},

    ``lambda = rho / (rho + eps)`` (1 in the balanced problem). Every update is a
    stabilised log-sum-exp over rows of the geometry (a dense cost is kept in
    both layouts; a :class:`~subjax.ot.PointCloud` is evaluated blockwise), so
    float32 at tiny epsilon stays finite and reports ``converged=False`` if it
    stalls. Stops when the marginal error ``|P1 - a|_1 + |P^T1 - b|_1`` is
    ``<= tol`` or after ``max_iters`` sweeps.

    Args:
      cost: ``(n, m)`` cost matrix or a geometry (:class:`~subjax.ot.Dense`,
        :class:`~subjax.ot.PointCloud`, blockwise).
      a, b: marginal weights (default uniform). Balanced: same total mass.
      epsilon: regularisation ``> 0`` (absolute; scale it by the mean cost yourself).
        Checked when concrete; a traced value that is not finite and positive
        gives ``converged=False``, ``error=inf`` and finite potentials.
      tol: target marginal error (traced).
      max_iters: cap on sweeps (static).
      record_every: the error history records every this many sweeps (static).
      epsilon_scaling: decay factor in (0, 1) for epsilon annealing, or ``None``.
      epsilon_init: starting epsilon for annealing (default: the mean cost).
      rho_a, rho_b: KL marginal relaxation strengths (unbalanced OT); ``None`` =
        hard constraint. Give both or neither.
      implicit_max_iters, implicit_rtol: CG settings of the implicit backward pass.
      axis_name: inside ``jax.shard_map``, the mesh axis the rows of ``cost`` (and
        ``a``) are split over; ``b`` is replicated. Reductions over rows are summed
        across it (see :func:`subjax.parallel.sharded_sinkhorn`).

    Returns:
      :class:`~subjax.ot.OTResult`; ``errors`` slot ``k`` holds the row marginal
      error of sweep ``k * record_every`` (plus its column error once the row error
      meets ``tol`` at the target epsilon).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.ot import sinkhorn, cost_matrix
      >>> x = jax.random.normal(jax.random.key(0), (50, 2))
      >>> out = sinkhorn(cost_matrix(x, x + 1.0), epsilon=0.1, tol=1e-5)
      >>> bool(out.converged), bool(out.error <= 1e-5)
      (True, True)

    References:
      Cuturi, "Sinkhorn Distances: Lightspeed Computation of Optimal Transport", 2013.
      Schmitzer, "Stabilized Sparse Scaling Algorithms for Entropy Regularized
      Transport Problems", 2019. Chizat, Peyré, Schmitzer, Vialard, "Scaling
      algorithms for unbalanced optimal transport problems", 2018.
    """
    return finish(prepare_sinkhorn(
        cost, a, b, epsilon, tol=tol, max_iters=max_iters, record_every=record_every,
        epsilon_scaling=epsilon_scaling, epsilon_init=epsilon_init, rho_a=rho_a, rho_b=rho_b,
        implicit_max_iters=implicit_max_iters, implicit_rtol=implicit_rtol,
        axis_name=axis_name), axis_name=axis_name)


def prepare_sinkhorn(cost, a, b, epsilon, *, tol, max_iters, record_every, epsilon_scaling,
                     epsilon_init, rho_a, rho_b, implicit_max_iters, implicit_rtol,
                     axis_name) -> Prepared:
    """Validate a :func:`sinkhorn` call and build its forward pass."""
    eps_checked = is_concrete(epsilon)
    cost, a, b, epsilon, rho_a, rho_b = cm.validate(
        cost, a, b, epsilon, rho_a, rho_b, epsilon_scaling=epsilon_scaling,
        epsilon_init=epsilon_init, axis_name=axis_name)
    max_iters = static_int(max_iters, "max_iters", minimum=1)
    record_every = static_int(record_every, "record_every", minimum=1)
    dtype = a.dtype
    tol = jnp.asarray(tol, dtype)

    def forward(cost, a, b, eps, rho_a, rho_b):
        prob, eps_ok = guarded_problem(cost, a, b, eps, rho_a, rho_b, checked=eps_checked,
                                       axis_name=axis_name)
        decay = eps_init = None
        if epsilon_scaling is not None:
            decay = jnp.asarray(epsilon_scaling, dtype)
            eps_init = (prob.geom.mean_cost() if epsilon_init is None
                        else jnp.asarray(epsilon_init, dtype))
            eps_init = jnp.maximum(eps_init, prob.epsilon)
        run = sinkhorn_loop(prob, jnp.zeros_like(a), tol=tol, max_iters=max_iters,
                            record_every=record_every, eps_init=eps_init, decay=decay)
        conv = (run.met <= tol) & run.at_target & all_finite(prob.geom, run.f, run.g)
        aux = (run.error, run.errors, run.n_iters, conv, jnp.zeros((), jnp.int32), eps_ok,
               prob.epsilon)
        return run.f, run.g, aux

    implicit = dict(implicit_max_iters=static_int(implicit_max_iters, "implicit_max_iters", 1),
                    implicit_rtol=implicit_rtol, materialize=not to_geometry(cost).is_online)
    return Prepared((cost, a, b, epsilon, rho_a, rho_b), forward, implicit)
