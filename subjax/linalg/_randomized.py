"""Randomized range finding, subspace iteration and randomized SVD / eigh.

Everything runs on a :class:`~subjax.linalg.LinearOperator`: the only access to
the matrix is through block products ``A @ X`` and ``A^T @ Y``, which dominate
the cost. The small dense problems (Gram matrices, Rayleigh quotients) are
``O((m + n) L^2)`` for a basis of ``L`` columns.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import (
    all_finite,
    check_key,
    choice,
    compute_dtype,
    fixed_point_loop,
    positive,
    static_int,
)
from subjax.linalg import _validate as V
from subjax.linalg._operator import LinearOperator
from subjax.linalg._orth import (
    ORTH_METHODS,
    _all_devices,
    _rows,
    orth_robust,
    orthonormalize,
    psum,
)

__all__ = [
    "RandomizedSVDResult",
    "SubspaceIterationResult",
    "EighResult",
    "randomized_range_finder",
    "subspace_iteration",
    "randomized_svd",
    "randomized_eigh",
]


class RandomizedSVDResult(NamedTuple):
    """Truncated SVD ``a ~= u @ diag(s) @ vt``.

    Attributes:
      u: ``(m, rank)`` orthonormal columns (left singular vectors).
      s: ``(rank,)`` singular values, descending.
      vt: ``(rank, n)`` orthonormal rows (right singular vectors).
      converged: ``()`` bool; False when a non-finite value appeared (e.g. NaN in ``a``).
    """

    u: jax.Array
    s: jax.Array
    vt: jax.Array
    converged: jax.Array


class SubspaceIterationResult(NamedTuple):
    """Result of :func:`subspace_iteration`.

    Attributes:
      u: ``(m, k)`` orthonormal basis of the dominant left singular subspace, as
        Ritz vectors (ordered by ``s``).
      s: ``(k,)`` Ritz singular values, descending.
      vt: ``(k, n)`` right Ritz vectors.
      n_iters: ``()`` int32, iterations run.
      converged: ``()`` bool: ``errors`` fell below ``tol`` (with ``tol=None``: all
        values finite).
      errors: ``(max_iters,)`` subspace change ``||sin Theta(Q_t, Q_{t+1})||_F / sqrt(k)``
        per iteration, padded with -1.
    """

    u: jax.Array
    s: jax.Array
    vt: jax.Array
    n_iters: jax.Array
    converged: jax.Array
    errors: jax.Array


class EighResult(NamedTuple):
    """Partial symmetric eigendecomposition ``a ~= v @ diag(w) @ v.T``.

    Attributes:
      eigenvalues: ``(rank,)``, ordered by ``which`` (descending for ``"LA"`` /
        ``"LM"`` magnitude, ascending for ``"SA"``).
      eigenvectors: ``(n, rank)`` orthonormal columns.
      n_iters: ``()`` int32, restart cycles (or power steps) run.
      converged: ``()`` bool.
      errors: ``(max_iters,)`` largest relative Ritz residual per cycle, padded with -1.
    """

    eigenvalues: jax.Array
    eigenvectors: jax.Array
    n_iters: jax.Array
    converged: jax.Array
    errors: jax.Array


# ----------------------------------------------------------------------------- helpers
# With ``axis`` (a bound mesh axis) the operator is the local row block ``A_d`` of a
# row-sharded matrix; "tall" quantities (``A X``, range bases) are row-sharded the
# same way, "short" ones (``A^T Q``, Gram and Ritz matrices) replicated. Every sum
# over rows is a ``psum``; everything else is the single-device code.


def _orth_q(y, kmat=None, axis=None):
    """The ``q`` of :func:`orth_robust` (orthonormal basis of ``y`` minus ``span(kmat)``)."""
    return orth_robust(y, kmat, axis)[0]


def _gaussian(key, shape, dtype):
    return jax.random.normal(key, shape, dtype=dtype)


def _local_rows(x, axis):
    """This device's block of the rows of a replicated ``x`` (all of ``x`` without ``axis``)."""
    if axis is None:
        return x
    rows = x.shape[0] // lax.axis_size(axis)
    return lax.dynamic_slice_in_dim(x, lax.axis_index(axis) * rows, rows, axis=0)


def _all_finite(axis, tall=(), short=()):
    """Every entry finite: ``tall`` row-sharded over ``axis``, ``short`` replicated."""
    return _all_devices(all_finite(*tall), axis) & all_finite(*short)


