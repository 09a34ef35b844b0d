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
Non-matrix leaves (biases, scales) get Adam with ``b1 = beta`` (as Muon does).

Implementation notes: ``P^-1``, ``P^-1/2`` (and ``Q``'s) come from an eigendecomposition
refreshed every ``refresh_every`` steps under ``lax.cond`` (``refresh_every=1``
recomputes them every step); both factor updates use the inverses of the last
refresh (the paper's ``R`` uses the just-updated ``P``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax._core import positive, static_int, unit_interval
from subjax.optim._kfac import param_names

_NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz(m: jax.Array, n_steps: int = 5, coeffs=_NS_COEFFS, eps: float = 1e-7):
    """Approximate polar factor ``U V^T`` of ``m`` by a quintic Newton-Schulz iteration.

    ``X <- a X + (b X X^T + c (X X^T)^2) X`` from ``X = m / ||m||_F``; the
    coefficients (Jordan et al., Muon) push every singular value into roughly
    ``[0.7, 1.2]`` in five steps.
    """
    a, b, c = coeffs
    x = m.astype(jnp.float32)
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
    """State of :func:`scale_by_fismo`.

    Attributes:
      count: int32 scalar.
      p: dict leaf path -> float32 ``(m, m)`` left factor (trace m).
      q: dict leaf path -> float32 ``(n, n)`` right factor (trace n).
      eig_p, eig_q: dict -> (eigenvalues, eigenvectors) at the last refresh.
      mu: pytree like params (float32): momentum (whitened for matrices).
      nu: pytree like params (float32): Adam second moment (non-matrix leaves; zeros
        of shape () for matrices).
    """

    count: jax.Array
    p: dict
    q: dict
    eig_p: dict
    eig_q: dict
    mu: Any
    nu: Any


def _eigh(m):
    w, v = jnp.linalg.eigh(m)
    return jnp.maximum(w, 1e-30), v


def _pow(eig, power):
    w, v = eig
    return (v * w**power) @ v.T


def _sym(a):
    return 0.5 * (a + a.T)


def scale_by_fismo(
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
    """FISMO direction (see module docstring); scale by ``-learning_rate`` after."""
    unit_interval(beta, "beta", closed_low=True)
    unit_interval(decay, "decay", closed_low=True)
    positive(relative_damping, "relative_damping")
    refresh_every = static_int(refresh_every, "refresh_every", minimum=1)
    ns_steps = static_int(ns_steps, "ns_steps", minimum=0)
    names = param_names

    def init_fn(params):
        leaves = jax.tree.leaves(params)
        p, q, ep, eq = {}, {}, {}, {}
        for name, x in zip(names(params), leaves, strict=True):
            if jnp.ndim(x) == 2:
                m, n = x.shape
                p[name] = jnp.eye(m, dtype=jnp.float32)
                q[name] = jnp.eye(n, dtype=jnp.float32)
                ep[name] = (jnp.ones((m,), jnp.float32), jnp.eye(m, dtype=jnp.float32))
                eq[name] = (jnp.ones((n,), jnp.float32), jnp.eye(n, dtype=jnp.float32))
        mu = jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params)
        nu = jax.tree.map(
            lambda x: jnp.zeros(() if jnp.ndim(x) == 2 else jnp.shape(x), jnp.float32), params
        )
        return FISMOState(jnp.zeros((), jnp.int32), p, q, ep, eq, mu, nu)

    def update_fn(updates, state, params=None):
        del params
        if axis_name is not None:
            updates = jax.lax.pmean(updates, axis_name)
        leaves = jax.tree.leaves(updates)
        treedef = jax.tree.structure(updates)
        keys = names(updates)
        count = optax.safe_int32_increment(state.count)
        mu_l = jax.tree.leaves(state.mu)
        nu_l = jax.tree.leaves(state.nu)
        new_p, new_q = {}, {}
        for k, g in zip(keys, leaves, strict=True):
            if k not in state.p:
                continue
            g = g.astype(jnp.float32)
            m, n = g.shape
            pp, qq = state.p[k], state.q[k]
            q_inv = _pow(state.eig_q[k], -1.0)
            p_inv = _pow(state.eig_p[k], -1.0)
            eye_m = jnp.eye(m, dtype=g.dtype)
            lft = g @ q_inv @ g.T / n + relative_damping * jnp.trace(pp) / m * eye_m
            pt = decay * pp + (1 - decay) * lft
            new_p[k] = _sym(m * pt / jnp.trace(pt))
            eye_n = jnp.eye(n, dtype=g.dtype)
            rgt = g.T @ p_inv @ g / m + relative_damping * jnp.trace(qq) / n * eye_n
            qt = decay * qq + (1 - decay) * rgt
            new_q[k] = _sym(n * qt / jnp.trace(qt))

        def refresh(_):
            return ({k: _eigh(v) for k, v in new_p.items()},
                    {k: _eigh(v) for k, v in new_q.items()})

        eig_p, eig_q = jax.lax.cond(
            state.count % refresh_every == 0, refresh, lambda _: (state.eig_p, state.eig_q), None
        )
        out, mus, nus = [], [], []
        bc1 = 1 - beta ** count.astype(jnp.float32)
        bc2 = 1 - b2 ** count.astype(jnp.float32)
        for k, g, mu, nu in zip(keys, leaves, mu_l, nu_l, strict=True):
            g32 = g.astype(jnp.float32)
            if k in state.p:
                p_is = _pow(eig_p[k], -0.5)
                q_is = _pow(eig_q[k], -0.5)
                mu = beta * mu + (1 - beta) * (p_is @ g32 @ q_is)
                d = p_is @ newton_schulz(mu, ns_steps) @ q_is
            else:
                mu = beta * mu + (1 - beta) * g32
                nu = b2 * nu + (1 - b2) * g32**2
                d = (mu / bc1) / (jnp.sqrt(nu / bc2) + eps)
            out.append(d.astype(g.dtype))
            mus.append(mu)
            nus.append(nu)
        new_state = FISMOState(
            count, new_p, new_q, eig_p, eig_q,
            jax.tree.unflatten(treedef, mus), jax.tree.unflatten(treedef, nus),
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformation(init_fn, update_fn)


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
    """FISMO: Kronecker-factored Fisher whitening + Muon-style orthogonalized momentum.

    Needs no extra arguments: the factors ``P, Q`` are estimated from the
    gradients themselves (see the module docstring for the update).

    Args:
      learning_rate: step size (float or schedule).
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

    References:
      Xu, Yan, Zhang, "FISMO: Fisher-Structured Momentum-Orthogonalized Optimizer",
      arXiv:2601.21750, 2026. Jordan et al., "Muon: An optimizer for hidden layers in
      neural networks", 2024.
    """
    return optax.chain(
        scale_by_fismo(
            beta=beta, decay=decay, relative_damping=relative_damping,
            refresh_every=refresh_every, ns_steps=ns_steps, b2=b2, eps=eps, axis_name=axis_name,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
