"""Row-sharded randomized SVD and subspace iteration (TSQR / Cholesky-QR with psum).

A tall ``(m, n)`` matrix is split by rows over one mesh axis: device ``d`` holds
``A_d`` (``m / p`` rows). Every tall quantity (the range basis ``Q``, ``A Omega``)
is split the same way; every short one (``A^T Q`` with ``n`` rows, Gram and
triangular factors) is replicated. The only communication is

- ``A^T Q = sum_d A_d^T Q_d``: one ``psum`` of an ``(n, L)`` block per product;
- Cholesky-QR: one ``psum`` of the ``(L, L)`` Gram ``Q^T Q = sum_d Q_d^T Q_d`` per pass;
- TSQR (the fallback): one ``all_gather`` of the ``p`` local ``(L, L)`` R factors;
- projections ``K^T Y``: one ``psum`` of a ``(|K|, L)`` block.

The algorithm is the one of :func:`subjax.linalg.randomized_svd` /
:func:`subjax.linalg.subspace_iteration` step for step — same Gaussian sketch for
the same key, same Cholesky-QR2 → shifted Cholesky-QR3 → Householder (here TSQR)
cascade, same Rayleigh–Ritz finish (shared code, ``_svd_from_range``) — so the
result equals the single-device one up to floating-point summation order.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from subjax._core import check_key, compute_dtype, static_int
from subjax.linalg import _validate as V
from subjax.linalg._orth import householder
from subjax.linalg._orth import qr_fast as _qr_replicated
from subjax.linalg._randomized import (
    RandomizedSVDResult,
    SubspaceIterationResult,
    _gaussian,
    _svd_from_range,
)
from subjax.parallel._data import check_axis

__all__ = [
    "sharded_orthonormalize",
    "sharded_randomized_svd",
    "sharded_subspace_iteration",
    "SHARDED_ORTH_METHODS",
]

SHARDED_ORTH_METHODS = ("cholesky_qr2", "shifted_cholesky_qr3", "tsqr", "householder")


class _QR(NamedTuple):
    q: jax.Array
    r: jax.Array
    ok: jax.Array


# ----------------------------------------------------------------------------- per-shard QR
# These run inside shard_map: ``x`` is the local row block, ``axis`` the mesh axis.


def _all(pred_local, axis):
    """Logical AND of a per-shard bool over the axis (a replicated bool)."""
    bad = lax.psum(jnp.where(pred_local, 0, 1).astype(jnp.int32), axis)
    return bad == 0


def _tri_inv(r):
    eye = jnp.eye(r.shape[-1], dtype=r.dtype)
    return jax.scipy.linalg.solve_triangular(r, eye, lower=False)


def _chol_step(x, axis, shift=None):
    g = lax.psum(x.T @ x, axis)  # the (k, k) Gram: the only communication
    if shift is not None:
        g = g + shift * jnp.eye(g.shape[-1], dtype=g.dtype)
    r = jnp.linalg.cholesky(g).T
    return x @ _tri_inv(r), r


def _cholesky_qr2(x, axis) -> _QR:
    q1, r1 = _chol_step(x, axis)
    q, r2 = _chol_step(q1, axis)
    d = jnp.abs(jnp.diagonal(r2))
    ok = jnp.all(jnp.isfinite(r1)) & jnp.all(jnp.isfinite(r2))
    ok = ok & _all(jnp.all(jnp.isfinite(q)), axis)
    ok = ok & (jnp.max(d) <= 1e2 * jnp.min(d))
    return _QR(q, r2 @ r1, ok)


def _shifted_cholesky_qr3(x, axis, m_global: int) -> _QR:
    k = x.shape[-1]
    u = jnp.finfo(x.dtype).eps
    nrm2 = lax.psum(jnp.sum(jnp.square(x)), axis)
    shift = jnp.asarray(11.0 * (m_global * k + k * (k + 1)), x.dtype) * u * nrm2
    q0, r0 = _chol_step(x, axis, shift)
    q, r, ok = _cholesky_qr2(q0, axis)
    return _QR(q, r @ r0, ok)


def _tsqr(x, axis) -> _QR:
    """Tall-skinny QR: local Householder, all-gather of the R factors, QR of the stack.

    ``x = blockdiag(Q_d) [R_1; ...; R_p]`` and ``[R_1; ...; R_p] = Q_2 R``; the sign
    fix ``diag(R) >= 0`` makes ``(Q, R)`` the unique QR factorization, the same as
    the sign-fixed Householder QR of the gathered matrix.
    """
    q1, r1 = jnp.linalg.qr(x, mode="reduced")  # (m_d, c), (c, k), c = min(m_d, k)
    stacked = lax.all_gather(r1, axis, tiled=True)  # (p c, k), replicated
    q2, r = householder(stacked)
    c = r1.shape[0]
    idx = lax.axis_index(axis)
    block = lax.dynamic_slice_in_dim(q2, idx * c, c, axis=0)
    q = q1 @ block
    ok = jnp.all(jnp.isfinite(r))
    return _QR(q, r, ok)


def _qr_cascade(x, axis, m_global: int):
    """Cholesky-QR2, then shifted Cholesky-QR3, then TSQR (as ``linalg.qr_fast``)."""
    first = _cholesky_qr2(x, axis)

    def robust(x):
        second = _shifted_cholesky_qr3(x, axis, m_global)
        return lax.cond(second.ok, lambda x: second.q, lambda x: _tsqr(x, axis).q, x)

    return lax.cond(first.ok, lambda x: first.q, robust, x)


def _orth_shard(x, axis, method: str, m_global: int):
    if method in ("tsqr", "householder"):
        return _tsqr(x, axis).q
    if method == "cholesky_qr2":
        first = _cholesky_qr2(x, axis)
        return lax.cond(first.ok, lambda x: first.q, lambda x: _tsqr(x, axis).q, x)
    if method == "shifted_cholesky_qr3":
        first = _shifted_cholesky_qr3(x, axis, m_global)
        return lax.cond(first.ok, lambda x: first.q, lambda x: _tsqr(x, axis).q, x)
    raise AssertionError(method)


def sharded_orthonormalize(x: jax.Array, axis_name: str, method: str = "cholesky_qr2"):
    r"""Orthonormalize a row-sharded tall matrix; call inside ``shard_map``.

    ``x`` is this device's row block ``X_d`` of ``X = [X_1; ...; X_p]``. Returns
    the matching row block of ``Q`` with ``X = Q R``, ``Q^T Q = I``, ``diag(R) > 0``:

    - ``"cholesky_qr2"``: ``R = chol(sum_d X_d^T X_d)^T``, ``Q_d = X_d R^{-1}``, twice;
      one ``psum`` of a ``(k, k)`` matrix per pass. Falls back to TSQR when the
      Gram matrix is too ill-conditioned (as ``subjax.linalg.orthonormalize``
      falls back to Householder).
    - ``"shifted_cholesky_qr3"``: a shifted first pass (robust to
      ``cond(X) ~ 1/u``), then Cholesky-QR2; TSQR fallback.
    - ``"tsqr"`` (alias ``"householder"``): local Householder QR, ``all_gather`` of
      the ``p`` small R factors, QR of the ``(p k, k)`` stack — unconditionally stable.

    All methods give the unique QR factor, equal (up to rounding) to
    ``subjax.linalg.orthonormalize(X, "householder")`` on the gathered matrix.

    Args:
      x: ``(m_d, k)`` local row block, real floating.
      axis_name: the mesh axis the rows are split over.
      method: one of ``SHARDED_ORTH_METHODS``.

    Returns:
      ``(m_d, k)`` local block of ``Q`` (dtype of ``x``).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> from subjax.parallel import sharded_orthonormalize
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
      >>> x = jax.random.normal(jax.random.key(0), (40, 3))
      >>> q = jax.shard_map(lambda x: sharded_orthonormalize(x, "rows"), mesh=mesh,
      ...                   in_specs=P("rows"), out_specs=P("rows"))(x)
      >>> bool(jnp.allclose(q.T @ q, jnp.eye(3), atol=1e-5))
      True

    References:
      Demmel, Grigori, Hoemmen, Langou, "Communication-optimal parallel and
      sequential QR and LU factorizations", SIAM J. Sci. Comput. 2012 (TSQR).
      Yamamoto et al., "Roundoff error analysis of the CholeskyQR2 algorithm", 2015.
    """
    if method not in SHARDED_ORTH_METHODS:
        raise ValueError(f"`method` must be one of {SHARDED_ORTH_METHODS}, got {method!r}")
    x = jnp.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"`x` must be a (rows, k) block, got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"`x` must have a real floating dtype, got {x.dtype}")
    m_global = x.shape[0] * lax.axis_size(axis_name)
    if x.shape[1] > m_global:
        raise ValueError(f"`x` has k={x.shape[1]} columns > m={m_global} rows in total")
    ct = compute_dtype(x.dtype)
    return _orth_shard(x.astype(ct), axis_name, method, m_global).astype(x.dtype)


# ----------------------------------------------------------------------------- products


def _rmatmat(a_local, y_local, axis):
    """``A^T Y = sum_d A_d^T Y_d`` (replicated ``(n, L)``)."""
    part = lax.dot_general(y_local, a_local, (((0,), (0,)), ((), ()))).T
    return lax.psum(part, axis)


def _proj_out(y, kmat, axis):
    """``y - K (K^T y)`` for row-sharded ``y`` and ``K``."""
    return y - kmat @ lax.psum(kmat.T @ y, axis)


def _all_finite_sharded(axis, local, replicated):
    ok = _all(jnp.all(jnp.isfinite(local)), axis)
    for x in replicated:
        ok = ok & jnp.all(jnp.isfinite(x))
    return ok


# ----------------------------------------------------------------------------- validation


def _check_tall(a, mesh, axis_name, argname="a"):
    n_dev = check_axis(mesh, axis_name)
    if not hasattr(a, "shape") or len(a.shape) != 2:
        raise ValueError(f"`{argname}` must be an (m, n) matrix, got {getattr(a, 'shape', a)}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"`{argname}` must have a real floating dtype, got {a.dtype}")
    m = a.shape[0]
    if m % n_dev:
        raise ValueError(
            f"the {m} rows of `{argname}` are not divisible by the size {n_dev} of mesh axis "
            f"{axis_name!r}; pad `{argname}` with zero rows to a multiple of {n_dev}"
        )
    return n_dev


def _row_sharding(mesh, axis_name):
    return NamedSharding(mesh, P(axis_name))


# ----------------------------------------------------------------------------- randomized SVD


def _rsvd_shard(a, omega, *, axis, rank, l, n_steps, method, m_global):
    def qr(x):
        return _qr_cascade(x, axis, m_global)

    y = a @ omega
    if method == "block_krylov":
        qs = [qr(y)]
        ws = []
        for _ in range(n_steps):
            w = _rmatmat(a, qs[-1], axis)
            ws.append(w)
            y = a @ _qr_replicated(w)
            kmat = jnp.concatenate(qs, axis=1)
            q = qr(_proj_out(y, kmat, axis))
            q = qr(_proj_out(q, kmat, axis))
            qs.append(q)
        ws.append(_rmatmat(a, qs[-1], axis))
        kmat, w = jnp.concatenate(qs, axis=1), jnp.concatenate(ws, axis=1)
    else:
        kmat = qr(y)
        for _ in range(n_steps):
            kmat = qr(a @ _qr_replicated(_rmatmat(a, kmat, axis)))
        w = _rmatmat(a, kmat, axis)
    u, s, vt = _svd_from_range(kmat, w, rank, l)
    ok = _all_finite_sharded(axis, u, (s, vt))
    return u, s, vt, ok


def sharded_randomized_svd(
    a: jax.Array,
    rank: int,
    *,
    key: jax.Array,
    mesh: Mesh,
    axis_name: str = "data",
    oversample: int = 10,
    n_steps: int = 4,
    method: str = "block_krylov",
) -> RandomizedSVDResult:
    r"""Randomized SVD of a tall matrix whose rows are split over a mesh axis.

    Same algorithm, arguments and result as :func:`subjax.linalg.randomized_svd`
    (same ``key`` → same Gaussian sketch ``Omega``, ``(n, rank + oversample)``,
    replicated), with the tall products run where the rows live:
    ``Y_d = A_d Omega`` locally, ``A^T Q = psum_d A_d^T Q_d``, and every
    orthonormalization of a tall block by Cholesky-QR2 with a ``psum`` of the
    small Gram matrix (shifted Cholesky-QR3 / TSQR fallback). Per device: memory
    ``O(m n / p + n L)``; communication per block product ``O(n L)`` words and
    per orthonormalization ``O(L^2)``, independent of ``m``.

    Args:
      a: ``(m, n)`` matrix, ``m`` divisible by ``mesh.shape[axis_name]``; placed with
        rows sharded over ``axis_name`` if it is not already.
      rank: singular triplets wanted (static).
      key: ``jax.random`` key.
      mesh: the device mesh.
      axis_name: mesh axis the rows are split over.
      oversample: extra sketch columns (static).
      n_steps: power / Krylov steps (static).
      method: ``"block_krylov"`` or ``"subspace"`` (as in ``randomized_svd``).

    Returns:
      ``RandomizedSVDResult(u, s, vt, converged)``; ``u`` (``(m, rank)``) is
      row-sharded like ``a``, ``s`` and ``vt`` are replicated.

    Raises:
      ValueError: ``axis_name`` not in ``mesh``, rows not divisible by the axis
        size, ``rank + oversample > min(m, n)``, unknown ``method``.

    Example:
      >>> import jax, numpy as np, jax.numpy as jnp
      >>> from jax.sharding import Mesh
      >>> from subjax.linalg import randomized_svd
      >>> from subjax.parallel import sharded_randomized_svd
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
      >>> a = jax.random.normal(jax.random.key(0), (64, 20))
      >>> res = sharded_randomized_svd(a, 4, key=jax.random.key(1), mesh=mesh,
      ...                              axis_name="rows", oversample=4)
      >>> ref = randomized_svd(a, 4, key=jax.random.key(1), oversample=4)
      >>> bool(jnp.allclose(res.s, ref.s, rtol=1e-5))
      True

    References:
      Halko, Martinsson, Tropp, "Finding structure with randomness", SIAM Review 2011.
      Demmel et al., "Communication-optimal parallel and sequential QR and LU
      factorizations", 2012. Musco, Musco, "Randomized block Krylov methods", 2015.
    """
    if method not in ("block_krylov", "subspace"):
        raise ValueError(f"`method` must be 'block_krylov' or 'subspace', got {method!r}")
    _check_tall(a, mesh, axis_name)
    check_key(key)
    op_shape = a.shape
    rank, oversample = V.check_rank(rank, _Shape(op_shape), "a", oversample)
    n_steps = static_int(n_steps, "n_steps", 0)
    m, n = op_shape
    l = rank + oversample
    dt = jnp.dtype(a.dtype)
    ct = compute_dtype(dt)
    n_blocks = n_steps
    if method == "block_krylov":
        n_blocks = min(n_steps, max(min(m, n) // l - 1, 0))
    return _rsvd_jit(a, key, mesh, axis_name, rank, l, n_blocks, method, ct, dt)


class _Shape:
    """Minimal stand-in with ``.shape`` for linalg's rank check."""

    def __init__(self, shape):
        self.shape = tuple(shape)


