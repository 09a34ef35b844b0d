"""Orthonormalization of tall matrices: Householder QR, Cholesky-QR2, polar factors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import (
    bound_axis_size,
    check_finite_if_concrete,
    choice,
    compute_dtype,
    floating_array,
    static_int,
)

__all__ = ["orthonormalize", "ORTH_METHODS"]

ORTH_METHODS = ("householder", "cholesky_qr2", "shifted_cholesky_qr3", "polar_eigh", "polar_ns")


def _mT(x):  # noqa: N802
    return jnp.swapaxes(x, -1, -2)


def psum(x, axis):
    """``lax.psum(x, axis)``, or ``x`` when ``axis`` is None (one device)."""
    return x if axis is None else lax.psum(x, axis)


def _gram(x, axis=None):
    """``x^T x`` of the whole (possibly row-sharded) matrix."""
    return psum(_mT(x) @ x, axis)


def _eps(dtype):
    return jnp.finfo(dtype).eps


def _tri_inv(r):
    """Inverse of an upper-triangular ``(k, k)`` matrix (tiny; makes ``x @ inv`` a GEMM).

    Computed as ``(L^{-1})^T`` with ``L = r^T`` by a left-side lower solve: on CPU
    that LAPACK ``trsm`` variant stays single-threaded for small sizes, while the
    right-side / upper variants spin up OpenBLAS threads and can take milliseconds
    on a loaded machine.
    """
    eye = jnp.eye(r.shape[-1], dtype=r.dtype)
    linv = lax.linalg.triangular_solve(_mT(r), eye, left_side=True, lower=True)
    return _mT(linv)


def _sign_fix(q, r):
    d = jnp.diagonal(r, axis1=-2, axis2=-1)
    sgn = jnp.where(d < 0, -jnp.ones_like(d), jnp.ones_like(d))
    return q * sgn[..., None, :], r * sgn[..., :, None]


def householder(x, axis=None):
    """Sign-fixed QR ``x = q r`` with ``diag(r) >= 0``: Householder, or TSQR over ``axis``."""
    if axis is not None:
        return _tsqr(x, axis)
    return _sign_fix(*jnp.linalg.qr(x, mode="reduced"))


def _tsqr(x, axis):
    """Tall-skinny QR of a row-sharded ``x`` (Demmel et al. 2012), sign-fixed.

    Each device factors its block, ``x_d = q_d r_d`` (``r_d`` padded to ``(k, k)``);
    then, for a power-of-two axis, a butterfly tree: at level ``j`` device ``d``
    swaps its ``r`` with device ``d xor 2^j`` (``ppermute``), both factor the same
    stacked ``(2k, k)`` pair and keep their half of its ``Q``. After ``log2 p``
    levels every device holds the same ``R`` and ``q_d`` times the kept halves is
    its block of ``Q``. Other axis sizes gather the ``p`` small factors instead.
    """
    k = x.shape[-1]
    q, r = jnp.linalg.qr(x, mode="reduced")
    if r.shape[0] < k:  # fewer local rows than columns
        pad = k - r.shape[0]
        q = jnp.pad(q, ((0, 0), (0, pad)))
        r = jnp.pad(r, ((0, pad), (0, 0)))
    p = lax.axis_size(axis)
    idx = lax.axis_index(axis)
    if p & (p - 1):
        stacked = lax.all_gather(r, axis, tiled=True)  # (p k, k)
        q2, r = jnp.linalg.qr(stacked, mode="reduced")
        q = q @ lax.dynamic_slice_in_dim(q2, idx * k, k, axis=0)
        return _sign_fix(q, lax.pmax(r, axis))  # equal everywhere; pmax types it replicated
    level = 1
    while level < p:
        other = lax.ppermute(r, axis, [(i, i ^ level) for i in range(p)])
        low = (idx & level) == 0
        top, bottom = jnp.where(low, r, other), jnp.where(low, other, r)
        q2, r = jnp.linalg.qr(jnp.concatenate([top, bottom], axis=0), mode="reduced")
        q = q @ jnp.where(low, q2[:k], q2[k:])
        level *= 2
    # Every device now holds the same R (the same QRs of the same pairs); pmax makes
    # that visible to shard_map's replication typing without changing a bit.
    return _sign_fix(q, lax.pmax(r, axis))


def _chol_step(x, shift=None, axis=None):
    g = _gram(x, axis)
    if shift is not None:
        g = g + shift * jnp.eye(g.shape[-1], dtype=g.dtype)
    r = _mT(jnp.linalg.cholesky(g))  # upper
    return x @ _tri_inv(r), r


def _all_devices(pred, axis):
    """``pred`` on every device of ``axis`` (a replicated bool)."""
    if axis is None:
        return pred
    return lax.psum(jnp.where(pred, 0, 1).astype(jnp.int32), axis) == 0


def cholesky_qr2(x, axis=None):
    """CholeskyQR2 (Yamamoto et al. 2015). Returns ``(q, r, ok)``.

    Two Cholesky passes; stable for ``cond(x) <~ u^{-1/2}``. ``ok`` is False when
    a Cholesky factor is not finite or the second pass reveals that the first
    one lost orthogonality badly (``cond(q1) > 1e2``), i.e. the caller should
    fall back to a more robust method. Over ``axis`` the Gram matrices are psum'd.
    """
    q1, r1 = _chol_step(x, axis=axis)
    q, r2 = _chol_step(q1, axis=axis)
    d = jnp.abs(jnp.diagonal(r2, axis1=-2, axis2=-1))
    ok = jnp.all(jnp.isfinite(r1)) & jnp.all(jnp.isfinite(r2))
    ok = ok & _all_devices(jnp.all(jnp.isfinite(q)), axis)
    ok = ok & (jnp.max(d) <= 1e2 * jnp.min(d))
    return q, r2 @ r1, ok


def _rows(x, axis):
    """Total number of rows of a (possibly row-sharded) ``x``."""
    return x.shape[-2] * (1 if axis is None else lax.axis_size(axis))


def shifted_cholesky_qr3(x, axis=None):
    """Shifted CholeskyQR3 (Fukaya, Kannan, Nakatsukasa, Yamamoto, Yanagisawa 2020).

    A shifted first pass ``chol(x^T x + s I)`` with ``s = 11 (m k + k (k + 1)) u
    ||x||_F^2`` always succeeds for ``cond(x) <~ u^{-1}`` and leaves a factor with
    ``cond <~ u^{-1/2}``, which CholeskyQR2 then finishes. Returns ``(q, r, ok)``.
    """
    m, k = _rows(x, axis), x.shape[-1]
    u = _eps(x.dtype)
    nrm2 = psum(jnp.sum(jnp.square(x)), axis)
    nrm2 = jnp.maximum(nrm2, jnp.finfo(x.dtype).tiny)
    shift = jnp.asarray(11.0 * (m * k + k * (k + 1)), x.dtype) * u * nrm2
    q0, r0 = _chol_step(x, shift, axis)
    q, r, ok = cholesky_qr2(q0, axis)
    return q, r @ r0, ok


def _with_fallback(x, fast, axis=None):
    q, r, ok = fast(x, axis)
    return lax.cond(ok, lambda x: (q, r), lambda x: householder(x, axis), x)


def polar_eigh(x, axis=None):
    """Polar factor ``x (x^T x)^{-1/2}`` from the eigendecomposition of the Gram matrix.

    Done twice (the second pass on an almost orthonormal matrix restores
    orthogonality lost to the squared condition number). Directions with a
    Gram eigenvalue below ``k u ||x||^2`` are treated as null and get zero weight,
    so a rank-deficient ``x`` gives a finite (partial) isometry.
    """

    def once(y):
        w, v = jnp.linalg.eigh(_gram(y, axis))
        floor = jnp.max(w) * _eps(y.dtype) * y.shape[-1]
        inv_sqrt = jnp.where(w > floor, lax.rsqrt(jnp.maximum(w, floor)), jnp.zeros_like(w))
        return y @ ((v * inv_sqrt[None, :]) @ v.T)

    return once(once(x))


def polar_newton_schulz(x, steps: int = 40, axis=None):
    """Polar factor by the cubic Newton–Schulz iteration run on the small Gram matrix.

    With ``y = x z``, ``y^T y = z^T g z`` (``g = x^T x``), so the iteration
    ``y <- y (3 I - y^T y) / 2`` becomes ``z <- z (3 I - z^T g z) / 2`` on ``(k, k)``
    matrices; ``x`` is touched twice (Gram and final product), then two steps on the
    ``(m, k)`` result remove the rounding amplified by ``cond(g)``. Starts from
    ``x / ||x||_F`` (inside the convergence region ``||y||_2 < sqrt 3``); small
    singular values grow by 1.5x per step, so ``steps ~ log_{1.5}(||x||_F /
    sigma_min) + 5`` are needed.
    """
    g = _gram(x, axis)
    k = g.shape[-1]
    eye = jnp.eye(k, dtype=x.dtype)
    nrm2 = jnp.trace(g)
    z0 = eye * lax.rsqrt(jnp.maximum(nrm2, jnp.finfo(x.dtype).tiny))

    def body(_, z):
        m = z.T @ g @ z
        return z @ (jnp.asarray(1.5, x.dtype) * eye - jnp.asarray(0.5, x.dtype) * m)

    z = lax.fori_loop(0, steps, body, z0)
    y = x @ z
    # Rounding in z^T g z is amplified by cond(g); two steps on y itself clean it up.
    for _ in range(2):
        y = y @ (jnp.asarray(1.5, x.dtype) * eye - jnp.asarray(0.5, x.dtype) * _gram(y, axis))
    return y


def _orth_single(x, method, ns_steps, axis=None):
    if method == "householder":
        return householder(x, axis)[0]
    if method == "cholesky_qr2":
        return _with_fallback(x, cholesky_qr2, axis)[0]
    if method == "shifted_cholesky_qr3":
        return _with_fallback(x, shifted_cholesky_qr3, axis)[0]
    if method == "polar_eigh":
        return polar_eigh(x, axis)
    if method == "polar_ns":
        return polar_newton_schulz(x, ns_steps, axis)
    raise AssertionError(method)


def orthonormalize(
    x: jax.Array,
    method: str = "householder",
    *,
    ns_steps: int = 40,
    axis_name: str | None = None,
) -> jax.Array:
    r"""Orthonormal basis of the column space of ``x`` (batched over leading dims).

    For ``x`` of shape ``(..., m, k)`` with ``m >= k`` returns ``q`` of the same
    shape with ``q^T q = I_k`` and ``span(q) = span(x)`` (for full column rank):

    - ``"householder"``: Householder QR with the sign fix ``diag(r) >= 0``, so the
      result is the unique QR factor (deterministic across methods and backends).
    - ``"cholesky_qr2"``: ``r = chol(x^T x)``, ``q = x r^{-1}``, twice. Only GEMMs on
      ``x``; several times faster than Householder on CPU; equal to the sign-fixed
      Householder factor in exact arithmetic. Falls back to Householder (via
      ``lax.cond``) when the Gram matrix is too ill-conditioned.
    - ``"shifted_cholesky_qr3"``: a shifted first Cholesky pass makes it robust up to
      ``cond(x) ~ 1/u``; still GEMM-only; Householder fallback.
    - ``"polar_eigh"``: the polar factor ``x (x^T x)^{-1/2}`` (the orthonormal matrix
      closest to ``x``) via ``eigh`` of the ``(k, k)`` Gram matrix.
    - ``"polar_ns"``: the same polar factor by ``ns_steps`` Newton–Schulz steps (GEMM
      only; accuracy depends on ``cond(x)`` and ``ns_steps``).

    QR-type methods return the same ``q`` (up to rounding); polar methods return a
    different basis of the same span.

    With ``axis_name`` (inside ``jax.shard_map``), ``x`` is this device's row block
    of a matrix split by rows over that mesh axis and the result is the matching
    block of ``q``: every Gram matrix is a ``psum`` of ``(k, k)`` local Grams, and
    Householder QR becomes TSQR (local QR, then a butterfly reduction of the small
    ``R`` factors). The result equals the single-device one up to rounding.

    Computation runs in at least float32 and is cast back to ``x.dtype``. A concrete
    ``x`` with NaN / inf entries is an error; under ``jit`` (no check possible) such
    an ``x`` gives a non-finite ``q``, so test ``jnp.isfinite`` on the result there.

    Args:
      x: ``(..., m, k)`` floating array, ``m >= k``.
      method: one of ``ORTH_METHODS``.
      ns_steps: Newton–Schulz steps for ``"polar_ns"``.
      axis_name: mesh axis the rows of ``x`` are split over (``x`` then 2-D), or None.

    Returns:
      ``q`` with the shape and dtype of ``x``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.linalg import orthonormalize
      >>> x = jax.random.normal(jax.random.key(0), (100, 5))
      >>> q = orthonormalize(x, method="cholesky_qr2")
      >>> bool(jnp.allclose(q.T @ q, jnp.eye(5), atol=1e-5))
      True

    References:
      Yamamoto, Nakatsukasa, Yanagisawa, Fukaya, "Roundoff error analysis of the
      CholeskyQR2 algorithm", 2015. Fukaya, Kannan, Nakatsukasa, Yamamoto,
      Yanagisawa, "Shifted Cholesky QR for computing the QR factorization of
      ill-conditioned matrices", 2020. Higham, "Functions of Matrices", 2008 (ch. 8).
    """
    choice(method, "method", ORTH_METHODS)
    x = floating_array(x, "x")
    if x.ndim < 2:
        raise ValueError(f"`x` must have shape (..., m, k), got {x.shape}")
    check_finite_if_concrete(x, "x")
    ns_steps = static_int(ns_steps, "ns_steps", 1)
    m, k = x.shape[-2:]
    if axis_name is not None:
        m = m * bound_axis_size(axis_name)
        if x.ndim != 2:
            raise ValueError(f"`x` must be a 2-D row block with `axis_name`, got shape {x.shape}")
    if k > m:
        raise ValueError(f"`x` has k={k} columns > m={m} rows; cannot orthonormalize")
    if k == 0:
        return x
    return _orthonormalize_impl(x, method=method, ns_steps=ns_steps, axis=axis_name)


@functools.partial(jax.jit, static_argnames=("method", "ns_steps", "axis"))
def _orthonormalize_impl(x, *, method, ns_steps, axis):
    m, k = x.shape[-2:]
    ct = compute_dtype(x.dtype)
    xc = x.astype(ct)
    f = functools.partial(_orth_single, method=method, ns_steps=ns_steps, axis=axis)
    batch = x.shape[:-2]
    if batch:
        flat = xc.reshape((-1, m, k))
        q = jax.vmap(f)(flat).reshape(x.shape)
    else:
        q = f(xc)
    return q.astype(x.dtype)


def _colmax(y, axis):
    """Per-column ``max |y|`` over all rows (1 for a zero column): a scale that cannot overflow."""
    d = jnp.max(jnp.abs(y), axis=0)
    if axis is not None:
        d = lax.pmax(d, axis)
    return jnp.where(d > 0, d, jnp.ones_like(d))


def _cqr_pass(y, kmat, big_shift: bool, axis=None):
    """One (projected, possibly shifted) Cholesky-QR pass: ``y <- (y - K K^T y) R^{-1}``.

    ``R^T R = y^T y + s I``. The columns are scaled to unit max-norm before the
    Gram matrix is formed, so neither its squares nor the shifts depend on the
    scale of ``y`` (no overflow at ``1e30``, no absolute floor at ``1e-30``). The
    big shift ``s = 11 (m l + l (l + 1)) u ||y||_F^2`` (Fukaya et al. 2020) makes
    the Cholesky succeed for any ``cond(y) <~ 1/u``; otherwise a tiny floor guards
    exact zeros.
    """
    if kmat is not None:
        y = y - kmat @ psum(kmat.T @ y, axis)
    l = y.shape[-1]
    d = _colmax(y, axis)
    ys = y / d[None, :]
    g = _gram(ys, axis)
    floor = jnp.finfo(y.dtype).tiny ** 0.5
    if big_shift:
        m = _rows(y, axis)
        shift = jnp.asarray(11.0 * (m * l + l * (l + 1)), y.dtype) * _eps(y.dtype) * jnp.trace(g)
        shift = jnp.maximum(shift, floor)
    else:
        shift = floor
    r = _mT(jnp.linalg.cholesky(g + shift * jnp.eye(l, dtype=g.dtype)))
    return ys @ _tri_inv(r), r * d[None, :]


def _passes(y, kmat, shifts, axis=None):
    q, r = y, None
    for big in shifts:
        q, ri = _cqr_pass(q, kmat, big, axis)
        r = ri if r is None else ri @ r
    d = jnp.diagonal(ri)
    ok = jnp.all(jnp.isfinite(r)) & jnp.all(jnp.abs(d - 1) < 0.1)
    return q, r, ok & _all_devices(jnp.all(jnp.isfinite(q)), axis)


def orth_robust(y, kmat=None, axis=None):
    """Orthonormalization for the randomized solvers (internal).

    Fast path: CholeskyQR2 with block classical Gram–Schmidt against the
    orthonormal ``kmat`` folded into both passes — GEMMs and ``(l, l)`` Cholesky
    factors only. Accepted when finite and the second pass was a near-identity
    correction (``|diag(R_2) - 1| < 0.1``): then the first pass left ``q``
    well-conditioned and the second projection removed whatever the first
    normalisation amplified in ``span(kmat)``. With ``kmat``, a failed check is first
    met by one more projected pass on the two-pass ``q`` (accepted under the same
    test): a block whose part outside ``span(kmat)`` is at rounding level — an
    exhausted direction of a quickly decaying spectrum in a Krylov basis — leaves
    ``span(kmat)`` components of that same size after the second projection, which a
    third removes ("twice is enough" once more). Otherwise (``cond(y) >~ u^{-1/2}``,
    or a projected block that nearly vanished) a ``lax.cond`` runs shifted
    CholeskyQR3 (Fukaya et al. 2020), projecting in every pass, and if even that
    fails (exact rank deficiency: fewer non-zero rows than ``l``, an exhausted
    Krylov space) Householder QR (TSQR over ``axis``) of ``[kmat, y]``, whose
    trailing columns are orthogonal to ``kmat`` whatever ``y`` is. Returns
    ``(q, r)`` with ``y - K K^T y ~= q r``. With ``axis``, ``y`` and ``kmat`` are
    row blocks of matrices split over that mesh axis; ``r`` is replicated.
    """
    q, r, ok = _passes(y, kmat, (False, False), axis)

    def householder_fallback(y):
        if kmat is None:
            return householder(y, axis)
        big_l = kmat.shape[1]
        qh, rh = householder(jnp.concatenate([kmat, y], axis=1), axis)
        return qh[:, big_l:], rh[big_l:, big_l:]

    def shifted(y):
        q3, r3, ok3 = _passes(y, kmat, (True, False, False), axis)
        return lax.cond(ok3, lambda y: (q3, r3), householder_fallback, y)

    if kmat is None:
        return lax.cond(ok, lambda y: (q, r), shifted, y)

    def once_more(y):
        q3, r3, ok3 = _passes(q, kmat, (False,), axis)
        return lax.cond(ok3, lambda y: (q3, r3 @ r), shifted, y)

    return lax.cond(ok, lambda y: (q, r), once_more, y)
