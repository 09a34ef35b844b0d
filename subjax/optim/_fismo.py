"""FISMO: Fisher-structured momentum orthogonalization (Xu, Yan, Zhang 2026).

For a matrix parameter ``W`` (``m x n``) with gradient ``G`` the Fisher is modelled
as ``P (x) Q`` (``P``: ``m x m``, ``Q``: ``n x n``), estimated from the gradients by
moving averages of the Kronecker "flip-flop" updates and trace-normalised::

    L = G Q^-1 G^T / n + mu tr(P)/m I        P <- sym(m P~ / tr P~),  P~ = g P + (1-g) L
    R = G^T P^-1 G / m + mu tr(Q)/n I        Q <- sym(n Q~ / tr Q~),  Q~ = g Q + (1-g) R

then the gradient is whitened, accumulated in momentum, orthogonalised (Muon's
Newton-Schulz polar factor) and mapped back::

    M <- beta M + (1 - beta) P^-1/2 G Q^-1/2
    Delta = P^-1/2 Polar(M) Q^-1/2,   W <- W - lr Delta

This is the steepest-descent step under the spectral-norm trust region
``||P^1/2 Delta Q^1/2||_2 <= 1`` of the Kronecker-factored Fisher metric.
Non-matrix leaves (biases, scales) get Adam with ``b1 = beta`` through
``optax.partition`` (as ``optax.contrib.muon`` does).

Implementation notes: ``P^-1``, ``P^-1/2`` (and ``Q``'s) come from an eigendecomposition
refreshed every ``refresh_every`` steps under ``lax.cond`` (``refresh_every=1``
recomputes them every step); both factor updates use the inverses of the last
refresh (the paper's ``R`` uses the just-updated ``P``).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax._core import as_compute, int_scalar, positive, static_int, unit_interval
from subjax.optim import _curvature as cv

_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(m: jax.Array, n_steps: int = 5, coeffs=_NS_COEFFS, eps: float = 1e-7):
    """Approximate polar factor ``U V^T`` of ``m`` by a quintic Newton-Schulz iteration.

    ``X <- a X + (b X X^T + c (X X^T)^2) X`` from ``X = m / ||m||_F``; the
    coefficients (Jordan et al., Muon) push every singular value into roughly
    ``[0.7, 1.2]`` in five steps.
    """
    a, b, c = coeffs
    x = as_compute(m)
    transpose = x.shape[0] > x.shape[1]
    if transpose:
        x = x.T
    x = x / (jnp.linalg.norm(x) + eps)

    def body(_, x):
        s = x @ x.T
        return a * x + (b * s + c * (s @ s)) @ x

    x = jax.lax.fori_loop(0, n_steps, body, x)
    return x.T if transpose else x


class FISMOState(NamedTuple):
    """State of :func:`scale_by_fismo` (matrix leaves; every field but ``count`` is
    shaped like the parameters, in their compute dtype).

    Attributes:
      count: int32 scalar.
      p: ``(m, m)`` left factor of each ``(m, n)`` leaf (trace ``m``).
      q: ``(n, n)`` right factor (trace ``n``).
      eigvals_p, eigvecs_p: eigendecomposition of ``p`` at the last refresh.
      eigvals_q, eigvecs_q: same for ``q``.
      momentum: whitened momentum ``M``, like the parameters.
    """

    count: jax.Array
    p: Any
    q: Any
    eigvals_p: Any
    eigvecs_p: Any
    eigvals_q: Any
    eigvecs_q: Any
    momentum: Any


def _sym(a):
    return 0.5 * (a + a.T)


def _check_matrix(x):
    if jnp.ndim(x) != 2:
        raise ValueError(
            f"scale_by_fismo preconditions matrix leaves only, got a leaf of shape "
            f"{jnp.shape(x)}: use subjax.optim.fismo (Adam on the other leaves) or "
            "optax.partition"
        )


def _flip_flop(g, p, q, wp, vp, wq, vq, decay, relative_damping):
    """One moving-average update of the factors ``P, Q`` from the gradient ``g``."""
    m, n = g.shape
    p_inv = cv.matrix_power(wp, vp, -1.0)
    q_inv = cv.matrix_power(wq, vq, -1.0)
    lft = g @ q_inv @ g.T / n + relative_damping * jnp.trace(p) / m * jnp.eye(m, dtype=g.dtype)
    pt = decay * p + (1 - decay) * lft
    rgt = g.T @ p_inv @ g / m + relative_damping * jnp.trace(q) / n * jnp.eye(n, dtype=g.dtype)
    qt = decay * q + (1 - decay) * rgt
    return _sym(m * pt / jnp.trace(pt)), _sym(n * qt / jnp.trace(qt))


def scale_by_fismo(
    *,
    beta: float = 0.9,
    decay: float = 0.95,
    relative_damping: float = 1e-3,
    refresh_every: int = 1,
    ns_steps: int = 5,
) -> optax.GradientTransformation:
    r"""FISMO direction of matrix leaves; every leaf must be 2-D.

    For a gradient ``G`` (``m x n``) with Kronecker Fisher factors ``P`` (``m x m``)
    and ``Q`` (``n x n``), moving averages of trace-normalised flip-flop updates
    (see the module docstring):

    .. math::

        M_t = \beta M_{t-1} + (1 - \beta)\, P^{-1/2} G Q^{-1/2}, \qquad
        D_t = P^{-1/2} \operatorname{Polar}(M_t)\, Q^{-1/2}

    with the polar factor from ``ns_steps`` Newton-Schulz iterations. The output
    is ``D_t`` (no learning rate); :func:`fismo` routes the other leaves to Adam
    and scales by ``-learning_rate``.

    Args:
      beta: momentum coefficient in [0, 1).
      decay: moving-average decay ``gamma`` of the factors in [0, 1).
      relative_damping: ``mu`` > 0, damping of the factor updates relative to the
        factor's mean eigenvalue.
      refresh_every: refresh the factors' eigendecompositions every ``T`` steps.
      ns_steps: Newton-Schulz iterations (static).

    Returns:
      An ``optax.GradientTransformation`` with :class:`FISMOState`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax import optim
      >>> tx = optim.scale_by_fismo()
      >>> g = {"w": jnp.arange(6.0).reshape(2, 3)}
      >>> d, state = tx.update(g, tx.init(g))
      >>> d["w"].shape, int(state.count)
      ((2, 3), 1)

    References:
      Xu, Yan, Zhang, "FISMO: Fisher-Structured Momentum-Orthogonalized Optimizer",
      arXiv:2601.21750, 2026.
    """
    unit_interval(beta, "beta", closed_low=True)
    unit_interval(decay, "decay", closed_low=True)
    positive(relative_damping, "relative_damping")
    int_scalar(refresh_every, "refresh_every", minimum=1)
    ns_steps = static_int(ns_steps, "ns_steps", minimum=0)

    def eye_rows(x):
        _check_matrix(x)
        return jnp.eye(x.shape[0], dtype=cv.zeros_compute(x).dtype)

    def eye_cols(x):
        _check_matrix(x)
        return jnp.eye(x.shape[1], dtype=cv.zeros_compute(x).dtype)

    def init_fn(params):
        p = jax.tree.map(eye_rows, params)
        q = jax.tree.map(eye_cols, params)
        ones = lambda e: jnp.ones(e.shape[:1], e.dtype)
        return FISMOState(
            count=jnp.zeros((), jnp.int32),
            p=p, q=q,
            eigvals_p=jax.tree.map(ones, p), eigvecs_p=p,
            eigvals_q=jax.tree.map(ones, q), eigvecs_q=q,
            momentum=jax.tree.map(cv.zeros_compute, params),
        )

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        for x in leaves:
            _check_matrix(x)
        flat = treedef.flatten_up_to
        g = [as_compute(x) for x in leaves]
        pq = [_flip_flop(*a, decay, relative_damping) for a in zip(
            g, flat(state.p), flat(state.q), flat(state.eigvals_p), flat(state.eigvecs_p),
            flat(state.eigvals_q), flat(state.eigvecs_q), strict=True)]
        p, q = [a for a, _ in pq], [b for _, b in pq]
        k = len(g)
        w, v = cv.refresh(
            state.count, refresh_every, p + q,
            (flat(state.eigvals_p) + flat(state.eigvals_q),
             flat(state.eigvecs_p) + flat(state.eigvecs_q)),
        )
        out, mom = [], []
        for gi, mi, wp, vp, wq, vq, u in zip(g, flat(state.momentum), w[:k], v[:k], w[k:],
                                             v[k:], leaves, strict=True):
            p_is = cv.matrix_power(wp, vp, -0.5)
            q_is = cv.matrix_power(wq, vq, -0.5)
            mi = beta * mi + (1 - beta) * (p_is @ gi @ q_is)
            out.append((p_is @ newton_schulz(mi, ns_steps) @ q_is).astype(u.dtype))
            mom.append(mi)
        tree = lambda xs: jax.tree.unflatten(treedef, xs)
        new_state = FISMOState(
            optax.safe_int32_increment(state.count), tree(p), tree(q), tree(w[:k]),
            tree(v[:k]), tree(w[k:]), tree(v[k:]), tree(mom),
        )
        return tree(out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _mean_over(axis_name: str) -> optax.GradientTransformation:
    """Average the updates over a mapped axis (a no-op on already-averaged updates)."""

    def update_fn(updates, state, params=None):
        del params
        return jax.lax.pmean(updates, axis_name), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _labels(params):
    return jax.tree.map(lambda x: "fismo" if jnp.ndim(x) == 2 else "adam", params)


def fismo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    beta: float = 0.9,
    decay: float = 0.95,
    relative_damping: float = 1e-3,
    refresh_every: int = 1,
    ns_steps: int = 5,
    b2: float = 0.999,
    eps: float = 1e-8,
    axis_name: str | None = None,
) -> optax.GradientTransformation:
    r"""FISMO: Kronecker-factored Fisher whitening + Muon-style orthogonalized momentum.

    Needs no extra arguments: the factors ``P, Q`` of each matrix leaf are
    estimated from the gradients themselves (see the module docstring), and

    .. math::

        M_t = \beta M_{t-1} + (1 - \beta)\, P^{-1/2} G_t Q^{-1/2}, \qquad
        W_{t+1} = W_t - \eta\, P^{-1/2} \operatorname{Polar}(M_t)\, Q^{-1/2},

    the steepest-descent step under the trust region ``||P^1/2 Delta Q^1/2||_2 <=
    1``. 2-D leaves get :func:`scale_by_fismo`, the others Adam (``b1 = beta``),
    through ``optax.partition``.

    Args:
      learning_rate: step size (float or schedule), shared by both groups.
      beta: momentum coefficient.
      decay: moving-average decay ``gamma`` of the factors.
      relative_damping: ``mu`` > 0, damping of the factor updates as a fraction of the
        factor's mean eigenvalue (``tr / dim``).
      refresh_every: refresh ``P^-1, P^-1/2, Q^-1, Q^-1/2`` every ``T`` steps.
      ns_steps: Newton-Schulz iterations.
      b2, eps: Adam parameters for the non-matrix leaves.
      axis_name: if set, the gradient is ``lax.pmean``-ed over this axis before the
        factor statistics are taken (a no-op when the caller already averaged it).

    Returns:
      An ``optax.GradientTransformation``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from subjax import optim
      >>> target = {"w": jax.random.normal(jax.random.key(0), (4, 3)), "b": jnp.ones(3)}
      >>> loss = lambda p: sum(jnp.sum((p[k] - target[k]) ** 2) for k in p)
      >>> params = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3)}
      >>> opt = optim.fismo(0.05)
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> start = loss(params)
      >>> for _ in range(100):
      ...     params, state = step(params, state)
      >>> bool(loss(params) < 0.25 * start)
      True

    References:
      Xu, Yan, Zhang, "FISMO: Fisher-Structured Momentum-Orthogonalized Optimizer",
      arXiv:2601.21750, 2026. Jordan et al., "Muon: An optimizer for hidden layers in
      neural networks", 2024.
    """
    matrices = optax.chain(
        scale_by_fismo(beta=beta, decay=decay, relative_damping=relative_damping,
                       refresh_every=refresh_every, ns_steps=ns_steps),
        optax.scale_by_learning_rate(learning_rate),
    )
    others = optax.adam(learning_rate, b1=beta, b2=b2, eps=eps)
    split = optax.partition({"fismo": matrices, "adam": others}, _labels)
    return split if axis_name is None else optax.chain(_mean_over(axis_name), split)
