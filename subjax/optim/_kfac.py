"""K-FAC as an optax transform (Martens & Grosse 2015).

For every dense or convolution layer (a ``kernel`` leaf of 2 or more dimensions,
``(*window, d_in, d_out)``, flattened to ``(prod(window) d_in, d_out)``, and its
optional ``bias``) the Fisher block is approximated by ``A (x) G`` with
``A = E[a a^T]`` (inputs, or input patches, with a 1 appended for the bias) and
``G = E[delta delta^T]`` (gradients at the layer's outputs). The statistics are
computed by the caller, together with the gradient, by
:func:`subjax.fisher.kfac_grads_and_stats`, and passed to ``update`` as the
extra keyword argument ``kfac_stats``; this transform keeps their moving
averages, refreshes an eigendecomposition of each factor every
``refresh_every`` steps (under ``lax.cond``) and preconditions::

    damping="kronecker":  Delta = Q_A [ (Q_A^T Gr Q_G) / (d_A d_G^T + lambda) ] Q_G^T
    damping="factored":   Delta = (A + pi sqrt(lambda) I)^-1 Gr (G + sqrt(lambda)/pi I)^-1

(``Gr = [dW; db]``), i.e. the exact inverse of the damped Kronecker product, or
Martens & Grosse's factored Tikhonov damping. Leaves that are not dense layers
get the identity preconditioner. The update is ``-lr v`` with
``v = mu v_prev + nu Delta`` (heavy-ball momentum ``mu``), ``nu <= 1`` chosen so
the predicted KL change ``(lr nu)^2 Delta . Gr`` stays below ``norm_constraint``.
Between scheduled refreshes the inverse is refreshed early when it has gone stale
(``stale_ratio``); the damping can follow
Levenberg-Marquardt adaptation from the observed vs predicted loss change
(``adaptive_damping=True``, needs ``loss=`` in ``update``).
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax._core import (
    as_compute,
    choice,
    compute_dtype,
    int_scalar,
    is_concrete,
    positive,
    scalar,
    unit_interval,
    value_at,
)
from subjax.fisher import _kfac_capture as capture
from subjax.fisher import _likelihood as lk
from subjax.optim import _curvature as cv

Params = Any


class DenseLayer(NamedTuple):
    name: str
    kernel: int  # index of the kernel leaf in the flattened params
    bias: int | None  # index of the bias leaf, or None
    d_in: int
    d_out: int


def find_dense_layers(params, layers=None) -> tuple[DenseLayer, ...]:
    """Layers of ``params``: ``kernel`` leaves of ndim >= 2 with an optional 1-D ``bias``.

    A convolution kernel ``(*window, c_in, c_out)`` counts as the dense layer
    ``(prod(window) c_in, c_out)`` on input patches. Any other parameter
    (LayerNorm scales, embeddings, ...) gets the identity preconditioner; leave a
    ``kernel`` that is not a recorded layer out with ``layers=``.
    """
    leaves = jax.tree.leaves(params)
    found = []
    for k in capture.kernel_leaves(params):
        if layers is not None and k.name not in layers:
            continue
        shape = jnp.shape(leaves[k.kernel])
        found.append(DenseLayer(k.name, k.kernel, k.bias, math.prod(shape[:-1]), int(shape[-1])))
    if layers is not None:
        missing = sorted(set(layers) - {d.name for d in found})
        if missing:
            raise ValueError(
                f"`layers` names {missing} that are not dense layers of `params` "
                "(a 'kernel' leaf of ndim >= 2 under that path)"
            )
    if not found:
        raise ValueError(
            "`params` has no layer for K-FAC (a 'kernel' leaf of ndim >= 2, optionally with a "
            "'bias' beside it): build the model from nnx.Linear / nnx.Conv layers, or name "
            "pure-JAX layers {'kernel': ..., 'bias': ...} and compute them as x @ kernel"
        )
    return tuple(found)


def check_stats(stats, dense: tuple[DenseLayer, ...], arg="kfac_stats"):
    if not isinstance(stats, dict):
        raise TypeError(
            f"`{arg}` must be the dict returned by subjax.fisher.kfac_grads_and_stats, "
            f"got {type(stats).__name__}"
        )
    for d in dense:
        if d.name not in stats:
            raise ValueError(
                f"`{arg}` has no entry for dense layer {d.name!r}: the capture records a "
                "'kernel' only where every use is `x @ kernel` or a convolution (not inside "
                "lax.scan or a custom derivative, not reshaped); leave it out with layers=..."
            )
        a_dim = d.d_in + (d.bias is not None)
        s = stats[d.name]
        if s.a.shape != (a_dim, a_dim) or s.g.shape != (d.d_out, d.d_out):
            raise ValueError(
                f"`{arg}`[{d.name!r}] has factors {s.a.shape}, {s.g.shape}; expected "
                f"({a_dim}, {a_dim}) and ({d.d_out}, {d.d_out})"
            )


def _check_bounds(bounds):
    """``damping_bounds`` as an ordered ``(low, high)`` pair of positive numbers."""
    try:
        low, high = bounds
    except (TypeError, ValueError):
        raise TypeError(
            f"`damping_bounds` must be a (low, high) pair, got {bounds!r}") from None
    positive(low, "damping_bounds[0]")
    positive(high, "damping_bounds[1]")
    if is_concrete(low) and is_concrete(high) and not float(low) <= float(high):
        raise ValueError(
            f"`damping_bounds` must be ordered (low, high) with low <= high, got {bounds!r}")
    return low, high


class KFACState(NamedTuple):
    """State of :func:`kfac`.

    Every field but the scalars is shaped like the parameters (so
    ``optax.tree_map_params`` applies), in the parameters' compute dtype: the
    leaf of a dense layer's ``kernel`` holds that layer's factor, every other
    leaf a 0-d zero.

    Attributes:
      count: int32 scalar, number of updates so far.
      factor_a: ``(d_in+1, d_in+1)`` moving average of ``A`` (``d_in`` without bias).
      factor_g: ``(d_out, d_out)`` moving average of ``G``.
      eigvals_a, eigvecs_a: eigendecomposition of ``factor_a`` at the last refresh.
      eigvals_g, eigvecs_g: same for ``factor_g``.
      momentum: the previous direction ``v`` (before the learning rate; with
        ``adaptive_step`` the previous ``u``), like the parameters.
      damping: float32 scalar, the current damping ``lambda``.
      prev_loss: float32 scalar, loss passed at the previous update (adaptive damping).
      prev_pred: float32 scalar, predicted change of the previous step (adaptive damping).
    """

    count: jax.Array
    factor_a: Any
    factor_g: Any
    eigvals_a: Any
    eigvecs_a: Any
    eigvals_g: Any
    eigvecs_g: Any
    momentum: Any
    damping: jax.Array
    prev_loss: jax.Array
    prev_pred: jax.Array


# -- the pieces of one update -------------------------------------------------------------


def _rows(x, d: DenseLayer):
    """A layer's ``[dW; db]`` from a list of leaves (a conv kernel flattened to 2-D)."""
    w = x[d.kernel].reshape(d.d_in, d.d_out)
    return w if d.bias is None else jnp.concatenate([w, x[d.bias][None, :]], axis=0)