def _col_norms(x, axis=None):
    """Column norms of a (row-sharded) ``x``."""
    return jnp.sqrt(psum(jnp.sum(jnp.square(x), axis=0), axis))


def _working_operator(op: LinearOperator, axis, *, symmetric_rows: bool = False):
    """``(op', ct)``: ``op`` with products in its compute dtype ``ct``.

    With ``axis``, ``op`` is the local row block: ``A^T Y = psum_d A_d^T Y_d``; for a
    row-sharded symmetric matrix (``symmetric_rows``) the input block of ``A X`` is
    gathered first (``A_d X`` needs all of ``X``).
    """
    ct = compute_dtype(op.dtype)
    if ct == op.dtype and axis is None:
        return op, ct
    src = op

    def mm(x):
        if symmetric_rows and axis is not None:
            x = lax.all_gather(x, axis, tiled=True)
        return src.matmat(x.astype(src.dtype)).astype(ct)

    def rmm(y):
        return psum(src.rmatmat(y.astype(src.dtype)).astype(ct), axis)

    shape = src.shape
    if symmetric_rows and axis is not None:
        shape = (shape[0], shape[0])
    return LinearOperator(shape, ct, matmat=mm, rmatmat=rmm), ct


def _scaled(op: LinearOperator, y0, axis):
    """``(op / c, y0 / c, c)`` with ``c = max |y0|`` (over ``axis``), ``y0 = A X`` a first product.

    The solvers then see an operator of norm ~1 whatever the scale of ``A``: no
    Gram matrix or residual norm overflows at ``|A| ~ 1e30`` or underflows at
    ``1e-30`` in float32, and no absolute floor meets the spectrum.
    """
    c = jnp.max(jnp.abs(y0))
    if axis is not None:
        c = lax.pmax(c, axis)
    c = jnp.where((c > 0) & jnp.isfinite(c), c, jnp.ones_like(c))
    src = op
    scaled = LinearOperator(
        src.shape, src.dtype, matmat=lambda x: src.matmat(x) / c,
        rmatmat=lambda y: src.rmatmat(y) / c,
    )
    return scaled, y0 / c, c


def _svd_from_range(k, w, rank: int, l: int, axis=None):
    """Top-``rank`` SVD of ``B = k^T A`` given ``k`` (m, L) orthonormal and ``w = A^T k``.

    ``B = w^T``. Rayleigh–Ritz in two stages so that nothing is squared more than
    needed: the ``(L, L)`` Gram ``w^T w`` picks the dominant ``l``-dimensional
    subspace (only its span is used, so the squared condition number matters only
    through the gap at ``l``); then ``p = w v_l`` (``(n, l)``, nearly orthogonal
    columns of norms ~ sigma_i) is column-scaled, Cholesky-QR'd and the ``(l, l)``
    triangle SVD'd for the singular vectors. That SVD resolves the singular values
    only to ``u * sigma_1`` absolute accuracy; the values returned are the column
    norms of ``p`` instead, square roots of the Rayleigh quotients of ``w^T w`` at
    its eigenvectors formed by one GEMM (second order in the eigenvector error), which
    keeps the small singular values relatively accurate (about half the float32 error
    at ``sigma_i / sigma_1 ~ 1e-2``). Without the Gram stage (``l = L``) they are
    the column norms of ``p v_2 = q_p u_2 diag(s)``.
    ``k`` may be row-sharded (``w`` is then replicated): only ``k @ left`` touches it.
    With ``axis``, it is ``w`` that is row-sharded over that axis instead (``k``
    replicated): its Gram and column norms are ``psum``-ed and its orthonormalization
    runs over the axis, which makes ``vt`` row-sharded.
    """
    c = jnp.max(jnp.abs(w))
    if axis is not None:
        c = lax.pmax(c, axis)
    c = jnp.where((c > 0) & jnp.isfinite(c), c, jnp.ones_like(c))
    w = w / c  # scale-free: the Gram below neither overflows nor underflows
    big_l = k.shape[1]
    if l < big_l:
        g = psum(w.T @ w, axis)
        g = (g + g.T) * jnp.asarray(0.5, g.dtype)
        _, vg = jnp.linalg.eigh(g)
        vl = vg[:, ::-1][:, :l]
        p = w @ vl
    else:
        vl = None
        p = w
    d = _col_norms(p, axis)
    d = jnp.where(d > 0, d, jnp.ones_like(d))
    qp, rs = orth_robust(p / d[None, :], None, axis)
    u2, s, v2t = jnp.linalg.svd(rs * d[None, :], full_matrices=False)
    # w_l = qp @ rp = (qp u2) diag(s) v2t  =>  B restricted = (vl v2) diag(s) (qp u2)^T
    left, right = v2t.T[:, :rank], u2[:, :rank]
    if vl is None:
        s = _safe_col_norms(p @ left, axis)
        order = jnp.argsort(-s)
        s, left, right = s[order], left[:, order], right[:, order]
    else:
        s = -jnp.sort(-_safe_col_norms(p, axis))[:rank]
        left = vl @ left
    u = k @ left
    vt = (qp @ right).T
    return u, s * c, vt


