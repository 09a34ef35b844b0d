"""Rank selection from a spectrum: energy, Marchenko–Pastur edge, normalized spectrum."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from subjax._core import (
    check_finite_if_concrete,
    floating_array,
    nonnegative,
    positive,
    unit_interval,
)

__all__ = [
    "energy_rank",
    "marchenko_pastur_rank",
    "normalized_spectrum_rank",
    "marchenko_pastur_median",
]


def _check_s(s, threshold=None, name="s"):
    """A non-empty real floating spectrum (finite when concrete); ``threshold`` in (0, 1]."""
    if threshold is not None:
        unit_interval(threshold, "threshold", closed_high=True)
    s = floating_array(s, name)
    if s.ndim < 1 or s.shape[-1] < 1:
        raise ValueError(f"`{name}` must be a non-empty vector of singular values, got {s.shape}")
    check_finite_if_concrete(s, name)
    return s


def _valid(s, threshold):
    """Traced validity of a spectrum and a fraction: all finite, threshold in ``(0, 1]``."""
    thr = jnp.asarray(threshold, s.dtype)
    return jnp.all(jnp.isfinite(s), axis=-1) & (thr > 0) & (thr <= 1)


def energy_rank(s: jax.Array, threshold: float | jax.Array = 0.9) -> jax.Array:
    r"""Smallest ``r`` with ``sum_{i<=r} s_i^2 / sum_i s_i^2 >= threshold``.

    ``s`` is sorted in decreasing order (as returned by an SVD). Batched over
    leading dimensions; ``threshold`` may be traced.

    Args:
      s: ``(..., p)`` singular values, descending.
      threshold: fraction of the squared Frobenius norm to keep, in ``(0, 1]``.

    Returns:
      ``(...)`` int32 ranks in ``[1, p]`` (0 for an all-zero spectrum). Invalid input
      is an error when concrete; under ``jit`` a NaN / inf in ``s`` or a ``threshold``
      outside ``(0, 1]`` gives ``-1``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import energy_rank
      >>> int(energy_rank(jnp.array([3.0, 2.0, 1.0, 0.1]), 0.9))
      2
    """
    s = _check_s(s, threshold)
    e = jnp.square(s)
    total = jnp.sum(e, axis=-1, keepdims=True)
    frac = jnp.cumsum(e, axis=-1) / jnp.where(total > 0, total, jnp.ones_like(total))
    thr = jnp.asarray(threshold, s.dtype)
    # Tolerance for the cumulative sum rounding at threshold 1.
    slack = jnp.asarray(8 * jnp.finfo(s.dtype).eps * s.shape[-1], s.dtype)
    r = jnp.sum((frac < thr - slack).astype(jnp.int32), axis=-1) + 1
    r = jnp.where(total[..., 0] > 0, jnp.minimum(r, s.shape[-1]), 0)
    return jnp.where(_valid(s, threshold), r, -1).astype(jnp.int32)


def normalized_spectrum_rank(s: jax.Array, threshold: float | jax.Array = 1e-2) -> jax.Array:
    r"""Number of singular values with ``s_i / s_1 >= threshold``.

    ``threshold`` in ``(0, 1]`` (may be traced). Invalid input is an error when
    concrete; under ``jit`` a NaN / inf in ``s`` or a ``threshold`` outside ``(0, 1]``
    gives ``-1``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import normalized_spectrum_rank
      >>> int(normalized_spectrum_rank(jnp.array([10.0, 1.0, 0.05, 0.0]), 0.01))
      2
    """
    s = _check_s(s, threshold)
    top = jnp.max(s, axis=-1, keepdims=True)
    thr = jnp.asarray(threshold, s.dtype) * top
    r = jnp.sum(((s >= thr) & (top > 0)).astype(jnp.int32), axis=-1)
    return jnp.where(_valid(s, threshold), r, -1).astype(jnp.int32)


@functools.lru_cache(maxsize=256)
def marchenko_pastur_median(beta: float) -> float:
    r"""Median of the Marchenko–Pastur law with aspect ratio ``beta = m / n <= 1``.

    The law of the eigenvalues of ``X X^T / n`` for an ``m x n`` matrix ``X`` with
    i.i.d. unit-variance entries, supported on ``[(1 - sqrt beta)^2, (1 + sqrt
    beta)^2]``. Computed once per ``beta`` by bisection on the CDF (numpy, static).
    """
    beta = float(beta)
    if not 0.0 < beta <= 1.0:
        raise ValueError(f"`beta` must be in (0, 1], got {beta}")
    lo, hi = (1 - np.sqrt(beta)) ** 2, (1 + np.sqrt(beta)) ** 2
    # density on a fine grid with the substitution t = lo + (hi - lo) sin^2(phi)
    # removes the square-root singularities at both edges.
    phi = np.linspace(0.0, np.pi / 2, 20001)
    t = lo + (hi - lo) * np.sin(phi) ** 2
    dt = (hi - lo) * 2 * np.sin(phi) * np.cos(phi)
    with np.errstate(divide="ignore", invalid="ignore"):
        dens = np.sqrt(np.maximum((hi - t) * (t - lo), 0.0)) / (2 * np.pi * beta * t)
    dens = np.nan_to_num(dens * dt)
    cdf = np.concatenate([[0.0], np.cumsum((dens[1:] + dens[:-1]) / 2 * np.diff(phi))])
    cdf /= cdf[-1]
    return float(np.interp(0.5, cdf, t))


def marchenko_pastur_rank(
    s: jax.Array,
    shape: tuple[int, int],
    *,
    sigma: float | jax.Array | None = None,
    margin: float | jax.Array = 1.0,
) -> jax.Array:
    r"""Number of singular values above the Marchenko–Pastur bulk edge.

    For ``Y = X + sigma Z`` (``m x n``, ``Z`` i.i.d. unit variance) the singular
    values of pure noise lie below ``sigma (sqrt m + sqrt n)``; a value above that
    edge carries signal. With ``sigma=None`` the noise level is estimated from
    the median singular value, ``sigma = s_med / sqrt(n mu_beta)`` with
    ``mu_beta`` the Marchenko–Pastur median (Gavish & Donoho 2014), which needs the
    full spectrum (``min(m, n)`` values). The top noise value fluctuates around the
    edge (Tracy–Widom, relative size ``~ min(m, n)^{-2/3}``); ``margin > 1`` counts
    only values above ``margin`` times the edge.

    Args:
      s: ``(..., p)`` singular values of an ``m x n`` matrix, descending.
      shape: ``(m, n)`` of that matrix (static).
      sigma: noise standard deviation per entry, or None to estimate it.
      margin: multiplicative safety factor on the edge (may be traced).

    Returns:
      ``(...)`` int32 counts.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.linalg import marchenko_pastur_rank
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> x = 3.0 * jax.random.normal(k1, (200, 3)) @ jax.random.normal(k2, (3, 100))
      >>> y = x + jax.random.normal(k3, (200, 100))
      >>> int(marchenko_pastur_rank(jnp.linalg.svd(y, compute_uv=False), (200, 100)))
      3

    References:
      Marchenko, Pastur, "Distribution of eigenvalues for some sets of random
      matrices", 1967. Gavish, Donoho, "The optimal hard threshold for singular
      values is 4/sqrt(3)", IEEE Trans. Inf. Theory 2014.
    """
    s = _check_s(s)
    if len(shape) != 2:
        raise ValueError(f"`shape` must be (m, n), got {shape}")
    m, n = (int(v) for v in shape)
    if min(m, n) < 1:
        raise ValueError(f"`shape` must be positive, got {shape}")
    small, big = min(m, n), max(m, n)
    if s.shape[-1] > small:
        raise ValueError(f"`s` has {s.shape[-1]} values > min(m, n)={small} for shape {shape}")
    if sigma is None:
        if s.shape[-1] != small:
            raise ValueError(
                f"estimating `sigma` needs all min(m, n)={small} singular values, "
                f"got {s.shape[-1]}; pass `sigma`"
            )
        mu = marchenko_pastur_median(small / big)
        med = jnp.median(s, axis=-1)
        sig = med / jnp.sqrt(jnp.asarray(big * mu, s.dtype))
    else:
        nonnegative(sigma, "sigma")
        sig = jnp.asarray(sigma, s.dtype)
    positive(margin, "margin")
    edge = sig * jnp.asarray(np.sqrt(m) + np.sqrt(n), s.dtype) * jnp.asarray(margin, s.dtype)
    return jnp.sum((s > edge[..., None]).astype(jnp.int32), axis=-1)
