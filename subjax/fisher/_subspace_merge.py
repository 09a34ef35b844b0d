"""Subspace merging of several weight matrices through a joint SVD (Sub-MoE expert merging)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from subjax._core import floating_array
from subjax.fisher._merge import _weights
from subjax.linalg import joint_svd

__all__ = ["subspace_merge"]


def subspace_merge(mats: jax.Array, rank: int, weights=None) -> jax.Array:
    r"""Merge ``k`` matrices in their shared rank-``r`` subspace (Sub-MoE).

    The joint SVD of the concatenation ``[A_1, ..., A_k] ~ U S [V_1^T, ..., V_k^T]``
    (:func:`subjax.linalg.joint_svd`) puts every matrix in one shared basis ``U``
    of rank ``r``; the merge keeps that basis and averages the matrix-specific
    factors, ``V = sum_i w_i V_i / sum_i w_i``, returning ``U S V^T``. Equivalently
    it is the weighted average projected on the shared subspace,
    ``U U^T (sum_i w_i A_i) / sum_i w_i``: directions the matrices do not share
    strongly (conflicts, noise) are removed before they are averaged. At full rank
    it is the plain weighted average.

    Args:
      mats: ``(k, m, n)`` matrices to merge (e.g. one weight of ``k`` experts in
        a cluster); the shared basis spans their first axis (``m``), so pass
        ``(out, in)`` weights to share the output space.
      rank: size ``r`` of the shared subspace, ``1 <= r <= min(m, k n)`` (static).
      weights: ``(k,)`` nonnegative merge weights, not all zero (default
        uniform), e.g. how often the router picks each expert.

    Returns:
      The ``(m, n)`` merged matrix in the dtype of ``mats``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.fisher import subspace_merge
      >>> a = jnp.array([[[2.0, 0.0], [0.0, 0.1]], [[2.0, 0.0], [0.0, -0.1]]])
      >>> subspace_merge(a, 1)        # the shared direction survives, the conflict does not
      Array([[2., 0.],
             [0., 0.]], dtype=float32)
      >>> m = subspace_merge(a, 2, weights=jnp.array([3.0, 1.0]))   # full rank: the average
      >>> [[round(float(x), 4) for x in row] for row in m]
      [[2.0, 0.0], [0.0, 0.05]]

    References:
      Li et al., "Sub-MoE: Efficient Mixture-of-Expert LLMs Compression via
      Subspace Expert Merging", 2025.
    """
    mats = floating_array(mats, "mats", ndim=3)
    w = _weights(weights, mats.shape[0], nonnegative=True)
    out = joint_svd(mats, rank)
    v = jnp.tensordot(w.astype(out.v.dtype), out.v, axes=1) / jnp.sum(w).astype(out.v.dtype)
    return ((out.u * out.s) @ v.T).astype(mats.dtype)
