r"""The OT problem, its dual, the result type, the Newton system and implicit
differentiation, shared by every solver.

Conventions. Entropic OT between weights ``a`` (n) and ``b`` (m) with cost ``C``:

.. math::
   \min_{P \ge 0}\ \langle C, P\rangle + \varepsilon\,\mathrm{KL}(P \,\|\, a b^\top)
   + \rho_a \mathrm{KL}(P1 \,\|\, a) + \rho_b \mathrm{KL}(P^\top 1 \,\|\, b)

(the marginal terms are constraints ``P1 = a``, ``P^T1 = b`` in the balanced
problem, ``rho = inf``). Its dual, maximised over potentials ``f, g``, is

.. math::
   D(f, g) = \varphi_a(f) + \varphi_b(g)
     - \varepsilon \sum_{ij} a_i b_j \big(e^{(f_i + g_j - C_{ij})/\varepsilon} - 1\big),

with ``phi_a(f) = <a, f>`` (balanced) or ``-rho_a <a, exp(-f/rho_a) - 1>``
(unbalanced), and the plan is ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``.
``grad D = (phi_a'(f) - P1, phi_b'(g) - P^T 1)``; its L1 norm is the *marginal
error* every solver reports (in the balanced case exactly
``|P1 - a|_1 + |P^T1 - b|_1``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from subjax._core import (
    check_finite_if_concrete,
    exact_matmul,
    floating_array,
    full_precision,
    is_concrete,
    positive,
    scalar,
    unit_interval,
)
from subjax.linalg import cg
from subjax.ot._geometry import Geometry, PointCloud, held_plan_slack, log_plan, to_geometry

# --------------------------------------------------------------------------- the problem


class Problem(NamedTuple):
    """An entropic OT problem on a geometry: marginals, epsilon, KL relaxation.

    ``rho_a = rho_b = None`` is the balanced problem. Under a ``shard_map`` row
    axis ``a`` holds the local rows' weights and ``b`` all columns' weights.
    """

    geom: Geometry
    a: jax.Array
    b: jax.Array
    epsilon: jax.Array
    rho_a: Any = None
    rho_b: Any = None

    @property
    def log_a(self):
        return safe_log(self.a)

    @property
    def log_b(self):
        return safe_log(self.b)

    @property
    def balanced(self) -> bool:
        return self.rho_a is None


def lam(rho, eps):
    """The unbalanced Sinkhorn damping ``rho / (rho + eps)`` (1 when balanced)."""
    return 1 if rho is None else rho / (rho + eps)


# --------------------------------------------------------------------------- validation


def _finite_positive(v, name, *, allow_none=False):
    return scalar(v, name, low=0.0, low_open=True, high=np.inf, high_open=True,
                  allow_none=allow_none)


def check_options(rho_a, rho_b, epsilon_scaling=None, epsilon_init=None):
    """The relaxation and epsilon-continuation options every solver takes."""
    if (rho_a is None) != (rho_b is None):
        raise ValueError("arguments `rho_a` and `rho_b` must both be given (unbalanced) or "
                         "both be None (balanced)")
    _finite_positive(rho_a, "rho_a", allow_none=True)
    _finite_positive(rho_b, "rho_b", allow_none=True)
    if epsilon_scaling is not None:
        unit_interval(epsilon_scaling, "epsilon_scaling")
    positive(epsilon_init, "epsilon_init", allow_none=True)


def validate(cost, a, b, epsilon, rho_a=None, rho_b=None, *, epsilon_scaling=None,
             epsilon_init=None, axis_name=None):
    """Check and normalise the inputs. Returns ``(cost, a, b, epsilon, rho_a, rho_b)``.

    Value checks (finite entries, non-negative weights, equal masses, epsilon
    > 0) run when the values are concrete, reduced on their device; under a trace
    the solvers report a bad value through ``converged=False`` instead. With a
    row ``axis_name`` ``a`` holds local rows, so the mass balance is not checked.
    """
    check_options(rho_a, rho_b, epsilon_scaling, epsilon_init)
    if isinstance(cost, Geometry):
        n, m = cost.shape
        dtype = cost.dtype
        if isinstance(cost, PointCloud):
            check_finite_if_concrete(cost.x, "x")
            check_finite_if_concrete(cost.y, "y")
        else:
            check_finite_if_concrete(cost.dense(), "cost")
    else:
        cost = floating_array(cost, "cost", ndim=2)
        n, m = cost.shape
        dtype = cost.dtype
        if n == 0 or m == 0:
            raise ValueError(f"argument `cost` must be non-empty, got shape {cost.shape}")
        check_finite_if_concrete(cost, "cost")

    def weights(w, k, nm):
        if w is None:
            return jnp.full((k,), 1.0 / k, dtype)
        w = floating_array(w, nm)
        if w.shape != (k,):
            raise ValueError(
                f"argument `{nm}` must have shape ({k},) to match the cost of shape {(n, m)}, "
                f"got {w.shape}"
            )
        w = w.astype(dtype)
        check_finite_if_concrete(w, nm)
        stats = _min_and_sum(w)
        if stats is not None:
            lo, total = stats
            if lo < 0:
                raise ValueError(f"argument `{nm}` has negative entries (min {lo:g})")
            if total <= 0:
                raise ValueError(f"argument `{nm}` must have positive total mass")
        return w

    a = weights(a, n, "a")
    b = weights(b, m, "b")
    sums = (_min_and_sum(a), _min_and_sum(b))
    if rho_a is None and axis_name is None and None not in sums:
        sa, sb = sums[0][1], sums[1][1]
        tol = 100 * float(jnp.finfo(dtype).eps) * max(sa, sb)
        if abs(sa - sb) > tol:
            raise ValueError(
                f"arguments `a` and `b` must have the same total mass in the balanced problem, "
                f"got sum(a)={sa:.10g} and sum(b)={sb:.10g}; pass rho_a/rho_b for unbalanced OT"
            )
    if epsilon is None:
        raise ValueError("argument `epsilon` must be given (> 0)")
    _finite_positive(epsilon, "epsilon")
    as_scalar = lambda v: None if v is None else jnp.asarray(v).astype(dtype)
    return cost, a, b, as_scalar(epsilon), as_scalar(rho_a), as_scalar(rho_b)


@jax.jit
def _min_and_sum_device(w):
    return jnp.stack([jnp.min(w), jnp.sum(w)])


def _min_and_sum(w):
    """``(min, sum)`` of a concrete ``w`` as floats (reduced on its device), else None."""
    if not is_concrete(w):
        return None
    try:
        lo, total = _min_and_sum_device(w)
        return float(lo), float(total)
    except jax.errors.ConcretizationTypeError:  # inside an outer trace
        return None


def epsilon_guard(eps, mean_cost):
    """``(eps_ok, eps_run)``: a traced epsilon that is not finite and positive is
    replaced by the mean cost (a well-posed stand-in) and reported by ``eps_ok``."""
    ok = jnp.isfinite(eps) & (eps > 0)
    fallback = jnp.where(jnp.isfinite(mean_cost) & (mean_cost > 0), mean_cost, 1)
    return ok, jnp.where(ok, eps, fallback.astype(eps.dtype))


# --------------------------------------------------------------------------- the dual


def safe_log(w):
    pos = w > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, w, 1)), -jnp.inf)


def phi(f, w, rho, geom):
    """Marginal part of the dual: <w, f> or -rho <w, exp(-f/rho) - 1> (summed over rows
    of ``geom`` when ``f`` is row-indexed; pass ``geom=None`` for columns)."""
    terms = w * f if rho is None else -rho * (w * jnp.expm1(-f / rho))
    return jnp.sum(terms) if geom is None else geom.row_sum(terms)


def dphi(f, w, rho):
    if rho is None:
        return w
    return w * jnp.exp(-f / rho)


def d2phi(f, w, rho):
    if rho is None:
        return jnp.zeros_like(f)
    return w * jnp.exp(-f / rho) / rho


def dual_value(prob: Problem, f, g, plan_sum):
    """``D(f, g)`` from the plan's total mass."""
    geom = prob.geom
    return (phi(f, prob.a, prob.rho_a, geom) + phi(g, prob.b, prob.rho_b, None)
            - prob.epsilon * (plan_sum - geom.row_sum(prob.a) * jnp.sum(prob.b)))


