"""Low-rank projected optimizers: ``projected`` (any inner transform) and ``galore``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax.optim._projectors import Projector, make_projector

_EMPTY_SHAPE = (0,)


class ProjectedState(NamedTuple):
    """State of :func:`projected`.

    Attributes:
      count: int32 ``()``, number of updates taken.
      projector_state: pytree like the params; per projected matrix the
        projector's state (``"svd"`` / ``"subspace"``: float32 ``(N, r)`` basis;
        ``"dct"``: int32 ``(r,)`` column indices; ``"random"``: float32 ``(0,)``),
        float32 ``(0,)`` for leaves that are not projected. ``N`` is the smaller
        side of the matrix.
      fisher_history: pytree like the params; with ``natural_history=s > 0``,
        float32 ``(s, M, r)`` recent projected gradients (``M`` the larger side)
        for the Natural GaLore empirical Fisher; float32 ``(0,)`` otherwise.
      inner_state: the inner transform's state, built on the projected shapes
        (``(r, n)`` for a wide ``(m, n)`` matrix, ``(m, r)`` for a tall one).
    """

    count: jax.Array
    projector_state: Any
    fisher_history: Any
    inner_state: optax.OptState


class _Spec(NamedTuple):
    transpose: bool  # leaf is wide (m < n): work on its transpose
    big: int  # M, the larger side
    small: int  # N, the smaller side (the projector's side)


def _leaf_specs(params, mask, rank: int) -> list[_Spec | None]:
    with_path, _ = jax.tree_util.tree_flatten_with_path(params)
    if mask is None:
        mask_leaves = [True] * len(with_path)
    else:
        m = mask(params) if callable(mask) else mask
        mask_leaves = jax.tree.leaves(m)
        if len(mask_leaves) != len(with_path):
            raise ValueError(
                f"`mask` has {len(mask_leaves)} leaves but the parameters have "
                f"{len(with_path)}; it must be a pytree of bools like the parameters"
            )
    specs: list[_Spec | None] = []
    for (path, leaf), use in zip(with_path, mask_leaves, strict=True):
        shape = jnp.shape(leaf)
        if not use or len(shape) != 2:
            specs.append(None)
            continue
        m, n = shape
        if rank > min(m, n):
            raise ValueError(
                f"`rank`={rank} exceeds min(m, n)={min(m, n)} for the matrix leaf "
                f"{jax.tree_util.keystr(path)} of shape {shape}; lower `rank` or "
                "exclude the leaf with `mask`"
            )
        specs.append(_Spec(transpose=m < n, big=max(m, n), small=min(m, n)))
    return specs


def _tall(g: jax.Array, spec: _Spec) -> jax.Array:
    g = g.astype(jnp.float64 if g.dtype == jnp.float64 else jnp.float32)
    return g.T if spec.transpose else g


def _woodbury_natural(hist: jax.Array, r: jax.Array, damping: float) -> jax.Array:
    """``F^{-1} r`` for ``F = delta I + (1/s) sum_i h_i h_i^T`` (Woodbury identity).

    ``delta = damping * (1/s) sum_i ||h_i||^2`` (damping relative to the trace of
    the empirical Fisher, so the preconditioner is invariant to the gradient
    scale). ``F^{-1} = (1/delta) (I - H^T (s delta I + H H^T)^{-1} H)`` with the
    ``s`` history vectors as the rows of ``H``: an ``s x s`` solve.
    """
    s = hist.shape[0]
    h = hist.reshape(s, -1)
    v = r.reshape(-1)
    k = h @ h.T
    delta = damping * jnp.trace(k) / s
    delta = jnp.maximum(delta, jnp.finfo(h.dtype).tiny)
    gram = k + (s * delta) * jnp.eye(s, dtype=h.dtype)
    a = jax.scipy.linalg.solve(gram, h @ v, assume_a="pos")
    return ((v - h.T @ a) / delta).reshape(r.shape)


def projected(
    inner: optax.GradientTransformation | None = None,
    rank: int = 128,
    update_gap: int = 200,
    *,
    projector: str | Projector = "subspace",
    scale: float = 1.0,
    mask: Any | Callable[[Any], Any] | None = None,
    subspace_iters: int = 1,
    init_iters: int = 6,
    align: str | None = "rotation",
    natural_history: int = 0,
    natural_damping: float = 0.1,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Run ``inner`` on gradients projected onto a rank-``r`` subspace (GaLore).

    For a matrix leaf with gradient :math:`G \in \mathbb{R}^{m \times n}` and
    :math:`N = \min(m, n)`, a basis :math:`Q \in \mathbb{R}^{N \times r}`,
    :math:`Q^\top Q = I`, of the smaller side is refreshed every ``update_gap``
    steps (step 0 included) from the current gradient. The inner transform sees
    :math:`R = Q^\top G` (wide, :math:`m < n`) or :math:`R = G Q` (tall) and its
    output :math:`U` is mapped back as ``scale *`` :math:`Q U` (or
    :math:`U Q^\top`). Leaves that are not matrices (or masked out) go to
    ``inner`` unprojected. The optimizer state of a matrix is
    :math:`O(r(m + n))`: the basis (``N r``) plus the inner state on ``R``
    (``2 r \max(m, n)`` for Adam).

    With ``natural_history = s > 0`` (Natural GaLore), the projected gradient is
    first preconditioned by the inverse of the low-rank empirical Fisher
    :math:`F = \delta I + \frac1s \sum_{i} r_i r_i^\top` of the last ``s``
    projected gradients (reset at every refresh), applied with the Woodbury
    identity (an ``s x s`` solve); :math:`\delta` is ``natural_damping`` times
    :math:`\frac1s \sum_i \|r_i\|^2`, so the preconditioner is scale-invariant.

    Args:
      inner: transform run in the projected space (default
        ``optax.scale_by_adam()``). It receives ``params=None``: it must not need
        parameter values (no ``adamw``; use ``galore(weight_decay=...)``).
      rank: static rank ``r``; must not exceed the smaller side of any projected
        matrix (exclude small matrices with ``mask``).
      update_gap: refresh the basis every ``update_gap >= 1`` steps.
      projector: ``"subspace"`` (warm-started subspace iteration, default),
        ``"svd"`` (exact), ``"dct"`` (SVD-free DCT column selection),
        ``"random"`` (seeded, regenerated), or a :class:`Projector`.
      scale: factor on the back-projected update (GaLore's ``alpha``).
      mask: pytree of bools like the params (or a callable returning one):
        which matrix leaves to project. Default: every 2-D leaf.
      subspace_iters: subspace-iteration steps per refresh (``"subspace"``).
      init_iters: steps at the first refresh, from a random start (``"subspace"``).
      align: how a refreshed ``"svd"`` / ``"subspace"`` basis is matched to the
        previous one: ``"rotation"`` (orthogonal Procrustes), ``"sign"``, ``None``.
      natural_history: ``s``, the number of projected gradients kept for the
        Natural GaLore Fisher (0 disables it).
      natural_damping: relative damping :math:`> 0` of the Natural GaLore Fisher.
      seed: seed of the random starts / random projector.

    Returns:
      An ``optax.GradientTransformationExtraArgs``; extra keyword arguments of
      ``update`` are forwarded to ``inner``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import subjax.optim as so
      >>> opt = so.projected(optax.scale_by_adam(), rank=2, update_gap=10)
      >>> params = {"w": jnp.ones((6, 4)), "b": jnp.ones((4,))}
      >>> state = opt.init(params)
      >>> state.projector_state["w"].shape, state.inner_state.mu["w"].shape
      ((4, 2), (6, 2))

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection, ICML 2024. Das, Natural GaLore: Accelerating GaLore for
      memory-efficient LLM training and fine-tuning, 2024. Modoranu et al.
      (SVD-free low-rank adaptive gradient optimization with DCT bases), 2025.
    """
    if inner is None:
        inner = optax.scale_by_adam()
    inner = optax.with_extra_args_support(inner)
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"`rank` must be a Python int, got {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"`rank` must be >= 1, got {rank}")
    if isinstance(update_gap, bool) or not isinstance(update_gap, int):
        raise TypeError(f"`update_gap` must be a Python int, got {type(update_gap).__name__}")
    if update_gap < 1:
        raise ValueError(f"`update_gap` must be >= 1, got {update_gap}")
    if not isinstance(natural_history, int) or natural_history < 0:
        raise ValueError(f"`natural_history` must be an int >= 0, got {natural_history!r}")
    if not natural_damping > 0:
        raise ValueError(f"`natural_damping` must be > 0, got {natural_damping!r}")
    proj = make_projector(projector, subspace_iters=subspace_iters, init_iters=init_iters,
                          align=align)

    def _empty():
        return jnp.zeros(_EMPTY_SHAPE, jnp.float32)

    def _proxy(leaf, spec):
        if spec is None:
            return jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf))
        shape = (rank, spec.big) if spec.transpose else (spec.big, rank)
        return jnp.zeros(shape, jnp.result_type(leaf))

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        specs = _leaf_specs(params, mask, rank)
        pstates = [_empty() if s is None else proj.init(s.small, rank) for s in specs]
        fisher = [
            _empty() if (s is None or natural_history == 0)
            else jnp.zeros((natural_history, s.big, rank), jnp.float32)
            for s in specs
        ]
        proxies = [_proxy(leaf, s) for leaf, s in zip(leaves, specs, strict=True)]
        return ProjectedState(
            count=jnp.zeros([], jnp.int32),
            projector_state=jax.tree.unflatten(treedef, pstates),
            fisher_history=jax.tree.unflatten(treedef, fisher),
            inner_state=inner.init(jax.tree.unflatten(treedef, proxies)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params
        leaves, treedef = jax.tree.flatten(updates)
        specs = _leaf_specs(updates, mask, rank)
        pstates = treedef.flatten_up_to(state.projector_state)
        fisher = treedef.flatten_up_to(state.fisher_history)
        count = state.count
        refresh_now = count % update_gap == 0
        first = count == 0
        refresh_idx = count // update_gap
        base_key = jax.random.key(seed)
        keys = [
            jax.random.fold_in(jax.random.fold_in(base_key, i), refresh_idx)
            for i in range(len(leaves))
        ]

        def do_refresh(ps):
            return [
                p if s is None else proj.refresh(_tall(g, s), p, k, first)
                for g, p, s, k in zip(leaves, ps, specs, keys, strict=True)
            ]

        pstates = jax.lax.cond(refresh_now, do_refresh, lambda ps: list(ps), list(pstates))

        bases, low, new_fisher = [], [], []
        for g, p, h, s, k in zip(leaves, pstates, fisher, specs, keys, strict=True):
            if s is None:
                bases.append(None)
                low.append(g)
                new_fisher.append(h)
                continue
            q = proj.basis(p, k, s.small, rank)
            r = _tall(g, s) @ q  # (M, r)
            if natural_history > 0:
                h = jnp.where(refresh_now, jnp.zeros_like(h), h)
                h = h.at[count % natural_history].set(r)
                r = _woodbury_natural(h, r, natural_damping)
            bases.append(q)
            new_fisher.append(h)
            r = r.T if s.transpose else r
            low.append(r.astype(jnp.result_type(g)))

        low_updates, inner_state = inner.update(
            jax.tree.unflatten(treedef, low), state.inner_state, None, **extra_args
        )
        out = []
        for u, g, q, s in zip(treedef.flatten_up_to(low_updates), leaves, bases, specs,
                              strict=True):
            if s is None:
                out.append(u)
                continue
            u32 = u.astype(q.dtype)
            u32 = u32.T if s.transpose else u32  # (M, r)
            full = u32 @ q.T  # (M, N)
            full = full.T if s.transpose else full
            out.append((scale * full).astype(jnp.result_type(g)))

        new_state = ProjectedState(
            count=optax.safe_int32_increment(count),
            projector_state=jax.tree.unflatten(treedef, pstates),
            fisher_history=jax.tree.unflatten(treedef, new_fisher),
            inner_state=inner_state,
        )
        return jax.tree.unflatten(treedef, out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def galore(
    learning_rate: optax.ScalarOrSchedule,
    rank: int = 128,
    update_gap: int = 200,
    *,
    projector: str | Projector = "subspace",
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    weight_decay_mask: Any = None,
    mask: Any = None,
    subspace_iters: int = 1,
    init_iters: int = 6,
    align: str | None = "rotation",
    natural_history: int = 0,
    natural_damping: float = 0.1,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """GaLore: Adam in a rank-``r`` gradient subspace, decoupled weight decay, learning rate.

    ``chain(projected(scale_by_adam(b1, b2, eps), rank, update_gap, ...),
    add_decayed_weights(weight_decay, weight_decay_mask),
    scale_by_learning_rate(learning_rate))``. The default projector is the
    warm-started subspace iteration (``"subspace"``); ``projector="svd"`` is the
    paper's exact SVD. See :func:`projected` for the remaining arguments.

    ``rank``, ``update_gap``, ``subspace_iters``, ``init_iters``,
    ``natural_history`` and ``seed`` are static: with ``optax.inject_hyperparams``
    name them in ``static_args`` (or wrap ``galore`` in a factory that takes only
    the hyperparameters to inject).

    Example:
      >>> import jax.numpy as jnp
      >>> import subjax.optim as so
      >>> opt = so.galore(1e-2, rank=4, update_gap=50)
      >>> state = opt.init({"w": jnp.zeros((16, 8))})
      >>> state[0].projector_state["w"].shape, state[0].inner_state.mu["w"].shape
      ((8, 4), (16, 4))

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection, ICML 2024.
    """
    return optax.chain(
        projected(
            optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
            rank,
            update_gap,
            projector=projector,
            scale=scale,
            mask=mask,
            subspace_iters=subspace_iters,
            init_iters=init_iters,
            align=align,
            natural_history=natural_history,
            natural_damping=natural_damping,
            seed=seed,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