def _safe_col_norms(x, axis=None):
    """Column norms (``x`` row-sharded over ``axis``), finite gradient at a zero column."""
    ss = psum(jnp.sum(jnp.square(x), axis=0), axis)
    pos = ss > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, ss, 1)), 0)


def _block_krylov(op: LinearOperator, y0, n_steps: int, axis=None):
    """Orthonormal block-Krylov basis ``K = [Q_0..Q_q]`` of ``span{(A A^T)^i y0}``
    (``y0 = A omega``) and ``W = A^T K``. ``2 q + 1`` further block products with
    ``A`` (``q = n_steps``), exactly as many as ``q`` power iterations plus the final
    projection.
    """
    qs = [_orth_q(y0, None, axis)]
    ws = []
    for _ in range(n_steps):
        w = op.rmatmat(qs[-1])
        ws.append(w)
        y = op.matmat(_orth_q(w))
        qs.append(_orth_q(y, jnp.concatenate(qs, axis=1), axis))
    ws.append(op.rmatmat(qs[-1]))
    return jnp.concatenate(qs, axis=1), jnp.concatenate(ws, axis=1)


def _power_range(op: LinearOperator, y0, n_steps: int, axis=None):
    """Subspace (power) iteration: ``Q = orth((A A^T)^q y0)`` (``2 q`` further products)."""
    q = _orth_q(y0, None, axis)
    for _ in range(n_steps):
        q = _orth_q(op.matmat(_orth_q(op.rmatmat(q))), None, axis)
    return q


# ----------------------------------------------------------------------------- API


def randomized_range_finder(
    a, size: int, *, key: jax.Array, n_steps: int = 4, axis_name: str | None = None
) -> jax.Array:
    r"""Orthonormal ``(m, size)`` basis ``Q`` approximating the range of ``a``.

    ``Q = orth((A A^T)^q A Omega)`` with Gaussian ``Omega`` (``n x size``), each power
    step re-orthonormalised (Cholesky-QR2), so that ``||A - Q Q^T A||`` is close to
    ``sigma_{size+1}``. Cost: ``2 q + 1`` block products.

    Args:
      a: ``(m, n)`` array, BCOO matrix or :class:`LinearOperator`.
      size: number of columns (static).
      key: ``jax.random`` key.
      n_steps: power iterations ``q`` (static).
      axis_name: mesh axis the rows of ``a`` are split over (inside ``shard_map``;
        ``a`` is then this device's row block and so is the result), or None.

    Returns:
      ``(m, size)`` array with orthonormal columns.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.linalg import randomized_range_finder
      >>> a = jax.random.normal(jax.random.key(0), (50, 8)) @ jax.random.normal(
      ...     jax.random.key(1), (8, 40))
      >>> q = randomized_range_finder(a, 8, key=jax.random.key(2))
      >>> bool(jnp.linalg.norm(a - q @ (q.T @ a)) < 1e-3 * jnp.linalg.norm(a))
      True

    References:
      Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 2011.
    """
    op = V.as_operator(a)
    check_key(key)
    size = static_int(size, "size", 1)
    n_steps = static_int(n_steps, "n_steps", 0)
    shape = V.global_shape(op, axis_name)
    if size > min(shape):
        raise ValueError(f"size={size} exceeds min(m, n)={min(shape)} for argument `a`")
    return _range_finder_impl(op, key, size=size, n_steps=n_steps, axis=axis_name)


@functools.partial(jax.jit, static_argnames=("size", "n_steps", "axis"))
def _range_finder_impl(op, key, *, size, n_steps, axis):
    dt = op.dtype
    op, ct = _working_operator(op, axis)
    op, y0, _ = _scaled(op, op.matmat(_gaussian(key, (op.shape[1], size), ct)), axis)
    return _power_range(op, y0, n_steps, axis).astype(dt)


