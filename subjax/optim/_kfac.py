"""K-FAC as an optax transform (Martens & Grosse 2015).

For every dense layer (a 2-D ``kernel`` leaf and its optional ``bias``) the
Fisher block is approximated by ``A (x) G`` with ``A = E[a a^T]`` (inputs with a
1 appended for the bias) and ``G = E[delta delta^T]`` (gradients at the layer's
outputs). The statistics are computed by the caller, together with the gradient,
by :func:`subjax.fisher.kfac_grads_and_stats`, and passed to ``update`` as the
extra keyword argument ``kfac_stats``; this transform keeps their moving
averages, refreshes an eigendecomposition of each factor every
``refresh_every`` steps (under ``lax.cond``) and preconditions::

    damping="kronecker":  Delta = Q_A [ (Q_A^T Gr Q_G) / (d_A d_G^T + lambda) ] Q_G^T
    damping="factored":   Delta = (A + pi sqrt(lambda) I)^-1 Gr (G + sqrt(lambda)/pi I)^-1

(``Gr = [dW; db]``), i.e. the exact inverse of the damped Kronecker product, or
Martens & Grosse's factored Tikhonov damping. Leaves that are not dense layers
get the identity preconditioner. The step is ``-lr (mu v + Delta)`` (heavy-ball
momentum ``mu``), optionally rescaled so the predicted KL change
``lr^2 Delta . Gr`` stays below ``norm_constraint``; the damping can follow
Levenberg-Marquardt adaptation from the observed vs predicted loss change
(``adaptive_damping=True``, needs ``loss=`` in ``update``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax._core import (
    choice,
    compute_dtype,
    is_concrete,
    path_name,
    positive,
    static_int,
    unit_interval,
    value_at,
)
from subjax.fisher import _likelihood as lk

Params = Any


def param_paths(tree) -> list[tuple]:
    """Key path of every leaf, without the trailing ``.value`` of an NNX variable."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        last = path[-1] if path else None
        if isinstance(last, jax.tree_util.GetAttrKey) and last.name in ("value", "raw_value"):
            path = path[:-1]
        paths.append(path)
    return paths


def param_names(tree) -> list[str]:
    """:func:`subjax._core.path_name` of every leaf of ``tree`` (NNX ``.value`` dropped)."""
    return [path_name(p) for p in param_paths(tree)]


class DenseLayer(NamedTuple):
    name: str
    kernel: int  # index of the kernel leaf in the flattened params
    bias: int | None  # index of the bias leaf, or None
    d_in: int
    d_out: int