def marginal_error(prob: Problem, f, g, rows, cols):
    """``|phi_a'(f) - P1|_1 + |phi_b'(g) - P^T1|_1`` and the two gradients."""
    ga = dphi(f, prob.a, prob.rho_a) - rows
    gb = dphi(g, prob.b, prob.rho_b) - cols
    err = prob.geom.row_sum(jnp.abs(ga)) + jnp.sum(jnp.abs(gb))
    return ga, gb, jnp.where(jnp.isnan(err), jnp.inf, err)


class Certified(NamedTuple):
    """The marginal error of a point evaluated for the convergence test.

    ``error`` is ``|grad D(f, g)|_1`` evaluated once more with the geometry's
    accurate costs (:meth:`~subjax.ot._geometry.Geometry.certify_marginals`);
    ``bound`` bounds, to first order, how far that evaluation can be from the exact
    error of the same potentials. A solver reports ``error`` and converges when
    ``error + bound <= tol``. ``error = inf`` means not evaluated.
    """

    error: jax.Array
    bound: jax.Array

    @property
    def met(self):
        return self.error + self.bound

    @staticmethod
    def none(dtype):
        return Certified(jnp.array(jnp.inf, dtype), jnp.zeros((), dtype))


def certify(prob: Problem, f, g, eps, plan=None) -> Certified:
    r"""The convergence test's evaluation of the marginal error at ``(f, g)``.

    Every plan entry ``p_ij`` evaluated in floating point carries a relative
    rounding error up to ``u K_ij`` (:func:`~subjax.ot._geometry.certify_log_plan`:
    the exponent ``(f_i + g_j - C_ij)/eps`` rounds at the scale of
    ``|f_i + g_j - C_ij|/eps`` and of the log-weights, a point cloud's cost at
    ``kappa u |C_ij| / eps``). Both marginals then differ from the exact ones of the
    same potentials by at most ``u sum_ij p_ij K_ij`` in L1 each, so
    ``bound = 2 u sum p K`` (plus the rounding of ``phi'`` in the unbalanced
    problem): in float32 at epsilon 0.001 x the mean cost a few percent of a 1e-3
    tolerance for 2-D clouds, a quarter of it in 10-D; in float64 negligible. The
    rounding of the sums themselves is not counted (for sums of positive terms it
    is around ``sqrt(m) u`` relative in practice), nor second-order terms.

    ``plan``: the dense plan at ``(f, g)`` when the solver holds it and the
    geometry's costs are given numbers (:class:`~subjax.ot.Dense`): no new pass,
    one reduction (:func:`~subjax.ot._geometry.held_plan_slack`). Otherwise one
    pass over the plan with accurate costs
    (:meth:`~subjax.ot._geometry.Geometry.certify_marginals`).
    """
    geom = prob.geom
    dtype = f.dtype
    u = jnp.finfo(dtype).eps / 2
    la, lb = prob.log_a, prob.log_b
    if plan is not None and geom.cost_kappa == 0.0:  # the held plan, costs given as numbers
        op = dense_operator(geom, plan)
        rows, cols = op.rows, op.cols
        slack = geom.row_sum(held_plan_slack(plan, geom.dense(), f, g, la, lb, eps))
    else:
        rows, cols, slack = geom.certify_marginals(f, g, la, lb, eps)
    pe = prob._replace(epsilon=eps)
    _, _, err = marginal_error(pe, f, g, rows, cols)
    bound = 2 * u * slack
    if not prob.balanced:  # phi'(f) = w exp(-f / rho): relative rounding (|f| / rho + 2) u
        bound = bound + u * (
            geom.row_sum(dphi(f, prob.a, prob.rho_a) * (jnp.abs(f) / prob.rho_a + 2))
            + jnp.sum(dphi(g, prob.b, prob.rho_b) * (jnp.abs(g) / prob.rho_b + 2)))
    bound = jnp.where(jnp.isnan(bound), jnp.inf, bound)
    return Certified(err, bound.astype(dtype))


