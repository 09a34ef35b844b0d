"""Joint SVD of several matrices that share their row space: one basis ``U``, one ``V_i`` each."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from subjax._core import as_compute, check_finite_if_concrete, floating_array, static_int

__all__ = ["JointSVD", "joint_svd"]


class JointSVD(NamedTuple):
    """Rank-``r`` joint factorisation ``A_i ~ u @ diag(s) @ v[i].T`` of ``k`` matrices.

    Attributes:
      u: ``(m, r)`` shared orthonormal basis (left singular vectors of
        ``[A_1, ..., A_k]``).
      s: ``(r,)`` singular values of the concatenation, descending.
      v: ``(k, n, r)`` the blocks of the right singular vectors, one per matrix.
        ``v[i]`` is not orthonormal on its own; ``v.reshape(k * n, r)`` is.
      error: Frobenius error of the whole stack, ``sqrt(sum_{j > r} s_j^2)``.
    """

    u: jax.Array
    s: jax.Array
    v: jax.Array
    error: jax.Array


def joint_svd(mats: jax.Array, rank: int) -> JointSVD:
    r"""Truncated SVD of ``k`` matrices side by side: a shared left basis, a right factor each.

    With ``[A_1, ..., A_k] = U S [V_1^T, ..., V_k^T]`` (the SVD of the ``(m, k n)``
    concatenation), the rank-``r`` truncation is the best rank-``r`` approximation
    of the concatenation (Eckart–Young), so ``sum_i ||A_i - U_r S_r V_{i,r}^T||_F^2``
    is minimal over every choice of a shared ``r``-dimensional column space. Every
    ``A_i`` is represented in the same basis ``U_r``, which makes the per-matrix
    factors ``V_i`` directly comparable and mergeable (Sub-MoE expert merging:
    :func:`subjax.fisher.subspace_merge`).

    Args:
      mats: ``(k, m, n)`` stack of real matrices.
      rank: ``r``, between 1 and ``min(m, k n)`` (static).

    Returns:
      :class:`JointSVD` in the dtype of ``mats`` (computed in at least float32).
      Works under ``jit`` and ``vmap``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import joint_svd
      >>> a = jnp.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 2.0], [0.0, 0.0]]])
      >>> out = joint_svd(a, 1)        # both matrices live in the first row: rank 1 is exact
      >>> float(out.error)
      0.0
      >>> (out.u * out.s) @ out.v[1].T
      Array([[0., 2.],
             [0., 0.]], dtype=float32)
    """
    mats = floating_array(mats, "mats", ndim=3)
    k, m, n = mats.shape
    rank = static_int(rank, "rank", minimum=1)
    if rank > min(m, k * n):
        raise ValueError(f"`rank` must be <= min(m, k * n) = {min(m, k * n)}, got {rank}")
    check_finite_if_concrete(mats, "mats")
    x = as_compute(mats)
    wide = jnp.transpose(x, (1, 0, 2)).reshape(m, k * n)
    u, s, vt = jnp.linalg.svd(wide, full_matrices=False)
    v = vt[:rank].T.reshape(k, n, rank)
    error = jnp.sqrt(jnp.sum(jnp.square(s[rank:])))
    dt = mats.dtype
    return JointSVD(u[:, :rank].astype(dt), s[:rank].astype(dt), v.astype(dt), error.astype(dt))
