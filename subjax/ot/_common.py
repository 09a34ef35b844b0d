r"""Shared pieces of the OT solvers: validation, the dual, the result type,
the Newton system (Schur complement + CG) and implicit differentiation.

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

from subjax.ot._costs import PointCloud, lse_row_update

# --------------------------------------------------------------------------- geometry


@jax.tree_util.register_pytree_node_class
class _Dense:
    """A dense cost kept in both layouts, so both Sinkhorn half-steps reduce rows."""

    def __init__(self, C, CT):
        self.C, self.CT = C, CT

    def tree_flatten(self):
        return (self.C, self.CT), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    @property
    def shape(self):
        return self.C.shape

    def dense(self):
        return self.C


def _to_geom(cost):
    if isinstance(cost, PointCloud):
        return cost
    return _Dense(cost, cost.T)


def row_update(geom, g, log_b, eps):
    """``f_hat`` for all rows (blockwise for a point cloud)."""
    if isinstance(geom, PointCloud):
        return geom.map_rows(lambda rows, _: lse_row_update(rows, g, log_b, eps))
    return lse_row_update(geom.C, g, log_b, eps)


def col_update(geom, f, log_a, eps):
    """``g_hat`` for all columns: the row update on the transposed cost."""
    if isinstance(geom, PointCloud):
        return geom.transpose().map_rows(lambda rows, _: lse_row_update(rows, f, log_a, eps))
    return lse_row_update(geom.CT, f, log_a, eps)


def mean_cost(geom):
    if isinstance(geom, PointCloud):
        return jnp.mean(geom.map_rows(lambda rows, _: jnp.mean(rows, axis=1)))
    return jnp.mean(geom.C)


# --------------------------------------------------------------------------- validation


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def validate(cost, a, b, epsilon, rho_a=None, rho_b=None, *, name="sinkhorn"):
    """Check and normalise the inputs. Returns ``(cost, a, b, epsilon, rho_a, rho_b)``."""
    if isinstance(cost, PointCloud):
        n, m = cost.shape
        dtype = cost.dtype
    else:
        if not hasattr(cost, "shape"):
            cost = jnp.asarray(cost)
        cost = jnp.asarray(cost)
        if cost.ndim != 2:
            raise ValueError(
                f"argument `cost` must be a 2-D cost matrix or a PointCloud, got shape {cost.shape}"
            )
        if not jnp.issubdtype(cost.dtype, jnp.floating):
            raise TypeError(f"argument `cost` must have a floating dtype, got {cost.dtype}")
        n, m = cost.shape
        dtype = cost.dtype
        if n == 0 or m == 0:
            raise ValueError(f"argument `cost` must be non-empty, got shape {cost.shape}")
        if _is_concrete(cost) and not np.all(np.isfinite(np.asarray(cost))):
            raise ValueError("argument `cost` contains non-finite entries")

    def weights(w, k, nm):
        if w is None:
            return jnp.full((k,), 1.0 / k, dtype)
        w = jnp.asarray(w)
        if w.shape != (k,):
            raise ValueError(
                f"argument `{nm}` must have shape ({k},) to match the cost of shape {(n, m)}, "
                f"got {w.shape}"
            )
        if not jnp.issubdtype(w.dtype, jnp.floating):
            raise TypeError(f"argument `{nm}` must have a floating dtype, got {w.dtype}")
        w = w.astype(dtype)
        if _is_concrete(w):
            wn = np.asarray(w)
            if not np.all(np.isfinite(wn)):
                raise ValueError(f"argument `{nm}` contains non-finite entries")
            if np.any(wn < 0):
                raise ValueError(f"argument `{nm}` has negative entries (min {wn.min():g})")
            if wn.sum() <= 0:
                raise ValueError(f"argument `{nm}` must have positive total mass")
        return w

    a = weights(a, n, "a")
    b = weights(b, m, "b")
    balanced = rho_a is None and rho_b is None
    if balanced and _is_concrete(a) and _is_concrete(b):
        sa, sb = float(np.sum(np.asarray(a, np.float64))), float(np.sum(np.asarray(b, np.float64)))
        tol = 100 * float(jnp.finfo(dtype).eps) * max(sa, sb)
        if abs(sa - sb) > tol:
            raise ValueError(
                f"arguments `a` and `b` must have the same total mass in the balanced problem, "
                f"got sum(a)={sa:.10g} and sum(b)={sb:.10g}; pass rho_a/rho_b for unbalanced OT"
            )

    def positive_scalar(v, nm):
        if v is None:
            return None
        v_arr = jnp.asarray(v)
        if v_arr.ndim != 0:
            raise ValueError(f"argument `{nm}` must be a scalar, got shape {v_arr.shape}")
        if _is_concrete(v_arr):
            fv = float(v_arr)
            if not np.isfinite(fv) or fv <= 0:
                raise ValueError(f"argument `{nm}` must be finite and > 0, got {fv!r}")
        return v_arr.astype(dtype)

    epsilon = positive_scalar(epsilon, "epsilon")
    if epsilon is None:
        raise ValueError("argument `epsilon` must be given (> 0)")
    rho_a = positive_scalar(rho_a, "rho_a")
    rho_b = positive_scalar(rho_b, "rho_b")
    return cost, a, b, epsilon, rho_a, rho_b


def check_positive_int(v, nm):
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
        raise ValueError(f"argument `{nm}` must be a positive int, got {v!r}")
    return int(v)


# --------------------------------------------------------------------------- the dual


def safe_log(w):
    pos = w > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, w, 1)), -jnp.inf)


def phi(f, w, rho):
    """Marginal part of the dual: <w, f> or -rho <w, exp(-f/rho) - 1>."""
    if rho is None:
        return jnp.sum(w * f)
    return -rho * jnp.sum(w * jnp.expm1(-f / rho))


def dphi(f, w, rho):
    if rho is None:
        return w
    return w * jnp.exp(-f / rho)


def d2phi(f, w, rho):
    if rho is None:
        return jnp.zeros_like(f)
    return w * jnp.exp(-f / rho) / rho


def plan_dense(C, f, g, log_a, log_b, eps):
    z = (f[:, None] + g[None, :] - C) * (1 / eps) + log_a[:, None] + log_b[None, :]
    return jnp.exp(z)


def dual_value(f, g, P_sum, a, b, eps, rho_a, rho_b):
    return (phi(f, a, rho_a) + phi(g, b, rho_b)
            - eps * (P_sum - jnp.sum(a) * jnp.sum(b)))


def _plan_rowsum(geom, f, g, log_a, log_b, eps):
    """Row sums of the plan without the dense matrix (blockwise for point clouds)."""
    if isinstance(geom, PointCloud):
        def fn(rows, idx):
            z = (f[idx][:, None] + g[None, :] - rows) * (1 / eps) + log_a[idx][:, None] + log_b
            return jnp.sum(jnp.exp(z), axis=1)
        return geom.map_rows(fn)
    return jnp.sum(plan_dense(geom.C, f, g, log_a, log_b, eps), axis=1)


def dual_objective(cost, f, g, a, b, eps, rho_a=None, rho_b=None):
    """The dual ``D(f, g)`` (see module docstring), blockwise for point clouds."""
    geom = _to_geom(cost)
    r = _plan_rowsum(geom, f, g, safe_log(a), safe_log(b), eps)
    return dual_value(f, g, jnp.sum(r), a, b, eps, rho_a, rho_b)


def dual_grad(cost, f, g, a, b, eps, rho_a, rho_b):
    """``grad D = (phi_a'(f) - P1, phi_b'(g) - P^T 1)`` with the dense plan."""
    C = cost.dense() if isinstance(cost, PointCloud) else cost
    P = plan_dense(C, f, g, safe_log(a), safe_log(b), eps)
    return dphi(f, a, rho_a) - jnp.sum(P, axis=1), dphi(g, b, rho_b) - jnp.sum(P, axis=0)


# --------------------------------------------------------------------------- result


class OTResult(NamedTuple):
    """Result of every subjax OT solver.

    Fields (``n, m`` the marginal sizes, ``dt`` the cost dtype):
      f: ``(n,) dt`` row potential.
      g: ``(m,) dt`` column potential.
      cost: the ``(n, m)`` cost matrix or the :class:`PointCloud` that was solved.
      a, b: ``(n,)``, ``(m,)`` marginal weights.
      epsilon: ``() dt`` entropic regularisation.
      rho_a, rho_b: ``() dt`` marginal relaxation (unbalanced) or ``None`` (balanced).
      error: ``() dt`` marginal error ``|grad D(f, g)|_1`` of the returned potentials
        (balanced: ``|P1 - a|_1 + |P^T 1 - b|_1``).
      errors: ``(history,) dt`` error every ``inner_iterations`` iterations
        (entry ``k`` after iteration ``k * inner_iterations``), -1 padded.
      n_iters: ``() int32`` outer iterations run (Sinkhorn sweeps or Newton steps,
        warm-up Sinkhorn sweeps included).
      converged: ``() bool`` ``error <= tol`` reached (and everything finite).
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

    def _dense_cost(self):
        return self.cost.dense() if isinstance(self.cost, PointCloud) else self.cost

    def plan(self) -> jax.Array:
        """The dense ``(n, m)`` transport plan ``P_ij = a_i b_j exp((f_i+g_j-C_ij)/eps)``."""
        return plan_dense(self._dense_cost(), self.f, self.g, safe_log(self.a),
                          safe_log(self.b), self.epsilon)

    def apply_plan(self, v: jax.Array, transpose: bool = False) -> jax.Array:
        """``P @ v`` (``v`` of shape ``(m,)`` or ``(m, k)``), or ``P^T @ v`` if ``transpose``.

        For a blockwise :class:`PointCloud` the plan is never materialised.
        """
        geom = self.cost
        f, g, la, lb = self.f, self.g, safe_log(self.a), safe_log(self.b)
        if transpose:
            f, g, la, lb = g, f, lb, la
            if isinstance(geom, PointCloud):
                geom = geom.transpose()
        eps = self.epsilon
        if isinstance(geom, PointCloud):
            def fn(rows, idx):
                z = (f[idx][:, None] + g[None, :] - rows) * (1 / eps) + la[idx][:, None] + lb
                return jnp.exp(z) @ v
            return geom.map_rows(fn)
        C = geom.T if transpose else geom
        return plan_dense(C, f, g, la, lb, eps) @ v

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
        """Unregularised cost ``<C, P>`` of the entropic plan."""
        geom = self.cost
        if isinstance(geom, PointCloud):
            f, g, la, lb, eps = self.f, self.g, safe_log(self.a), safe_log(self.b), self.epsilon
            def fn(rows, idx):
                z = (f[idx][:, None] + g[None, :] - rows) * (1 / eps) + la[idx][:, None] + lb
                return jnp.sum(jnp.exp(z) * rows, axis=1)
            return jnp.sum(geom.map_rows(fn))
        return jnp.sum(self.plan() * geom)

    def marginal_errors(self) -> tuple[jax.Array, jax.Array]:
        """``(|P1 - a|_1, |P^T1 - b|_1)`` recomputed from the potentials."""
        n, m = self.f.shape[0], self.g.shape[0]
        r = self.apply_plan(jnp.ones((m,), self.f.dtype))
        c = self.apply_plan(jnp.ones((n,), self.f.dtype), transpose=True)
        return jnp.sum(jnp.abs(r - self.a)), jnp.sum(jnp.abs(c - self.b))