def subspace_iteration(
    a,
    q0: jax.Array,
    *,
    max_iters: int = 10,
    tol: float | jax.Array | None = None,
    orth_method: str = "cholesky_qr2",
    axis_name: str | None = None,
    side: str = "left",
) -> SubspaceIterationResult:
    r"""Block power iteration for a dominant singular subspace, warm-startable.

    ``side="left"``: ``Q_{t+1} = orth(A orth(A^T Q_t))`` from ``Q_0 = orth(q0)``,
    ``q0`` of shape ``(m, k)``; ``side="right"``: ``Q_{t+1} = orth(A^T orth(A Q_t))``,
    ``q0`` of shape ``(n, k)``. Stops after ``max_iters`` steps, or earlier once the
    subspace change ``||sin Theta(Q_t, Q_{t+1})||_F / sqrt(k) <= tol``. A final
    Rayleigh–Ritz step (one more product, SVD of ``Q^T A^T`` resp. ``A Q``) orders
    the basis and gives singular values; the iterated basis comes back as ``u``
    (left) or ``vt.T`` (right), ordered by ``s``. Passing the previous basis as
    ``q0`` (periodic refreshes, GaLore-style) starts close to the answer, so far
    fewer steps reach ``tol`` than from a random start.

    ``side="right"`` is the same iteration as ``side="left"`` on ``a.T``, but keeps
    ``a``'s rows as the split dimension: with ``axis_name`` (``a`` a row block of a
    row-sharded matrix) the tall products ``A Q`` stay local and are orthonormalized
    over the axis (Cholesky-QR2 on ``psum``-ed ``k x k`` Grams), ``A^T W`` is a
    ``psum`` of ``(n, k)`` blocks, and the basis ``Q`` (``(n, k)``) is replicated —
    no device gathers ``a``. This is the refresh of
    :func:`subjax.parallel.sharded_subspace_projector`.

    Error per step contracts like ``(sigma_{k+1} / sigma_k)^2``.

    Args:
      a: ``(m, n)`` array, BCOO matrix or :class:`LinearOperator`.
      q0: starting basis (need not be orthonormal), ``(m, k)`` for ``side="left"``,
        ``(n, k)`` for ``side="right"``, ``k <= min(m, n)``.
      max_iters: iteration cap (static); size of ``errors``.
      tol: optional tolerance on the subspace change (may be traced).
      orth_method: orthonormalization used in each step (see :func:`orthonormalize`).
      axis_name: mesh axis the rows of ``a`` are split over, inside ``shard_map``;
        ``u`` is then row-sharded too, everything else replicated. With
        ``side="left"`` ``q0`` is row-sharded like ``a``; with ``side="right"`` it
        is replicated.
      side: ``"left"`` or ``"right"``: which singular subspace is iterated.

    Returns:
      :class:`SubspaceIterationResult`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.linalg import subspace_iteration
      >>> u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (60, 60)))
      >>> a = (u * (0.5 ** jnp.arange(60.0))) @ u.T
      >>> res = subspace_iteration(a, jax.random.normal(jax.random.key(1), (60, 3)), tol=1e-5,
      ...                          max_iters=50)
      >>> bool(res.converged), [round(float(x), 3) for x in res.s]
      (True, [1.0, 0.5, 0.25])

    References:
      Rutishauser, "Simultaneous iteration method for symmetric matrices", 1970.
      Saad, "Numerical Methods for Large Eigenvalue Problems", 2011 (ch. 5).
    """
    choice(side, "side", ("left", "right"))
    op = V.as_operator(a)
    m, n = V.global_shape(op, axis_name)
    rows = op.shape[0] if side == "left" else n
    q0 = V.check_basis(q0, rows, "q0", max_cols=min(m, n))
    max_iters = static_int(max_iters, "max_iters", 1)
    choice(orth_method, "orth_method", ORTH_METHODS)
    positive(tol, "tol", allow_none=True)
    tol = None if tol is None else jnp.asarray(tol, compute_dtype(op.dtype))
    return _subspace_iteration_impl(
        op, q0, tol, max_iters=max_iters, orth_method=orth_method, axis=axis_name, side=side
    )


