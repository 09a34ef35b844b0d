"""Row-sharded log-domain Sinkhorn: cost rows split over a mesh axis.

Device ``d`` holds the rows ``C_d`` (``n / p`` of them), ``a_d`` and ``f_d``; the
column potential ``g`` and ``b`` are replicated. One sweep of
:func:`subjax.ot.sinkhorn` becomes

- ``g_j = -eps log sum_i a_i exp((f_i - C_ij)/eps)``: a log-sum-exp over *all*
  rows, reduced across the axis: ``pmax`` of the local column maxima, then
  ``psum`` of the shifted local sums (two collectives of ``m`` words);
- ``f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps)``: local rows only
  (``subjax.ot.lse_row_update``, the same function the single-device solver uses);
- the marginal error ``|P1 - a|_1``: a ``psum`` of one scalar.

Per device: memory ``O(n m / p)``, communication ``O(m)`` words per sweep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from subjax.ot import OTResult, lse_row_update
from subjax.ot import _common as cm
from subjax.parallel._data import check_axis

__all__ = ["sharded_sinkhorn"]


def _lam(rho, eps):
    return 1 if rho is None else rho / (rho + eps)


def _col_lse(cost_rows, f, log_a, eps, axis):
    r"""``-eps log sum_i exp((f_i - C_ij)/eps + log a_i)`` over rows split across ``axis``."""
    z = (f[:, None] - cost_rows) * (1 / eps) + log_a[:, None]
    zmax = lax.pmax(jnp.max(z, axis=0), axis)
    zmax = lax.stop_gradient(jnp.where(jnp.isfinite(zmax), zmax, 0))
    s = lax.psum(jnp.sum(jnp.exp(z - zmax[None, :]), axis=0), axis)
    return -eps * (jnp.log(s) + zmax)


def _sweeps_shard(c, a, b, eps_target, rho_a, rho_b, tol, eps_init, decay, *, axis,
                  max_iterations, inner_iterations, history, balanced, scaling):
    """``subjax.ot._sinkhorn.sinkhorn_sweeps`` on local rows (same loop, same outputs)."""
    dtype = a.dtype
    log_a, log_b = cm.safe_log(a), cm.safe_log(b)
    ra = None if balanced else rho_a
    rb = None if balanced else rho_b

    def eps_at(it):
        if not scaling:
            return eps_target
        return jnp.maximum(eps_target, eps_init * decay ** it.astype(dtype))

    def sweep(it, f):
        eps = eps_at(it)
        g = _lam(rb, eps) * _col_lse(c, f, log_a, eps, axis)
        f_hat = lse_row_update(c, g, log_b, eps)
        ratio = jnp.exp((f - f_hat) / eps)
        grad = jnp.where(a > 0, cm.dphi(f, a, ra) - a * ratio, 0)
        err = lax.psum(jnp.sum(jnp.abs(grad)), axis)
        err = jnp.where(jnp.isnan(err), jnp.inf, err)
        at_target = eps >= eps_target if not scaling else eps <= eps_target
        return g, _lam(ra, eps) * f_hat, err, at_target

    def cond(s):
        it, _, _, _, err, done_eps, _ = s
        return (it < max_iterations) & ~((err <= tol) & done_eps)

    def body(s):
        it, f, _, _, _, _, errors = s
        g, f_next, err, at_target = sweep(it, f)
        errors = cm.record(errors, it, err, inner_iterations)
        return it + 1, f_next, f, g, err, at_target, errors

    f0 = jnp.zeros_like(a)
    m = b.shape[0]
    init = (jnp.zeros((), jnp.int32), f0, f0, jnp.zeros((m,), dtype),
            jnp.array(jnp.inf, dtype), jnp.array(False), -jnp.ones((history,), dtype))
    it, _, f, g, err, _, errors = lax.while_loop(cond, body, init)
    finite = lax.psum(jnp.where(jnp.all(jnp.isfinite(f)), 0, 1), axis) == 0
    finite = finite & jnp.all(jnp.isfinite(g))
    return f, g, err, errors, it, (err <= tol) & finite


def sharded_sinkhorn(
    cost: jax.Array,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    tol: float | jax.Array = 1e-6,
    max_iterations: int = 10_000,
    inner_iterations: int = 10,
    epsilon_scaling: float | None = None,
    epsilon_init: float | jax.Array | None = None,
    rho_a: float | jax.Array | None = None,
    rho_b: float | jax.Array | None = None,
    implicit_maxiter: int = 2000,
    implicit_rtol: float = 1e-10,
) -> OTResult:
    r"""Log-domain Sinkhorn with the rows of the cost matrix split over a mesh axis.

    Same iteration, stopping rule, arguments and :class:`~subjax.ot.OTResult` as
    :func:`subjax.ot.sinkhorn` (balanced and KL-unbalanced, epsilon scaling), so
    the potentials equal the single-device ones up to summation order:

    .. math::
       g_j \leftarrow -\lambda_b \varepsilon \log \sum_{d} \sum_{i \in d}
         a_i e^{(f_i - C_{ij})/\varepsilon}, \qquad
       f_i \leftarrow -\lambda_a \varepsilon \log \sum_j b_j e^{(g_j - C_{ij})/\varepsilon},

    the outer sum over devices ``d`` taken as a stabilised log-sum-exp
    (``pmax`` of the local maxima, ``psum`` of the shifted sums). ``f`` comes back
    row-sharded, ``g`` replicated. Gradients use ``subjax.ot``'s implicit
    differentiation on the (row-sharded) plan.

    Args:
      cost: ``(n, m)`` dense cost, ``n`` divisible by ``mesh.shape[axis_name]``.
      a, b: marginals (default uniform); ``a`` is split like the rows.
      epsilon: regularisation ``> 0``.
      mesh, axis_name: where the rows live.
      tol, max_iterations, inner_iterations, epsilon_scaling, epsilon_init, rho_a,
        rho_b, implicit_maxiter, implicit_rtol: as in :func:`subjax.ot.sinkhorn`.

    Returns:
      :class:`~subjax.ot.OTResult`.

    Raises:
      ValueError: ``axis_name`` not in ``mesh``, rows not divisible by the axis
        size, or any of :func:`subjax.ot.sinkhorn`'s input errors.
      TypeError: ``cost`` is a ``PointCloud`` (shard its points instead: not
        supported here).

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh
      >>> from subjax.ot import cost_matrix, sinkhorn
      >>> from subjax.parallel import sharded_sinkhorn
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
      >>> x = jax.random.normal(jax.random.key(0), (32, 2))
      >>> c = cost_matrix(x, x + 1.0)
      >>> out = sharded_sinkhorn(c, epsilon=0.1, tol=1e-4, mesh=mesh, axis_name="rows")
      >>> ref = sinkhorn(c, epsilon=0.1, tol=1e-4)
      >>> bool(out.converged), int(out.n_iters) == int(ref.n_iters)
      (True, True)

    References:
      Cuturi, "Sinkhorn Distances", 2013. Schmitzer, "Stabilized Sparse Scaling
      Algorithms for Entropy Regularized Transport Problems", 2019.
    """
    n_dev = check_axis(mesh, axis_name)
    if isinstance(cost, cm.PointCloud):
        raise TypeError("`cost` must be a dense (n, m) matrix for sharded_sinkhorn; "
                        "PointCloud costs are not supported (materialise the cost rows)")
    if (rho_a is None) != (rho_b is None):
        raise ValueError("arguments `rho_a` and `rho_b` must both be given (unbalanced) or "
                         "both be None (balanced)")
    cost, a, b, epsilon, rho_a, rho_b = cm.validate(cost, a, b, epsilon, rho_a, rho_b)
    n = cost.shape[0]
    if n % n_dev:
        raise ValueError(
            f"the {n} rows of `cost` are not divisible by the size {n_dev} of mesh axis "
            f"{axis_name!r}; pad `cost` with rows of zero weight in `a`"
        )
    max_iterations = cm.check_positive_int(max_iterations, "max_iterations")
    inner_iterations = cm.check_positive_int(inner_iterations, "inner_iterations")
    if epsilon_scaling is not None and not (0 < float(epsilon_scaling) < 1):
        raise ValueError(f"argument `epsilon_scaling` must be in (0, 1), got {epsilon_scaling!r}")
    history = -(-max_iterations // inner_iterations)
    tol = jnp.asarray(tol, a.dtype)
    eps_init = None if epsilon_init is None else jnp.asarray(epsilon_init, a.dtype)
    static = (mesh, axis_name, max_iterations, inner_iterations, history,
              None if epsilon_scaling is None else float(epsilon_scaling))

    def forward(cost, a, b, eps, rho_a, rho_b):
        f, g, err, errors, it, conv = _forward(cost, a, b, eps, rho_a, rho_b, tol, eps_init,
                                               *static)
        return f, g, (err, errors, it, conv)

    f, g, (err, errors, it, conv) = cm.with_implicit_diff(
        forward, cost, a, b, epsilon, rho_a, rho_b, implicit_maxiter, implicit_rtol)
    return cm.make_result(f, g, cost, a, b, epsilon, rho_a, rho_b, err, errors, it, conv,
                          jnp.zeros((), jnp.int32))


def _forward_impl(cost, a, b, eps, rho_a, rho_b, tol, epsilon_init, mesh, axis_name,
                  max_iterations, inner_iterations, history, epsilon_scaling):
    dtype = a.dtype
    balanced = rho_a is None
    scaling = epsilon_scaling is not None
    rows = NamedSharding(mesh, P(axis_name))
    shard_fn = jax.shard_map(
        lambda c, a, b, e, ra, rb, t, ei, dc: _sweeps_shard(
            c, a, b, e, ra, rb, t, ei, dc, axis=axis_name, max_iterations=max_iterations,
            inner_iterations=inner_iterations, history=history, balanced=balanced,
            scaling=scaling),
        mesh=mesh,
        in_specs=(P(axis_name), P(axis_name), P(), P(), P(), P(), P(), P(), P()),
        out_specs=(P(axis_name), P(), P(), P(), P(), P()),
    )
    decay = jnp.asarray(0.0 if epsilon_scaling is None else epsilon_scaling, dtype)
    if scaling:
        eps_init = jnp.mean(cost) if epsilon_init is None else epsilon_init
        eps_init = jnp.maximum(eps_init, eps)
    else:
        eps_init = eps
    zero = jnp.zeros((), dtype)
    return shard_fn(
        lax.with_sharding_constraint(cost, rows), lax.with_sharding_constraint(a, rows), b,
        eps, zero if rho_a is None else rho_a, zero if rho_b is None else rho_b, tol,
        eps_init, decay)


_forward = jax.jit(_forward_impl, static_argnums=tuple(range(8, 14)))