def _scatter(out: list, rows, d: DenseLayer):
    out[d.kernel] = rows[: d.d_in].reshape(out[d.kernel].shape).astype(out[d.kernel].dtype)
    if d.bias is not None:
        out[d.bias] = rows[d.d_in].astype(out[d.bias].dtype)


def _accumulate(state: KFACState, stats: dict, dense, count, decay) -> tuple[list, list]:
    """Statistics: moving averages of ``A`` and ``G`` (plain running mean at first)."""
    rho = jnp.maximum(1.0 - decay, 1.0 / (count.astype(jnp.float32) + 1.0))
    fa, fg = jax.tree.leaves(state.factor_a), jax.tree.leaves(state.factor_g)
    for d in dense:
        fa[d.kernel] = cv.ema(fa[d.kernel], stats[d.name].a, rho)
        fg[d.kernel] = cv.ema(fg[d.kernel], stats[d.name].g, rho)
    return fa, fg


def _levenberg_marquardt(state: KFACState, loss, count, damping_factor, bounds):
    """Damping: Levenberg-Marquardt on the lagged ratio of observed to predicted change."""
    lam = state.damping
    ratio = (jnp.asarray(loss, jnp.float32) - state.prev_loss) / jnp.minimum(
        state.prev_pred, -1e-30)
    new = jnp.where(ratio > 0.75, lam * damping_factor,
                    jnp.where(ratio < 0.25, lam / damping_factor, lam))
    return jnp.clip(jnp.where(count > 0, new, lam), bounds[0], bounds[1])