def dual_objective(cost, f, g, a, b, eps, rho_a=None, rho_b=None):
    """The dual ``D(f, g)`` (see module docstring), blockwise for point clouds."""
    geom = to_geometry(cost)
    prob = Problem(geom, a, b, eps, rho_a, rho_b)
    rows = geom.plan_map(f, g, prob.log_a, prob.log_b, eps, lambda p, _: jnp.sum(p, axis=1))
    return dual_value(prob, f, g, geom.row_sum(rows))


# --------------------------------------------------------------------------- result


class OTResult(NamedTuple):
    """Result of every subjax OT solver.

    Fields (``n, m`` the marginal sizes, ``dt`` the cost dtype):
      f: ``(n,) dt`` row potential.
      g: ``(m,) dt`` column potential.
      cost: the ``(n, m)`` cost matrix or the geometry that was solved.
      a, b: ``(n,)``, ``(m,)`` marginal weights.
      epsilon: ``() dt`` entropic regularisation the potentials solve (the given
        one; a traced epsilon that is not finite and positive is replaced by the
        mean cost and the result reports ``converged=False``, ``error=inf``).
      rho_a, rho_b: ``() dt`` marginal relaxation (unbalanced) or ``None`` (balanced).
      error: ``() dt`` marginal error ``|grad D(f, g)|_1`` of the returned potentials
        (balanced: ``|P1 - a|_1 + |P^T 1 - b|_1``), evaluated by :func:`certify`
        (a point cloud's costs summed from the coordinate differences).
      errors: ``(history,) dt`` error history (see each solver), -1 padded.
      n_iters: ``() int32`` outer iterations run (Sinkhorn sweeps or Newton steps,
        warm-up Sinkhorn sweeps included).
      converged: ``() bool`` ``error`` plus a first-order bound on its rounding is
        ``<= tol`` (and everything finite): the error recomputed exactly meets ``tol``.
      n_linear_iters: ``() int32`` total CG iterations (0 for Sinkhorn).

    ``f, g`` are differentiable (implicit differentiation of the optimality
    conditions); :attr:`reg_ot_cost` is differentiable by the envelope theorem.
    """

    f: jax.Array
    g: jax.Array
    cost: Any
    a: jax.Array
    b: jax.Array
    epsilon: jax.Array
    rho_a: Any
    rho_b: Any
    error: jax.Array
    errors: jax.Array
    n_iters: jax.Array
    converged: jax.Array
    n_linear_iters: jax.Array

    def _args(self):
        return self.f, self.g, safe_log(self.a), safe_log(self.b), self.epsilon

    def plan(self) -> jax.Array:
        """The dense ``(n, m)`` transport plan ``P_ij = a_i b_j exp((f_i+g_j-C_ij)/eps)``."""
        return to_geometry(self.cost).plan(*self._args())

    def apply_plan(self, v: jax.Array, transpose: bool = False) -> jax.Array:
        """``P @ v`` (``v`` of shape ``(m,)`` or ``(m, k)``), or ``P^T @ v`` if ``transpose``.

        For a blockwise :class:`PointCloud` the plan is never materialised.
        """
        geom = to_geometry(self.cost)
        if transpose:
            return geom.plan_rmatvec(*self._args(), v)
        return geom.plan_matvec(*self._args(), v)

    @property
    def reg_ot_cost(self) -> jax.Array:
        """Regularised OT cost, the dual value ``D(f, g)``.

        Equals the primal ``<C,P> + eps KL(P | ab^T) (+ rho KL terms)`` at the optimum.
        Its gradient w.r.t. cost / points / marginals / epsilon is the partial
        derivative at fixed potentials (envelope theorem): e.g. ``d/dC = P``,
        ``d/da = f`` (balanced, unit mass).
        """
        f, g = lax.stop_gradient(self.f), lax.stop_gradient(self.g)
        return dual_objective(self.cost, f, g, self.a, self.b, self.epsilon, self.rho_a,
                              self.rho_b)

    @property
    def transport_cost(self) -> jax.Array:
        """Unregularised cost ``<C, P>`` of the entropic plan (blockwise)."""
        return to_geometry(self.cost).transport_cost(*self._args())

    def marginal_errors(self) -> tuple[jax.Array, jax.Array]:
        """``(|P1 - a|_1, |P^T1 - b|_1)`` recomputed from the potentials, in one pass
        evaluated like the solvers' convergence test (:func:`certify`)."""
        r, c, _ = to_geometry(self.cost).certify_marginals(*self._args())
        return jnp.sum(jnp.abs(r - self.a)), jnp.sum(jnp.abs(c - self.b))