def _rsvd_impl(a, key, mesh, axis_name, rank, l, n_blocks, method, ct, dt):
    m, n = a.shape
    omega = _gaussian(key, (n, l), ct)
    body = jax.shard_map(
        lambda a, omega: _rsvd_shard(
            a.astype(ct), omega, axis=axis_name, rank=rank, l=l, n_steps=n_blocks,
            method=method, m_global=m,
        ),
        mesh=mesh,
        in_specs=(P(axis_name), P()),
        out_specs=(P(axis_name), P(), P(), P()),
    )
    u, s, vt, ok = body(jax.lax.with_sharding_constraint(a, _row_sharding(mesh, axis_name)),
                        omega)
    return RandomizedSVDResult(u.astype(dt), s.astype(dt), vt.astype(dt), ok)


_rsvd_jit = jax.jit(_rsvd_impl, static_argnums=(2, 3, 4, 5, 6, 7, 8, 9))


# ----------------------------------------------------------------------------- subspace iteration


def _subspace_shard(a, q0, tol_arr, *, axis, max_iters, orth_method, use_tol, m_global, k):
    ct = q0.dtype

    def orth_tall(x):
        return _orth_shard(x, axis, orth_method, m_global)

    def orth_short(x):  # replicated (n, k): plain single-device orthonormalization
        from subjax.linalg._orth import orthonormalize

        return orthonormalize(x, "householder" if orth_method == "tsqr" else orth_method)

    def step(q):
        z = orth_short(_rmatmat(a, q, axis))
        return orth_tall(a @ z)

    def change(q_old, q_new):
        r = _proj_out(q_new, q_old, axis)
        return jnp.sqrt(lax.psum(jnp.sum(jnp.square(r)), axis) / k)

    q = orth_tall(q0)
    errors0 = -jnp.ones((max_iters,), ct)

    def cond(carry):
        i, _, err, _ = carry
        keep = i < max_iters
        if use_tol:
            keep = keep & ~(err <= tol_arr)
        return keep

    def body(carry):
        i, q, _, errors = carry
        q_new = step(q)
        err = change(q, q_new)
        return i + 1, q_new, err, errors.at[i].set(err)

    init = (jnp.array(0, jnp.int32), q, jnp.array(jnp.inf, ct), errors0)
    n_iters, q, err, errors = lax.while_loop(cond, body, init)
    w = _rmatmat(a, q, axis)
    u, s, vt = _svd_from_range(q, w, k, k)
    finite = _all_finite_sharded(axis, u, (s, vt))
    converged = finite & (err <= tol_arr) if use_tol else finite
    return u, s, vt, n_iters, converged, errors