# --------------------------------------------------------------------------- Newton system


def pcg(matvec, rhs, diag_inv, rtol, maxiter, project):
    """Preconditioned CG for an SPD(-on-a-subspace) operator, fixed shapes.

    Specialised rather than ``subjax.linalg.cg`` because the operator here needs the
    null direction (constants) projected out of every residual, and the solve
    runs inside the solver's ``while_loop`` under ``vmap``. Returns ``(x, iters)``.
    """
    proj = (lambda v: v - jnp.mean(v)) if project else (lambda v: v)
    rhs = proj(rhs)
    tol2 = (rtol * jnp.linalg.norm(rhs)) ** 2
    x0 = jnp.zeros_like(rhs)
    z0 = diag_inv * rhs
    rz0 = jnp.vdot(rhs, z0)

    def cond(s):
        k, _, r, _, _ = s
        return (k < maxiter) & (jnp.vdot(r, r) > tol2)

    def body(s):
        k, x, r, p, rz = s
        q = matvec(p)
        pq = jnp.vdot(p, q)
        alpha = jnp.where(pq > 0, rz / jnp.where(pq > 0, pq, 1), 0)
        x = x + alpha * p
        r = proj(r - alpha * q)
        z = diag_inv * r
        rz_new = jnp.vdot(r, z)
        beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1), 0)
        # A non-positive curvature means breakdown (rounding): stop there.
        k_next = jnp.where(pq > 0, k + 1, maxiter)
        return k_next, x, r, z + beta * p, rz_new

    k, x, *_ = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), x0, rhs, z0, rz0))
    return x, jnp.minimum(k, maxiter)


