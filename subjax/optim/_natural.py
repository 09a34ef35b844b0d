"""Natural gradient / Hessian-free: a damped Fisher (Gauss-Newton) solve by CG per step."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax.fisher import _core
from subjax.fisher import _likelihood as lk
from subjax.fisher._likelihood import wide
from subjax.optim._kfac import at_least, in_unit, positive

Params = Any


def _vdot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _axpy(alpha, x, y):
    return jax.tree.map(lambda xi, yi: jnp.asarray(alpha).astype(xi.dtype) * xi + yi, x, y)


def tree_cg(matvec: Callable, b, x0, *, maxiter: int, tol):
    """Conjugate gradients on pytrees; stops at ``|r| <= tol |b|`` or ``maxiter``.

    Returns ``(x, n_iters, relative residual)``.
    """
    # TODO(linalg): subjax.linalg.cg works on flat vectors; this pytree CG avoids a
    # ravel / unravel per matvec of the Fisher operator.
    r = jax.tree.map(lambda bi, ai: bi - ai, b, matvec(x0))
    p = r
    rs = _vdot(r, r)
    tiny = jnp.asarray(jnp.finfo(jnp.float32).tiny, rs.dtype)
    bnorm2 = jnp.maximum(_vdot(b, b), tiny)
    tol2 = jnp.asarray(tol).astype(rs.dtype) ** 2 * bnorm2

    def cond(c):
        _, _, _, rs, k = c
        return (k < maxiter) & (rs > tol2)

    def body(c):
        x, r, p, rs, k = c
        ap = matvec(p)
        alpha = rs / jnp.maximum(_vdot(p, ap), tiny)
        x = _axpy(alpha, p, x)
        r = _axpy(-alpha, ap, r)
        rs_new = _vdot(r, r)
        p = _axpy(rs_new / jnp.maximum(rs, tiny), p, r)
        return x, r, p, rs_new, k + 1

    x, _, _, rs, k = jax.lax.while_loop(cond, body, (x0, r, p, rs, jnp.zeros((), jnp.int32)))
    return x, k, jnp.sqrt(rs / bnorm2).astype(jnp.float32)


class NaturalGradientState(NamedTuple):
    """State of :func:`scale_by_natural_gradient`.

    Attributes:
      count: int32 scalar.
      direction: pytree like params (float32 or wider), the last solution ``d`` (CG warm start
        and heavy-ball momentum buffer).
      cg_iters: int32 scalar, CG iterations of the last solve.
      cg_residual: float32 scalar, relative residual ``|(F + lambda) d - g| / |g|``.
    """

    count: jax.Array
    direction: Any
    cg_iters: jax.Array
    cg_residual: jax.Array


def scale_by_natural_gradient(
    damping: float = 1e-3,
    *,
    curvature: str = "fisher",
    likelihood: str = "categorical",
    maxiter: int = 20,
    tol: float = 1e-5,
    momentum: float = 0.0,
    warm_start: bool = True,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Direction ``d = (F + lambda I)^-1 g`` by CG (see :func:`natural_gradient`)."""
    positive(damping, "damping")
    in_unit(momentum, "momentum")
    lk.check_likelihood(likelihood)
    if curvature not in ("fisher", "empirical"):
        raise ValueError(f"`curvature` must be 'fisher' or 'empirical', got {curvature!r}")
    at_least(maxiter, "maxiter")

    def init_fn(params):
        return NaturalGradientState(
            count=jnp.zeros((), jnp.int32),
            direction=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), wide(p.dtype)), params),
            cg_iters=jnp.zeros((), jnp.int32),
            cg_residual=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None, *, apply_fn=None, inputs=None, labels=None,
                  **extra):
        del extra
        if params is None:
            raise ValueError("natural_gradient needs `params` in update")
        if apply_fn is None or inputs is None:
            raise ValueError(
                "natural_gradient needs the keyword arguments `apply_fn` ((params, inputs) "
                "-> outputs) and `inputs` in update, e.g. "
                "opt.update(grads, state, params, apply_fn=apply, inputs=x)"
            )
        if curvature == "empirical" and labels is None:
            raise ValueError("curvature='empirical' needs `labels` in update")
        if not callable(apply_fn):
            raise TypeError(f"`apply_fn` must be callable, got {type(apply_fn).__name__}")
        p32 = jax.tree.map(lambda p: p.astype(wide(p.dtype)), params)
        if curvature == "fisher":
            fv = _core.make_fvp(apply_fn, p32, inputs, likelihood=likelihood)
        else:
            fv = _core.make_empirical_fvp(apply_fn, p32, inputs, labels, likelihood=likelihood)
        lam = jnp.asarray(damping, jnp.float32)

        def matvec(v):
            fvv = jax.tree.map(lambda a, b: a.astype(b.dtype), fv(v), v)
            fvv = fvv if axis_name is None else jax.lax.pmean(fvv, axis_name)
            return _axpy(lam, v, fvv)

        g = jax.tree.map(lambda x: x.astype(wide(x.dtype)), updates)
        x0 = state.direction if warm_start else jax.tree.map(jnp.zeros_like, g)
        d, k, res = tree_cg(matvec, g, x0, maxiter=maxiter, tol=tol)
        v = _axpy(jnp.asarray(momentum, jnp.float32), state.direction, d)
        out = jax.tree.map(lambda x, u: x.astype(u.dtype), v, updates)
        return out, NaturalGradientState(optax.safe_int32_increment(state.count), d, k, res)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def natural_gradient(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 1e-3,
    *,
    curvature: str = "fisher",
    likelihood: str = "categorical",
    maxiter: int = 20,
    tol: float = 1e-5,
    momentum: float = 0.0,
    warm_start: bool = True,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Natural gradient with a damped, matrix-free Fisher solve (Hessian-free style).

    Each step solves ``(F + lambda I) d = g`` by conjugate gradients, where ``F v``
    is a Fisher-vector product at the current parameters (the true Fisher, equal
    to the Gauss-Newton matrix of the mean NLL, or the empirical Fisher), then
    returns ``-learning_rate * d``. CG is warm-started from the previous
    solution (Martens 2010).

    The model comes in as extra keyword arguments of ``update``::

        opt = subjax.optim.natural_gradient(1.0, damping=1e-3, likelihood="categorical")
        updates, state = opt.update(grads, state, params, apply_fn=apply_fn, inputs=x)

    ``apply_fn(params, inputs) -> outputs`` (logits / mean). Inside your own
    ``jax.jit`` a plain function works; to pass it *through* a ``jax.jit``
    boundary as an argument wrap it in ``jax.tree_util.Partial``.

    Args:
      learning_rate: step size (float or schedule).
      damping: ``lambda`` > 0.
      curvature: ``"fisher"`` (true Fisher = GGN; no labels) or ``"empirical"``
        (needs ``labels=`` in update).
      likelihood: ``"categorical" | "bernoulli" | "gaussian"``.
      maxiter: CG iteration cap (static).
      tol: relative residual tolerance of CG.
      momentum: heavy-ball coefficient on the natural-gradient direction.
      warm_start: start CG from the previous solution.
      axis_name: if set, every Fisher-vector product is ``lax.pmean``-ed over this
        axis (data parallel); the gradient must already be averaged by the caller.

    Returns:
      ``optax.GradientTransformationExtraArgs`` with ``update(grads, state, params,
      *, apply_fn, inputs, labels=None)``.

    References:
      Amari, "Natural gradient works efficiently in learning", 1998. Martens,
      "Deep learning via Hessian-free optimization", ICML 2010.
    """
    return optax.chain(
        scale_by_natural_gradient(
            damping,
            curvature=curvature,
            likelihood=likelihood,
            maxiter=maxiter,
            tol=tol,
            momentum=momentum,
            warm_start=warm_start,
            axis_name=axis_name,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