def find_dense_layers(params, layers=None) -> tuple[DenseLayer, ...]:
    """Dense layers of ``params``: 2-D ``kernel`` leaves with an optional 1-D ``bias``."""
    leaves = jax.tree.leaves(params)
    names = param_names(params)
    index = {n: i for i, n in enumerate(names)}
    found = []
    for i, p in enumerate(param_paths(params)):
        if not p or path_name(p[-1:]) != "kernel" or jnp.ndim(leaves[i]) != 2:
            continue
        name = path_name(p[:-1])
        if layers is not None and name not in layers:
            continue
        b = index.get(path_name(p[:-1] + (jax.tree_util.DictKey("bias"),)))
        if b is not None and (jnp.ndim(leaves[b]) != 1 or leaves[b].shape[0] != leaves[i].shape[1]):
            b = None
        found.append(DenseLayer(name, i, b, int(leaves[i].shape[0]), int(leaves[i].shape[1])))
    if layers is not None:
        missing = sorted(set(layers) - {d.name for d in found})
        if missing:
            raise ValueError(
                f"`layers` names {missing} that are not dense layers of `params` "
                "(a 2-D 'kernel' leaf under that path)"
            )
    if not found:
        raise ValueError(
            "`params` has no dense layer for K-FAC (a 2-D 'kernel' leaf, optionally with a "
            "'bias' beside it): build the model from nnx.Linear layers and call "
            "subjax.fisher.register_dense(model), or name pure-JAX layers "
            "{'kernel': ..., 'bias': ...} and compute them with subjax.fisher.tag_dense"
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
                f"`{arg}` has no entry for dense layer {d.name!r}: register it "
                "(subjax.fisher.register_dense / tag_dense) or leave it out with layers=..."
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


def pmean(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


class KFACState(NamedTuple):
    """State of :func:`scale_by_kfac`.

    Factor and momentum arrays are float32, or the parameter dtype when wider.

    Attributes:
      count: int32 scalar, number of updates so far.
      factor_a: dict layer -> float32 ``(d_in+1, d_in+1)`` moving average of ``A``.
      factor_g: dict layer -> float32 ``(d_out, d_out)`` moving average of ``G``.
      eig_a: dict layer -> (float32 ``(d_in+1,)`` eigenvalues, ``(d_in+1, d_in+1)``
        eigenvectors) of ``factor_a`` at the last refresh.
      eig_g: same for ``factor_g``.
      momentum: pytree like params (float32), the previous step direction ``v``.
      damping: float32 scalar, the current damping ``lambda``.
      prev_loss: float32 scalar, loss passed at the previous update (adaptive damping).
      prev_pred: float32 scalar, predicted change of the previous step (adaptive damping).
    """

    count: jax.Array
    factor_a: dict
    factor_g: dict
    eig_a: dict
    eig_g: dict
    momentum: Any
    damping: jax.Array
    prev_loss: jax.Array
    prev_pred: jax.Array


def _eigh(m):
    w, v = jnp.linalg.eigh(m)
    return jnp.maximum(w, 0.0), v


def scale_by_kfac(
    damping: float = 1e-3,
    *,
    momentum: float = 0.9,
    decay: float = 0.95,
    refresh_every: int = 10,
    damping_mode: str = "kronecker",
    norm_constraint: float | None = None,
    adaptive_damping: bool = False,
    damping_bounds: tuple[float, float] = (1e-8, 1e2),
    damping_factor: float = 0.95,
    layers: tuple[str, ...] | None = None,
    axis_name: str | None = None,
    adaptive_step: bool = False,
    likelihood: str = "categorical",
    learning_rate_for_constraint=None,
) -> optax.GradientTransformationExtraArgs:
    """K-FAC preconditioning (see the module docstring); returns the direction ``v``.

    The output is the *descent direction* ``mu v_prev + Delta`` (not yet scaled by
    ``-learning_rate``); :func:`kfac` chains the learning rate.
    """
    positive(damping, "damping")
    unit_interval(momentum, "momentum", closed_low=True)
    unit_interval(decay, "decay", closed_low=True)
    refresh_every = static_int(refresh_every, "refresh_every", minimum=1)
    choice(damping_mode, "damping_mode", ("kronecker", "factored"))
    positive(norm_constraint, "norm_constraint", allow_none=True)
    unit_interval(damping_factor, "damping_factor")
    lk.check_likelihood(likelihood)
    damping_bounds = _check_bounds(damping_bounds)
    layers = None if layers is None else tuple(layers)

    def init_fn(params):
        dense = find_dense_layers(params, layers)
        fa, fg, ea, eg = {}, {}, {}, {}
        leaves = jax.tree.leaves(params)
        for d in dense:
            na = d.d_in + (d.bias is not None)
            dt = compute_dtype(leaves[d.kernel].dtype)
            fa[d.name] = jnp.zeros((na, na), dt)
            fg[d.name] = jnp.zeros((d.d_out, d.d_out), dt)
            ea[d.name] = (jnp.zeros((na,), dt), jnp.eye(na, dtype=dt))
            eg[d.name] = (jnp.zeros((d.d_out,), dt), jnp.eye(d.d_out, dtype=dt))
        mom = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), compute_dtype(p.dtype)), params)
        return KFACState(
            count=jnp.zeros((), jnp.int32),
            factor_a=fa,
            factor_g=fg,
            eig_a=ea,
            eig_g=eg,
            momentum=mom,
            damping=jnp.asarray(damping, jnp.float32),
            prev_loss=jnp.zeros((), jnp.float32),
            prev_pred=jnp.zeros((), jnp.float32),
        )

    def update_fn(updates, state, params=None, *, kfac_stats=None, loss=None, apply_fn=None,
                  inputs=None, **extra):
        del extra
        if adaptive_step and (apply_fn is None or inputs is None):
            raise ValueError(
                "adaptive_step=True needs the keyword arguments `apply_fn` and `inputs` in "
                "update (for the exact Fisher quadratic model)"
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
        stats = pmean({d.name: kfac_stats[d.name] for d in dense}, axis_name)

        count = state.count
        rho = jnp.maximum(1.0 - decay, 1.0 / (count.astype(jnp.float32) + 1.0))

        def ema(old, new):
            r = rho.astype(old.dtype)
            return (1 - r) * old + r * new.astype(old.dtype)

        fa = {k: ema(state.factor_a[k], stats[k].a) for k in state.factor_a}
        fg = {k: ema(state.factor_g[k], stats[k].g) for k in state.factor_g}

        def refresh(_):
            return ({k: _eigh(v) for k, v in fa.items()}, {k: _eigh(v) for k, v in fg.items()})

        ea, eg = jax.lax.cond(
            count % refresh_every == 0, refresh, lambda _: (state.eig_a, state.eig_g), None
        )

        # Damping: adaptive (Levenberg-Marquardt on the lagged reduction ratio).
        lam = state.damping if adaptive_damping else jnp.asarray(damping, jnp.float32)
        if adaptive_damping:
            cur = jnp.asarray(loss, jnp.float32)
            ratio = (cur - state.prev_loss) / jnp.minimum(state.prev_pred, -1e-30)
            lam_new = jnp.where(ratio > 0.75, lam * damping_factor,
                                jnp.where(ratio < 0.25, lam / damping_factor, lam))
            lam = jnp.where(count > 0, lam_new, lam)
            lam = jnp.clip(lam, damping_bounds[0], damping_bounds[1])

        leaves = jax.tree.leaves(updates)
        treedef = jax.tree.structure(updates)
        g32 = [x.astype(compute_dtype(x.dtype)) for x in leaves]
        out = list(g32)  # identity preconditioner for non-dense leaves
        for d in dense:
            gr = g32[d.kernel]
            if d.bias is not None:
                gr = jnp.concatenate([gr, g32[d.bias][None, :]], axis=0)
            wa, qa = ea[d.name]
            wg, qg = eg[d.name]
            gr = gr.astype(wa.dtype)
            lam_d = lam.astype(wa.dtype)
            if damping_mode == "kronecker":
                t = qa.T @ gr @ qg
                t = t / (wa[:, None] * wg[None, :] + lam_d)
            else:
                ta = jnp.mean(wa) + 1e-30
                tg = jnp.mean(wg) + 1e-30
                pi = jnp.sqrt(ta / tg)
                sl = jnp.sqrt(lam_d)
                t = qa.T @ gr @ qg
                t = t / ((wa + pi * sl)[:, None] * (wg + sl / pi)[None, :])
            delta = qa @ t @ qg.T
            out[d.kernel] = delta[: d.d_in].astype(g32[d.kernel].dtype)
            if d.bias is not None:
                out[d.bias] = delta[d.d_in].astype(g32[d.bias].dtype)
        if norm_constraint is not None and not adaptive_step:
            lr = learning_rate_for_constraint
            lr = 1.0 if lr is None else value_at(lr, count)
            vg = sum(jnp.vdot(o, g).astype(jnp.float32) for o, g in zip(out, g32, strict=True))
            nu = jnp.minimum(1.0, jnp.sqrt(norm_constraint / (lr**2 * jnp.abs(vg) + 1e-30)))
            out = [o * nu.astype(o.dtype) for o in out]
        mom_leaves = jax.tree.leaves(state.momentum)
        if adaptive_step:
            v, u_new, pred = _exact_quadratic_step(
                apply_fn, inputs, likelihood, params, g32, out, mom_leaves, lam, count,
                learning_rate_for_constraint, axis_name,
            )
        else:
            mu = jnp.asarray(momentum, jnp.float32)
            v = [mu.astype(m.dtype) * m + o for m, o in zip(mom_leaves, out, strict=True)]
            u_new = v
            pred = jnp.zeros((), jnp.float32)
        if adaptive_damping and not adaptive_step:
            # Quadratic model of the step -v (scaled by the learning rate outside; the
            # alias passes it in): M = -lr g.v + lr^2/2 (v.Fv + lam |v|^2), F from factors.
            lr = learning_rate_for_constraint
            lr = 1.0 if lr is None else value_at(lr, count)
            quad = sum(jnp.vdot(x, x).astype(jnp.float32) for x in v) * lam
            for d in dense:
                vr = v[d.kernel]
                if d.bias is not None:
                    vr = jnp.concatenate([vr, v[d.bias][None, :]], axis=0)
                vr = vr.astype(fa[d.name].dtype)
                quad = quad + jnp.vdot(vr, fa[d.name] @ vr @ fg[d.name]).astype(jnp.float32)
            lin = sum(jnp.vdot(g, x).astype(jnp.float32) for g, x in zip(g32, v, strict=True))
            pred = -lr * lin + 0.5 * lr**2 * quad

        new_state = KFACState(
            count=optax.safe_int32_increment(count),
            factor_a=fa,
            factor_g=fg,
            eig_a=ea,
            eig_g=eg,
            momentum=jax.tree.unflatten(treedef, u_new),
            damping=jnp.asarray(lam, jnp.float32),
            prev_loss=(jnp.asarray(loss, jnp.float32) if loss is not None else state.prev_loss),
            prev_pred=pred,
        )
        result = [x.astype(leaf.dtype) for x, leaf in zip(v, leaves, strict=True)]
        return jax.tree.unflatten(treedef, result), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _tree_vdot(a, b, dtype=jnp.float32):
    return sum(jnp.vdot(x, y).astype(dtype) for x, y in zip(a, b, strict=True))


def _exact_quadratic_step(apply_fn, inputs, likelihood, params, g, delta, prev, lam, count,
                          lr, axis_name):
    """Martens & Grosse's step: ``u = alpha (-Delta) + mu u_prev`` minimising the exact
    Fisher quadratic model ``g.u + 1/2 u^T (F + lam) u`` over ``(alpha, mu)``.

    Returns the direction to emit (``-u / lr``, the chained learning rate multiplies it
    back) and the model's predicted change ``g.u + 1/2 u^T F u``.
    """
    treedef = jax.tree.structure(params)
    p_w = jax.tree.map(lambda p: p.astype(compute_dtype(p.dtype)), params)
    a = [-x for x in delta]
    b = list(prev)
    f = lambda p: apply_fn(p, inputs)
    outputs, f_jvp = jax.linearize(f, p_w)
    n = outputs.shape[0]
    cast = lambda xs: jax.tree.unflatten(
        treedef, [x.astype(q.dtype) for x, q in zip(xs, jax.tree.leaves(p_w), strict=True)])
    ja, jb = f_jvp(cast(a)), f_jvp(cast(b))
    fa_ = lk.output_fisher_product(likelihood, outputs, ja)
    fb_ = lk.output_fisher_product(likelihood, outputs, jb)
    dt = compute_dtype(jax.tree.leaves(p_w)[0].dtype)
    quad = jnp.stack([jnp.vdot(ja, fa_), jnp.vdot(ja, fb_), jnp.vdot(jb, fb_)]).astype(dt) / n
    lin = jnp.stack([_tree_vdot(g, a, dt), _tree_vdot(g, b, dt)])
    norms = jnp.stack([_tree_vdot(a, a, dt), _tree_vdot(a, b, dt), _tree_vdot(b, b, dt)])
    lam = jnp.asarray(lam).astype(dt)
    if axis_name is not None:
        quad = jax.lax.pmean(quad, axis_name)
    aFa, aFb, bFb = quad[0], quad[1], quad[2]
    m11 = aFa + lam * norms[0]
    m12 = aFb + lam * norms[1]
    m22 = bFb + lam * norms[2]
    det = m11 * m22 - m12 * m12
    tiny = jnp.asarray(1e-30, dt)
    first = (count == 0) | (norms[2] <= tiny) | (det <= 1e-12 * m11 * m22)
    alpha_1 = -lin[0] / jnp.maximum(m11, tiny)
    alpha_2 = (-lin[0] * m22 + lin[1] * m12) / jnp.where(det > 0, det, 1.0)
    mu_2 = (-lin[1] * m11 + lin[0] * m12) / jnp.where(det > 0, det, 1.0)
    alpha = jnp.where(first, alpha_1, alpha_2)
    mu = jnp.where(first, jnp.zeros((), dt), mu_2)
    u = [alpha.astype(x.dtype) * x + mu.astype(y.dtype) * y for x, y in zip(a, b, strict=True)]
    pred = (alpha * lin[0] + mu * lin[1]
            + 0.5 * (alpha**2 * aFa + 2 * alpha * mu * aFb + mu**2 * bFb))
    lr = 1.0 if lr is None else value_at(lr, count)
    lr = jnp.asarray(lr).astype(dt)
    safe = jnp.where(lr == 0, jnp.ones((), dt), lr)
    v = [-(x / safe.astype(x.dtype)) for x in u]
    return v, u, pred.astype(jnp.float32)


def kfac(
    learning_rate: optax.ScalarOrSchedule,
    damping: float = 1e-3,
    *,
    momentum: float = 0.9,
    decay: float = 0.95,
    refresh_every: int = 10,
    damping_mode: str = "kronecker",
    norm_constraint: float | None = None,
    adaptive_damping: bool = False,
    damping_bounds: tuple[float, float] = (1e-8, 1e2),
    damping_factor: float = 0.95,
    layers: tuple[str, ...] | None = None,
    axis_name: str | None = None,
    adaptive_step: bool = False,
    likelihood: str = "categorical",
) -> optax.GradientTransformationExtraArgs:
    """K-FAC for the dense layers of a model, as an optax transform.

    Usage (``kfac_stats`` is an extra keyword argument of ``update``)::

        fisher.register_dense(model)                    # NNX: record nnx.Linear stats
        graphdef, params = nnx.split(model, nnx.Param)
        apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)
        opt = subjax.optim.kfac(learning_rate=0.1, damping=1e-3)
        state = opt.init(params)

        @jax.jit
        def step(params, state, x, y, key):
            loss, grads, stats = fisher.kfac_grads_and_stats(
                apply_fn, params, x, y, likelihood="categorical", key=key)
            updates, state = opt.update(grads, state, params, kfac_stats=stats)
            return optax.apply_updates(params, updates), state, loss

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
      norm_constraint: if set, rescale the step so ``alpha^2 |Delta . g| <= c``
        (KL clipping, Ba et al. 2017).
      adaptive_damping: Levenberg-Marquardt adaptation of ``lambda`` from the ratio
        of the observed loss change (``loss=`` passed to every ``update``) to the
        change predicted by the K-FAC quadratic model at the previous step.
      damping_bounds: ``(min, max)`` of the adaptive damping.
      damping_factor: multiplicative adaptation factor ``omega`` in (0, 1).
      layers: names of the dense layers to precondition (default: every 2-D
        ``kernel`` of the params; others get the identity).
      axis_name: if set, the statistics in ``kfac_stats`` (and, with
        ``adaptive_step``, the quadratic-model products) are ``lax.pmean``-ed over
        this mapped axis inside ``update`` (data-parallel ``shard_map`` / ``pmap``);
        the gradient itself must already be averaged by the caller.
      adaptive_step: choose the step size ``alpha`` and momentum ``mu`` each step by
        minimising the exact Fisher quadratic model over ``u = alpha (-Delta) + mu
        u_prev`` (Martens & Grosse 2015, sec. 7); needs ``apply_fn`` and ``inputs``
        in ``update`` (two forward-mode passes per step). ``learning_rate`` then
        multiplies the chosen step (use 1.0); ``momentum`` and ``norm_constraint``
        are unused. With ``adaptive_damping`` the predicted change is the exact
        model's.
      likelihood: the output distribution for ``adaptive_step``'s Fisher products.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; ``update(grads, state, params,
      *, kfac_stats, loss=None, apply_fn=None, inputs=None)``.

    References:
      Martens, Grosse, "Optimizing Neural Networks with Kronecker-factored
      Approximate Curvature", ICML 2015. Ba, Grosse, Martens, "Distributed
      second-order optimization using Kronecker-factored approximations", ICLR 2017.
    """
    return optax.chain(
        scale_by_kfac(
            damping,
            momentum=momentum,
            decay=decay,
            refresh_every=refresh_every,
            damping_mode=damping_mode,
            norm_constraint=norm_constraint,
            adaptive_damping=adaptive_damping,
            damping_bounds=damping_bounds,
            damping_factor=damping_factor,
            layers=layers,
            axis_name=axis_name,
            adaptive_step=adaptive_step,
            likelihood=likelihood,
            learning_rate_for_constraint=learning_rate,
        ),
        optax.scale_by_learning_rate(learning_rate),
    )