@functools.partial(jax.jit, static_argnames=("max_iters", "orth_method", "axis", "side"))
def _subspace_iteration_impl(op, q0, tol, *, max_iters, orth_method, axis, side):
    k = q0.shape[1]
    dt = op.dtype
    op, ct = _working_operator(op, axis)
    # ``to_other`` maps the iterated basis to the other side of ``A``, ``back`` returns;
    # ``q_axis`` / ``w_axis``: the axis (None: replicated) of the rows of each side.
    if side == "left":
        to_other, back, q_axis, w_axis = op.rmatmat, op.matmat, axis, None
    else:
        to_other, back, q_axis, w_axis = op.matmat, op.rmatmat, None, axis

    def orth(x, axis=None):
        return orthonormalize(x, orth_method, axis_name=axis)

    def step(q, _):
        q_new = orth(back(orth(to_other(q), w_axis)), q_axis)
        r = q_new - q @ psum(q.T @ q_new, q_axis)  # ||sin Theta(Q_t, Q_{t+1})||_F
        return q_new, jnp.sqrt(psum(jnp.sum(jnp.square(r)), q_axis) / k)

    stop = None if tol is None else (lambda q, err: err <= tol)
    q0 = orth(q0.astype(ct), q_axis)
    out = fixed_point_loop(step, q0, max_iters=max_iters, stop=stop, dtype=ct)
    q = out.state
    # Rayleigh-Ritz on the iterated side: q's side plays the role of the range basis
    x, s, yt = _svd_from_range(q, to_other(q), k, k, w_axis)
    u, vt = (x, yt) if side == "left" else (yt.T, x.T)
    converged = _all_finite(axis, (u,), (s, vt))
    if tol is not None:
        converged = converged & (out.error <= tol)
    return SubspaceIterationResult(
        u.astype(dt), s.astype(dt), vt.astype(dt), out.n_iters, converged, out.errors
    )


def randomized_svd(
    a,
    rank: int,
    *,
    key: jax.Array,
    oversample: int | None = None,
    n_steps: int | None = None,
    method: str = "block_krylov",
    axis_name: str | None = None,
) -> RandomizedSVDResult:
    r"""Truncated SVD by randomized range finding.

    With ``l = rank + oversample`` Gaussian test vectors ``Omega`` and ``q = n_steps``:

    - ``method="block_krylov"`` (default): Rayleigh–Ritz on the block Krylov space
      ``span[A Omega, (A A^T) A Omega, ..., (A A^T)^q A Omega]`` (``(q + 1) l``
      columns). It uses the same ``2 q + 2`` block products as ``q`` power
      iterations — every ``A^T Q_i`` computed on the way is a block of
      ``B = K^T A`` — but keeps every block, which is far more accurate for
      slowly decaying spectra (Musco & Musco 2015).
    - ``method="subspace"``: classical power (subspace) iteration, basis of ``l``
      columns (Halko et al. 2011, Alg. 4.4) — what scikit-learn does.

    All orthonormalizations are Cholesky-QR2 (GEMM only) with a shifted
    Cholesky-QR3 / Householder fallback; the small SVD is done on ``(l, l)``
    matrices. Work is in at least float32 and cast back.

    Args:
      a: ``(m, n)`` array, BCOO matrix or :class:`LinearOperator`.
      rank: number of singular triplets (static), ``rank + oversample <= min(m, n)``.
      key: ``jax.random`` key.
      oversample: extra test vectors (static). None (default): at least 8, rounded
        up so that ``rank + oversample`` is a multiple of 8 (40 columns for rank 32),
        and lowered to fit ``min(m, n)``; matrix products on whole 8-column panels
        are the fastest per column.
      n_steps: power / Krylov steps ``q`` (static), ``2 q + 2`` block products.
        None (default): ``q = 3`` (8 products) when ``min(m, n) >= 1000``, else
        ``q = 4`` (10 products). On large matrices the products dominate the cost and
        3 block-Krylov steps are already more accurate than scikit-learn's defaults
        (10 oversamples, ``n_iter='auto'``: 7 power iterations below rank
        ``0.1 min(m, n)``, 16 products) on slowly and quickly decaying spectra, and
        about as accurate on a flat (Gaussian) one; on small matrices the fourth step
        is cheap and resolves flat spectra about ten times better. With
        ``method="subspace"`` (scikit-learn's algorithm) matching scikit-learn's
        accuracy needs its step count (7).
      method: ``"block_krylov"`` or ``"subspace"``.
      axis_name: mesh axis the rows of ``a`` are split over, inside ``shard_map``
        (``a`` is the local row block; ``u`` comes back row-sharded, ``s`` and ``vt``
        replicated), or None.

    Returns:
      :class:`RandomizedSVDResult` ``(u, s, vt, converged)``; ``converged`` is False
      when a non-finite value appeared.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.linalg import randomized_svd
      >>> a = jax.random.normal(jax.random.key(0), (200, 100))
      >>> res = randomized_svd(a, 5, key=jax.random.key(1))
      >>> s_ref = jnp.linalg.svd(a, compute_uv=False)[:5]
      >>> bool(jnp.allclose(res.s, s_ref, rtol=1e-2))
      True

    References:
      Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 2011.
      Musco, Musco, "Randomized block Krylov methods for stronger and faster
      approximate singular value decomposition", NeurIPS 2015.
      Yamamoto et al., "Roundoff error analysis of the CholeskyQR2 algorithm", 2015.
    """
    choice(method, "method", ("block_krylov", "subspace"))
    op = V.as_operator(a)
    check_key(key)
    shape = V.global_shape(op, axis_name)
    rank, oversample = V.check_rank(rank, shape, "a", oversample)
    if n_steps is None:
        n_steps = 3 if min(shape) >= 1000 else 4
    n_steps = static_int(n_steps, "n_steps", 0)
    return _randomized_svd_impl(
        op, key, rank=rank, oversample=oversample, n_steps=n_steps, method=method,
        m=shape[0], axis=axis_name,
    )