def make_result(f, g, cost, a, b, eps, rho_a, rho_b, error, errors, n_iters, converged,
                n_linear):
    return OTResult(f=f, g=g, cost=cost, a=a, b=b, epsilon=eps, rho_a=rho_a, rho_b=rho_b,
                    error=error, errors=errors, n_iters=n_iters, converged=converged,
                    n_linear_iters=n_linear)


# --------------------------------------------------------------------------- Newton system


def newton_solve(geom: Geometry, Pv, PTu, dr, dc, rhs_f, rhs_g, rtol, max_iters, balanced,
                 Psq=None):
    r"""Solve ``[[diag(dr), P], [P^T, diag(dc)]] (x, y) = (rhs_f, rhs_g)`` matrix-free.

    Eliminating ``y`` gives the Schur system
    ``(diag(dr) - P diag(1/dc) P^T) x = rhs_f - P (rhs_g / dc)``: one product with
    ``P`` and one with ``P^T`` per CG step (:func:`subjax.linalg.cg`),
    Jacobi-preconditioned. With ``Psq`` (``w -> (P * P) w``, elementwise square)
    the preconditioner is the Schur matrix's own diagonal
    ``dr_i - sum_j P_ij^2 / dc_j``, floored at ``sqrt(u) dr_i`` (``u`` the unit
    roundoff of ``Psq``'s output, the precision of the products: below that floor
    the diagonal is lost in the products' rounding); at small epsilon, where a
    row's mass sits on few columns, that diagonal is far below ``dr`` and the
    Schur-diagonal CG needs 2-4x fewer iterations than with ``dr`` alone, the
    fallback without ``Psq``. On a row-sharded geometry ``x`` is split like
    the rows and CG's inner products are summed across the axis. In the balanced
    problem the Schur matrix has the constants as null direction (the (1, -1)
    direction of the full system); CG runs on its orthogonal complement.
    The relative tolerance is raised to ``10 u`` (``u`` the unit roundoff of the
    dtype): below it CG's recursive residual no longer tracks the true one and the
    iterates drift (float32 with a 1e-10 tolerance). Returns ``(x, y, cg_iters)``.
    """
    fi = jnp.finfo(dr.dtype)
    tiny = fi.tiny
    rtol = jnp.maximum(rtol, 10 * fi.eps)
    inv_dc = 1 / jnp.maximum(dc, tiny)
    if balanced:
        n_all = geom.row_sum(jnp.ones_like(dr))
        proj = lambda v: v - geom.row_sum(v) / n_all
    else:
        proj = lambda v: v
    rhs = proj(rhs_f - Pv(rhs_g * inv_dc))
    schur = lambda v: proj(dr * v - Pv(PTu(v) * inv_dc))
    diag = jnp.maximum(dr, tiny)
    if Psq is not None:
        sq = Psq(inv_dc)
        floor = jnp.sqrt(jnp.asarray(jnp.finfo(sq.dtype).eps, dr.dtype)) * diag
        diag = jnp.maximum(dr - sq.astype(dr.dtype), floor)
    sol = cg(schur, rhs, tol=rtol, max_iters=max_iters, m=1 / diag, axis_name=geom.axis_name)
    x = sol.x
    y = (rhs_g - PTu(x)) * inv_dc
    return x, y, sol.n_iters