def _precondition(g: list, dense, eig, lam, damping_mode) -> list:
    """Preconditioning: ``Delta`` per dense layer; the identity on the other leaves."""
    wa, va, wg, vg = eig
    out = list(g)
    for d in dense:
        k = d.kernel
        qa, qg = va[k], vg[k]
        t = qa.T @ _rows(g, d).astype(qa.dtype) @ qg
        lam_d = lam.astype(qa.dtype)
        if damping_mode == "kronecker":
            t = t / (wa[k][:, None] * wg[k][None, :] + lam_d)
        else:
            pi = jnp.sqrt(jnp.mean(wa[k]) / jnp.mean(wg[k]))
            sl = jnp.sqrt(lam_d)
            t = t / ((wa[k] + pi * sl)[:, None] * (wg[k] + sl / pi)[None, :])
        _scatter(out, qa @ t @ qg.T, d)
    return out


def _vdot(xs, ys) -> jax.Array:
    return sum(jnp.vdot(x, y).astype(jnp.float32) for x, y in zip(xs, ys, strict=True))


def _curvature(x: list, dense, fa, fg, lam) -> jax.Array:
    """``x^T (A (x) G + lambda I) x`` with the current factors (identity off the layers)."""
    quad = lam * _vdot(x, x)
    for d in dense:
        r = _rows(x, d).astype(fa[d.kernel].dtype)
        quad = quad + jnp.vdot(r, fa[d.kernel] @ r @ fg[d.kernel]).astype(jnp.float32)
    return quad


def _kl_clip(lr, g, delta, norm_constraint) -> jax.Array:
    """Step size / clipping: the factor ``nu <= 1`` with ``(lr nu)^2 |Delta . g| <=
    norm_constraint`` (KL clipping, Ba et al. 2017); 1 without a constraint."""
    if norm_constraint is None:
        return jnp.ones((), jnp.float32)
    lr = jnp.asarray(lr, jnp.float32)
    kl = lr * lr * jnp.abs(_vdot(g, delta))
    return jnp.minimum(1.0, jnp.sqrt(norm_constraint / jnp.maximum(kl, 1e-30)))


def _stale(g, delta, dense, fa, fg, lam, stale_ratio) -> jax.Array:
    """Whether ``Delta`` came from an inverse the current factors no longer support.

    A fresh inverse gives ``Delta^T (A (x) G + lambda) Delta = g . Delta`` (kronecker
    damping; ``<=`` for factored damping); the cached one is stale when the current
    factors see more than ``stale_ratio`` times that curvature along ``Delta``.
    """
    return _curvature(delta, dense, fa, fg, lam) > stale_ratio * jnp.abs(_vdot(g, delta))


