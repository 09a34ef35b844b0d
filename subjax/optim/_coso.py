"""CoSO: continual learning in gradient subspaces orthogonal to earlier tasks' subspace."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax._core import (
    as_compute,
    int_scalar,
    optional_static_int,
    static_int,
    unit_interval,
    value_at,
)
from subjax.linalg import subspace_iteration

__all__ = ["CoSOState", "coso", "coso_consolidate"]


class CoSOState(NamedTuple):
    """State of :func:`coso`.

    Per matrix leaf of shape ``(m, n)`` (other leaves hold ``optax.MaskedNode()``):
    ``basis`` the ``(m, r)`` current gradient subspace, ``memory`` the ``(m, m)``
    orthonormal basis of earlier tasks' subspace in its first columns (zeros after),
    ``sketch`` the ``(m, m)`` sum of ``g' g'^T`` over this task's projected gradients.
    ``inner`` is the Adam state of the projected gradients; ``count`` counts steps
    since the last :func:`coso_consolidate`.
    """

    count: jax.Array
    key: jax.Array  # raw key data (uint32), so that the state checkpoints
    basis: Any
    memory: Any
    sketch: Any
    inner: Any


def _is_matrix(p) -> bool:
    return getattr(p, "ndim", 0) == 2


def _masked():
    return optax.MaskedNode()


def _rank(m: int, rank: int | None) -> int:
    return m if rank is None else min(rank, m)


def _project_out(memory, x):
    """``(I - M M^T) x``."""
    return x - memory @ (memory.T @ x)


def coso(
    learning_rate: optax.ScalarOrSchedule,
    rank: int | None = 8,
    *,
    refresh_every: int | jax.Array = 10,
    subspace_steps: int = 1,
    init_steps: int = 6,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    seed: int = 0,
) -> optax.GradientTransformation:
    r"""Continuous subspace optimization (CoSO) for continual learning.

    For every matrix parameter ``W`` (``m x n``; the projection acts on its rows,
    the input space of a Flax ``kernel``), with ``M`` the orthonormal basis of the
    subspace earlier tasks occupy:

    1. the gradient is made orthogonal to earlier tasks, ``g' = (I - M M^T) g``;
    2. every ``refresh_every`` steps the dominant rank-``r`` left singular subspace
       ``P`` of ``g'`` is refreshed by warm-started subspace iteration from the
       previous ``P`` (:func:`subjax.linalg.subspace_iteration`, ``subspace_steps``
       steps; ``init_steps`` from a random start after each consolidation) — no
       full SVD;
    3. Adam runs on the projected gradient ``P^T g'`` (``r x n`` moments) and the
       step ``-lr P d`` is mapped back (and projected off ``M`` once more, so it
       never moves the earlier tasks' directions);
    4. ``g' g'^T`` is accumulated; at the end of a task :func:`coso_consolidate`
       adds its dominant eigenvectors (an energy ``threshold``) to ``M``.

    ``rank=None`` skips the low-rank step (Adam on the whole ``g'``): a fixed
    projection orthogonal to ``M`` as in gradient projection memory (GPM), whose
    memory comes from whatever covariance is passed to :func:`coso_consolidate`.
    Leaves that are not matrices get plain Adam.

    Args:
      learning_rate: step size or schedule.
      rank: ``r``, size of the per-step gradient subspace (static), or None.
      refresh_every: period of the subspace refresh (may be traced).
      subspace_steps: subspace-iteration steps per refresh (static).
      init_steps: steps of the first refresh after a consolidation (static).
      b1, b2, eps: Adam parameters of the projected moments.
      seed: seed of the random starts.

    Returns:
      An ``optax.GradientTransformationExtraArgs`` whose state is :class:`CoSOState`.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from subjax.optim import coso, coso_consolidate
      >>> params = {"w": jnp.zeros((4, 3))}
      >>> opt = coso(0.1, rank=1, refresh_every=5)
      >>> state = opt.init(params)
      >>> g = {"w": jnp.ones((4, 3)).at[0].set(0.0)}   # task 1 uses rows 1..3
      >>> u, state = opt.update(g, state)
      >>> state = coso_consolidate(state, threshold=0.99)  # its direction joins the memory
      >>> u, state = opt.update(g, state)           # the next task's step never moves
      >>> mem = state.memory["w"][:, :1]            # along the remembered direction
      >>> float(jnp.abs(mem.T @ u["w"]).max()) < 1e-6
      True

    References:
      Cheng et al., "Continuous Subspace Optimization for Continual Learning", 2025.
    """
    rank = optional_static_int(rank, "rank", minimum=1)
    refresh_every = int_scalar(refresh_every, "refresh_every", minimum=1)
    subspace_steps = static_int(subspace_steps, "subspace_steps", minimum=1)
    init_steps = static_int(init_steps, "init_steps", minimum=1)
    inner = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)

    def _projected_like(params):
        def one(p):
            if not _is_matrix(p):
                return jnp.zeros(p.shape, as_compute(p).dtype)
            m, n = p.shape
            return jnp.zeros((_rank(m, rank), n), as_compute(p).dtype)

        return jax.tree.map(one, params)

    def init_fn(params):
        def mat(fn):
            return jax.tree.map(lambda p: fn(p) if _is_matrix(p) else _masked(), params)

        return CoSOState(
            count=jnp.zeros([], jnp.int32),
            key=jax.random.key_data(jax.random.key(seed)),
            basis=mat(lambda p: jnp.eye(p.shape[0], _rank(p.shape[0], rank),
                                        dtype=as_compute(p).dtype)),
            memory=mat(lambda p: jnp.zeros((p.shape[0],) * 2, as_compute(p).dtype)),
            sketch=mat(lambda p: jnp.zeros((p.shape[0],) * 2, as_compute(p).dtype)),
            inner=inner.init(_projected_like(params)),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        leaves, treedef = jax.tree.flatten(updates)
        bases = treedef.flatten_up_to(state.basis)
        mems = treedef.flatten_up_to(state.memory)
        sketches = treedef.flatten_up_to(state.sketch)
        first = state.count == 0
        refresh = jnp.logical_or(first, state.count % refresh_every == 0)
        base_key = jax.random.wrap_key_data(state.key)
        keys = jax.random.split(jax.random.fold_in(base_key, state.count), len(leaves))
        proj, new_bases, new_sketches, gps = [], [], [], []
        for g, q, mem, sk, key in zip(leaves, bases, mems, sketches, keys, strict=True):
            if not _is_matrix(g):
                proj.append(as_compute(g))
                new_bases.append(q)
                new_sketches.append(sk)
                gps.append(None)
                continue
            gp = _project_out(mem, as_compute(g))
            if rank is None or rank >= g.shape[0]:
                q_new = q
                proj.append(gp)
            else:
                def warm(gp, q, key):
                    return subspace_iteration(gp, q, max_iters=subspace_steps,
                                              orth_method="householder").u

                def cold(gp, q, key):
                    q0 = jax.random.normal(key, q.shape, q.dtype)
                    return subspace_iteration(gp, q0, max_iters=init_steps,
                                              orth_method="householder").u

                def keep(gp, q, key):
                    return q

                q_new = jax.lax.cond(
                    refresh,
                    lambda gp, q, key: jax.lax.cond(first, cold, warm, gp, q, key),
                    keep, gp, q, key)
                proj.append(q_new.T @ gp)
            new_bases.append(q_new)
            new_sketches.append(sk + gp @ gp.T)
            gps.append(gp)
        direction, inner_state = inner.update(treedef.unflatten(proj), state.inner)
        lr = value_at(learning_rate, state.count)
        out = []
        for g, d, q, mem in zip(leaves, treedef.flatten_up_to(direction), new_bases, mems,
                                strict=True):
            if _is_matrix(g) and not (rank is None or rank >= g.shape[0]):
                d = q @ d
            if _is_matrix(g):
                d = _project_out(mem, d)
            out.append((-lr * d).astype(g.dtype))
        new_state = CoSOState(
            count=optax.safe_increment(state.count),
            key=state.key,
            basis=treedef.unflatten(new_bases),
            memory=state.memory,
            sketch=treedef.unflatten(new_sketches),
            inner=inner_state,
        )
        return treedef.unflatten(out), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _consolidate_one(memory, sketch, threshold):
    m = memory.shape[0]
    used = jnp.sum(jnp.linalg.norm(memory, axis=0) > 0.5)
    sketch = 0.5 * (sketch + sketch.T)
    total = jnp.trace(sketch)
    # the part of the task's covariance the memory does not hold yet
    resid = _project_out(memory, _project_out(memory, sketch).T)
    resid = 0.5 * (resid + resid.T)
    evals, evecs = jnp.linalg.eigh(resid)
    evals, evecs = jnp.maximum(evals[::-1], 0.0), evecs[:, ::-1]
    captured = total - jnp.sum(evals)
    safe = jnp.where(total > 0, total, 1.0)
    frac = (captured + jnp.cumsum(evals)) / safe
    k_new = jnp.where(captured / safe < threshold, jnp.sum(frac < threshold) + 1, 0)
    # only directions with energy (a zero eigenvalue's vector may lie in the memory)
    tol = jnp.finfo(evals.dtype).eps * m * jnp.maximum(evals[0], 0.0)
    k_new = jnp.minimum(k_new, jnp.sum(evals > tol))
    k_new = jnp.where(total > 0, jnp.minimum(k_new, m - used), 0)
    j = jnp.arange(m)
    place = (j[None, :] == j[:, None] + used) & (j[:, None] < k_new)  # column j -> used + j
    return memory + evecs @ place.astype(evecs.dtype)


def coso_consolidate(state: CoSOState, threshold: float | jax.Array = 0.97,
                     sketch: Any = None) -> CoSOState:
    """End a task: add the task's dominant directions to the memory of :func:`coso`.

    For every matrix leaf, with ``S`` the task's covariance (``sketch``, by
    default the accumulated ``sum g' g'^T`` of the projected gradients), the
    eigenvectors of its part off the memory, ``(I - M M^T) S (I - M M^T)``, are
    added to the memory in decreasing order until the memory and they hold a
    fraction ``threshold`` of ``trace S`` (GPM's energy criterion); directions
    without energy are never added, and the memory stops at the whole space.
    The sketch, the Adam moments and the step count are reset, so the next task
    starts a fresh subspace from a random start.

    Args:
      state: the optimizer state after the task.
      threshold: energy fraction in ``(0, 1]`` (may be traced).
      sketch: optional pytree like ``state.sketch`` of ``(m, m)`` covariances to
        use instead (e.g. ``sum x x^T`` of a layer's inputs, as in GPM).

    Returns:
      The new :class:`CoSOState`.
    """
    unit_interval(threshold, "threshold", closed_high=True)
    sk = state.sketch if sketch is None else sketch
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    mem_leaves, treedef = jax.tree.flatten(state.memory, is_leaf=is_masked)
    sk_leaves = treedef.flatten_up_to(sk)
    new_mem = []
    for mem, s in zip(mem_leaves, sk_leaves, strict=True):
        if is_masked(mem):
            new_mem.append(mem)
            continue
        s = jnp.asarray(s, mem.dtype)
        if s.shape != mem.shape:
            raise ValueError(f"`sketch` leaves must be {mem.shape} covariances, got {s.shape}")
        new_mem.append(_consolidate_one(mem, s, jnp.asarray(threshold, mem.dtype)))
    return CoSOState(
        count=jnp.zeros_like(state.count),
        key=jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(state.key), 1)),
        basis=state.basis,
        memory=treedef.unflatten(new_mem),
        sketch=jax.tree.map(jnp.zeros_like, state.sketch),
        inner=jax.tree.map(jnp.zeros_like, state.inner),
    )
