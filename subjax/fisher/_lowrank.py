"""Low-rank and rank-1 Fisher approximations from the matrix-free Fisher operator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from subjax._core import as_compute, choice, compute_dtype
from subjax.fisher import _core
from subjax.fisher import _likelihood as lk
from subjax.fisher._core import LowRankFisher

Params = Any


def _make_products(apply_fn, params, inputs, labels, likelihood, kind):
    choice(kind, "kind", ("true", "empirical"))
    lk.check_likelihood(likelihood)
    if kind == "true":
        return _core.make_fvp(apply_fn, params, inputs, likelihood=likelihood)
    if labels is None:
        raise ValueError("`labels` is None: kind='empirical' needs observed labels")
    return _core.make_empirical_fvp(apply_fn, params, inputs, labels, likelihood=likelihood)


def fisher_operator(
    apply_fn: Callable,
    params: Params,
    inputs,
    *,
    labels=None,
    likelihood: str = "categorical",
    kind: str = "true",
):
    """The Fisher as a :class:`subjax.linalg.LinearOperator` on flat parameter vectors.

    Args:
      apply_fn: ``(params, inputs) -> outputs``.
      params, inputs: where the Fisher is taken.
      labels: observed labels (``kind="empirical"`` only).
      likelihood: ``"categorical" | "bernoulli" | "gaussian"``.
      kind: ``"true"`` (= Gauss-Newton) or ``"empirical"``.

    Returns:
      ``(op, unravel)``: a symmetric ``(P, P)`` operator (float32 or wider) whose
      ``matvec`` is a Fisher-vector product, and ``unravel`` mapping a flat vector
      back to the params pytree.
    """
    from subjax.linalg import LinearOperator

    flat, unravel = ravel_pytree(params)
    dt = compute_dtype(flat.dtype)
    params32 = unravel(flat.astype(dt))
    fv = _make_products(apply_fn, params32, inputs, labels, likelihood, kind)

    def matvec(x):
        out, _ = ravel_pytree(fv(unravel(x.astype(dt))))
        return out.astype(dt)

    n = flat.shape[0]
    return LinearOperator((n, n), dt, matvec=matvec, symmetric=True), unravel


def _to_tree(vecs, unravel):
    """``(P, k)`` columns -> pytree with a leading ``k`` axis."""
    return jax.vmap(unravel, in_axes=1)(vecs)


def low_rank(
    apply_fn: Callable,
    params: Params,
    inputs,
    rank: int,
    *,
    key: jax.Array,
    labels=None,
    likelihood: str = "categorical",
    kind: str = "true",
    oversample: int | None = None,
    n_steps: int = 4,
) -> LowRankFisher:
    """Top-``rank`` eigenpairs of the Fisher, matrix-free.

    Runs :func:`subjax.linalg.randomized_eigh` (Nystrom, PSD) on the Fisher
    operator of :func:`fisher_operator`; ``rank + oversample`` Fisher-vector
    products per power step.

    Args:
      apply_fn, params, inputs, labels, likelihood, kind: as :func:`fisher_operator`.
      rank: number of eigenpairs (static).
      key: PRNG key for the test vectors.
      oversample, n_steps: see :func:`subjax.linalg.randomized_eigh`; ``rank + oversample``
        may not exceed the number of parameters (the default oversample is lowered to fit).

    Returns:
      :class:`LowRankFisher` with eigenvectors as a pytree (leading axis ``rank``).
    """
    from subjax.linalg import randomized_eigh
    from subjax.linalg._validate import check_rank

    op, unravel = fisher_operator(
        apply_fn, params, inputs, labels=labels, likelihood=likelihood, kind=kind
    )
    # the Fisher is (n_params, n_params): errors name the argument that sized it
    rank, oversample = check_rank(rank, op.shape, "params", oversample)
    res = randomized_eigh(op, rank, key=key, oversample=oversample, n_steps=n_steps, psd=True)
    return LowRankFisher(res.eigenvalues, _to_tree(res.eigenvectors, unravel))


def rank_one(
    apply_fn: Callable,
    params: Params,
    inputs,
    *,
    labels=None,
    likelihood: str = "categorical",
    method: str = "mean_gradient",
    key: jax.Array | None = None,
    n_steps: int = 6,
) -> LowRankFisher:
    """Rank-1 Fisher ``lambda u u^T``.

    - ``method="mean_gradient"`` (Wang et al. 2025): ``u`` = the normalised mean
      gradient ``g / |g|`` of the NLL on ``labels``, ``lambda = u^T F_emp u =
      mean_i (g_i . u)^2`` — exact when the per-example gradients are collinear,
      the regime in which the paper finds the Fisher effectively rank-1. Costs one
      gradient and one empirical Fisher-vector product.
    - ``method="top"``: the top eigenpair of the empirical Fisher (the best rank-1
      approximation), by :func:`low_rank` with ``rank=1`` (``key`` required).

    Returns:
      :class:`LowRankFisher` with ``k = 1``.

    References:
      Wang, Gupta, Dong, MacLellan, "Avoid Catastrophic Forgetting with Rank-1 Fisher
      from Diffusion Models", arXiv:2509.23593, 2025.
    """
    choice(method, "method", ("mean_gradient", "top"))
    if labels is None:
        raise ValueError("`labels` is None: the rank-1 (empirical) Fisher needs observed labels")
    if method == "top":
        if key is None:
            raise ValueError("`key` is required for method='top'")
        return low_rank(
            apply_fn, params, inputs, 1, key=key, labels=labels, likelihood=likelihood,
            kind="empirical", n_steps=n_steps,
        )
    lk.check_likelihood(likelihood)
    p32 = jax.tree.map(as_compute, params)
    g = jax.grad(lambda p: lk.mean_nll(likelihood, apply_fn(p, inputs), labels))(p32)
    gnorm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(g)))
    u = jax.tree.map(lambda x: x / jnp.maximum(gnorm, jnp.finfo(x.dtype).tiny), g)
    fu = _core.make_empirical_fvp(apply_fn, p32, inputs, labels, likelihood=likelihood)(u)
    lam = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(fu), strict=True))
    return LowRankFisher(lam[None], jax.tree.map(lambda x: x[None], u))