def _model_step(lin, tangent_tree, g, delta, prev, lam, count, lr, axis_name):
    """Step size and momentum from the exact Fisher quadratic model (Martens & Grosse, 7).

    ``u = alpha (-Delta) + mu u_prev`` minimising ``g.u + 1/2 u^T (F + lambda) u`` over
    ``(alpha, mu)`` (``mu = 0`` on the first step or a degenerate 2x2 system), with
    ``u^T F u' = (J u)^T F_z (J u') / N`` from the linearisation ``lin`` that gave the
    gradient (both Jacobian products in one batched linear pass, no new forward
    pass). Returns ``u`` and the predicted change ``g.(lr u) + 1/2 (lr u)^T F (lr u)``
    of the update ``lr u`` (damping excluded).
    """
    dt = g[0].dtype
    a = [-x for x in delta]
    b = list(prev)
    jv = jax.vmap(lin.jvp)(tangent_tree([jnp.stack([x, y]) for x, y in zip(a, b, strict=True)]))
    fjv = lk.output_fisher_product(lin.likelihood, lin.outputs, jv)
    flat = lambda z: z.reshape(2, -1).astype(dt)
    quad = cv.pmean(flat(jv) @ flat(fjv).T / lin.outputs.shape[0], axis_name)
    dot = lambda xs, ys: sum(jnp.vdot(x, y).astype(dt) for x, y in zip(xs, ys, strict=True))
    lin_ab = jnp.stack([dot(g, a), dot(g, b)])
    lam = jnp.asarray(lam).astype(dt)
    aFa, aFb, bFb = quad[0, 0], 0.5 * (quad[0, 1] + quad[1, 0]), quad[1, 1]
    m11 = aFa + lam * dot(a, a)
    m12 = aFb + lam * dot(a, b)
    bb = dot(b, b)
    m22 = bFb + lam * bb
    det = m11 * m22 - m12 * m12
    tiny = jnp.asarray(1e-30, dt)
    first = (count == 0) | (bb <= tiny) | (det <= 1e-12 * m11 * m22)
    safe_det = jnp.where(det > 0, det, 1.0)
    alpha = jnp.where(first, -lin_ab[0] / jnp.maximum(m11, tiny),
                      (-lin_ab[0] * m22 + lin_ab[1] * m12) / safe_det)
    mu = jnp.where(first, jnp.zeros((), dt), (-lin_ab[1] * m11 + lin_ab[0] * m12) / safe_det)
    u = [alpha.astype(x.dtype) * x + mu.astype(y.dtype) * y for x, y in zip(a, b, strict=True)]
    lr = jnp.asarray(lr).astype(dt)
    pred = (lr * (alpha * lin_ab[0] + mu * lin_ab[1])
            + 0.5 * lr**2 * (alpha**2 * aFa + 2 * alpha * mu * aFb + mu**2 * bFb))
    return u, pred.astype(jnp.float32)


