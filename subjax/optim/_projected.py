"""Low-rank projected optimizers: ``projected`` (any inner transform) and ``galore``."""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from optax.contrib import GaLoreDimensionNumbers

from subjax._core import as_compute, int_scalar, optional_static_int, positive, static_int
from subjax.optim._projectors import Projector, make_projector


class ProjectedState(NamedTuple):
    """State of :func:`projected`.

    Attributes:
      count: int32 ``()``, number of updates taken.
      projector_state: pytree like the params; per projected matrix the
        projector's state (``"svd"`` / ``"subspace"``: float32 ``(N, r)`` basis;
        ``"dct"``: int32 ``(r,)`` column indices; ``"random"``:
        ``optax.MaskedNode()``), ``optax.MaskedNode()`` for leaves that are not
        projected. ``N`` is the smaller side of the matrix.
      fisher_history: pytree like the params; with ``natural_history=s > 0``,
        float32 ``(s, M, r)`` recent projected gradients (``M`` the larger side)
        for the Natural GaLore empirical Fisher; ``optax.MaskedNode()`` otherwise.
      inner_state: the inner transform's state, built on the projected shapes
        (``(r, n)`` for a wide ``(m, n)`` matrix, ``(m, r)`` for a tall one).
    """

    count: jax.Array
    projector_state: Any
    fisher_history: Any
    inner_state: optax.OptState


class _Spec(NamedTuple):
    """How one leaf is seen as a matrix ``(R, O)`` (reduction x output axes)."""

    perm: tuple[int, ...]  # leaf axes in (reduction..., output...) order
    shape2d: tuple[int, int]  # (R, O)
    transpose: bool  # R < O: work on the transpose (the canonical tall form)
    big: int  # M = max(R, O)
    small: int  # N = min(R, O), the projector's side
    rank: int  # min(rank, M, N)


def _axes(axis, ndim: int) -> tuple[int, ...]:
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(a % ndim for a in axes)


def _dim_nums_tree(weight_dimension_numbers, params):
    """Per-leaf ``GaLoreDimensionNumbers`` or ``None`` (leaf not projected)."""
    wdn = weight_dimension_numbers
    if wdn is None:
        return jax.tree.map(lambda p: GaLoreDimensionNumbers() if jnp.ndim(p) == 2 else None,
                            params)
    if isinstance(wdn, GaLoreDimensionNumbers):
        return jax.tree.map(lambda p: wdn if jnp.ndim(p) >= 2 else None, params)
    if callable(wdn):
        return wdn(params)
    return wdn


def _leaf_specs(params, weight_dimension_numbers, rank: int) -> list[_Spec | None]:
    with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    dims = _dim_nums_tree(weight_dimension_numbers, params)
    try:
        dim_leaves = treedef.flatten_up_to(dims)
    except (ValueError, TypeError):
        raise ValueError(
            "`weight_dimension_numbers` must be None, one GaLoreDimensionNumbers, or a "
            "pytree like the parameters with a GaLoreDimensionNumbers or None per leaf; got "
            f"structure {jax.tree.structure(dims)} for parameters {treedef}"
        ) from None
    specs: list[_Spec | None] = []
    for (path, leaf), dn in zip(with_path, dim_leaves, strict=True):
        if dn is None:
            specs.append(None)
            continue
        name = f"params{jax.tree_util.keystr(path)}"
        if not isinstance(dn, GaLoreDimensionNumbers):
            raise TypeError(
                f"`weight_dimension_numbers` for {name} must be a GaLoreDimensionNumbers or "
                f"None, got {type(dn).__name__}"
            )
        shape = jnp.shape(leaf)
        if len(shape) < 2:
            raise ValueError(f"{name} of shape {shape} cannot be projected: it needs ndim >= 2")
        if jnp.issubdtype(jnp.result_type(leaf), jnp.complexfloating):
            raise TypeError(
                f"{name} is complex ({jnp.result_type(leaf)}): low-rank projection supports "
                "real matrices only; exclude the leaf (a None in `weight_dimension_numbers`) "
                "so that the inner transform updates it unprojected"
            )
        red, out = _axes(dn.reduction_axis, len(shape)), _axes(dn.output_axis, len(shape))
        if set(red) & set(out) or len(set(red) | set(out)) != len(shape):
            raise ValueError(
                f"`weight_dimension_numbers` for {name} (shape {shape}) must split its axes "
                f"into disjoint reduction and output axes covering every axis; got {dn}"
            )
        rows = math.prod(shape[a] for a in red)
        cols = math.prod(shape[a] for a in out)
        specs.append(_Spec(perm=red + out, shape2d=(rows, cols), transpose=rows < cols,
                           big=max(rows, cols), small=min(rows, cols),
                           rank=min(rank, rows, cols)))
    return specs


