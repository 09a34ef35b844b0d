"""Kronecker-factor bookkeeping shared by the curvature optimizers.

K-FAC, FISMO and natural gradient keep their state in compute precision
(:func:`subjax._core.compute_dtype` of each parameter), average statistics over
a mapped axis the same way, and K-FAC and FISMO refresh the eigendecompositions
of their Kronecker factors on one rule: every ``refresh_every`` steps under
``lax.cond``, eigenvalues clamped at the dtype's smallest normal number (the
factors are positive semi-definite; the clamp removes rounding negatives and
keeps inverse powers finite).

Factor trees are shaped like the parameters: the leaf of a parameter that has
a factor holds the factor (a matrix), every other leaf a 0-d zero. So
``optax.tree_map_params`` sees them as parameter-shaped state.

Under :func:`distributed_eigh` (which :func:`subjax.parallel.fsdp_step` turns
on), :func:`eig_tree` distributes the eigendecompositions over the devices of a
mesh: factors of equal shape are stacked, the stack is split over the given mesh
axes, and each device runs the eigensolver on its own matrices only; the
eigen-pieces are then exchanged to wherever the optimizer state keeps them.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from subjax._core import compute_dtype

# (mesh, axes) while tracing under distributed_eigh, else None
_EIGH_SPREAD: contextvars.ContextVar = contextvars.ContextVar("eigh_spread", default=None)


def zeros_compute(p) -> jax.Array:
    """Zeros of ``p``'s shape in ``p``'s compute dtype (``p`` may be a ShapeDtypeStruct)."""
    return jnp.zeros(jnp.shape(p), compute_dtype(p.dtype))


def pmean(tree, axis_name):
    """``lax.pmean`` over ``axis_name``, or ``tree`` itself when ``axis_name`` is None."""
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def ema(old: jax.Array, new: jax.Array, rho) -> jax.Array:
    """``(1 - rho) old + rho new`` in ``old``'s dtype."""
    r = jnp.asarray(rho).astype(old.dtype)
    return (1 - r) * old + r * new.astype(old.dtype)


def is_factor(x) -> bool:
    """A factor-tree leaf that holds a factor (not the 0-d filler)."""
    return jnp.ndim(x) == 2


def eigh_clamped(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clamped at the smallest normal number) and eigenvectors of ``m``."""
    w, v = jnp.linalg.eigh(m)
    return jnp.maximum(w, jnp.finfo(w.dtype).tiny), v


def identity_eig(factor) -> tuple[jax.Array, jax.Array]:
    """The eigendecomposition of the identity shaped like ``factor`` (0-d filler kept)."""
    if not is_factor(factor):
        return factor, factor
    n = factor.shape[0]
    return jnp.ones((n,), factor.dtype), jnp.eye(n, dtype=factor.dtype)


@contextlib.contextmanager
def distributed_eigh(mesh, axes):
    """Trace :func:`eig_tree` so that each device of ``mesh`` decomposes a share of the factors.

    While the context is active (at trace time: wrap the function that
    ``jax.jit`` traces), :func:`eig_tree` stacks the factors of equal shape and
    dtype, pads each stack with identity matrices to a multiple of the number of
    devices along ``axes``, and constrains the stack and its eigendecomposition
    to be split over ``axes`` along the stacking axis: each device's eigensolver
    runs on ``ceil(L / p)`` of the ``L`` matrices (``p`` devices) and no device
    gathers the others' factors. The per-matrix results are those of the
    unbatched eigensolver.
    """
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    token = _EIGH_SPREAD.set((mesh, axes))
    try:
        yield
    finally:
        _EIGH_SPREAD.reset(token)


def _eig_stacked(group: list, mesh, axes: tuple) -> tuple[list, list]:
    """Eigendecompositions of equal-shape factors, one stack split over ``axes``."""
    p = math.prod(mesh.shape[a] for a in axes)
    n, dtype = group[0].shape[0], group[0].dtype
    pad = -len(group) % p
    stack = jnp.stack(group + [jnp.eye(n, dtype=dtype)] * pad)
    split = lambda x: jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, P(axes, *[None] * (x.ndim - 1))))
    w, v = jax.vmap(eigh_clamped)(split(stack))
    w, v = split(w), split(v)
    return [w[i] for i in range(len(group))], [v[i] for i in range(len(group))]


def eig_tree(factors: list) -> tuple[list, list]:
    """``(eigenvalues, eigenvectors)`` leaf lists of a factor leaf list.

    Under :func:`distributed_eigh` the factors of equal shape are decomposed as
    one stack split over the mesh (same per-matrix results).
    """
    spread = _EIGH_SPREAD.get()
    if spread is None:
        pairs = [eigh_clamped(f) if is_factor(f) else (f, f) for f in factors]
        return [w for w, _ in pairs], [v for _, v in pairs]
    w, v = list(factors), list(factors)
    groups: dict = {}
    for i, f in enumerate(factors):
        if is_factor(f):
            groups.setdefault((f.shape, jnp.dtype(f.dtype)), []).append(i)
    for idx in groups.values():
        ws, vs = _eig_stacked([factors[i] for i in idx], *spread)
        for i, wi, vi in zip(idx, ws, vs, strict=True):
            w[i], v[i] = wi, vi
    return w, v


def refresh(count, refresh_every: int, factors: list, cached: tuple[list, list]):
    """:func:`eig_tree` of ``factors`` when ``count % refresh_every == 0``, else ``cached``."""
    return jax.lax.cond(
        count % refresh_every == 0, lambda _: eig_tree(factors), lambda _: cached, None
    )


def matrix_power(w: jax.Array, v: jax.Array, power) -> jax.Array:
    """``V diag(w ** power) V^T`` from an eigendecomposition."""
    return (v * w**power) @ v.T
