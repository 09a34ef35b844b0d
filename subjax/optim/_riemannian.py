"""Riemannian SGD (heavy ball / Nesterov) and Riemannian Adam as optax transforms.

Which parameter lives on which manifold is a pytree ``manifolds`` whose leaves
are :class:`subjax.manifolds.Manifold` instances or ``None`` (ordinary Euclidean
parameter) and whose structure is a prefix of the parameters' (like the labels of
``optax.partition``). A single manifold applies to every leaf. A callable is refused
(``optax.inject_hyperparams`` would take it for a schedule): call it on the
parameters and pass the pytree. The transforms return ``updates = R_x(step) - x`` so that
``optax.apply_updates`` lands on ``R_x(step)``, on the manifold; every
``refresh_every`` steps the new point is additionally mapped back with
``manifold.project_point`` (QR / polar), so rounding drift never accumulates.
Purely functional (no host callbacks): runs under ``jit``, ``vmap``, ``shard_map``.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax._core import (
    as_compute,
    compute_dtype,
    int_scalar,
    leaves_with_names,
    nonnegative,
    scalar,
    value_at,
)
from subjax.manifolds import Euclidean, Manifold

ManifoldTree = Any


def _is_label(x) -> bool:
    return x is None or isinstance(x, Manifold)


def _check_manifolds(manifolds) -> None:
    """Reject what is not a pytree of ``Manifold`` / ``None`` labels, naming ``manifolds``."""
    if _is_label(manifolds):
        return
    if callable(manifolds):
        raise TypeError(
            "argument `manifolds` must be a pytree of subjax.manifolds.Manifold / None (or one "
            f"Manifold), not a callable ({type(manifolds).__name__}): optax.inject_hyperparams "
            "would take a callable for a schedule and call it with the step count. Call your "
            "function on the parameters and pass the result (e.g. "
            "`manifolds=subjax.nn.manifolds_of(model)`)"
        )
    for path, lab in jax.tree_util.tree_flatten_with_path(manifolds, is_leaf=_is_label)[0]:
        if not _is_label(lab):
            raise TypeError(
                f"argument `manifolds` must hold subjax.manifolds.Manifold instances or None "
                f"at its leaves; `manifolds{jax.tree_util.keystr(path)}` is "
                f"{type(lab).__name__}: {lab!r}"
            )


def _leaf_manifolds(manifolds, params) -> list:
    """The manifold (or ``None``) of each leaf of ``params``, in ``tree_leaves`` order.

    A label at key path ``p`` of ``manifolds`` applies to every parameter leaf whose
    path starts with ``p`` (matched by key names, so a dict of labels also fits an
    ``nnx.State`` of the same keys, with or without its ``Variable`` wrappers).
    """
    names = [n for n, _ in leaves_with_names(params)]
    if _is_label(manifolds):
        return [manifolds] * len(names)
    labels = leaves_with_names(manifolds, is_leaf=_is_label)
    out = []
    for name in names:
        best = None
        for k, (lab_name, _) in enumerate(labels):
            if lab_name == "" or name == lab_name or name.startswith(lab_name + "/"):
                if best is None or len(lab_name) > len(labels[best][0]):
                    best = k
        if best is None:
            raise ValueError(
                f"argument `manifolds` (labels {[n for n, _ in labels]}) does not match the "
                f"parameters: no label for `params/{name}`; give a Manifold or None for every "
                "parameter (a label may cover a whole subtree)"
            )
        out.append(labels[best][1])
    # labels that name no leaf are fine: optax.partition masks the other group's leaves
    return out


def _is_euclidean(m) -> bool:
    return m is None or isinstance(m, Euclidean)


def _check_real(params, who: str) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(
                f"{who} supports real parameters only; `params{jax.tree_util.keystr(path)}` has "
                f"dtype {jnp.result_type(leaf)} (split it into real and imaginary parts, or "
                "optimise it with an optax transform that supports complex parameters)"
            )


def _validate(manifolds, params) -> None:
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    for m, (path, leaf) in zip(_leaf_manifolds(manifolds, params), flat, strict=True):
        if not _is_euclidean(m):
            m.assert_on_manifold(leaf, name="params" + jax.tree_util.keystr(path))


def _check_init(manifolds, params, validate: bool, who: str) -> bool:
    """The ``init`` checks: real parameters, labels that fit, points on their manifolds.

    Returns ``False`` for a leafless ``params`` (``optax.tree_map_params`` inits on a
    placeholder), for which there is nothing to check.
    """
    _check_real(params, who)
    if not jax.tree.leaves(params):
        return False
    _leaf_manifolds(manifolds, params)  # raises if the labels do not fit
    if validate:
        _validate(manifolds, params)
    return True


def _check_like_params(tree, params, name: str) -> None:
    """``tree`` has one leaf per parameter, of the parameter's shape (containers may differ)."""
    shapes = [jnp.shape(x) for x in jax.tree.leaves(tree)]
    pshapes = [jnp.shape(x) for x in jax.tree.leaves(params)]
    if shapes != pshapes:
        raise ValueError(
            f"`{name}` (structure {jax.tree.structure(tree)}, leaf shapes {shapes}) does not "
            f"match `params` (structure {jax.tree.structure(params)}, leaf shapes {pshapes}); "
            "pass one gradient per parameter, of its shape"
        )