def _tall(g: jax.Array, spec: _Spec) -> jax.Array:
    """The leaf as its canonical tall ``(M, N)`` matrix, in the compute dtype."""
    g = as_compute(g).transpose(spec.perm).reshape(spec.shape2d)
    return g.T if spec.transpose else g


def _untall(t: jax.Array, spec: _Spec, shape) -> jax.Array:
    """Inverse of :func:`_tall` (up to the dtype)."""
    t = t.T if spec.transpose else t
    permuted = tuple(shape[a] for a in spec.perm)
    inv = tuple(sorted(range(len(shape)), key=lambda i: spec.perm[i]))
    return t.reshape(permuted).transpose(inv)


def _woodbury_natural(hist: jax.Array, r: jax.Array, damping) -> jax.Array:
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
    refresh_every: int = 200,
    *,
    projector: str | Projector = "subspace",
    scale: float = 1.0,
    weight_dimension_numbers: Any = None,
    subspace_steps: int | None = None,
    init_steps: int | None = None,
    align: str | None = "rotation",
    natural_history: int | None = None,
    natural_damping: float = 0.1,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""Run ``inner`` on gradients projected onto a rank-``r`` subspace (GaLore).

    For a matrix leaf with gradient :math:`G \in \mathbb{R}^{m \times n}` and
    :math:`N = \min(m, n)`, a basis :math:`Q \in \mathbb{R}^{N \times r}`,
    :math:`Q^\top Q = I`, of the smaller side is refreshed every
    ``refresh_every`` steps (step 0 included) from the current gradient. The
    inner transform sees

    .. math::
        R = Q^\top G \ (m < n), \qquad R = G Q \ (m \ge n),

    and its output :math:`U` is mapped back as :math:`\text{scale}\cdot Q U`
    (or :math:`\text{scale}\cdot U Q^\top`). Leaves that are not projected go to
    ``inner`` unprojected. The optimizer state of a matrix is
    :math:`O(r(m + n))`: the basis (``N r``) plus the inner state on ``R``
    (``2 r \max(m, n)`` for Adam). The rank of each matrix is
    :math:`\min(r, m, n)` (as in ``optax.contrib.galore``).

    With ``natural_history = s > 0`` (Natural GaLore), the projected gradient is
    first preconditioned by the inverse of the low-rank empirical Fisher
    :math:`F = \delta I + \frac1s \sum_{i} r_i r_i^\top` of the last ``s``
    projected gradients (reset at every refresh), applied with the Woodbury
    identity (an ``s x s`` solve); :math:`\delta` is ``natural_damping`` times
    :math:`\frac1s \sum_i \|r_i\|^2`, so the preconditioner is scale-invariant.

    Under ``optax.inject_hyperparams``, ``refresh_every``, ``scale``,
    ``natural_damping`` and ``seed`` may be traced; ``rank`` fixes shapes and
    must be listed in ``static_args`` (a ``TypeError`` says so otherwise), and so
    must ``subspace_steps``, ``init_steps`` and ``natural_history`` when given as
    ints (their ``None`` defaults are static).

    Args:
      inner: transform run in the projected space (default
        ``optax.scale_by_adam()``). It receives ``params=None``: it must not need
        parameter values (no ``adamw``; use ``galore(weight_decay=...)``).
      rank: static rank ``r``, clipped to ``min(m, n)`` per matrix.
      refresh_every: refresh the basis every ``refresh_every >= 1`` steps.
      projector: ``"subspace"`` (warm-started subspace iteration, default),
        ``"svd"`` (exact), ``"dct"`` (SVD-free DCT column selection),
        ``"random"`` (seeded, regenerated), or a :class:`Projector`.
      scale: factor on the back-projected update (GaLore's ``alpha``).
      weight_dimension_numbers: which leaves are projected and how they are
        read as matrices: ``None`` (every 2-D leaf), one
        ``optax.contrib.GaLoreDimensionNumbers`` (every leaf with ``ndim >= 2``),
        a pytree like the params with a ``GaLoreDimensionNumbers`` or ``None``
        (not projected) per leaf, or a callable returning one. The reduction
        axes form the rows and the output axes the columns, as in
        ``optax.contrib.scale_by_galore``.
      subspace_steps: subspace-iteration steps per refresh (``"subspace"``;
        ``None``: 1).
      init_steps: steps at the first refresh, from a random start (``"subspace"``;
        ``None``: 6).
      align: how a refreshed ``"svd"`` / ``"subspace"`` basis is matched to the
        previous one: ``"rotation"`` (orthogonal Procrustes), ``"sign"``, ``None``.
      natural_history: ``s``, the number of projected gradients kept for the
        Natural GaLore Fisher (``None`` or 0 disables it).
      natural_damping: relative damping :math:`> 0` of the Natural GaLore Fisher.
      seed: seed of the random starts / random projector.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`ProjectedState`; extra keyword arguments of ``update`` are
      forwarded to ``inner``. Complex matrices cannot be projected (a
      ``TypeError`` names the leaf); complex leaves that are not projected go to
      ``inner`` as they are.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> import subjax.optim as so
      >>> opt = so.projected(optax.scale_by_adam(), rank=2, refresh_every=10)
      >>> params = {"w": jnp.ones((6, 4)), "b": jnp.ones((4,))}
      >>> state = opt.init(params)
      >>> state.projector_state["w"].shape, state.inner_state.mu["w"].shape
      ((4, 2), (6, 2))
      >>> updates, state = opt.update({"w": jnp.ones((6, 4)), "b": jnp.ones((4,))}, state)
      >>> updates["w"].shape
      (6, 4)

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection, ICML 2024. Das, Natural GaLore: Accelerating GaLore for
      memory-efficient LLM training and fine-tuning, 2024. Modoranu et al.
      (SVD-free low-rank adaptive gradient optimization with DCT bases), 2025.
    """
    if inner is None:
        inner = optax.scale_by_adam()
    inner = optax.with_extra_args_support(inner)
    rank = static_int(rank, "rank", 1)
    int_scalar(refresh_every, "refresh_every", 1)
    natural_history = optional_static_int(natural_history, "natural_history", 0) or 0
    positive(natural_damping, "natural_damping")
    int_scalar(seed, "seed")
    proj = make_projector(projector, subspace_steps=subspace_steps, init_steps=init_steps,
                          align=align)

    def _proxy(leaf, spec):
        if spec is None:
            return jnp.zeros(jnp.shape(leaf), jnp.result_type(leaf))
        shape = (spec.rank, spec.big) if spec.transpose else (spec.big, spec.rank)
        return jnp.zeros(shape, jnp.result_type(leaf))

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        if not leaves:  # optax.tree_map_params inits on a leafless placeholder
            return ProjectedState(jnp.zeros([], jnp.int32), params, params, inner.init(params))
        specs = _leaf_specs(params, weight_dimension_numbers, rank)
        masked = optax.MaskedNode()
        pstates = [masked if s is None else proj.init(s.small, s.rank) for s in specs]
        fisher = [
            masked if (s is None or natural_history == 0)
            else jnp.zeros((natural_history, s.big, s.rank), jnp.float32)
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
        specs = _leaf_specs(updates, weight_dimension_numbers, rank)
        pstates = treedef.flatten_up_to(state.projector_state)
        fisher = treedef.flatten_up_to(state.fisher_history)
        count = state.count
        refresh_now = count % refresh_every == 0
        first = count == 0
        refresh_idx = count // refresh_every
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
            q = proj.basis(p, k, s.small, s.rank)
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
            u = u.astype(q.dtype)
            full = (u.T if s.transpose else u) @ q.T  # (M, N)
            full = _untall(full, s, jnp.shape(g))
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
    update_proj_gap: int = 200,
    scale: float = 1.0,
    base_optimizer: optax.GradientTransformation | None = None,
    weight_decay: float = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
    weight_dimension_numbers: Any = None,
    *,
    projector: str | Projector = "subspace",
    subspace_steps: int | None = None,
    init_steps: int | None = None,
    align: str | None = "rotation",
    natural_history: int | None = None,
    natural_damping: float = 0.1,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    r"""GaLore: Adam in a rank-``r`` gradient subspace, decoupled weight decay, learning rate.

    A drop-in for ``optax.contrib.galore``: the positional arguments and their
    names are optax's (``update_proj_gap``, ``base_optimizer``, ``mask`` is the
    *weight-decay* mask, ``weight_dimension_numbers`` selects and shapes the
    projected leaves, ``rank`` is clipped to ``min(m, n)``), so ported code
    means the same thing. ``update_proj_gap`` is the one place subjax does not
    say ``refresh_every`` (it is passed to :func:`projected` as that). The
    keyword-only arguments add subjax's projectors and Natural GaLore.

    .. math::
        u_t = -\eta_t \big(\text{scale}\cdot P\,\mathrm{base}(P^\top G_t)
        + \lambda W_t\big)

    for a projected matrix (``P`` the basis of :func:`projected`, applied on the
    smaller side); that is ``chain(projected(base_optimizer, rank,
    update_proj_gap, ...), add_decayed_weights(weight_decay, mask),
    scale_by_learning_rate(learning_rate))``.

    Args:
      learning_rate: a float or an optax schedule.
      rank: static rank ``r`` (clipped to ``min(m, n)`` per matrix).
      update_proj_gap: refresh the basis every this many steps (may be traced).
      scale: factor on the back-projected update (GaLore's ``alpha``).
      base_optimizer: gradient-scaling transform run in the projected space
        (default ``optax.scale_by_adam()``); it must not need the parameters.
      weight_decay: decoupled weight-decay rate :math:`\lambda`, in full space.
      mask: pytree of bools like the params (or a callable returning one): the
        leaves that get weight decay (optax's meaning).
      weight_dimension_numbers: which leaves are projected; see :func:`projected`.
      projector: ``"subspace"`` (default; warm-started subspace iteration),
        ``"svd"`` (the paper's exact SVD), ``"dct"``, ``"random"`` or a
        :class:`Projector`.
      subspace_steps, init_steps, align, natural_history, natural_damping, seed:
        see :func:`projected`.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` (an ``optax.chain``; its
      first state is the :class:`ProjectedState`).

    Under ``optax.inject_hyperparams``, ``rank`` fixes shapes: list it in
    ``static_args``, as with ``optax.contrib.galore`` (and ``subspace_steps``,
    ``init_steps``, ``natural_history`` when given as ints).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import subjax.optim as so
      >>> opt = so.galore(1e-2, rank=4, update_proj_gap=50)
      >>> params = {"w": jnp.ones((16, 8))}
      >>> state = opt.init(params)
      >>> state[0].projector_state["w"].shape, state[0].inner_state.mu["w"].shape
      ((8, 4), (16, 4))
      >>> loss = lambda p: jnp.sum((p["w"] - 2.0) ** 2)
      >>> for _ in range(3):
      ...     updates, state = opt.update(jax.grad(loss)(params), state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(loss(params) < 16 * 8)
      True

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection, ICML 2024.
    """
    return optax.chain(
        projected(
            base_optimizer,
            rank,
            update_proj_gap,
            projector=projector,
            scale=scale,
            weight_dimension_numbers=weight_dimension_numbers,
            subspace_steps=subspace_steps,
            init_steps=init_steps,
            align=align,
            natural_history=natural_history,
            natural_damping=natural_damping,
            seed=seed,
        ),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale_by_learning_rate(learning_rate),
    )