class PlanOperator(NamedTuple):
    """``P v``, ``P^T u``, the marginals and, for a held plan, ``(P * P) w`` (the
    Schur diagonal of :func:`newton_solve`) of one plan (dense or blockwise)."""

    matvec: Any
    rmatvec: Any
    rows: jax.Array
    cols: jax.Array
    sq_matvec: Any = None


def plan_operator(prob: Problem, f, g, eps, materialize: bool) -> PlanOperator:
    """The plan at ``(f, g)`` as an operator: the dense plan when ``materialize``,
    else blockwise products that recompute it from the geometry."""
    geom, la, lb = prob.geom, prob.log_a, prob.log_b
    if materialize:
        P = geom.plan(f, g, la, lb, eps)
        return dense_operator(geom, P)
    mv = lambda v: geom.plan_matvec(f, g, la, lb, eps, v)
    rmv = lambda u: geom.plan_rmatvec(f, g, la, lb, eps, u)
    return PlanOperator(mv, rmv, *geom.plan_marginals(f, g, la, lb, eps))


def dense_operator(geom: Geometry, P) -> PlanOperator:
    """The operator of a dense plan (its local rows when sharded)."""
    ax = geom.axis_name
    colsum = lambda x: x if ax is None else lax.psum(x, ax)
    return PlanOperator(lambda v: exact_matmul(P, v), lambda u: colsum(exact_matmul(u, P)),
                        jnp.sum(P, axis=1), colsum(jnp.sum(P, axis=0)),
                        lambda w: jnp.sum(jnp.square(P) * w, axis=1))


