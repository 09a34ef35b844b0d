"""Spectral diagnostics of weight matrices: stable rank, WeLore rank selection,
intruder dimensions."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from subjax._core import as_compute, choice, static_int, unit_interval
from subjax.linalg import normalized_spectrum_rank


def _check_matrix(w, name: str) -> None:
    if jnp.ndim(w) < 2:
        raise ValueError(f"`{name}` must be a matrix (ndim >= 2), got shape {jnp.shape(w)}")


def stable_rank(w: jax.Array) -> jax.Array:
    r"""Stable rank :math:`\|W\|_F^2 / \|W\|_2^2` (batched over leading dims).

    A continuous proxy for the rank: 1 for a rank-one matrix, ``min(m, n)`` for
    a matrix with equal singular values; insensitive to tiny singular values.

    Example:
      >>> import jax.numpy as jnp, subjax.nn as snn
      >>> round(float(snn.stable_rank(jnp.diag(jnp.array([2.0, 1.0, 1.0])))), 3)
      1.5
    """
    _check_matrix(w, "w")
    s = jnp.linalg.svd(as_compute(w), compute_uv=False)
    return jnp.sum(s * s, axis=-1) / (s[..., 0] ** 2)


def welore_ranks(params: Any, threshold: float = 0.01) -> Any:
    r"""WeLore rank selection: per matrix, the number of normalized singular values
    :math:`\sigma_i / \sigma_1 \geq` ``threshold``.

    Matrices whose spectrum decays fast (WeLore's "low-rank components") get a
    small rank; matrices with a flat spectrum keep most of theirs, which is why a
    single global threshold gives non-uniform ranks across layers.

    Args:
      params: pytree; every 2-D leaf is ranked, other leaves map to ``None``.
      threshold: cut on the normalized spectrum, in ``(0, 1]``.

    Returns:
      A pytree like ``params`` of int32 scalars (``None`` for non-matrix leaves).

    References:
      Jaiswal et al., From GaLore to WeLore: How Low-Rank Weights Non-uniformly
      Emerge from Low-Rank Gradients, 2024.
    """
    unit_interval(threshold, "threshold", closed_high=True)

    def one(w):
        if jnp.ndim(w) != 2:
            return None
        s = jnp.linalg.svd(as_compute(w), compute_uv=False)
        return normalized_spectrum_rank(s, threshold).astype(jnp.int32)

    return jax.tree.map(one, params)


class IntruderResult(NamedTuple):
    """Result of :func:`intruder_dimensions`.

    Attributes:
      count: int32 ``()``, number of intruder dimensions among the top ``k``.
      max_similarity: ``(k,)`` for each of the fine-tuned matrix's top-``k``
        singular vectors, its largest ``|cos|`` with any singular vector of the
        pre-trained matrix.
      is_intruder: ``(k,)`` bool, ``max_similarity < epsilon``.
    """

    count: jax.Array
    max_similarity: jax.Array
    is_intruder: jax.Array


def intruder_dimensions(
    w_pre: jax.Array,
    w_ft: jax.Array,
    top_k: int = 10,
    epsilon: float = 0.5,
    *,
    side: str = "left",
) -> IntruderResult:
    r"""Intruder dimensions of a fine-tuned matrix relative to its pre-trained one.

    A top-``k`` singular vector :math:`u'_j` of ``w_ft`` is an intruder when
    :math:`\max_i |\langle u'_j, u_i \rangle| <` ``epsilon`` over all singular
    vectors :math:`u_i` of ``w_pre``: a new high-ranking direction that is not
    close to anything the pre-trained matrix had.

    Args:
      w_pre, w_ft: ``(m, n)`` matrices of the same shape.
      top_k: static number of leading fine-tuned singular vectors examined.
      epsilon: similarity threshold in ``(0, 1)``.
      side: ``"left"`` (column space, ``m``-dim vectors) or ``"right"``.

    Returns:
      :class:`IntruderResult`.

    References:
      Shuttleworth et al., LoRA vs Full Fine-tuning: An Illusion of Equivalence, 2024.
    """
    _check_matrix(w_pre, "w_pre")
    if jnp.shape(w_pre) != jnp.shape(w_ft):
        raise ValueError(
            f"`w_pre` and `w_ft` must have the same shape, got {jnp.shape(w_pre)} "
            f"and {jnp.shape(w_ft)}"
        )
    top_k = static_int(top_k, "top_k", 1)
    if top_k > min(jnp.shape(w_ft)[-2:]):
        raise ValueError(f"`top_k` must be <= min(m, n) = {min(jnp.shape(w_ft)[-2:])}, got {top_k}")
    unit_interval(epsilon, "epsilon")
    choice(side, "side", ("left", "right"))
    u0, _, v0t = jnp.linalg.svd(as_compute(w_pre), full_matrices=False)
    u1, _, v1t = jnp.linalg.svd(as_compute(w_ft), full_matrices=False)
    if side == "left":
        base, new = u0, u1[..., :, :top_k]
    else:
        base, new = jnp.swapaxes(v0t, -1, -2), jnp.swapaxes(v1t, -1, -2)[..., :, :top_k]
    sim = jnp.max(jnp.abs(jnp.swapaxes(new, -1, -2) @ base), axis=-1)
    intruder = sim < epsilon
    return IntruderResult(jnp.sum(intruder, axis=-1).astype(jnp.int32), sim, intruder)
