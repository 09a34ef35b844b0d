"""Manifold Muon: steepest descent under the spectral norm on Stiefel / Grassmann.

For a Stiefel leaf ``W`` (``W^T W = I``) with gradient ``G`` the step solves

    min_A <G, A>  subject to  ||A||_2 <= 1,  W^T A + A^T W = 0

(the steepest-descent direction for the spectral norm, restricted to the tangent
space) by dual ascent on the symmetric multiplier ``L`` of the tangency
constraint: for fixed ``L`` the minimiser is ``A = -msign(G + 2 W L)``, and the
residual ``W^T A + A^T W`` is the dual gradient. On a Grassmann leaf the
constraint ``W^T A = 0`` is a projection and the answer is closed-form,
``A = -msign((I - W W^T) G)``. The point moves to ``msign(W + lr A)``, the polar
retraction.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax._core import (
    as_compute,
    fixed_point_loop,
    nonnegative,
    positive,
    scalar,
    static_int,
    value_at,
)
from subjax.manifolds import Grassmann, Stiefel
from subjax.optim._riemannian import (
    ManifoldTree,
    _check_init,
    _check_like_params,
    _check_manifolds,
    _is_euclidean,
    _leaf_manifolds,
)


class ManifoldMuonState(NamedTuple):
    """State of :func:`manifold_muon`.

    Attributes:
      count: int32 ``()``, number of updates so far.
      momentum: like the params (param dtype), the gradient momentum; ``None``
        without momentum.
      dual_residual: float32 ``()``, after the last step the largest RMS tangency
        residual ``||W^T A + A^T W||_F / p`` over the Stiefel leaves (0 when there
        is none): how far the dual ascent was from converged.
    """

    count: jax.Array
    momentum: optax.Updates
    dual_residual: jax.Array


def _msign(x: jax.Array) -> jax.Array:
    """``U sign(S) V^T`` for ``x = U S V^T`` (batched): the polar factor, exact zeros kept.

    Traced under :func:`subjax.parallel.row_sharded_polar` (as ``fsdp_step`` does),
    a row-sharded tall ``x`` is factored without a gather (sharded QR, ``k x k`` SVD).
    """
    from subjax.parallel._polar import msign_rows  # lazy: subjax.parallel imports optim

    y = msign_rows(x)
    if y is not None:
        return y
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    return (u * jnp.sign(s)[..., None, :]) @ vt


def _sym_gram(w, a):
    """``W^T A + A^T W`` over the long axis."""
    wa = jnp.swapaxes(w, -1, -2) @ a
    return wa + jnp.swapaxes(wa, -1, -2)


class _Dual(NamedTuple):
    lam: jax.Array  # the symmetric multiplier L of the tangency constraint


def stiefel_spectral_direction(w, g, *, max_iters: int = 50, dual_lr: float = 0.1,
                               tol: float = 1e-4):
    """The spectral-norm steepest-descent direction at ``W`` on Stiefel, by dual ascent.

    Returns ``(a, residual, n_iters)`` with ``a = msign(G + 2 W L)`` (so the descent
    step is ``-a``), the RMS tangency residual ``||W^T a + a^T W||_F / p`` (largest
    over a batch) and the dual steps run. ``G`` is first divided by the Frobenius
    norm of its tangent part (``a`` does not depend on ``G``'s scale), and the step
    size of the ascent decays linearly from ``dual_lr`` to 0 over ``max_iters``.
    """
    p = w.shape[-1]
    wtg = jnp.swapaxes(w, -1, -2) @ g
    # the multiplier that makes G + 2 W L tangent when msign is the identity
    lam0 = -0.25 * (wtg + jnp.swapaxes(wtg, -1, -2))
    # The answer depends on G's direction only; the dual steps are O(1), so measure G
    # in units of its tangent part P_W(G) = G + 2 W L0 (near a critical point the
    # normal part dominates and an unscaled ascent would overshoot).
    t0 = g + 2.0 * (w @ lam0)
    norm = jnp.sqrt(jnp.sum(t0 * t0, axis=(-2, -1), keepdims=True))
    scale = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    g, lam0 = g / scale, lam0 / scale

    def step(state, it):
        a = _msign(g + 2.0 * (w @ state.lam))
        h = _sym_gram(w, a)
        err = jnp.max(jnp.sqrt(jnp.sum(h * h, axis=(-2, -1)))) / p
        decay = 1.0 - it.astype(h.dtype) / max_iters
        return _Dual(state.lam - dual_lr * decay * h), err

    out = fixed_point_loop(step, _Dual(lam0),
                           max_iters=max_iters, stop=lambda s, err: err < tol,
                           dtype=w.dtype)
    a = _msign(g + 2.0 * (w @ out.state.lam))
    h = _sym_gram(w, a)
    residual = jnp.max(jnp.sqrt(jnp.sum(h * h, axis=(-2, -1)))) / p
    return a, residual, out.n_iters


def manifold_muon(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    manifolds: ManifoldTree = None,
    dual_steps: int | None = None,
    dual_lr: float = 0.1,
    tol: float = 1e-4,
    validate: bool = True,
) -> optax.GradientTransformationExtraArgs:
    r"""Manifold Muon: spectral-norm steepest descent on Stiefel (and Grassmann) leaves.

    With ``G`` the gradient (or its momentum), each Stiefel leaf ``W`` moves by

    .. math::
        A^\star = \arg\min_{A}\ \langle G, A\rangle
        \ \text{s.t.}\ \|A\|_2 \le 1,\ W^\top A + A^\top W = 0,\qquad
        W_{k+1} = \operatorname{msign}(W_k + \eta_k A^\star),

    where ``msign`` is the polar factor (the matrix sign of the singular values).
    ``A*`` is found by dual ascent on the symmetric multiplier :math:`\Lambda`:
    :math:`A(\Lambda) = -\operatorname{msign}(G + 2 W \Lambda)`,
    :math:`\Lambda \leftarrow \Lambda + \alpha_t (W^\top A + A^\top W)` with
    :math:`\alpha_t` decaying linearly from ``dual_lr``, until the RMS tangency
    residual is below ``tol`` or ``dual_steps`` steps have run. On a Grassmann
    leaf the answer is closed-form,
    :math:`A^\star = -\operatorname{msign}((I - W W^\top) G)`. Leaves labelled
    ``None`` (Euclidean) take a plain (momentum) SGD step ``-lr G``; use
    ``optax.partition`` to give them another optimizer. Every step moves a
    manifold leaf by at most ``lr`` in spectral norm before the retraction.

    Args:
      learning_rate: float, scalar array or optax schedule: the spectral-norm step.
      momentum: heavy-ball coefficient in ``[0, 1)`` on the gradient (as Muon);
        ``None`` (default) uses the gradient itself.
      nesterov: use ``g + momentum * m`` instead of ``m``.
      manifolds: pytree of :class:`subjax.manifolds.Stiefel` /
        :class:`~subjax.manifolds.Grassmann` / ``None`` labels that is a prefix of
        the params (matched by key names), or one manifold for every leaf.
        Leading axes of a leaf are a batch of independent points.
      dual_steps: cap on the dual-ascent steps per Stiefel leaf (static; ``None``:
        50, which stays static under ``optax.inject_hyperparams``).
      dual_lr: initial dual step size ``> 0``.
      tol: RMS tangency residual at which the dual ascent stops (``>= 0``).
      validate: check at ``init`` that concrete manifold leaves are on their manifold.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`ManifoldMuonState`; its ``dual_residual`` reports how far the last
      dual ascent was from converged.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from subjax.manifolds import Stiefel
      >>> from subjax.optim import manifold_muon
      >>> st = Stiefel(6, 2)
      >>> c = jnp.diag(jnp.arange(6.0, 0.0, -1.0))
      >>> loss = lambda p: -jnp.trace(p["w"].T @ c @ p["w"])  # top-2 eigenvectors
      >>> lr = optax.cosine_decay_schedule(0.1, 100)  # a spectral step has fixed length
      >>> opt = manifold_muon(lr, manifolds={"w": st})
      >>> params = {"w": st.random_point(jax.random.key(0))}
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(100):
      ...     params, state = step(params, state)
      >>> round(float(loss(params)), 2), bool(st.check(params["w"]) < 1e-5)
      (-11.0, True)

    References:
      Bernstein, "Modular Manifolds", Thinking Machines Lab: Connectionism, 2025
      (manifold Muon). Jordan et al., "Muon: An optimizer for hidden layers in
      neural networks", 2024. Bernstein, Newhouse, "Old optimizer, new norm: an
      anthology", 2024.
    """
    if not callable(learning_rate):
        scalar(learning_rate, "learning_rate")
    scalar(momentum, "momentum", low=0.0, high=1.0, high_open=True, allow_none=True)
    _check_manifolds(manifolds)
    dual_steps = 50 if dual_steps is None else static_int(dual_steps, "dual_steps", 1)
    positive(dual_lr, "dual_lr")
    nonnegative(tol, "tol")
    use_momentum = momentum is not None

    def _labels(params):
        labels = _leaf_manifolds(manifolds, params)
        for m in labels:
            if not (_is_euclidean(m) or isinstance(m, Stiefel)):
                raise TypeError(
                    f"manifold_muon handles Stiefel, Grassmann and Euclidean (None) leaves; "
                    f"got {m!r} in `manifolds`"
                )
        return labels

    def init_fn(params):
        if _check_init(manifolds, params, validate, "manifold_muon"):
            _labels(params)
        mom = jax.tree.map(jnp.zeros_like, params) if use_momentum else None
        return ManifoldMuonState(jnp.zeros([], jnp.int32), mom, jnp.zeros([], jnp.float32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted (optax.GradientTransformationExtraArgs), not used
        if params is None:
            raise ValueError("manifold_muon.update needs `params` (the current point)")
        _check_like_params(updates, params, "updates")
        labels = _labels(params)
        lr = value_at(learning_rate, state.count)
        leaves_p = jax.tree.leaves(params)
        leaves_g, gdef = jax.tree.flatten(updates)
        if use_momentum:
            leaves_m, mdef = jax.tree.flatten(state.momentum)
            new_m = [(momentum * m.astype(jnp.float32) + g.astype(jnp.float32)).astype(m.dtype)
                     for m, g in zip(leaves_m, leaves_g, strict=True)]
            dirs = [g.astype(jnp.float32) + momentum * m.astype(jnp.float32) if nesterov
                    else m for g, m in zip(leaves_g, new_m, strict=True)]
        else:
            new_m, dirs = None, leaves_g
        out, residual = [], jnp.zeros([], jnp.float32)
        for m, x, d in zip(labels, leaves_p, dirs, strict=True):
            xw, dw = as_compute(x), as_compute(d)
            lr_w = jnp.asarray(lr).astype(xw.dtype)
            if _is_euclidean(m):
                out.append((-lr_w * dw).astype(x.dtype))
                continue
            if isinstance(m, Grassmann):
                a = _msign(dw - xw @ (jnp.swapaxes(xw, -1, -2) @ dw))
            else:
                a, res, _ = stiefel_spectral_direction(xw, dw, max_iters=dual_steps,
                                                       dual_lr=dual_lr, tol=tol)
                residual = jnp.maximum(residual, res.astype(jnp.float32))
            u = _msign(xw - lr_w * a) - xw
            out.append(jnp.where(lr_w == 0, jnp.zeros_like(u), u).astype(x.dtype))
        new_state = ManifoldMuonState(
            count=optax.safe_int32_increment(state.count),
            momentum=jax.tree.unflatten(mdef, new_m) if use_momentum else None,
            dual_residual=residual,
        )
        return jax.tree.unflatten(gdef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