# --------------------------------------------------------------------------- implicit diff


def with_implicit_diff(forward, cost, a, b, eps, rho_a, rho_b, *, implicit_max_iters,
                       implicit_rtol, materialize, axis_name=None):
    """Run ``forward(cost, a, b, eps, rho_a, rho_b) -> (f, g, aux)`` with implicit VJPs.

    The backward pass differentiates the optimality condition ``grad D(f, g) = 0``:
    for a cotangent ``(u, v)`` on ``(f, g)`` it solves ``H lam = (u, v)`` with
    ``H = -Hess D`` (the Newton system's CG, on the dense plan when
    ``materialize``, else blockwise from the geometry) and returns
    ``lam^T d(grad D)/d(theta)`` for ``theta = (cost, a, b, eps, rho)``, also
    blockwise (each block rematerialised). No iteration is unrolled.
    A solver called with a row ``axis_name`` inside ``shard_map`` runs forward
    only: its backward pass raises (the wrappers of :mod:`subjax.parallel` shard
    the forward pass and differentiate on the whole arrays).
    """
    balanced = rho_a is None and rho_b is None

    @jax.custom_vjp
    def solve(cost, a, b, eps, rho_a, rho_b):
        return forward(cost, a, b, eps, rho_a, rho_b)

    def fwd(cost, a, b, eps, rho_a, rho_b):
        f, g, aux = forward(cost, a, b, eps, rho_a, rho_b)
        return (f, g, aux), (f, g, cost, a, b, eps, rho_a, rho_b)

    def bwd(res, cts):
        if axis_name is not None:
            raise NotImplementedError(
                f"differentiating an OT solver called with axis_name={axis_name!r} inside "
                f"shard_map is not supported; call subjax.parallel.sharded_sinkhorn / "
                f"sharded_sinkhorn_newton, which shard the solve and differentiate it")
        f, g, cost, a, b, eps, rho_a, rho_b = res
        u, v = cts[0], cts[1]
        prob = Problem(to_geometry(cost), a, b, eps, rho_a, rho_b)
        geom = prob.geom
        op = plan_operator(prob, f, g, eps, materialize)
        dr = op.rows + eps * d2phi(f, a, rho_a)
        dc = op.cols + eps * d2phi(g, b, rho_b)
        if balanced:
            # Cotangent component along the null direction (1, -1) is dropped.
            n_all = geom.row_sum(jnp.ones_like(u))
            s = (geom.row_sum(u) - jnp.sum(v)) / (n_all + v.shape[0])
            u, v = u - s, v + s
        lf, lg, _ = newton_solve(geom, op.matvec, op.rmatvec, dr, dc, eps * u, eps * v,
                                 implicit_rtol, implicit_max_iters, balanced, op.sq_matvec)

        # lam^T grad D(theta) = <lf, phi_a'(f)> + <lg, phi_b'(g)> - sum_ij P_ij (lf_i + lg_j)
        def rows_part(cost, a, b, eps, rho_a):
            geo = to_geometry(cost)
            la, lb = safe_log(a), safe_log(b)

            def block(c, idx):
                lfi = lf if idx is None else lf[idx]
                fi = f if idx is None else f[idx]
                lai = la if idx is None else la[idx]
                p = jnp.exp(log_plan(c, fi, g, lai, lb, eps))
                return jnp.sum(p * (lfi[:, None] + lg[None, :]), axis=1)

            coupled = geo.map_rows(jax.checkpoint(block))
            return jnp.vdot(lf, dphi(f, a, rho_a)) - jnp.sum(coupled)

        _, vjp_rows = jax.vjp(rows_part, cost, a, b, eps, rho_a)
        ct_cost, ct_a, ct_b, ct_eps, ct_rho_a = vjp_rows(jnp.ones((), f.dtype))
        _, vjp_cols = jax.vjp(lambda b, rho_b: jnp.vdot(lg, dphi(g, b, rho_b)), b, rho_b)
        ct_b2, ct_rho_b = vjp_cols(jnp.ones((), f.dtype))
        return ct_cost, ct_a, ct_b + ct_b2, ct_eps, ct_rho_a, ct_rho_b

    # the backward pass is traced after the forward call returned: its products ask
    # for full precision themselves
    solve.defvjp(fwd, full_precision(bwd))
    return solve(cost, a, b, eps, rho_a, rho_b)

