"""Riemannian SGD (heavy ball / Nesterov) and Riemannian Adam as optax transforms.

Which parameter lives on which manifold is a pytree ``manifolds`` whose leaves
are :class:`subjax.manifolds.Manifold` instances or ``None`` (ordinary Euclidean
parameter) and whose structure is a prefix of the parameters' (like the labels of
``optax.partition``). A single manifold applies to every leaf; a callable is called
with the parameters. The transforms return ``updates = R_x(step) - x`` so that
``optax.apply_updates`` lands on ``R_x(step)``, on the manifold; every
``reorthonormalize_every`` steps the new point is additionally mapped back with
``manifold.project_point`` (QR / polar), so rounding drift never accumulates.
Purely functional (no host callbacks): runs under ``jit``, ``vmap``, ``shard_map``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax.manifolds import Euclidean, Manifold
from subjax.manifolds._base import as_work, work_dtype

ManifoldTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


def _is_label(x) -> bool:
    return x is None or isinstance(x, Manifold)


def _resolve(manifolds, params) -> ManifoldTree:
    if _is_label(manifolds):
        return jax.tree.map(lambda _: manifolds, params)
    if callable(manifolds):
        return manifolds(params)
    return manifolds


def _align(manifolds, tree, name: str):
    """Flatten ``manifolds`` (labels) and the matching subtrees of ``tree``."""
    labels, treedef = jax.tree.flatten(manifolds, is_leaf=_is_label)
    for lab in labels:
        if not _is_label(lab):
            raise TypeError(
                f"argument `manifolds` must hold subjax.manifolds.Manifold instances or None "
                f"at its leaves, got {type(lab).__name__}: {lab!r}"
            )
    try:
        subs = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"argument `manifolds` (structure {treedef}) does not match the structure of "
            f"`{name}` ({jax.tree.structure(tree)}); it must be a prefix of the parameter "
            f"pytree with a Manifold or None at each leaf. Original error: {e}"
        ) from None
    return labels, treedef, subs


def _is_euclidean(m) -> bool:
    return m is None or isinstance(m, Euclidean)


def _validate(manifolds, params) -> None:
    labels, _, subs = _align(manifolds, params, "params")
    paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(manifolds, is_leaf=_is_label)[0]]
    for m, sub, path in zip(labels, subs, paths, strict=True):
        if _is_euclidean(m):
            continue
        for subpath, leaf in jax.tree_util.tree_leaves_with_path(sub):
            name = "params" + jax.tree_util.keystr(tuple(path) + tuple(subpath))
            m.assert_on_manifold(leaf, name=name)


def _map_leaves(fn, manifolds, *trees, n_out: int):
    """Apply ``fn(manifold, *leaves) -> tuple`` over aligned leaves; return ``n_out`` trees."""
    labels, treedef, subs0 = _align(manifolds, trees[0], "params")
    all_subs = [subs0] + [_align(manifolds, t, "state")[2] for t in trees[1:]]
    outs = [[] for _ in range(n_out)]
    for k, m in enumerate(labels):
        sub_leaves = []
        subdef = None
        for subs in all_subs:
            leaves, d = jax.tree.flatten(subs[k])
            subdef = d if subdef is None else subdef
            sub_leaves.append(leaves)
        results = [fn(m, *ls) for ls in zip(*sub_leaves, strict=True)]
        for j in range(n_out):
            outs[j].append(jax.tree.unflatten(subdef, [r[j] for r in results]))
    return tuple(treedef.unflatten(o) for o in outs)


def _lr_at(learning_rate, count):
    return learning_rate(count) if callable(learning_rate) else learning_rate


def _cast(v, dtype):
    return jnp.asarray(v).astype(dtype)


def _maybe_reproject(m: Manifold, x, u, count, every):
    """Every ``every`` steps replace ``x + u`` by ``project_point(x + u)`` (under lax.cond)."""
    if every is None or _is_euclidean(m):
        return u

    def fix(u):
        return m.project_point(x + u) - x

    return jax.lax.cond((count + 1) % every == 0, fix, lambda u: u, u)


def _frozen_if_zero(lr, u):
    """A zero learning rate is an exact no-op (no re-orthonormalisation correction).

    The retractions re-normalise the point (e.g. ``(x - lr d)(y^T y)^{-1/2}``), which
    with ``lr = 0`` still moves a point with rounding-level drift by ~1 ulp; a user
    freezing a leaf with ``inject_hyperparams`` expects exactly zero updates.
    """
    return jnp.where(lr == 0, jnp.zeros_like(u), u)


class RiemannianSGDState(NamedTuple):
    """State of :func:`riemannian_sgd`."""

    count: jax.Array  # () int32, number of updates so far
    momentum: optax.Updates  # like params (param dtype): tangent momentum, or None


class RiemannianAdamState(NamedTuple):
    """State of :func:`riemannian_adam`."""

    count: jax.Array  # () int32
    mu: optax.Updates  # like params: first moment (a tangent vector on manifold leaves)
    nu: optax.Updates  # like params on Euclidean leaves (elementwise); on a manifold leaf
    #                    one scalar per point, shape = the leaf's batch shape (float32+)


def _check_common(learning_rate, reorthonormalize_every, retraction):
    if not callable(learning_rate) and not isinstance(learning_rate, jax.Array | float | int):
        raise TypeError(
            f"argument `learning_rate` must be a float, array or schedule, got "
            f"{type(learning_rate).__name__}"
        )
    if reorthonormalize_every is not None and (
        not isinstance(reorthonormalize_every, int) or reorthonormalize_every < 1
    ):
        raise ValueError(
            f"argument `reorthonormalize_every` must be a positive int or None, got "
            f"{reorthonormalize_every!r}"
        )
    if retraction is not None and not isinstance(retraction, str):
        raise TypeError(f"argument `retraction` must be a str or None, got {retraction!r}")


def riemannian_sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    manifolds: ManifoldTree = None,
    retraction: str | None = None,
    reorthonormalize_every: int | None = 100,
    validate: bool = True,
) -> optax.GradientTransformation:
    r"""Riemannian SGD with transported (heavy-ball or Nesterov) momentum.

    On a manifold leaf ``x`` with Euclidean gradient ``g``:

    .. math::
        m_k = \beta\, \mathcal{T}_{x_{k-1} \to x_k}(m_{k-1}) + \operatorname{grad} f(x_k),\quad
        d_k = m_k \ (\text{or } \operatorname{grad} f(x_k) + \beta m_k),\quad
        x_{k+1} = R_{x_k}(-\eta_k d_k),

    with the transport by projection (parallel transport for ``SPD(metric="affine")``)
    and the returned update ``x_{k+1} - x_k``. On ``None`` / ``Euclidean`` leaves it is
    ``optax.sgd``. For Stiefel / Grassmann with a polar or (Cholesky-)QR retraction
    and no Nesterov, projection, transport, momentum and retraction are fused into
    ``p x p`` Gram work plus one pass over the ``n x p`` arrays
    (:meth:`subjax.manifolds.Stiefel.momentum_step`).

    Args:
      learning_rate: a float, scalar array, or optax schedule of the step count.
      momentum: ``beta``; ``None`` for plain Riemannian gradient descent.
      nesterov: use the Nesterov direction.
      manifolds: pytree of ``Manifold`` / ``None`` that is a prefix of the params,
        a single ``Manifold`` for every leaf, or a callable ``params -> pytree``.
        ``None`` means all leaves are Euclidean.
      retraction: retraction name for every manifold leaf (default: each manifold's).
      reorthonormalize_every: every this many steps the new point is re-projected
        onto its manifold (``project_point`` under ``lax.cond``); ``None`` disables.
        The fused Stiefel / Grassmann kernel needs no refresh: it uses the exact Gram
        ``x^T x`` and so re-orthonormalises at every step.
      validate: check at ``init`` (concrete parameters only) that each manifold leaf
        is on its manifold; raises ``ValueError`` with the constraint error.

    Returns:
      An ``optax.GradientTransformation``; state :class:`RiemannianSGDState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from subjax.manifolds import Stiefel
      >>> from subjax.optim import riemannian_sgd
      >>> st = Stiefel(5, 2)
      >>> params = {"w": st.random_point(jax.random.key(0)), "b": jnp.zeros(2)}
      >>> opt = riemannian_sgd(0.1, momentum=0.9, manifolds={"w": st, "b": None})
      >>> state = opt.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = opt.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)
      >>> bool(st.check(params["w"]) < 1e-5)
      True

    References:
      Bonnabel, "Stochastic gradient descent on Riemannian manifolds", IEEE TAC 2013.
      Absil, Mahony, Sepulchre, "Optimization Algorithms on Matrix Manifolds", 2008.
    """
    _check_common(learning_rate, reorthonormalize_every, retraction)
    use_momentum = momentum is not None

    def init_fn(params):
        mtree = _resolve(manifolds, params)
        _align(mtree, params, "params")
        if validate:
            _validate(mtree, params)
        mom = jax.tree.map(jnp.zeros_like, params) if use_momentum else None
        return RiemannianSGDState(count=jnp.zeros([], jnp.int32), momentum=mom)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("riemannian_sgd.update needs `params` (the current point)")
        mtree = _resolve(manifolds, params)
        count = state.count
        lr = _lr_at(learning_rate, count)
        beta = momentum if use_momentum else 0.0
        mom_tree = state.momentum if use_momentum else jax.tree.map(jnp.zeros_like, params)

        def leaf(m, x, g, mo):
            wd = work_dtype(x.dtype)
            lr_w, beta_w = _cast(lr, wd), _cast(beta, wd)
            man = Euclidean() if m is None else m
            refresh = None if reorthonormalize_every is None else (
                (count + 1) % reorthonormalize_every == 0)
            u, m_new = man.momentum_step(x, g, mo, lr_w, beta_w, nesterov, retraction, refresh)
            u = _frozen_if_zero(lr_w, u)
            return u.astype(x.dtype), m_new.astype(mo.dtype)

        new_updates, new_mom = _map_leaves(leaf, mtree, params, updates, mom_tree, n_out=2)
        return new_updates, RiemannianSGDState(
            count=optax.safe_int32_increment(count),
            momentum=new_mom if use_momentum else None,
        )

    return optax.GradientTransformation(init_fn, update_fn)


def riemannian_adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    manifolds: ManifoldTree = None,
    retraction: str | None = None,
    reorthonormalize_every: int | None = 100,
    validate: bool = True,
) -> optax.GradientTransformation:
    r"""Riemannian Adam (Bécigneul & Ganea, 2019).

    On a manifold leaf (a batch of points), with ``r = grad f(x)``:

    .. math::
        m_k = \beta_1 \mathcal{T}(m_{k-1}) + (1-\beta_1) r,\quad
        v_k = \beta_2 v_{k-1} + (1-\beta_2) \|r\|_x^2,\quad
        x_{k+1} = R_{x_k}\!\Big(-\eta \frac{\hat m_k}{\sqrt{\hat v_k} + \epsilon}\Big),

    with one second moment per point (so the step stays tangent) and the momentum
    transported to ``x_{k+1}`` (projection; parallel transport on affine SPD). On
    ``None`` / ``Euclidean`` leaves it is ``optax.adam`` (elementwise ``v``).

    Args:
      learning_rate: float, array or schedule.
      b1, b2, eps: as in Adam.
      manifolds, retraction, reorthonormalize_every, validate: as in
        :func:`riemannian_sgd`.

    Returns:
      An ``optax.GradientTransformation``; state :class:`RiemannianAdamState`.

    References:
      Bécigneul, Ganea, "Riemannian Adaptive Optimization Methods", ICLR 2019.
    """
    _check_common(learning_rate, reorthonormalize_every, retraction)

    def init_fn(params):
        mtree = _resolve(manifolds, params)
        _align(mtree, params, "params")
        if validate:
            _validate(mtree, params)

        def leaf(m, x):
            mu = jnp.zeros_like(x)
            if _is_euclidean(m):
                return mu, jnp.zeros_like(x)
            return mu, jnp.zeros(m.batch_shape(x), work_dtype(x.dtype))

        mu, nu = _map_leaves(leaf, mtree, params, n_out=2)
        return RiemannianAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError("riemannian_adam.update needs `params` (the current point)")
        mtree = _resolve(manifolds, params)
        count = optax.safe_int32_increment(state.count)
        lr = _lr_at(learning_rate, state.count)

        def leaf(m, x, g, mu, nu):
            wd = work_dtype(x.dtype)
            lr_w, b1_w, b2_w, eps_w = (_cast(v, wd) for v in (lr, b1, b2, eps))
            t = count.astype(wd)
            c1 = 1 - b1_w**t
            c2 = 1 - b2_w**t
            xw, gw, muw = as_work(x), as_work(g), as_work(mu)
            if _is_euclidean(m):
                mu_new = b1_w * muw + (1 - b1_w) * gw
                nu_new = b2_w * as_work(nu) + (1 - b2_w) * gw * gw
                u = -lr_w * (mu_new / c1) / (jnp.sqrt(nu_new / c2) + eps_w)
                return u.astype(x.dtype), mu_new.astype(mu.dtype), nu_new.astype(nu.dtype)
            rg = m.egrad2rgrad(xw, gw)
            mu_new = b1_w * m.proj(xw, muw) + (1 - b1_w) * rg
            nu_new = b2_w * nu.astype(wd) + (1 - b2_w) * m.inner(xw, rg, rg).astype(wd)
            scale = -lr_w / c1 / (jnp.sqrt(nu_new / c2) + eps_w)
            scale = scale.reshape(scale.shape + (1,) * len(m.point_shape))
            x_new = m.retract(xw, scale * mu_new, retraction)
            mu_t = m.transport(xw, x_new, mu_new)
            u = _maybe_reproject(m, xw, x_new - xw, state.count, reorthonormalize_every)
            u = _frozen_if_zero(lr_w, u)
            return u.astype(x.dtype), mu_t.astype(mu.dtype), nu_new.astype(nu.dtype)

        new_updates, mu, nu = _map_leaves(
            leaf, mtree, params, updates, state.mu, state.nu, n_out=3
        )
        return new_updates, RiemannianAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


def manifold_labels(manifolds: ManifoldTree, riemannian="riemannian", euclidean="euclidean"):
    """Labels for ``optax.partition``: ``riemannian`` on manifold leaves, else ``euclidean``.

    Example:
      >>> import optax
      >>> from subjax.manifolds import Grassmann
      >>> manifold_labels({"head": Grassmann(4, 2), "bias": None})
      {'bias': 'euclidean', 'head': 'riemannian'}
    """
    return jax.tree.map(
        lambda m: euclidean if _is_euclidean(m) else riemannian, manifolds, is_leaf=_is_label
    )