def newton_solve(Pv, PTu, dr, dc, rhs_f, rhs_g, rtol, maxiter, balanced):
    r"""Solve ``[[diag(dr), P], [P^T, diag(dc)]] (x, y) = (rhs_f, rhs_g)`` matrix-free.

    Eliminating ``y`` gives the Schur system
    ``(diag(dr) - P diag(1/dc) P^T) x = rhs_f - P (rhs_g / dc)``: one product with
    ``P`` and one with ``P^T`` per CG step, Jacobi-preconditioned by ``dr``. In the
    balanced problem the Schur matrix has the constants as null direction (the
    (1, -1) direction of the full system); CG runs on its orthogonal complement.
    """
    tiny = jnp.finfo(dr.dtype).tiny
    dc_safe = jnp.maximum(dc, tiny)
    inv_dc = 1 / dc_safe
    rhs = rhs_f - Pv(rhs_g * inv_dc)
    matvec = lambda v: dr * v - Pv(PTu(v) * inv_dc)
    x, k = pcg(matvec, rhs, 1 / jnp.maximum(dr, tiny), rtol, maxiter, balanced)
    y = (rhs_g - PTu(x)) * inv_dc
    return x, y, k


# --------------------------------------------------------------------------- implicit diff


def with_implicit_diff(forward, cost, a, b, eps, rho_a, rho_b, implicit_maxiter, implicit_rtol):
    """Run ``forward(cost, a, b, eps, rho_a, rho_b) -> (f, g, aux)`` with implicit VJPs.

    The backward pass differentiates the optimality condition ``grad D(f, g) = 0``:
    for a cotangent ``(u, v)`` on ``(f, g)`` it solves ``H lam = (u, v)`` with
    ``H = -Hess D`` (same Schur-complement CG as the Newton step, dense plan) and
    returns ``lam^T d(grad D)/d(theta)`` for ``theta = (cost, a, b, eps, rho)``.
    No iteration is unrolled.
    """
    balanced = rho_a is None and rho_b is None

    @jax.custom_vjp
    def solve(cost, a, b, eps, rho_a, rho_b):
        return forward(cost, a, b, eps, rho_a, rho_b)

    def fwd(cost, a, b, eps, rho_a, rho_b):
        f, g, aux = forward(cost, a, b, eps, rho_a, rho_b)
        return (f, g, aux), (f, g, cost, a, b, eps, rho_a, rho_b)

    def bwd(res, cts):
        f, g, cost, a, b, eps, rho_a, rho_b = res
        u, v = cts[0], cts[1]
        C = cost.dense() if isinstance(cost, PointCloud) else cost
        P = plan_dense(C, f, g, safe_log(a), safe_log(b), eps)
        dr = jnp.sum(P, axis=1) + eps * d2phi(f, a, rho_a)
        dc = jnp.sum(P, axis=0) + eps * d2phi(g, b, rho_b)
        if balanced:
            # Cotangent component along the null direction (1, -1) is dropped.
            s = (jnp.sum(u) - jnp.sum(v)) / (u.shape[0] + v.shape[0])
            u, v = u - s, v + s
        lf, lg, _ = newton_solve(lambda w: P @ w, lambda w: w @ P, dr, dc, eps * u, eps * v,
                                 implicit_rtol, implicit_maxiter, balanced)
        _, vjp = jax.vjp(lambda c, a_, b_, e, ra, rb: dual_grad(c, f, g, a_, b_, e, ra, rb),
                         cost, a, b, eps, rho_a, rho_b)
        return vjp((lf, lg))

    solve.defvjp(fwd, bwd)
    return solve(cost, a, b, eps, rho_a, rho_b)


def make_result(f, g, cost, a, b, eps, rho_a, rho_b, error, errors, n_iters, converged,
                n_linear):
    return OTResult(f=f, g=g, cost=cost, a=a, b=b, epsilon=eps, rho_a=rho_a, rho_b=rho_b,
                    error=error, errors=errors, n_iters=n_iters, converged=converged,
                    n_linear_iters=n_linear)


def record(errors, it, err, inner):
    """Write ``err`` into the history at slot ``it // inner`` when ``it % inner == 0``."""
    k = it // inner
    ok = (it % inner == 0) & (k < errors.shape[0])
    return errors.at[jnp.where(ok, k, errors.shape[0])].set(err, mode="drop")