@functools.partial(
    jax.jit, static_argnames=("rank", "oversample", "n_steps", "method", "m", "axis")
)
def _randomized_svd_impl(op, key, *, rank, oversample, n_steps, method, m, axis):
    n = op.shape[1]
    l = rank + oversample
    dt = op.dtype
    op, ct = _working_operator(op, axis)
    op, y0, c = _scaled(op, op.matmat(_gaussian(key, (n, l), ct)), axis)
    if method == "block_krylov":
        # The Krylov basis cannot have more than min(m, n) independent columns.
        n_blocks = min(n_steps, max(min(m, n) // l - 1, 0))
        kmat, w = _block_krylov(op, y0, n_blocks, axis)
    else:
        kmat = _power_range(op, y0, n_steps, axis)
        w = op.rmatmat(kmat)
    u, s, vt = _svd_from_range(kmat, w, rank, l)
    s = s * c
    ok = _all_finite(axis, (u,), (s, vt))
    return RandomizedSVDResult(u.astype(dt), s.astype(dt), vt.astype(dt), ok)


def _select(theta, which: str, k: int):
    """Indices of the ``k`` wanted Ritz values, in output order."""
    if which == "LA":
        key = -theta
    elif which == "SA":
        key = theta
    else:  # LM
        key = -jnp.abs(theta)
    return jnp.argsort(key)[:k]


def _asymmetry(t):
    """``||t - t^T||_F / ||t||_F`` of a small projected matrix (0 for ``t = 0``)."""
    nrm = jnp.sqrt(jnp.sum(jnp.square(t)))
    return jnp.sqrt(jnp.sum(jnp.square(t - t.T))) / jnp.where(nrm > 0, nrm, jnp.ones_like(nrm))


def _symmetric_enough(asym, dtype):
    """A projection ``V^T A V`` this symmetric comes from a symmetric ``A`` (rounding only)."""
    return asym <= jnp.sqrt(jnp.finfo(dtype).eps)


class _Ritz(NamedTuple):
    theta: jax.Array  # (k,) wanted Ritz values
    y: jax.Array  # (n, k) Ritz vectors (row-sharded with an axis)
    ay: jax.Array  # A y
    norm: jax.Array  # max |Ritz value| over the whole basis: an estimate of ||A||_2
    asym: jax.Array  # asymmetry of the projected matrix


def _rayleigh_ritz_sym(vmat, wmat, k: int, which: str, axis=None) -> _Ritz:
    """Ritz pairs of symmetric ``A`` on the orthonormal basis ``vmat`` (``wmat = A vmat``)."""
    t = psum(vmat.T @ wmat, axis)
    asym = _asymmetry(t)
    theta, s = jnp.linalg.eigh((t + t.T) * jnp.asarray(0.5, t.dtype))
    idx = _select(theta, which, k)
    s_k = s[:, idx]
    return _Ritz(theta[idx], vmat @ s_k, wmat @ s_k, jnp.max(jnp.abs(theta)), asym)


def _relative_residual(ritz_theta, y, ay, norm, axis=None):
    """``max_i ||A y_i - theta_i y_i|| / ||A||`` (``norm`` an estimate of ``||A||_2``)."""
    res = ay - y * ritz_theta[None, :]
    scale = jnp.where(norm > 0, norm, jnp.ones_like(norm))
    return jnp.max(_col_norms(res, axis)) / scale


def _nystrom(op: LinearOperator, q, y, rank: int, n_steps: int, axis):
    """Stabilised Nyström approximation ``A ~= (A Q)(Q^T A Q)^+ (A Q)^T`` for PSD ``A``.

    ``y = A q`` on entry. Returns ``(lam, vecs, psd_ok, asym)``: ``psd_ok`` is False
    when the core ``Q^T A Q`` has an eigenvalue clearly below zero (``A`` is not
    positive semidefinite).
    """
    ct = y.dtype
    for _ in range(n_steps):
        q = _orth_q(y, None, axis)
        y = op.matmat(q)
    core = psum(q.T @ y, axis)
    asym = _asymmetry(core)
    w0 = jnp.linalg.eigvalsh((core + core.T) * jnp.asarray(0.5, ct))
    psd_ok = jnp.min(w0) >= -jnp.sqrt(jnp.finfo(ct).eps) * jnp.max(jnp.abs(w0))
    n = _rows(y, axis)
    nu = jnp.sqrt(jnp.asarray(n, ct)) * jnp.finfo(ct).eps * jnp.sqrt(
        psum(jnp.sum(jnp.square(y)), axis)
    )
    y = y + nu * q
    mmat = psum(q.T @ y, axis)
    mmat = (mmat + mmat.T) * jnp.asarray(0.5, ct)
    w, v = jnp.linalg.eigh(mmat)
    floor = jnp.max(w) * jnp.finfo(ct).eps * w.shape[0]
    inv_sqrt = jnp.where(w > floor, lax.rsqrt(jnp.maximum(w, floor)), jnp.zeros_like(w))
    b = y @ (v * inv_sqrt[None, :])  # b b^T = y M^+ y^T
    d = _col_norms(b, axis)
    d = jnp.where(d > 0, d, jnp.ones_like(d))
    qb, rb = orth_robust(b / d[None, :], None, axis)
    u2, sig, _ = jnp.linalg.svd(rb * d[None, :], full_matrices=False)
    lam = jnp.maximum(jnp.square(sig) - nu, jnp.zeros_like(sig))
    return lam[:rank], qb @ u2[:, :rank], psd_ok, asym


def randomized_eigh(
    a,
    rank: int,
    *,
    key: jax.Array,
    oversample: int | None = None,
    n_steps: int | None = None,
    psd: bool = False,
    which: str = "LM",
    tol: float | jax.Array | None = None,
    axis_name: str | None = None,
) -> EighResult:
    r"""Partial eigendecomposition of a symmetric matrix by randomized methods.

    - ``psd=True``: stabilised Nyström approximation (Tropp et al. 2017, Alg. 3):
      ``Y = A Q`` for ``Q = orth(A^q Omega)``, a shift ``nu = sqrt(n) u ||Y||`` to make
      the core ``Q^T Y`` safely positive definite, eigenvalues ``max(sigma^2 - nu, 0)``.
      ``n_steps + 1`` block products; the top-``rank`` eigenvalues (``which`` ignored).
    - ``psd=False``: Rayleigh–Ritz on the block Krylov space ``[Omega, A Omega, ...,
      A^q Omega]`` (``q = n_steps``), ``n_steps + 1`` block products; ``which`` selects
      ``"LM"`` (largest magnitude), ``"LA"`` (largest) or ``"SA"`` (smallest).

    Args:
      a: ``(n, n)`` symmetric array, BCOO matrix or :class:`LinearOperator`.
      rank: eigenpairs wanted (static); ``rank + oversample <= n``.
      key: ``jax.random`` key.
      oversample: extra test vectors (static). None (default): at least 8, rounded
        up so that ``rank + oversample`` is a multiple of 8 (40 columns for rank 32),
        and lowered to fit ``n``.
      n_steps: power / Krylov steps (static); default 5 (6 block products). With the
        Krylov Rayleigh–Ritz and the default block that is 3.7 to 10 times more
        accurate than scikit-learn's ``_randomized_eigsh`` at its defaults (16 block
        products) on a slowly (``1/i``) decaying spectrum and as accurate (float32
        rounding) on a quickly (``exp(-i/8)``) decaying one, 1024 to 4096 rows, rank
        32; 4 steps were 4.8 to 13 times less accurate than scikit-learn on ``1/i``.
        Nyström's power steps converge more slowly there.
      psd: use the Nyström method (``a`` must be positive semidefinite).
      which: ``"LM"``, ``"LA"`` or ``"SA"``.
      tol: optional tolerance on the relative residual ``errors[0]`` (may be traced).
      axis_name: mesh axis the rows of ``a`` are split over, inside ``shard_map``
        (``a`` is the local ``(n / p, n)`` row block; eigenvectors come back
        row-sharded), or None.

    Returns:
      :class:`EighResult` (``n_iters = n_steps``; ``errors`` holds one entry, the
      largest relative Ritz residual ``||A y - theta y|| / ||A||`` with ``||A||``
      estimated by the largest Ritz value in magnitude). ``converged`` is False when
      a value is not finite, when the projected matrix is not symmetric (``a`` is
      not), with ``psd=True`` when ``a`` is visibly indefinite, and when ``tol`` is
      given and not met.

    Raises:
      ValueError: a concrete dense ``a`` that is not symmetric (to rounding).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.linalg import randomized_eigh
      >>> x = jax.random.normal(jax.random.key(0), (100, 30))
      >>> ref = jnp.linalg.eigvalsh(x @ x.T)[::-1][:5]
      >>> res = randomized_eigh(x @ x.T, 5, key=jax.random.key(1), psd=True, n_steps=8)
      >>> bool(jnp.allclose(res.eigenvalues, ref, rtol=1e-4))
      True
      >>> res = randomized_eigh(x @ x.T, 5, key=jax.random.key(1), n_steps=3)
      >>> bool(jnp.allclose(res.eigenvalues, ref, rtol=1e-5))
      True

    References:
      Tropp, Yurtsever, Udell, Cevher, "Fixed-rank approximation of a positive-
      semidefinite matrix from streaming data", NeurIPS 2017. Halko et al. 2011.
    """
    choice(which, "which", ("LM", "LA", "SA"))
    op = V.as_symmetric_operator(a, axis_name)
    check_key(key)
    rank, oversample = V.check_rank(rank, (op.shape[1], op.shape[1]), "a", oversample)
    n_steps = static_int(5 if n_steps is None else n_steps, "n_steps", 0)
    positive(tol, "tol", allow_none=True)
    tol = None if tol is None else jnp.asarray(tol, compute_dtype(op.dtype))
    return _randomized_eigh_impl(
        op, key, tol, rank=rank, oversample=oversample, n_steps=n_steps, psd=bool(psd),
        which=which, axis=axis_name,
    )


@functools.partial(
    jax.jit, static_argnames=("rank", "oversample", "n_steps", "psd", "which", "axis")
)
def _randomized_eigh_impl(op, key, tol, *, rank, oversample, n_steps, psd, which, axis):
    n = op.shape[1]
    l = rank + oversample
    dt = op.dtype
    op, ct = _working_operator(op, axis, symmetric_rows=True)
    q = _orth_q(_local_rows(_gaussian(key, (n, l), ct), axis), None, axis)
    op, y, c = _scaled(op, op.matmat(q), axis)
    if psd:
        lam, vecs, ok, asym = _nystrom(op, q, y, rank, n_steps, axis)
        norm = jnp.max(lam)
        err = _relative_residual(lam, vecs, op.matmat(vecs), norm, axis)
    else:
        n_blocks = min(n_steps, max(n // l - 1, 0))
        qs, ws = [q], [y]
        for _ in range(n_blocks):
            qs.append(_orth_q(ws[-1], jnp.concatenate(qs, axis=1), axis))
            ws.append(op.matmat(qs[-1]))
        ritz = _rayleigh_ritz_sym(
            jnp.concatenate(qs, axis=1), jnp.concatenate(ws, axis=1), rank, which, axis
        )
        lam, vecs, asym, ok = ritz.theta, ritz.y, ritz.asym, jnp.array(True)
        err = _relative_residual(lam, vecs, ritz.ay, ritz.norm, axis)
    lam = lam * c
    ok = ok & _symmetric_enough(asym, ct) & jnp.isfinite(err)
    ok = ok & _all_finite(axis, (vecs,), (lam,))
    if tol is not None:
        ok = ok & (err <= tol)
    return EighResult(
        lam.astype(dt), vecs.astype(dt), jnp.array(n_steps, jnp.int32), ok, err[None].astype(ct)
    )
