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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subjax._core import compute_dtype


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


def eig_tree(factors: list) -> tuple[list, list]:
    """``(eigenvalues, eigenvectors)`` leaf lists of a factor leaf list."""
    pairs = [eigh_clamped(f) if is_factor(f) else (f, f) for f in factors]
    return [w for w, _ in pairs], [v for _, v in pairs]


def refresh(count, refresh_every: int, factors: list, cached: tuple[list, list]):
    """:func:`eig_tree` of ``factors`` when ``count % refresh_every == 0``, else ``cached``."""
    return jax.lax.cond(
        count % refresh_every == 0, lambda _: eig_tree(factors), lambda _: cached, None
    )


def matrix_power(w: jax.Array, v: jax.Array, power) -> jax.Array:
    """``V diag(w ** power) V^T`` from an eigendecomposition."""
    return (v * w**power) @ v.T
