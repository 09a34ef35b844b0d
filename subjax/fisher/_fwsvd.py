"""Fisher-weighted SVD: low-rank compression of a weight matrix weighted by Fisher importance."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subjax._core import as_compute, choice, floating_array, nonnegative
from subjax.linalg import WeightedLowRank, weighted_low_rank

__all__ = ["fisher_weighted_svd"]


def fisher_weighted_svd(
    weight: jax.Array,
    fisher: jax.Array,
    rank: int,
    *,
    axis: int = 0,
    floor: float = 1e-6,
) -> WeightedLowRank:
    r"""Rank-``r`` factorisation of ``weight`` that keeps the Fisher-important rows exact.

    The importance of row ``i`` (index ``i`` along ``axis``) is the sum of the
    diagonal Fisher over that row, ``I_i = sum_j F_ij``; the factorisation solves

    .. math::
       \min_{\operatorname{rank} X \le r} \sum_{ij} I_i (W_{ij} - X_{ij})^2,

    the row-weighted approximation of Hsu et al. (2022), in closed form
    (:func:`subjax.linalg.weighted_low_rank`). It tolerates a larger plain
    reconstruction error than the truncated SVD to fit the rows the loss is
    sensitive to. Importances below ``floor`` times their mean are raised to it
    (a row the data never reaches, e.g. a constant-zero input, would otherwise
    have weight zero and an undetermined fit).

    Args:
      weight: ``(m, n)`` weight matrix (a Flax ``kernel`` is ``(in, out)``: use
        ``axis=1`` for the paper's rows, the output units of ``y = W x``, and
        ``axis=0`` for input features).
      fisher: diagonal Fisher of ``weight``, same shape (e.g. the matching leaf
        of :func:`diag_empirical`).
      rank: target rank (static), ``1 <= rank <= min(m, n)``.
      axis: the axis whose entries share a weight (0: rows, 1: columns).
      floor: relative floor on the importances (``>= 0``).

    Returns:
      :class:`subjax.linalg.WeightedLowRank`: ``left @ right`` approximates
      ``weight``; ``error`` is the Fisher-weighted error.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.fisher import fisher_weighted_svd
      >>> w = jnp.array([[2.0, 0.0], [0.0, 1.0]])
      >>> f = jnp.array([[0.1, 0.1], [5.0, 5.0]])   # the loss cares about row 1
      >>> out = fisher_weighted_svd(w, f, 1)
      >>> out.left @ out.right
      Array([[0., 0.],
             [0., 1.]], dtype=float32)
    """
    weight = floating_array(weight, "weight", ndim=2)
    fisher = floating_array(fisher, "fisher", ndim=2)
    if fisher.shape != weight.shape:
        raise ValueError(f"`fisher` must have the shape of `weight` {weight.shape}, "
                         f"got {fisher.shape}")
    choice(axis, "axis", (0, 1))
    nonnegative(floor, "floor")
    importance = jnp.sum(as_compute(fisher), axis=1 - axis)
    importance = jnp.maximum(importance, floor * jnp.mean(importance))
    # an all-zero Fisher carries no preference: fall back to uniform weights
    importance = jnp.where(jnp.any(importance > 0), importance, jnp.ones_like(importance))
    if axis == 0:
        return weighted_low_rank(weight, rank, row_weights=importance)
    return weighted_low_rank(weight, rank, col_weights=importance)