def sharded_subspace_iteration(
    a: jax.Array,
    q0: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    max_iters: int = 10,
    tol: float | jax.Array | None = None,
    orth_method: str = "cholesky_qr2",
) -> SubspaceIterationResult:
    r"""Block power iteration on a row-sharded tall matrix (warm-startable).

    Same iteration and result as :func:`subjax.linalg.subspace_iteration`:
    ``Q_{t+1} = orth(A orth(A^T Q_t))`` until ``max_iters`` steps or the subspace change
    ``||sin Theta(Q_t, Q_{t+1})||_F / sqrt(k) <= tol``, then Rayleigh–Ritz. Here
    ``A`` and ``Q`` (``(m, k)``) are split by rows over ``axis_name``; ``A^T Q`` is a
    ``psum`` of local products, the tall orthonormalization is Cholesky-QR2 with a
    ``psum`` of the ``(k, k)`` Gram (or TSQR), the short one (``(n, k)``, replicated)
    is done redundantly on every device.

    Args:
      a: ``(m, n)`` matrix, ``m`` divisible by the axis size.
      q0: ``(m, k)`` starting basis (sharded like ``a``'s rows).
      mesh, axis_name: where the rows live.
      max_iters: iteration cap (static).
      tol: optional tolerance on the subspace change (may be traced).
      orth_method: ``"cholesky_qr2"``, ``"shifted_cholesky_qr3"`` or ``"tsqr"``.

    Returns:
      ``SubspaceIterationResult(u, s, vt, n_iters, converged, errors)``; ``u`` is
      row-sharded.

    Raises:
      ValueError: ``axis_name`` not in ``mesh``; rows not divisible; ``q0`` of the
        wrong shape; unknown ``orth_method``.

    Example:
      >>> import jax, numpy as np, jax.numpy as jnp
      >>> from jax.sharding import Mesh
      >>> from subjax.parallel import sharded_subspace_iteration
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
      >>> u, _ = jnp.linalg.qr(jax.random.normal(jax.random.key(0), (40, 40)))
      >>> a = (u * 0.5 ** jnp.arange(40.0)) @ u.T
      >>> res = sharded_subspace_iteration(a, jax.random.normal(jax.random.key(1), (40, 2)),
      ...                                  mesh=mesh, axis_name="rows", max_iters=40, tol=1e-5)
      >>> [round(float(x), 3) for x in res.s]
      [1.0, 0.5]

    References:
      Rutishauser, "Simultaneous iteration method for symmetric matrices", 1970.
      Demmel et al., "Communication-optimal parallel and sequential QR and LU
      factorizations", 2012.
    """
    if orth_method not in ("cholesky_qr2", "shifted_cholesky_qr3", "tsqr"):
        raise ValueError(
            "`orth_method` must be 'cholesky_qr2', 'shifted_cholesky_qr3' or 'tsqr', "
            f"got {orth_method!r}"
        )
    _check_tall(a, mesh, axis_name)
    m, n = a.shape
    q0 = V.check_basis(q0, m, "q0", max_cols=min(m, n))
    max_iters = static_int(max_iters, "max_iters", 1)
    dt = jnp.dtype(a.dtype)
    ct = compute_dtype(dt)
    use_tol = tol is not None
    tol_arr = jnp.asarray(tol if use_tol else 0.0, ct)
    return _subspace_jit(a, q0, tol_arr, mesh, axis_name, max_iters, orth_method, use_tol, ct, dt)


def _subspace_impl(a, q0, tol_arr, mesh, axis_name, max_iters, orth_method, use_tol, ct, dt):
    m = a.shape[0]
    k = q0.shape[1]
    body = jax.shard_map(
        lambda a, q0, tol_arr: _subspace_shard(
            a.astype(ct), q0.astype(ct), tol_arr, axis=axis_name, max_iters=max_iters,
            orth_method=orth_method, use_tol=use_tol, m_global=m, k=k,
        ),
        mesh=mesh,
        in_specs=(P(axis_name), P(axis_name), P()),
        out_specs=(P(axis_name), P(), P(), P(), P(), P()),
    )
    rows = _row_sharding(mesh, axis_name)
    u, s, vt, n_iters, converged, errors = body(
        jax.lax.with_sharding_constraint(a, rows), jax.lax.with_sharding_constraint(q0, rows),
        tol_arr,
    )
    return SubspaceIterationResult(
        u.astype(dt), s.astype(dt), vt.astype(dt), n_iters, converged, errors
    )


_subspace_jit = jax.jit(_subspace_impl, static_argnums=(3, 4, 5, 6, 7, 8, 9))
