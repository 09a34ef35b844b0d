"""Entry-wise causal matrix completion: Synthetic Nearest Neighbors and its mixed form.

To impute a missing entry ``(i, j)`` of a low-rank matrix observed on a
not-at-random pattern, SNN (Agarwal, Dahleh, Shah & Shen, "Causal Matrix
Completion", 2021) finds a fully observed *anchor* submatrix ``S = Y[R, C]`` whose
rows ``R`` are observed in column ``j`` and whose columns ``C`` are observed in row
``i``, regresses row ``i`` on the anchor rows by principal component regression
(rank-``k`` truncated pseudo-inverse of ``S^T``), and reads the entry off the
anchor rows' column ``j``:

    beta = pinv_k(S^T) Y[i, C],    Y_hat[i, j] = <beta, Y[R, j]>.

Under a rank-``r`` model with independent noise the estimate is asymptotically
normal with variance ``sigma^2 ||beta||^2``; ``sigma^2`` is estimated from the
regression's residual. :func:`snn_impute` returns the estimate, that standard
error and the anchor sets.

With several treatment levels the potential outcomes form a tensor
``Y[unit, time, level]``; a unit's latent factor is shared by every level.
Applied level by level (one ``unit x time`` matrix per level), SNN's anchor
columns must all be observed under the target's level, which starves it when a
level is rare. :func:`msnn_impute` (Mixed SNN, Luo & Zhang 2026) completes the
flattened ``unit x (time, level)`` matrix instead, so anchor columns may come from
any level while the anchor rows still observe the target entry: the regression
of the unit on its anchor rows pools information across levels.

The anchor submatrix is found greedily (the reference implementation searches a
maximum biclique): starting from every row observed in ``j`` and every column
observed in ``i``, the row or column with the largest fraction of missing entries
in the current submatrix is dropped until the submatrix is fully observed. All
shapes are static (sets are boolean masks), so the estimators work under
``jax.jit`` and ``jax.vmap`` over entries.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from subjax._core.checks import floating_array, is_concrete, static_int
from subjax._core.dtypes import as_compute
from subjax._core.loop import fixed_point_loop


class SNNResult(NamedTuple):
    """What :func:`snn_impute` and :func:`msnn_impute` return (one entry, or a batch).

    Attributes:
      estimate: the imputed value (``nan`` when no anchor submatrix exists).
      std_err: SNN's asymptotic standard error ``sigma_hat * ||beta||``: the noise of
        the anchor rows' column ``j`` carried through ``beta``.
      std_err_regression: ``sigma_hat * ||pinv_k(S) Y[R, j]||``, the first-order
        contribution of the noise in row ``i``'s anchor values (through the
        estimated ``beta``). SNN's asymptotics neglect it (it vanishes as ``|C|``
        grows); with few anchor columns it is not negligible, and
        ``sqrt(std_err**2 + std_err_regression**2)`` is the first-order error of
        the estimate.

      Both standard errors use ``sigma_hat^2 = ||Y[i, C] - S^T beta||^2 / (|C| - rank)``
      and are ``nan`` when ``|C| <= rank`` (no residual degrees of freedom: the
      noise level cannot be estimated).
      rows: ``(m,)`` bool, the anchor rows ``R``.
      cols: ``(n,)`` bool, the anchor columns ``C``.
      n_rows, n_cols: ``|R|`` and ``|C|``.
      rank: the number of principal components used (at most ``min(|R|, |C|, k)``).
      feasible: an anchor submatrix with at least one row and one column exists.
    """

    estimate: jax.Array
    std_err: jax.Array
    std_err_regression: jax.Array
    rows: jax.Array
    cols: jax.Array
    n_rows: jax.Array
    n_cols: jax.Array
    rank: jax.Array
    feasible: jax.Array


class _Anchor(NamedTuple):
    rows: jax.Array
    cols: jax.Array


def anchor_submatrix(mask: jax.Array, i, j) -> tuple[jax.Array, jax.Array]:
    """Greedy fully observed submatrix for entry ``(i, j)`` of a boolean ``mask``.

    Returns ``(rows, cols)`` boolean masks: every ``mask[r, c]`` with ``rows[r]`` and
    ``cols[c]`` is True, every anchor row is observed in column ``j`` and every anchor
    column in row ``i``; ``i`` and ``j`` themselves are excluded.
    """
    mask = jnp.asarray(mask, bool)
    m, n = mask.shape
    rows0 = mask[:, j] & (jnp.arange(m) != i)
    cols0 = mask[i, :] & (jnp.arange(n) != j)
    missing = ~mask

    def step(a, _):
        sub = missing & a.rows[:, None] & a.cols[None, :]
        n_r = jnp.maximum(jnp.sum(a.rows), 1)
        n_c = jnp.maximum(jnp.sum(a.cols), 1)
        row_frac = jnp.where(a.rows, jnp.sum(sub, 1) / n_c, -1.0)
        col_frac = jnp.where(a.cols, jnp.sum(sub, 0) / n_r, -1.0)
        r_best, c_best = jnp.argmax(row_frac), jnp.argmax(col_frac)
        holes = jnp.any(sub)
        drop_row = holes & (row_frac[r_best] >= col_frac[c_best])
        drop_col = holes & ~drop_row
        rows = a.rows.at[r_best].set(a.rows[r_best] & ~drop_row)
        cols = a.cols.at[c_best].set(a.cols[c_best] & ~drop_col)
        return _Anchor(rows, cols), holes.astype(jnp.float32)

    out = fixed_point_loop(step, _Anchor(rows0, cols0), max_iters=m + n,
                           stop=lambda a, holes: holes == 0, history=1,
                           stop_on_nonfinite=False)
    return out.state.rows, out.state.cols


def _check_matrix(values, mask, rank):
    values = floating_array(values, "values", ndim=2)
    mask = jnp.asarray(mask)
    if mask.shape != values.shape:
        raise ValueError(f"`mask` must have the shape of `values` {values.shape}, got "
                         f"{mask.shape}")
    if mask.dtype != bool:
        raise TypeError(f"`mask` must be a bool array, got dtype {mask.dtype}")
    rank = static_int(rank, "rank", minimum=1)
    return as_compute(values), mask, rank


def _check_index(x, size, name):
    if is_concrete(x):
        v = int(x)
        if not 0 <= v < size:
            raise ValueError(f"`{name}`={v} is out of range for size {size}")


def _snn_entry(values, mask, i, j, rank, rcond):
    rows, cols = anchor_submatrix(mask, i, j)
    dt = values.dtype
    y = jnp.where(mask, values, jnp.zeros((), dt))
    s_mat = jnp.where(rows[:, None] & cols[None, :], y, 0.0)  # (m, n), zero off the anchors
    q = jnp.where(cols, y[i], 0.0)                           # row i on the anchor columns
    x = jnp.where(rows, y[:, j], 0.0)                        # anchor rows in column j
    # PCR: beta = pinv_k(S^T) q, with S^T = V diag(s) U^T
    u, s, vt = jnp.linalg.svd(s_mat, full_matrices=False)
    keep = (jnp.arange(s.shape[0]) < rank) & (s > rcond * s[0])
    inv = jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)
    beta = u @ (inv * (vt @ q))
    gamma = vt.T @ (inv * (u.T @ x))                         # pinv_k(S) x: d estimate / d q
    estimate = beta @ x
    n_r, n_c = jnp.sum(rows), jnp.sum(cols)
    k = jnp.sum(keep)
    resid = q - s_mat.T @ beta
    # the noise level is estimable only with residual degrees of freedom left
    dof = n_c - k
    sigma2 = jnp.where(dof > 0, jnp.sum(resid ** 2) / jnp.maximum(dof, 1).astype(dt), jnp.nan)
    std_err = jnp.sqrt(sigma2 * jnp.sum(beta ** 2))
    std_reg = jnp.sqrt(sigma2 * jnp.sum(gamma ** 2))
    feasible = (n_r > 0) & (n_c > 0) & (k > 0)
    nan = jnp.array(jnp.nan, dt)

    def keep_if(v):
        return jnp.where(feasible, v, nan)

    return SNNResult(keep_if(estimate), keep_if(std_err), keep_if(std_reg), rows, cols, n_r,
                     n_c, k, feasible)


_snn_entry_jit = jax.jit(_snn_entry, static_argnames=("rank",))


def snn_impute(values, mask, i, j, *, rank: int, rcond: float = 1e-6) -> SNNResult:
    """Synthetic Nearest Neighbors estimate of entry ``(i, j)`` with its standard error.

    Args:
      values: ``(m, n)`` matrix; entries where ``mask`` is False are ignored.
      mask: ``(m, n)`` bool, True where observed.
      i, j: the entry to impute (ints, or traced int scalars under ``jit`` / ``vmap``).
      rank: principal components kept in the regression (fewer when the anchor
        submatrix is smaller, or its singular values fall below ``rcond`` times
        the largest).
      rcond: relative cut-off on the anchor submatrix's singular values.

    Returns:
      :class:`SNNResult`. SNN's asymptotic 95% interval is
      ``estimate ± 1.96 * std_err``.

    Example:
      >>> import jax.numpy as jnp, subjax.linalg as sl
      >>> a = jnp.outer(jnp.arange(1.0, 5.0), jnp.array([1.0, 2.0, 3.0]))
      >>> mask = jnp.ones(a.shape, bool).at[0, 2].set(False)
      >>> res = sl.snn_impute(a, mask, 0, 2, rank=1)
      >>> round(float(res.estimate), 4), int(res.n_rows), int(res.n_cols)
      (3.0, 3, 2)
    """
    values, mask, rank = _check_matrix(values, mask, rank)
    _check_index(i, values.shape[0], "i")
    _check_index(j, values.shape[1], "j")
    return _snn_entry_jit(values, mask, i, j, rank, rcond)


def msnn_impute(values, mask, unit, time, level, *, rank: int,
                rcond: float = 1e-6) -> SNNResult:
    """Mixed SNN estimate of the potential outcome ``Y[unit, time, level]``.

    The tensor is completed as the ``units x (time, level)`` matrix, so the anchor
    columns of the regression may be observed under any treatment level (pooling
    across levels) while the anchor rows are the units observed at
    ``(time, level)``.

    Args:
      values: ``(units, times, levels)`` potential outcomes; ignored where ``mask``
        is False.
      mask: same shape, bool, True where observed.
      unit, time, level: the entry (ints or traced int scalars).
      rank, rcond: as in :func:`snn_impute`.

    Returns:
      :class:`SNNResult`; ``cols`` indexes the flattened ``time * levels + level``.

    Example:
      >>> import jax, jax.numpy as jnp, subjax.linalg as sl
      >>> u = jnp.array([1.0, 2.0, 3.0, 4.0])
      >>> v = jnp.arange(1.0, 7.0).reshape(3, 2)          # (times, levels)
      >>> y = u[:, None, None] * v[None]                   # a rank-one tensor
      >>> mask = jnp.zeros(y.shape, bool).at[:, :, 0].set(True)
      >>> mask = mask.at[1:, 2, 1].set(True)               # level 1 seen once, by 3 units
      >>> res = sl.msnn_impute(y, mask, 0, 2, 1, rank=1)
      >>> round(float(res.estimate), 4), float(y[0, 2, 1])
      (6.0, 6.0)
    """
    values = floating_array(values, "values", ndim=3)
    mask = jnp.asarray(mask)
    if mask.shape != values.shape:
        raise ValueError(f"`mask` must have the shape of `values` {values.shape}, got "
                         f"{mask.shape}")
    m, t, d = values.shape
    _check_index(time, t, "time")
    _check_index(level, d, "level")
    return snn_impute(values.reshape(m, t * d), mask.reshape(m, t * d), unit,
                      time * d + level, rank=rank, rcond=rcond)