def _map_leaves(fn, manifolds, *trees, n_out: int):
    """``fn(manifold, *leaves) -> tuple`` over the aligned leaves of ``trees``.

    ``trees[0]`` is the parameters; the others have one leaf per parameter (their
    containers may differ, e.g. ``nnx.State`` with or without ``Variable``
    wrappers). Output ``j`` has the structure of ``trees[min(j + 1, len - 1)]``:
    updates like the gradients, states like the state they replace.
    """
    labels = _leaf_manifolds(manifolds, trees[0])
    flats = [jax.tree.flatten(t) for t in trees]
    results = [fn(m, *ls) for m, *ls in zip(labels, *[f[0] for f in flats], strict=True)]
    defs = [flats[min(j + 1, len(trees) - 1)][1] for j in range(n_out)]
    return tuple(jax.tree.unflatten(defs[j], [r[j] for r in results]) for j in range(n_out))


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


def _check_common(learning_rate, manifolds, refresh_every, retraction):
    if not callable(learning_rate):
        scalar(learning_rate, "learning_rate")
    _check_manifolds(manifolds)
    int_scalar(refresh_every, "refresh_every", 1, allow_none=True)
    if retraction is not None and not isinstance(retraction, str):
        raise TypeError(f"argument `retraction` must be a str or None, got {retraction!r}")


