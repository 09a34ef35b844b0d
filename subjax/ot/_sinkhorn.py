"""Log-domain Sinkhorn with epsilon scaling and KL-relaxed (unbalanced) marginals."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from subjax.ot import _common as cm

__all__ = ["sinkhorn"]


def _lam(rho, eps):
    return 1 if rho is None else rho / (rho + eps)


def sinkhorn_sweeps(geom, a, b, eps_target, rho_a, rho_b, f0, tol, max_iterations,
                    inner_iterations, history, eps_init=None, decay=None):
    """The Sinkhorn loop. Returns ``(f, g, err, it, errors)``.

    One sweep: ``g <- T_g(f)`` (columns exact), then ``f_hat <- T_f(g)``. The row
    marginal of ``(f, g)`` is ``a_i exp((f_i - f_hat_i)/eps)``, so the error of the
    pair ``(f, g)`` costs nothing extra; the loop returns that certified pair.
    With epsilon scaling, sweep ``t`` uses ``max(eps, eps_init * decay**t)`` and
    convergence counts only once the target epsilon is reached.
    """
    dtype = a.dtype
    log_a, log_b = cm.safe_log(a), cm.safe_log(b)

    def eps_at(it):
        if decay is None:
            return eps_target
        return jnp.maximum(eps_target, eps_init * decay ** it.astype(dtype))

    def sweep(it, f):
        eps = eps_at(it)
        g = _lam(rho_b, eps) * cm.col_update(geom, f, log_a, eps)
        f_hat = cm.row_update(geom, g, log_b, eps)
        # grad_f D at (f, g):  phi_a'(f) - P1,  P1 = a exp((f - f_hat)/eps)
        ratio = jnp.exp((f - f_hat) / eps)
        grad = jnp.where(a > 0, cm.dphi(f, a, rho_a) - a * ratio, 0)
        err = jnp.sum(jnp.abs(grad))
        err = jnp.where(jnp.isnan(err), jnp.inf, err)
        at_target = eps >= eps_target if decay is None else eps <= eps_target
        return g, _lam(rho_a, eps) * f_hat, err, at_target

    def cond(s):
        it, _, _, _, err, done_eps, _ = s
        return (it < max_iterations) & ~((err <= tol) & done_eps)

    def body(s):
        it, f, _, _, _, _, errors = s
        g, f_next, err, at_target = sweep(it, f)
        errors = cm.record(errors, it, err, inner_iterations)
        return it + 1, f_next, f, g, err, at_target, errors

    m = b.shape[0]
    init = (jnp.zeros((), jnp.int32), f0, f0, jnp.zeros((m,), dtype), jnp.array(jnp.inf, dtype),
            jnp.array(False), -jnp.ones((history,), dtype))
    it, _, f, g, err, _, errors = lax.while_loop(cond, body, init)
    return f, g, err, it, errors


def sinkhorn(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    tol: float | jax.Array = 1e-6,
    max_iterations: int = 10_000,
    inner_iterations: int = 10,
    epsilon_scaling: float | None = None,
    epsilon_init: float | jax.Array | None = None,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_maxiter: int = 2000,
    implicit_rtol: float = 1e-10,
) -> cm.OTResult:
    r"""Log-domain Sinkhorn for (unbalanced) entropic optimal transport.

    Alternating exact maximisation of the dual ``D(f, g)`` (see
    :class:`~subjax.ot.OTResult`):

    .. math::
       g_j \leftarrow -\lambda_b\,\varepsilon \log \sum_i a_i e^{(f_i - C_{ij})/\varepsilon},\qquad
       f_i \leftarrow -\lambda_a\,\varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon},

    ``lambda = rho / (rho + eps)`` (1 in the balanced problem). Every update is a
    stabilised log-sum-exp over rows (the cost is kept in both layouts), so float32
    at tiny epsilon stays finite and reports ``converged=False`` if it stalls.
    Stops when the marginal error ``|P1 - a|_1`` (columns are exact after the
    g-update) is ``<= tol`` or after ``max_iterations`` sweeps.

    Args:
      cost: ``(n, m)`` cost matrix or :class:`~subjax.ot.PointCloud` (blockwise).
      a, b: marginal weights (default uniform). Balanced: same total mass.
      epsilon: regularisation ``> 0`` (absolute; scale it by the mean cost yourself).
      tol: target marginal error (traced).
      max_iterations: cap on sweeps (static).
      inner_iterations: the error history records every this many sweeps (static).
      epsilon_scaling: decay factor in (0, 1) for epsilon annealing, or ``None``.
      epsilon_init: starting epsilon for annealing (default: the mean cost).
      rho_a, rho_b: KL marginal relaxation strengths (unbalanced OT); ``None`` =
        hard constraint. Give both or neither.
      implicit_maxiter, implicit_rtol: CG settings of the implicit backward pass.

    Returns:
      :class:`~subjax.ot.OTResult`.

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
    if (rho_a is None) != (rho_b is None):
        raise ValueError("arguments `rho_a` and `rho_b` must both be given (unbalanced) or "
                         "both be None (balanced)")
    cost, a, b, epsilon, rho_a, rho_b = cm.validate(cost, a, b, epsilon, rho_a, rho_b)
    max_iterations = cm.check_positive_int(max_iterations, "max_iterations")
    inner_iterations = cm.check_positive_int(inner_iterations, "inner_iterations")
    if epsilon_scaling is not None and not (0 < float(epsilon_scaling) < 1):
        raise ValueError(f"argument `epsilon_scaling` must be in (0, 1), got {epsilon_scaling!r}")
    dtype = a.dtype
    history = -(-max_iterations // inner_iterations)
    tol = jnp.asarray(tol, dtype)

    def forward(cost, a, b, eps, rho_a, rho_b):
        geom = cm._to_geom(cost)
        decay = eps_init = None
        if epsilon_scaling is not None:
            decay = jnp.asarray(epsilon_scaling, dtype)
            eps_init = (cm.mean_cost(geom) if epsilon_init is None
                        else jnp.asarray(epsilon_init, dtype))
            eps_init = jnp.maximum(eps_init, eps)
        f0 = jnp.zeros_like(a)
        f, g, err, it, errors = sinkhorn_sweeps(
            geom, a, b, eps, rho_a, rho_b, f0, tol, max_iterations, inner_iterations,
            history, eps_init, decay)
        finite = jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g))
        aux = (err, errors, it, (err <= tol) & finite)
        return f, g, aux

    f, g, (err, errors, it, conv) = cm.with_implicit_diff(
        forward, cost, a, b, epsilon, rho_a, rho_b, implicit_maxiter, implicit_rtol)
    return cm.make_result(f, g, cost, a, b, epsilon, rho_a, rho_b, err, errors, it, conv,
                          jnp.zeros((), jnp.int32))
