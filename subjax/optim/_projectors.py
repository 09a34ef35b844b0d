"""Projectors for low-rank projected optimizers (GaLore family).

A projector maps the canonical *tall* gradient ``g`` of shape ``(M, N)``,
``M >= N`` (a matrix leaf, transposed when it is wide), to a basis ``Q`` of shape
``(N, r)`` with orthonormal columns spanning the subspace of the smaller side on
which the optimizer runs: the projected gradient is ``g @ Q`` (``M x r``) and an
update ``u`` in projected space maps back as ``u @ Q.T``.

Each projector keeps a small per-matrix state (what the refresh produces) and
rebuilds ``Q`` from it at every step:

* ``"svd"``: exact top-``r`` right singular vectors (float32 SVD); state ``Q``.
* ``"subspace"``: warm-started subspace iteration ``Q <- orth(g^T g Q)``
  (``subspace_steps`` products per refresh, ``init_steps`` at the first one,
  from a random start); state ``Q``.
* ``"dct"``: the ``r`` columns of the orthonormal DCT-II basis best aligned with
  the gradient (largest ``||g c_j||``, computed with an FFT-based DCT); state the
  ``r`` column indices (int32) — the basis itself is regenerated.
* ``"random"``: a seeded Gaussian basis, orthonormalized; nothing is stored
  (state ``optax.MaskedNode()``) — the basis is regenerated from
  ``(seed, leaf, refresh index)``.

Refreshed ``"svd"`` / ``"subspace"`` bases are aligned with the previous basis
(``align="rotation"``: orthogonal Procrustes, ``"sign"``: column signs,
``None``: no alignment), so the inner optimizer's moments, which live in the
coordinates of the basis, stay meaningful across a refresh.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from subjax._core import as_compute, choice, static_int
from subjax.linalg import orthonormalize, subspace_iteration

PROJECTOR_NAMES = ("svd", "subspace", "dct", "random")
ALIGN_NAMES = ("rotation", "sign", None)


class Projector(NamedTuple):
    """A projector: pure functions over a per-matrix state.

    Attributes:
      name: projector name.
      init: ``(n, r) -> state`` for a tall matrix with ``n`` columns.
      refresh: ``(g, state, key, first) -> state``; ``g`` float32 ``(M, N)``,
        ``first`` a traced bool (the first refresh), ``key`` a PRNG key.
      basis: ``(state, key, n, r) -> Q`` float32 ``(n, r)`` orthonormal columns.
    """

    name: str
    init: Callable[[int, int], Any]
    refresh: Callable[[jax.Array, Any, jax.Array, jax.Array], Any]
    basis: Callable[[Any, jax.Array, int, int], jax.Array]


def _orth(y: jax.Array) -> jax.Array:
    """Orthonormal basis of the columns of ``y`` (Householder QR, float32 at least)."""
    return orthonormalize(as_compute(y), "householder")


def _align(q_new: jax.Array, q_old: jax.Array, align: str | None) -> jax.Array:
    """Rotate / flip ``q_new`` (same span) to be as close as possible to ``q_old``."""
    if align is None:
        return q_new
    m = q_new.T @ q_old  # (r, r)
    if align == "sign":
        s = jnp.where(jnp.diagonal(m) < 0, -1.0, 1.0).astype(q_new.dtype)
        return q_new * s[None, :]
    # Orthogonal Procrustes: argmin_R ||q_new R - q_old||_F over orthogonal R.
    u, _, vt = jnp.linalg.svd(m, full_matrices=False)
    return q_new @ (u @ vt)


def _eye_basis(n: int, r: int) -> jax.Array:
    return jnp.eye(n, r, dtype=jnp.float32)


def _basis_projector(name: str, refresh) -> Projector:
    """A projector whose state is the basis itself (``"svd"``, ``"subspace"``)."""
    return Projector(name, init=_eye_basis, refresh=refresh, basis=lambda q, key, n, r: q)


def svd_projector(align: str | None = "rotation") -> Projector:
    """Exact top-``r`` right singular vectors of the tall gradient."""

    def refresh(g, q, key, first):
        del key, first
        _, _, vt = jnp.linalg.svd(g, full_matrices=False)
        q_new = vt[: q.shape[1]].T
        return _align(q_new, q, align)

    return _basis_projector("svd", refresh)


def subspace_projector(
    subspace_steps: int = 1,
    init_steps: int = 6,
    align: str | None = "rotation",
    orth_method: str = "cholesky_qr2",
) -> Projector:
    """Warm-started subspace iteration on ``g^T g`` from the previous basis.

    Each refresh runs ``subspace_steps`` steps of ``Q <- orth(g^T orth(g Q))``
    (:func:`subjax.linalg.subspace_iteration` on ``g^T``) starting from the stored
    basis (``init_steps`` steps from a seeded Gaussian start at the first
    refresh); the cost is ``4 M N r`` flops per step plus two thin
    orthonormalizations and a Rayleigh–Ritz step, versus ``O(M N^2)`` for the SVD.
    """
    subspace_steps = static_int(subspace_steps, "subspace_steps", 1)
    init_steps = static_int(init_steps, "init_steps", 1)

    def refresh(g, q, key, first):
        # right singular subspace of the tall g = left singular subspace of g^T
        a = g.T

        # operands go through the cond (not closed over) so that they are traced
        # inside both branches
        def from_random(a, q, key):
            q0 = jax.random.normal(key, q.shape, q.dtype)
            return subspace_iteration(a, q0, max_iters=init_steps, orth_method=orth_method).u

        def warm(a, q, key):
            return subspace_iteration(a, q, max_iters=subspace_steps, orth_method=orth_method).u

        q_new = jax.lax.cond(first, from_random, warm, a, q, key)
        return _align(q_new, q, align)

    return _basis_projector("subspace", refresh)


def dct_basis(n: int, idx: jax.Array) -> jax.Array:
    r"""Columns ``idx`` of the orthonormal DCT-II basis of size ``n``.

    .. math::
        c_j[k] = s_j \cos\Big(\frac{\pi (2k + 1) j}{2n}\Big),\qquad
        s_0 = \sqrt{1/n},\ s_{j > 0} = \sqrt{2/n}.

    Args:
      n: the basis size (rows).
      idx: int array of column indices in ``[0, n)``.

    Returns:
      float32 ``(n, len(idx))`` with orthonormal columns (the ``"dct"``
      projector's basis).

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.optim import dct_basis
      >>> c = dct_basis(8, jnp.array([0, 3]))
      >>> c.shape, bool(jnp.allclose(c.T @ c, jnp.eye(2), atol=1e-6))
      ((8, 2), True)

    References:
      Ahmed, Natarajan, Rao, "Discrete cosine transform", IEEE Trans. Computers, 1974.
    """
    k = jnp.arange(n, dtype=jnp.float32)[:, None]
    j = idx.astype(jnp.float32)[None, :]
    s = jnp.where(idx == 0, math.sqrt(1.0 / n), math.sqrt(2.0 / n)).astype(jnp.float32)
    return s[None, :] * jnp.cos((math.pi / (2 * n)) * (2.0 * k + 1.0) * j)


def dct_projector() -> Projector:
    """SVD-free projector: DCT-II columns selected by alignment with the gradient."""

    def refresh(g, idx, key, first):
        del key, first
        # coefficients of every row of g in the DCT basis: (g C^T)[:, j] = g c_j
        coef = jax.scipy.fft.dct(g, type=2, norm="ortho", axis=-1)
        score = jnp.sum(coef * coef, axis=0)
        _, top = jax.lax.top_k(score, idx.shape[0])
        return jnp.sort(top).astype(jnp.int32)

    return Projector(
        "dct",
        init=lambda n, r: jnp.arange(r, dtype=jnp.int32),
        refresh=refresh,
        basis=lambda idx, key, n, r: dct_basis(n, idx),
    )


def random_projector() -> Projector:
    """Seeded Gaussian basis, orthonormalized, regenerated at every step (not stored)."""

    return Projector(
        "random",
        init=lambda n, r: optax.MaskedNode(),
        refresh=lambda g, s, key, first: s,
        basis=lambda s, key, n, r: _orth(jax.random.normal(key, (n, r), jnp.float32)),
    )


def make_projector(
    projector: str | Projector,
    *,
    subspace_steps: int | None = None,
    init_steps: int | None = None,
    align: str | None = "rotation",
) -> Projector:
    r"""The :class:`Projector` of a name, for :func:`subjax.optim.projected` / ``galore``.

    A projector turns the tall gradient :math:`g \in \mathbb{R}^{M \times N}`
    (:math:`M \ge N`) into an orthonormal basis :math:`Q \in \mathbb{R}^{N \times r}`
    of the subspace the optimizer runs in:

    .. math::
        \texttt{"svd"}:\ Q = V_{:, :r},\ g = U \Sigma V^\top; \qquad
        \texttt{"subspace"}:\ Q \leftarrow \operatorname{orth}(g^\top g\, Q)
        \ \text{(warm-started)};

    ``"dct"`` keeps the ``r`` DCT-II columns :math:`c_j` with the largest
    :math:`\|g c_j\|` and ``"random"`` a seeded Gaussian basis, orthonormalized.

    Args:
      projector: ``"svd"``, ``"subspace"``, ``"dct"``, ``"random"``, or a
        :class:`Projector` (returned unchanged).
      subspace_steps: subspace-iteration steps per refresh (``"subspace"``;
        ``None``: 1).
      init_steps: subspace-iteration steps at the first refresh, from a seeded
        Gaussian start (``"subspace"``; ``None``: 6).
      align: how a refreshed ``"svd"`` / ``"subspace"`` basis is matched to the
        previous one: ``"rotation"`` (orthogonal Procrustes), ``"sign"``
        (column signs) or ``None``.

    Returns:
      A :class:`Projector` (``init``, ``refresh``, ``basis`` pure functions).
      An unknown name raises ``ValueError`` naming ``projector``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.optim import make_projector
      >>> proj = make_projector("svd")
      >>> g = jnp.diag(jnp.array([3.0, 2.0, 1.0]))[:, ::-1]  # (3, 3), largest in column 2
      >>> q = proj.refresh(g, proj.init(3, 1), jax.random.key(0), jnp.array(True))
      >>> q.shape, bool(jnp.allclose(jnp.abs(q[:, 0]), jnp.array([0.0, 0.0, 1.0])))
      ((3, 1), True)

    References:
      Zhao et al., GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
      Projection, ICML 2024. Halko, Martinsson, Tropp, "Finding structure with
      randomness", SIAM Review 2011 (subspace iteration). Modoranu et al.
      (SVD-free low-rank adaptive gradient optimization with DCT bases), 2025.
    """
    if isinstance(projector, Projector):
        return projector
    choice(align, "align", ALIGN_NAMES)
    if projector == "svd":
        return svd_projector(align)
    if projector == "subspace":
        return subspace_projector(1 if subspace_steps is None else subspace_steps,
                                  6 if init_steps is None else init_steps, align)
    if projector == "dct":
        return dct_projector()
    if projector == "random":
        return random_projector()
    raise ValueError(
        f"unknown `projector`={projector!r}; expected one of {PROJECTOR_NAMES} "
        "or a subjax.optim.Projector"
    )
