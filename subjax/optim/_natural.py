"""Natural gradient / Hessian-free: a damped Fisher (Gauss-Newton) solve by CG per step."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from subjax import linalg
from subjax._core import as_compute, choice, positive, static_int, unit_interval
from subjax.fisher import _core
from subjax.fisher import _likelihood as lk
from subjax.optim import _curvature as cv

Params = Any


def _axpy(alpha, x, y):
    return jax.tree.map(lambda xi, yi: jnp.asarray(alpha).astype(xi.dtype) * xi + yi, x, y)


class NaturalGradientState(NamedTuple):
    """State of :func:`natural_gradient` (the first element of its chain state).

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


def natural_gradient(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 1e-3,
    *,
    curvature: str = "fisher",
    likelihood: str = "categorical",
    max_iters: int = 20,
    tol: float = 1e-5,
    momentum: float = 0.0,
    warm_start: bool = True,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Natural gradient with a damped, matrix-free Fisher solve (Hessian-free style).

    Each step solves the damped Fisher system by conjugate gradients, warm-started
    from the previous solution (Martens 2010), and takes a heavy-ball step along it:

    .. math::

        (F + \lambda I)\, d_t = g_t, \qquad
        F = \frac1N \sum_i J_i^\top F_{z_i} J_i, \qquad
        v_t = \mu v_{t-1} + d_t, \qquad \theta_{t+1} = \theta_t - \eta\, v_t

    where ``F v`` is a Fisher-vector product at the current parameters (the true
    Fisher, equal to the Gauss-Newton matrix of the mean NLL, with ``J_i`` the
    model's Jacobian on example ``i`` and ``F_z`` the output Fisher of the
    likelihood; or the empirical Fisher). The CG iterations and relative residual
    of the last solve are kept in the state.

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
      max_iters: cap on the CG iterations of each solve (static).
      tol: relative residual tolerance of CG.
      momentum: heavy-ball coefficient on the natural-gradient direction.
      warm_start: start CG from the previous solution.
      axis_name: if set, every Fisher-vector product is ``lax.pmean``-ed over this
        axis (data parallel); the gradient must already be averaged by the caller.

    Returns:
      ``optax.GradientTransformationExtraArgs`` with ``update(grads, state, params,
      *, apply_fn, inputs, labels=None)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from subjax import optim
      >>> x = jax.random.normal(jax.random.key(0), (64, 3))
      >>> y = (x @ jnp.array([1.0, -2.0, 0.5]) > 0).astype(jnp.float32)[:, None]
      >>> apply_fn = lambda p, xb: xb @ p["w"] + p["b"]
      >>> def loss(p):
      ...     z = apply_fn(p, x)
      ...     return jnp.mean(jnp.sum(jax.nn.softplus(z) - y * z, axis=-1))
      >>> params = {"w": jnp.zeros((3, 1)), "b": jnp.zeros(1)}
      >>> opt = optim.natural_gradient(1.0, damping=1e-3, likelihood="bernoulli",
      ...                              max_iters=10)
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params,
      ...                                 apply_fn=apply_fn, inputs=x)
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(5):
      ...     params, state = step(params, state)
      >>> bool(loss(params) < 0.25 * jnp.log(2.0))  # from log 2 at zero weights
      True

    References:
      Amari, "Natural gradient works efficiently in learning", 1998. Martens,
      "Deep learning via Hessian-free optimization", ICML 2010.
    """
    positive(damping, "damping")
    unit_interval(momentum, "momentum", closed_low=True)
    lk.check_likelihood(likelihood)
    choice(curvature, "curvature", ("fisher", "empirical"))
    max_iters = static_int(max_iters, "max_iters", minimum=1)
    positive(tol, "tol")

    def init_fn(params):
        return NaturalGradientState(
            count=jnp.zeros((), jnp.int32),
            direction=jax.tree.map(lambda p: jnp.zeros_like(as_compute(p)), params),
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
        p32 = jax.tree.map(as_compute, params)
        if curvature == "fisher":
            fv = _core.make_fvp(apply_fn, p32, inputs, likelihood=likelihood)
        else:
            fv = _core.make_empirical_fvp(apply_fn, p32, inputs, labels, likelihood=likelihood)
        lam = jnp.asarray(damping, jnp.float32)
        g = jax.tree.map(as_compute, updates)
        g_flat, unravel = ravel_pytree(g)
        lam = lam.astype(g_flat.dtype)

        def matvec(x):
            v = unravel(x)
            fvv = jax.tree.map(lambda a, b: a.astype(b.dtype), fv(v), v)
            fvv = cv.pmean(fvv, axis_name)
            return ravel_pytree(fvv)[0] + lam * x

        x0 = ravel_pytree(state.direction)[0].astype(g_flat.dtype)
        if not warm_start:
            x0 = jnp.zeros_like(g_flat)
        res = linalg.cg(matvec, g_flat, x0=x0, tol=tol, max_iters=max_iters)
        d = unravel(res.x)
        k = res.n_iters
        gnorm = jnp.maximum(jnp.linalg.norm(g_flat), jnp.finfo(g_flat.dtype).tiny)
        res = (res.residual_norm / gnorm).astype(jnp.float32)
        v = _axpy(jnp.asarray(momentum, jnp.float32), state.direction, d)
        out = jax.tree.map(lambda x, u: x.astype(u.dtype), v, updates)
        return out, NaturalGradientState(optax.safe_int32_increment(state.count), d, k, res)

    return optax.chain(
        optax.GradientTransformationExtraArgs(init_fn, update_fn),
        optax.scale_by_learning_rate(learning_rate),
    )
