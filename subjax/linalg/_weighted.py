"""Weighted low-rank approximation with row and column weights (closed form)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from subjax._core import (
    as_compute,
    check_finite_if_concrete,
    floating_array,
    is_concrete,
    static_int,
)

__all__ = ["WeightedLowRank", "weighted_low_rank"]


class WeightedLowRank(NamedTuple):
    """A rank-``r`` approximation ``left @ right`` of an ``(m, n)`` matrix.

    Attributes:
      left: ``(m, r)`` factor.
      right: ``(r, n)`` factor.
      s: ``(min(m, n),)`` singular values of the weighted matrix
        ``diag(sqrt(row_weights)) A diag(sqrt(col_weights))``, descending.
      error: the weighted Frobenius error of the approximation, which is the
        norm of the discarded singular values ``sqrt(sum_{i > r} s_i^2)``.
    """

    left: jax.Array
    right: jax.Array
    s: jax.Array
    error: jax.Array


def _weights(w, size: int, name: str, like):
    if w is None:
        return None
    w = floating_array(w, name, ndim=1)
    if w.shape[0] != size:
        raise ValueError(f"`{name}` must have shape ({size},), got {w.shape}")
    check_finite_if_concrete(w, name)
    if is_concrete(w) and not bool(jnp.all(w > 0)):
        raise ValueError(f"`{name}` must be positive (give zero-importance entries a small "
                         "floor), got a minimum of " + f"{float(jnp.min(w))}")
    return w.astype(like.dtype)


def weighted_low_rank(
    a: jax.Array,
    rank: int,
    *,
    row_weights: jax.Array | None = None,
    col_weights: jax.Array | None = None,
) -> WeightedLowRank:
    r"""The best rank-``r`` approximation of ``a`` in a row- and column-weighted norm.

    Solves

    .. math::
       \min_{\operatorname{rank} X \le r}
       \sum_{ij} p_i q_j (A_{ij} - X_{ij})^2
       = \| D_p (A - X) D_q \|_F^2,\quad D_p = \operatorname{diag}(\sqrt p),\;
       D_q = \operatorname{diag}(\sqrt q)

    in closed form: with the SVD ``D_p A D_q = U S V^T``, the minimiser is
    ``X = D_p^{-1} U_r S_r V_r^T D_q^{-1}`` (Eckart–Young in the weighted
    coordinates, since ``X -> D_p X D_q`` is a rank-preserving bijection).
    Weights that are constant along rows or columns are the case with a closed
    form; general element-wise weights have none. With ``p`` the row sums of a
    diagonal Fisher this is Fisher-weighted SVD (Hsu et al., 2022).

    Args:
      a: ``(m, n)`` real matrix.
      rank: ``r``, between 1 and ``min(m, n)`` (static).
      row_weights: ``(m,)`` positive importances ``p`` (None: all ones).
      col_weights: ``(n,)`` positive importances ``q`` (None: all ones).

    Returns:
      :class:`WeightedLowRank` with ``left = D_p^{-1} U_r S_r`` and
      ``right = V_r^T D_q^{-1}``, in the dtype of ``a`` (computed in at least
      float32). Works under ``jit`` and ``vmap``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import weighted_low_rank
      >>> a = jnp.array([[3.0, 0.0], [0.0, 1.0]])
      >>> plain = weighted_low_rank(a, 1)
      >>> plain.left @ plain.right            # keeps the larger singular value
      Array([[3., 0.],
             [0., 0.]], dtype=float32)
      >>> heavy = weighted_low_rank(a, 1, row_weights=jnp.array([1.0, 100.0]))
      >>> heavy.left @ heavy.right            # the heavy second row wins
      Array([[0., 0.],
             [0., 1.]], dtype=float32)
      >>> round(float(heavy.error), 4)        # sqrt(1 * 3^2): the first row is dropped
      3.0
    """
    a = floating_array(a, "a", ndim=2)
    m, n = a.shape
    rank = static_int(rank, "rank", minimum=1)
    if rank > min(m, n):
        raise ValueError(f"`rank` must be <= min(m, n) = {min(m, n)}, got {rank}")
    check_finite_if_concrete(a, "a")
    x = as_compute(a)
    p = _weights(row_weights, m, "row_weights", x)
    q = _weights(col_weights, n, "col_weights", x)
    dp = None if p is None else jnp.sqrt(p)
    dq = None if q is None else jnp.sqrt(q)
    b = x
    if dp is not None:
        b = dp[:, None] * b
    if dq is not None:
        b = b * dq[None, :]
    u, s, vt = jnp.linalg.svd(b, full_matrices=False)
    left = u[:, :rank] * s[:rank]
    right = vt[:rank]
    if dp is not None:
        left = left / dp[:, None]
    if dq is not None:
        right = right / dq[None, :]
    error = jnp.sqrt(jnp.sum(jnp.square(s[rank:])))
    dt = a.dtype
    return WeightedLowRank(left.astype(dt), right.astype(dt), s.astype(dt), error.astype(dt))
