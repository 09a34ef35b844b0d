"""EWC penalties and model merging (Fisher-weighted averaging, averaging, task arithmetic)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from subjax._core import (
    as_compute,
    check_finite_if_concrete,
    compute_dtype,
    is_concrete,
    positive,
)
from subjax.fisher._core import LowRankFisher, _check_like

Params = Any


def _vdot(a, b):
    return sum(
        jnp.vdot(x, y.astype(x.dtype))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def ewc_penalty(params: Params, anchor: Params, fisher, strength=1.0) -> jax.Array:
    """Elastic weight consolidation ``(strength / 2) (theta - theta*)^T F (theta - theta*)``.

    ``fisher`` may be any of the curvature estimates of :mod:`subjax.fisher`:

    - a pytree like ``params`` (a diagonal Fisher, e.g. :func:`diag_true`);
    - a :class:`LowRankFisher` (:func:`low_rank`, :func:`rank_one`);
    - a callable ``v -> F v`` (e.g. :func:`make_fvp` at the anchor).

    Args:
      params: current parameters ``theta``.
      anchor: parameters ``theta*`` after the previous task.
      fisher: the Fisher at ``anchor`` (see above).
      strength: ``lambda`` (may be traced).

    Returns:
      A scalar (float32, or float64 for float64 parameters).

    References:
      Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks",
      PNAS 2017.
    """
    _check_like(anchor, params, "anchor")
    delta = jax.tree.map(lambda p, a: as_compute(p) - a.astype(compute_dtype(p.dtype)),
                         params, anchor)
    if isinstance(fisher, LowRankFisher):
        coeffs = sum(
            jnp.tensordot(u.reshape(u.shape[0], -1).astype(d.dtype), d.reshape(-1), axes=1)
            for u, d in zip(
                jax.tree.leaves(fisher.eigenvectors), jax.tree.leaves(delta), strict=True
            )
        )
        quad = jnp.sum(fisher.eigenvalues.astype(coeffs.dtype) * coeffs**2)
    elif callable(fisher):
        quad = _vdot(delta, fisher(delta))
    else:
        _check_like(fisher, params, "fisher")
        quad = sum(
            jnp.sum(f.astype(d.dtype) * d**2)
            for f, d in zip(jax.tree.leaves(fisher), jax.tree.leaves(delta), strict=True)
        )
    return 0.5 * jnp.asarray(strength).astype(quad.dtype) * quad


def _weights(weights, k: int, name="weights", nonnegative: bool = False):
    """Per-model weights; concrete ones must not sum to zero (nor be negative if asked)."""
    if weights is None:
        return jnp.full((k,), 1.0 / k, jnp.float32)
    w = jnp.asarray(weights, jnp.float32)
    if w.shape != (k,):
        raise ValueError(f"`{name}` must have shape ({k},) (one per model), got {w.shape}")
    if is_concrete(w):
        check_finite_if_concrete(w, name)
        if nonnegative and bool(jnp.any(w < 0)):
            raise ValueError(f"`{name}` must be >= 0, got {w.tolist()}")
        if float(jnp.sum(w)) == 0.0:
            raise ValueError(
                f"`{name}` sum to zero ({w.tolist()}): the merge divides by their sum")
    return w


def _check_models(params_list, name="params_list"):
    if not isinstance(params_list, Sequence) or len(params_list) == 0:
        raise ValueError(f"`{name}` must be a non-empty list of parameter pytrees")
    for p in params_list[1:]:
        _check_like(p, params_list[0], name)


def average(params_list: Sequence[Params], weights=None) -> Params:
    """Weighted parameter average ``sum_i w_i theta_i / sum_i w_i`` (uniform by default)."""
    _check_models(params_list)
    w = _weights(weights, len(params_list))
    total = jnp.sum(w)

    def merge(*leaves):
        acc = sum(wi * leaf.astype(jnp.float32) for wi, leaf in zip(w, leaves, strict=True))
        return (acc / total).astype(leaves[0].dtype)

    return jax.tree.map(merge, *params_list)


def fisher_merge(
    params_list: Sequence[Params],
    fishers: Sequence[Params],
    weights=None,
    *,
    floor: float = 1e-6,
) -> Params:
    """Fisher-weighted merge ``sum_i w_i F_i theta_i / sum_i w_i F_i`` (elementwise).

    ``F_i`` are diagonal Fishers (pytrees like the parameters, e.g.
    :func:`diag_true`, as in the reference code of Matena & Raffel), floored at
    ``floor`` so that a parameter no model is sensitive to gets the weighted
    average instead of 0/0.

    Args:
      params_list: models ``theta_i`` (same structure).
      fishers: their diagonal Fishers.
      weights: per-model weights ``w_i >= 0``, not all zero (default uniform); a
        zero weight drops a model.
      floor: lower bound on every Fisher entry (> 0).

    Returns:
      The merged parameters (dtype of the first model).

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax import fisher
      >>> a, b = jnp.array([0.0, 0.0]), jnp.array([1.0, 1.0])
      >>> fisher.fisher_merge([a, b], [jnp.array([1.0, 3.0]), jnp.array([3.0, 1.0])]).tolist()
      [0.75, 0.25]

    References:
      Matena, Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
    """
    _check_models(params_list)
    if len(fishers) != len(params_list):
        raise ValueError(
            f"`fishers` must have one Fisher per model ({len(params_list)}), got {len(fishers)}"
        )
    for f in fishers:
        _check_like(f, params_list[0], "fishers")
    positive(floor, "floor")
    w = _weights(weights, len(params_list), nonnegative=True)
    k = len(params_list)

    def merge(*leaves):
        ps, fs = leaves[:k], leaves[k:]
        num = 0.0
        den = 0.0
        for wi, p, f in zip(w, ps, fs, strict=True):
            fi = wi * jnp.maximum(f.astype(jnp.float32), floor)
            num = num + fi * p.astype(jnp.float32)
            den = den + fi
        return (num / den).astype(ps[0].dtype)

    return jax.tree.map(merge, *params_list, *fishers)


def task_arithmetic(base: Params, params_list: Sequence[Params], scale=1.0) -> Params:
    """Task arithmetic ``theta_0 + scale * sum_i (theta_i - theta_0)``.

    References:
      Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023.
    """
    _check_models(params_list)
    _check_like(params_list[0], base, "params_list")
    s = jnp.asarray(scale, jnp.float32)

    def merge(b, *leaves):
        b32 = b.astype(jnp.float32)
        tau = sum(leaf.astype(jnp.float32) - b32 for leaf in leaves)
        return (b32 + s * tau).astype(b.dtype)

    return jax.tree.map(merge, base, *params_list)


def ewc_loss(loss_fn: Callable, anchors, fishers, strength) -> Callable:
    """``params, *args -> loss_fn(params, *args) + sum_t ewc_penalty(params, anchor_t, F_t)``."""

    def total(params, *args):
        pairs = zip(anchors, fishers, strict=True)
        pen = sum(ewc_penalty(params, a, f, strength) for a, f in pairs)
        return loss_fn(params, *args) + pen

    return total