# -- the transform ------------------------------------------------------------------------


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 1e-3,
    *,
    momentum: float = 0.9,
    decay: float = 0.95,
    refresh_every: int = 10,
    damping_mode: str = "kronecker",
    norm_constraint: float | None = None,
    stale_ratio: float | None = 1.2,
    adaptive_damping: bool = False,
    damping_bounds: tuple[float, float] = (1e-8, 1e2),
    damping_factor: float = 0.95,
    layers: tuple[str, ...] | None = None,
    axis_name: str | None = None,
    adaptive_step: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""K-FAC (Kronecker-factored approximate curvature) as an optax transform.

    For every recorded dense or convolution layer (weights ``W``, ``d_in x d_out``,
    a convolution kernel flattened over its window, and an optional bias ``b``)
    the Fisher block is a Kronecker product of input and output-gradient second
    moments, and the step preconditions the layer's gradient with its damped
    inverse:

    .. math::

        F_\ell \approx A_\ell \otimes G_\ell, \qquad
        A_\ell = \mathbb{E}[a a^\top], \quad G_\ell = \mathbb{E}[\delta \delta^\top],
        \qquad
        \Delta_\ell = (A_\ell \otimes G_\ell + \lambda I)^{-1}
            \operatorname{vec}[\nabla_W; \nabla_b]

    (``a``: layer inputs with a 1 appended for the bias; ``delta``: gradients at
    the layer's outputs for targets sampled from the model). Leaves that are not
    recorded layers get the identity. The update is ``-lr v`` with heavy-ball
    momentum, ``v = mu v_prev + nu Delta``, where ``nu <= 1`` keeps the predicted
    KL change ``(lr nu)^2 Delta . g`` below ``norm_constraint``; or, with
    ``adaptive_step=True``, ``lr u`` with ``u = alpha (-Delta) + mu u_prev``
    minimising the exact quadratic model over ``(alpha, mu)``:

    .. math::

        M(u) = g^\top u + \tfrac12 u^\top (F + \lambda I) u, \qquad
        u^\top F u' = \tfrac1N (J u)^\top F_z (J u')

    with ``J`` the model's Jacobian on the batch (from the linearisation that gave
    the gradient) and ``F_z`` the output Fisher of the likelihood. With
    ``adaptive_damping=True``, ``lambda`` follows Levenberg-Marquardt: the ratio of
    the observed loss change to the model's predicted change (damping excluded)
    shrinks it by ``damping_factor`` above 3/4 and grows it below 1/4.

    The statistics come from :func:`subjax.fisher.kfac_grads_and_stats` (the
    same forward pass as the loss and gradient) and are passed to ``update`` as
    the extra keyword argument ``kfac_stats``. One update runs, in order: factor
    statistics (moving averages; the eigendecompositions of the factors refreshed
    every ``refresh_every`` steps, or early when stale), damping, preconditioning,
    step size (KL clipping or the exact quadratic model) and momentum. The
    learning rate enters the clipping and the quadratic models, so there is no
    separate ``scale_by_kfac``: the updates are the parameter changes (zero when
    the learning rate is zero).

    The statistics come from ``fisher.kfac_grads_and_stats(apply_fn, ...)``, which
    finds the layers in the trace of ``apply_fn``: for a Flax NNX model
    ``apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)`` (every ``nnx.Linear`` and
    ``nnx.Conv``), for a pure-JAX function the products ``x @ p[...]["kernel"]``.

    Args:
      learning_rate: step size ``alpha`` (float or schedule).
      damping: Tikhonov damping ``lambda`` > 0 (initial value when adaptive).
      momentum: heavy-ball coefficient ``mu`` in [0, 1).
      decay: moving-average decay of the factors in [0, 1) (the first steps use a
        plain running mean).
      refresh_every: refresh the eigendecompositions every ``T`` steps (static).
      damping_mode: ``"kronecker"`` (exact inverse of ``A (x) G + lambda I`` in the
        factors' eigenbasis) or ``"factored"`` (Martens & Grosse's pi-adjusted
        factored Tikhonov damping).
      norm_constraint: if set, ``Delta`` is scaled by ``nu <= 1`` so that
        ``(alpha nu)^2 |Delta . g| <= c`` (KL clipping, Ba et al. 2017).
      stale_ratio: between scheduled refreshes, refresh early when the cached
        inverse is stale: when the current factors' damped curvature along the
        preconditioned direction, ``Delta^T (A (x) G + lambda) Delta``, exceeds
        ``stale_ratio`` times ``g . Delta`` (the two are equal right after a refresh).
        Keeps ``refresh_every > 1`` stable while the factors still move; costs two
        small matrix products per layer, and an eigendecomposition only when it
        fires. ``None`` refreshes on the schedule only (cheaper with
        ``adaptive_step``, whose quadratic model sizes a stale direction: with a
        small adaptive damping the test fires on most steps).
      adaptive_damping: Levenberg-Marquardt adaptation of ``lambda`` from the ratio
        of the observed loss change (``loss=`` passed to every ``update``) to the
        change predicted by the K-FAC quadratic model at the previous step.
      damping_bounds: ``(min, max)`` of the adaptive damping, ``0 < min <= max``.
      damping_factor: multiplicative adaptation factor ``omega`` in (0, 1).
      layers: names of the dense layers to precondition (default: every 2-D
        ``kernel`` of the params; others get the identity).
      axis_name: if set, the statistics in ``kfac_stats`` (and, with
        ``adaptive_step``, the quadratic-model products) are ``lax.pmean``-ed over
        this mapped axis inside ``update`` (data-parallel ``shard_map`` / ``pmap``);
        the gradient itself must already be averaged by the caller.
      adaptive_step: choose the step size ``alpha`` and momentum ``mu`` each step by
        minimising the exact Fisher quadratic model over ``u = alpha (-Delta) + mu
        u_prev`` (Martens & Grosse 2015, sec. 7); needs ``linearization=`` in
        ``update`` (from ``kfac_grads_and_stats(..., linearization=True)``: the two
        Fisher products reuse the linearisation that gave the gradient, one batched
        linear pass). The update is ``learning_rate * u`` (use 1.0); ``momentum``
        and ``norm_constraint`` are unused. With ``adaptive_damping`` the predicted
        change is the exact model's.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params,
      *, kfac_stats, loss=None, linearization=None)`` returns the parameter
      changes and a :class:`KFACState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from subjax import fisher, optim
      >>> def apply_fn(p, x):
      ...     h = jnp.tanh(x @ p["l0"]["kernel"] + p["l0"]["bias"])
      ...     return h @ p["l1"]["kernel"] + p["l1"]["bias"]
      >>> k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
      >>> params = {"l0": {"kernel": jax.random.normal(k0, (4, 8)), "bias": jnp.zeros(8)},
      ...           "l1": {"kernel": jax.random.normal(k1, (8, 3)), "bias": jnp.zeros(3)}}
      >>> x = jax.random.normal(k2, (64, 4))
      >>> y = jnp.argmax(x[:, :3], axis=1)
      >>> opt = optim.kfac(1.0, damping=1e-2, adaptive_step=True, adaptive_damping=True)
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state, key):
      ...     loss, grads, stats, lin = fisher.kfac_grads_and_stats(
      ...         apply_fn, params, x, y, key=key, linearization=True)
      ...     updates, state = opt.update(grads, state, params, kfac_stats=stats,
      ...                                 loss=loss, linearization=lin)
      ...     return optax.apply_updates(params, updates), state, loss
      >>> losses = []
      >>> for i in range(20):
      ...     params, state, loss = step(params, state, jax.random.key(i))
      ...     losses.append(float(loss))
      >>> bool(losses[-1] < 0.25 * losses[0])
      True

    References:
      Martens, Grosse, "Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature", ICML 2015 (K-FAC, the exact quadratic-model step,
      factored Tikhonov damping, Levenberg-Marquardt adaptation).
      Grosse, Martens, "A Kronecker-factored approximate Fisher matrix for
      convolution layers", ICML 2016. Ba, Grosse, Martens, "Distributed
      second-order optimization using Kronecker-factored approximations", ICLR
      2017 (KL clipping). Eschenhagen et al., "Kronecker-Factored Approximate
      Curvature for Modern Neural Network Architectures", NeurIPS 2023
      (weight sharing: K-FAC-expand and -reduce).
    """
    positive(damping, "damping")
    unit_interval(momentum, "momentum", closed_low=True)
    unit_interval(decay, "decay", closed_low=True)
    int_scalar(refresh_every, "refresh_every", minimum=1)
    choice(damping_mode, "damping_mode", ("kronecker", "factored"))
    positive(norm_constraint, "norm_constraint", allow_none=True)
    scalar(stale_ratio, "stale_ratio", low=1.0, allow_none=True)
    unit_interval(damping_factor, "damping_factor")
    damping_bounds = _check_bounds(damping_bounds)
    layers = None if layers is None else tuple(layers)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        if any(jnp.issubdtype(x.dtype, jnp.complexfloating) for x in leaves):
            raise TypeError("K-FAC does not support complex parameters")
        dense = find_dense_layers(params, layers) if leaves else ()
        filler = [jnp.zeros((), compute_dtype(x.dtype)) for x in leaves]
        fa, fg = list(filler), list(filler)
        for d in dense:
            dt = filler[d.kernel].dtype
            na = d.d_in + (d.bias is not None)
            fa[d.kernel] = jnp.zeros((na, na), dt)
            fg[d.kernel] = jnp.zeros((d.d_out, d.d_out), dt)
        ea = [cv.identity_eig(f) for f in fa]
        eg = [cv.identity_eig(f) for f in fg]
        tree = lambda xs: jax.tree.unflatten(treedef, xs)
        return KFACState(
            count=jnp.zeros((), jnp.int32),
            factor_a=tree(fa),
            factor_g=tree(fg),
            eigvals_a=tree([w for w, _ in ea]),
            eigvecs_a=tree([v for _, v in ea]),
            eigvals_g=tree([w for w, _ in eg]),
            eigvecs_g=tree([v for _, v in eg]),
            momentum=jax.tree.map(cv.zeros_compute, params),
            damping=jnp.asarray(damping, jnp.float32),
            prev_loss=jnp.zeros((), jnp.float32),
            prev_pred=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None, *, kfac_stats=None, loss=None,
                  linearization=None, **extra):
        del extra
        if adaptive_step and not isinstance(linearization, capture.Linearization):
            raise ValueError(
                "adaptive_step=True needs the keyword argument `linearization` in update: "
                "`loss, grads, stats, lin = subjax.fisher.kfac_grads_and_stats(..., "
                "linearization=True)` and `opt.update(grads, state, params, kfac_stats=stats, "
                "linearization=lin)` (the exact quadratic model reuses that linearisation)"
            )
        if params is None:
            raise ValueError("K-FAC needs `params` in update (to find the dense layers)")
        if kfac_stats is None:
            raise ValueError(
                "K-FAC needs the keyword argument `kfac_stats` in update: compute it with "
                "`loss, grads, stats = subjax.fisher.kfac_grads_and_stats(...)` and call "
                "`opt.update(grads, state, params, kfac_stats=stats)`"
            )
        if adaptive_damping and loss is None:
            raise ValueError("adaptive_damping=True needs the current `loss=` in update")
        dense = find_dense_layers(params, layers)
        check_stats(kfac_stats, dense)
        stats = cv.pmean({d.name: kfac_stats[d.name] for d in dense}, axis_name)
        count = state.count
        leaves, treedef = jax.tree.flatten(updates)
        g = [as_compute(x) for x in leaves]

        fa, fg = _accumulate(state, stats, dense, count, decay)
        lam = jnp.asarray(damping, jnp.float32)
        if adaptive_damping:
            lam = _levenberg_marquardt(state, loss, count, damping_factor, damping_bounds)
        # refresh on schedule, or early when the cached inverse is stale for this step
        k = len(fa)
        precondition = lambda w, v: _precondition(
            g, dense, (w[:k], v[:k], w[k:], v[k:]), lam, damping_mode)
        w = jax.tree.leaves(state.eigvals_a) + jax.tree.leaves(state.eigvals_g)
        v = jax.tree.leaves(state.eigvecs_a) + jax.tree.leaves(state.eigvecs_g)
        due = count % refresh_every == 0

        def fresh(_):
            w, v = cv.eig_tree(fa + fg)
            return w, v, precondition(w, v)

        if stale_ratio is None:
            w, v, delta = jax.lax.cond(due, fresh, lambda _: (w, v, precondition(w, v)), None)
        else:
            delta = precondition(w, v)
            fire = due | _stale(g, delta, dense, fa, fg, lam, stale_ratio)
            w, v, delta = jax.lax.cond(fire, fresh, lambda _: (w, v, delta), None)
        lr = value_at(learning_rate, count)
        prev = jax.tree.leaves(state.momentum)
        if adaptive_step:  # step size and momentum from the exact quadratic model
            tangents = lambda xs: jax.tree.unflatten(
                treedef, [x.astype(leaf.dtype) for x, leaf in zip(xs, leaves, strict=True)])
            u, pred = _model_step(linearization, tangents, g, delta, prev, lam, count, lr,
                                  axis_name)
            scale = jnp.asarray(lr, jnp.float32)
        else:  # KL clipping, then heavy-ball momentum on the direction
            nu = _kl_clip(lr, g, delta, norm_constraint)
            mu = jnp.asarray(momentum, jnp.float32)
            u = [mu.astype(m.dtype) * m + nu.astype(x.dtype) * x
                 for m, x in zip(prev, delta, strict=True)]
            scale = -jnp.asarray(lr, jnp.float32)
            pred = jnp.zeros((), jnp.float32)
            if adaptive_damping:  # K-FAC model of the update -lr u
                pred = scale * _vdot(g, u) + 0.5 * scale**2 * _curvature(u, dense, fa, fg, lam)

        tree = lambda xs: jax.tree.unflatten(treedef, xs)
        new_state = KFACState(
            count=optax.safe_int32_increment(count),
            factor_a=tree(fa),
            factor_g=tree(fg),
            eigvals_a=tree(w[:k]),
            eigvecs_a=tree(v[:k]),
            eigvals_g=tree(w[k:]),
            eigvecs_g=tree(v[k:]),
            momentum=tree(u),
            damping=jnp.asarray(lam, jnp.float32),
            prev_loss=(jnp.asarray(loss, jnp.float32) if loss is not None else state.prev_loss),
            prev_pred=pred,
        )
        out = [(scale.astype(x.dtype) * x).astype(leaf.dtype)
               for x, leaf in zip(u, leaves, strict=True)]
        return tree(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