def riemannian_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    *,
    manifolds: ManifoldTree = None,
    retraction: str | None = None,
    refresh_every: int | None = 100,
    validate: bool = True,
) -> optax.GradientTransformationExtraArgs:
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
      momentum: ``beta`` in ``[0, 1)``; ``None`` for plain Riemannian gradient descent.
      nesterov: use the Nesterov direction.
      manifolds: pytree of ``Manifold`` / ``None`` that is a prefix of the params,
        or a single ``Manifold`` for every leaf (not a callable: call it on the
        parameters, e.g. ``subjax.nn.manifolds_of(model)``).
        ``None`` means all leaves are Euclidean.
      retraction: retraction name for every manifold leaf (default: each manifold's).
      refresh_every: every this many steps the new point is re-projected
        onto its manifold (``project_point`` under ``lax.cond``); ``None`` disables.
        May be traced (``optax.inject_hyperparams``).
        The fused Stiefel / Grassmann kernel needs no refresh: it uses the exact Gram
        ``x^T x`` and so re-orthonormalises at every step.
      validate: check at ``init`` (concrete parameters only) that each manifold leaf
        is on its manifold; raises ``ValueError`` with the constraint error.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra ``update`` keywords are
      accepted and ignored); state :class:`RiemannianSGDState`. Real parameters
      only (complex ones raise ``TypeError`` at ``init``).

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
    _check_common(learning_rate, manifolds, refresh_every, retraction)
    scalar(momentum, "momentum", low=0.0, high=1.0, high_open=True, allow_none=True)
    use_momentum = momentum is not None

    def init_fn(params):
        _check_init(manifolds, params, validate, "riemannian_sgd")
        mom = jax.tree.map(jnp.zeros_like, params) if use_momentum else None
        return RiemannianSGDState(count=jnp.zeros([], jnp.int32), momentum=mom)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted (optax.GradientTransformationExtraArgs), not used
        if params is None:
            raise ValueError("riemannian_sgd.update needs `params` (the current point)")
        _check_like_params(updates, params, "updates")
        count = state.count
        lr = value_at(learning_rate, count)
        beta = momentum if use_momentum else 0.0
        mom_tree = state.momentum if use_momentum else jax.tree.map(jnp.zeros_like, params)

        def leaf(m, x, g, mo):
            wd = compute_dtype(x.dtype)
            lr_w, beta_w = _cast(lr, wd), _cast(beta, wd)
            man = Euclidean() if m is None else m
            refresh = None if refresh_every is None else (
                (count + 1) % refresh_every == 0)
            u, m_new = man.momentum_step(x, g, mo, lr_w, beta_w, nesterov, retraction, refresh)
            u = _frozen_if_zero(lr_w, u)
            return u.astype(x.dtype), m_new.astype(mo.dtype)

        new_updates, new_mom = _map_leaves(leaf, manifolds, params, updates, mom_tree, n_out=2)
        return new_updates, RiemannianSGDState(
            count=optax.safe_int32_increment(count),
            momentum=new_mom if use_momentum else None,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def riemannian_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    manifolds: ManifoldTree = None,
    retraction: str | None = None,
    refresh_every: int | None = 100,
    validate: bool = True,
) -> optax.GradientTransformationExtraArgs:
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
      learning_rate: float, scalar array or optax schedule of the step count.
      b1: decay of the first moment, in ``[0, 1)``.
      b2: decay of the second moment, in ``[0, 1)``.
      eps: ``>= 0``, added to the root of the second moment.
      manifolds: pytree of ``Manifold`` / ``None`` that is a prefix of the params
        (matched by key names), or one ``Manifold`` for every leaf.
      retraction: retraction name for every manifold leaf (default: each manifold's).
      refresh_every: every this many steps the new point is re-projected onto its
        manifold (``project_point`` under ``lax.cond``); ``None`` disables. May be
        traced (``optax.inject_hyperparams``).
      validate: check at ``init`` (concrete parameters) that each manifold leaf is
        on its manifold.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (extra ``update`` keywords are
      accepted and ignored); state :class:`RiemannianAdamState`. Real parameters
      only (complex ones raise ``TypeError`` at ``init``).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from subjax.manifolds import Sphere
      >>> from subjax.optim import riemannian_adam
      >>> sphere = Sphere(3)
      >>> a = jnp.diag(jnp.array([3.0, 2.0, 1.0]))
      >>> loss = lambda p: -p["x"] @ a @ p["x"]  # minimum: the top eigenvector
      >>> opt = riemannian_adam(0.05, manifolds={"x": sphere})
      >>> params = {"x": jnp.array([0.6, 0.0, 0.8])}
      >>> state = opt.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     return optax.apply_updates(params, updates), state
      >>> for _ in range(200):
      ...     params, state = step(params, state)
      >>> bool(abs(params["x"][0]) > 0.99), bool(sphere.check(params["x"]) < 1e-5)
      (True, True)

    References:
      Bécigneul, Ganea, "Riemannian Adaptive Optimization Methods", ICLR 2019.
    """
    _check_common(learning_rate, manifolds, refresh_every, retraction)
    scalar(b1, "b1", low=0.0, high=1.0, high_open=True)
    scalar(b2, "b2", low=0.0, high=1.0, high_open=True)
    nonnegative(eps, "eps")

    def init_fn(params):
        if not _check_init(manifolds, params, validate, "riemannian_adam"):
            zeros = jax.tree.map(jnp.zeros_like, params)
            return RiemannianAdamState(count=jnp.zeros([], jnp.int32), mu=zeros, nu=zeros)

        def leaf(m, x):
            mu = jnp.zeros_like(x)
            if _is_euclidean(m):
                return mu, jnp.zeros_like(x)
            return mu, jnp.zeros(m.batch_shape(x), compute_dtype(x.dtype))

        mu, nu = _map_leaves(leaf, manifolds, params, n_out=2)
        return RiemannianAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted (optax.GradientTransformationExtraArgs), not used
        if params is None:
            raise ValueError("riemannian_adam.update needs `params` (the current point)")
        _check_like_params(updates, params, "updates")
        count = optax.safe_int32_increment(state.count)
        lr = value_at(learning_rate, state.count)

        def leaf(m, x, g, mu, nu):
            wd = compute_dtype(x.dtype)
            lr_w, b1_w, b2_w, eps_w = (_cast(v, wd) for v in (lr, b1, b2, eps))
            t = count.astype(wd)
            c1 = 1 - b1_w**t
            c2 = 1 - b2_w**t
            xw, gw, muw = as_compute(x), as_compute(g), as_compute(mu)
            if _is_euclidean(m):
                mu_new = b1_w * muw + (1 - b1_w) * gw
                nu_new = b2_w * as_compute(nu) + (1 - b2_w) * gw * gw
                u = -lr_w * (mu_new / c1) / (jnp.sqrt(nu_new / c2) + eps_w)
                return u.astype(x.dtype), mu_new.astype(mu.dtype), nu_new.astype(nu.dtype)
            rg = m.egrad2rgrad(xw, gw)
            mu_new = b1_w * m.proj(xw, muw) + (1 - b1_w) * rg
            nu_new = b2_w * nu.astype(wd) + (1 - b2_w) * m.inner(xw, rg, rg).astype(wd)
            scale = -lr_w / c1 / (jnp.sqrt(nu_new / c2) + eps_w)
            scale = scale.reshape(scale.shape + (1,) * len(m.point_shape))
            x_new = m.retract(xw, scale * mu_new, retraction)
            mu_t = m.transport(xw, x_new, mu_new)
            u = _maybe_reproject(m, xw, x_new - xw, state.count, refresh_every)
            u = _frozen_if_zero(lr_w, u)
            return u.astype(x.dtype), mu_t.astype(mu.dtype), nu_new.astype(nu.dtype)

        new_updates, mu, nu = _map_leaves(
            leaf, manifolds, params, updates, state.mu, state.nu, n_out=3
        )
        return new_updates, RiemannianAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def manifold_labels(manifolds: ManifoldTree, riemannian="riemannian", euclidean="euclidean"):
    """Labels for ``optax.partition``: ``riemannian`` on manifold leaves, else ``euclidean``.

    Args:
      manifolds: pytree of :class:`subjax.manifolds.Manifold` / ``None`` labels (a
        ``Euclidean`` manifold counts as Euclidean), or one manifold.
      riemannian: the label of manifold leaves.
      euclidean: the label of ``None`` / ``Euclidean`` leaves.

    Returns:
      A pytree of the structure of ``manifolds`` holding the two labels, for
      ``optax.partition({riemannian: riemannian_sgd(...), euclidean: adam}, labels)``.
      Anything but a ``Manifold`` / ``None`` at a leaf raises ``TypeError``.

    Example:
      >>> import optax
      >>> from subjax.manifolds import Grassmann
      >>> manifold_labels({"head": Grassmann(4, 2), "bias": None})
      {'bias': 'euclidean', 'head': 'riemannian'}
    """
    _check_manifolds(manifolds)
    return jax.tree.map(
        lambda m: euclidean if _is_euclidean(m) else riemannian, manifolds, is_leaf=_is_label
    )
