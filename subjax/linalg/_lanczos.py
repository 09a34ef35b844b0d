"""Thick-restarted block Lanczos with full reorthogonalization."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from subjax._core import (
    all_finite,
    bound_axis_size,
    check_key,
    choice,
    compute_dtype,
    fixed_point_loop,
    full_precision,
    positive,
    scalar,
    static_int,
)
from subjax.linalg import _validate as V
from subjax.linalg._cg import cg
from subjax.linalg._operator import LinearOperator
from subjax.linalg._orth import orth_robust, psum
from subjax.linalg._randomized import (
    EighResult,
    _all_finite,
    _local_rows,
    _relative_residual,
    _scaled,
    _select,
    _symmetric_enough,
    _working_operator,
)

__all__ = ["lanczos_eigh"]


def lanczos_eigh(
    a,
    rank: int,
    *,
    key: jax.Array | None = None,
    v0: jax.Array | None = None,
    block_size: int = 1,
    basis_size: int | None = None,
    max_restarts: int = 100,
    tol: float | jax.Array = 1e-5,
    which: str = "LA",
    sigma: float | None = None,
    solve: Callable | None = None,
    axis_name: str | None = None,
) -> EighResult:
    r"""A few extreme eigenpairs of a symmetric matrix by thick-restarted (block) Lanczos.

    Krylov–Schur form of thick restart (Stewart 2001; Wu & Simon 2000), in one
    jitted loop. A cycle extends the basis ``V`` (``m = basis_size`` vectors, rows
    of an ``(m + b, n)`` array) by block Lanczos steps of ``b = block_size``
    vectors: from each new ``A q_j`` the terms the recurrence predicts are
    subtracted, then one classical Gram–Schmidt pass against the whole basis
    (matrix-vector products for ``b = 1``) removes what rounding left, a second
    one only when the first cancelled more than ``1 - 1/sqrt(2)`` of the norm
    (the DGKS test), and the coefficients fill ``T = V^T A V``. Rayleigh–Ritz on
    ``T`` (``m x m``) gives the Ritz pairs and, from the last block's coupling,
    every residual norm ``||A y_i - theta_i y_i||`` without a product with ``A``. The restart keeps
    the ``keep`` wanted Ritz vectors (about halfway between ``rank`` and ``m``)
    and the residual block, so ``A V = V T + q L E^T`` holds again with ``T``
    diagonal plus the coupling row; Ritz pairs whose residual already meets the
    tolerance are locked (their coupling, below ``tol * ||A||``, is dropped, so
    they no longer move). A cycle then costs ``m - keep`` products with ``A``.
    Stops when the ``rank`` wanted residuals are ``<= tol * ||A||``, ``||A||``
    estimated by the largest Ritz value in magnitude seen so far (scale-invariant,
    meaningful for eigenvalues near zero); ``converged`` is then decided by the
    true residuals of the returned pairs (one block product), and is False when a
    value is not finite or ``A`` showed itself not symmetric (the computed
    ``(A q_{j+1}) . q_j`` differs from the recurrence's ``L_j``); a concrete dense
    ``a`` that is not symmetric is an error.

    Args:
      a: ``(n, n)`` symmetric array, BCOO matrix or :class:`LinearOperator`.
      rank: eigenpairs wanted (static).
      key: ``jax.random`` key for the random start (or give ``v0``).
      v0: optional ``(n, block_size)`` start block (warm start).
      block_size: vectors per Lanczos step (static, default 1: fewest products
        with ``A``; a block helps when ``A`` times a block costs about as much as
        ``A`` times a vector, or for clustered eigenvalues).
      basis_size: Krylov basis size ``m`` (static, a multiple of ``block_size``,
        ``m + 2 block_size <= n``); default ``max(2 rank + b, 30, rank + 4 b)``
        rounded up to a multiple of ``b`` (clamped to ``n - 2 b``). A larger basis
        needs fewer products with ``A`` (ARPACK's default is
        ``max(2 rank + 1, 20)``; 30 made up to a quarter fewer products on the benchmark
        matrices) at a reorthogonalisation cost that grows like ``m``.
      max_restarts: cycle cap (static, the first cycle included); size of ``errors``.
      tol: relative residual tolerance (may be traced).
      which: ``"LA"`` largest algebraic, ``"SA"`` smallest, ``"LM"`` largest magnitude.
      sigma, solve: shift-and-invert. ``solve(x)`` returns ``(A - sigma I)^{-1} x``
        for ``x`` of shape ``(n,)`` (a factorization or an inner solver of the
        user's choice); Lanczos then runs on that operator and returns the ``rank``
        eigenvalues of ``a`` nearest ``sigma``, ``lambda = sigma + 1 / theta``,
        ordered by distance to ``sigma`` (``which`` must be ``"LM"``). ``errors``
        and ``tol`` then refer to the inverted operator.
      axis_name: mesh axis the rows are split over, inside ``shard_map``. Every
        basis vector is then row-sharded like ``A`` (this device holds its ``n_d``
        rows of each), every inner product and norm over the ``n`` rows is a
        ``psum`` (Gram–Schmidt coefficients, norms, the block Cholesky Gram, the
        scale estimate, the true residuals; the robust block normalisation falls
        back to TSQR), and the ``m x m`` Rayleigh–Ritz work is repeated, identical,
        on every device. An array / operator ``a`` is this device's ``(n_d, n)`` row
        block (the input of each product is gathered); ``a`` may also be a
        callable mapping this device's ``(n_d,)`` block of ``x`` to that of
        ``A x`` (doing its own communication), which then needs ``v0`` and
        computes in ``v0``'s dtype; ``solve`` likewise maps local blocks to local
        blocks. ``v0`` is the local ``(n_d, block_size)`` block; the random start
        from ``key`` is the single-device one's rows, so a sharded run repeats the
        single-device one up to summation order. ``eigenvectors`` come back as the
        local ``(n_d, rank)`` rows, the rest replicated. A dense ``a`` is not
        checked for symmetry here (an asymmetric one shows in ``converged``), and
        the sharded run is forward-only (a derivative raises ``TypeError``).

    Returns:
      :class:`EighResult` with ``errors[c]`` the largest relative residual after
      cycle ``c`` (padded with -1; the last one is the true residual of the
      returned pairs), ``n_iters`` cycles run, ``converged``.

    Differentiation:
      Eigenvalues and eigenvectors are differentiable with respect to the arrays
      of ``a`` (a dense matrix, BCOO values, a :class:`LinearOperator`'s operands)
      by implicit differentiation of ``A v = lambda v``, never through the restart
      loop: ``d lambda_i = v_i^T dA v_i``; the eigenvector part inside the computed
      block uses ``1 / (lambda_i - lambda_j)`` (eigenvalues must be distinct), the
      part outside it one CG solve per eigenvector with the projected
      ``(A - lambda_i I)^2``. ``solve`` itself is not differentiated.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.linalg import lanczos_eigh
      >>> a = jnp.diag(jnp.arange(1.0, 201.0))
      >>> res = lanczos_eigh(a, 3, key=jax.random.key(0), tol=1e-5)
      >>> bool(res.converged), [round(float(w), 3) for w in res.eigenvalues]
      (True, [200.0, 199.0, 198.0])

    References:
      Golub, Underwood, "The block Lanczos method for computing eigenvalues", 1977.
      Stewart, "A Krylov–Schur algorithm for large eigenproblems", SIAM J. Matrix
      Anal. Appl. 2001. Wu, Simon, "Thick-restart Lanczos method for large symmetric eigenvalue
      problems", SIAM J. Matrix Anal. Appl. 2000. Saad, "Numerical Methods for
      Large Eigenvalue Problems", 2011.
    """
    choice(which, "which", ("LM", "LA", "SA"))
    n_dev = 1 if axis_name is None else bound_axis_size(axis_name)
    gather = axis_name is not None
    if axis_name is not None and callable(a) and not hasattr(a, "shape"):
        # a callable on local blocks: its local size and dtype come from `v0`
        if v0 is None:
            raise ValueError(
                "a callable `a` with `axis_name` needs `v0`, this device's "
                "(n_d, block_size) start block (it fixes the local size n_d)"
            )
        if jnp.ndim(v0) != 2:
            raise ValueError(
                "`v0` must be this device's (n_d, block_size) start block, got shape "
                f"{jnp.shape(v0)}"
            )
        v0 = V.check_basis(v0, jnp.shape(v0)[0], "v0")
        n_loc = v0.shape[0]
        op = LinearOperator((n_loc, n_loc), compute_dtype(v0.dtype), matvec=a, symmetric=True)
        gather = False
    else:
        op = V.as_symmetric_operator(a, axis_name)
    if (sigma is None) != (solve is None):
        raise ValueError("shift-and-invert needs both `sigma` and `solve` (or neither)")
    if solve is not None:
        if not callable(solve):
            raise TypeError(f"`solve` must be callable, got {type(solve).__name__}")
        if which != "LM":
            raise ValueError(f"with `solve`, `which` must be 'LM' (nearest sigma), got {which!r}")
        scalar(sigma, "sigma")
    n_loc = op.shape[0]  # this device's rows (all of them without an axis)
    n = n_loc * n_dev
    rank = static_int(rank, "rank", 1)
    if rank > n:
        raise ValueError(f"rank={rank} exceeds min(m, n)={n} for argument `a`")
    b = 1 if block_size is None else static_int(block_size, "block_size", 1)
    if basis_size is None:
        m = -(-max(2 * rank + b, 30, rank + 4 * b) // b) * b
        # the residual block and a new block must fit beside the basis: the fallback
        # orthonormalisation takes a new block's complement of all m + b vectors
        m = min(m, (n - 2 * b) // b * b)
    else:
        m = static_int(basis_size, "basis_size", 1)
        if m % b:
            raise ValueError(f"`basis_size`={m} must be a multiple of `block_size`={b}")
        if m + 2 * b > n:
            raise ValueError(
                f"`basis_size` + 2 x `block_size` = {m} + 2 x {b} exceeds n={n} for "
                "argument `a` (the residual block and a new block must fit beside the basis)"
            )
    if m < rank + b:
        raise ValueError(
            f"a Lanczos basis of {max(m, 0)} vectors cannot hold rank={rank} Ritz vectors and a "
            f"block of {b} for argument `a` (n={n}); raise `basis_size` "
            "(<= n - 2 x block_size) or use a dense eigensolver"
        )
    keep = m - b * max(1, (m - rank) // (2 * b))
    max_restarts = static_int(max_restarts, "max_restarts", 1)
    ct = compute_dtype(op.dtype)
    local = "" if axis_name is None else " (this device's rows)"
    if v0 is None:
        check_key(key)
        v0 = _local_rows(jax.random.normal(key, (n, b), ct), axis_name)
    else:
        v0 = V.check_basis(v0, n_loc, "v0")
        if v0.shape[1] != b:
            raise ValueError(
                f"`v0` must have shape ({n_loc}, {b}){local} (block_size), got {v0.shape}"
            )
        v0 = v0.astype(ct)
    positive(tol, "tol")
    tol = jnp.asarray(tol, ct)
    statics = dict(rank=rank, b=b, m=m, keep=keep, max_restarts=max_restarts, which=which)
    inv = None
    if solve is not None:
        inv = LinearOperator((n_loc, n_loc), op.dtype, matvec=solve, symmetric=True)
        sigma = jnp.asarray(sigma, ct)
    if axis_name is not None:
        if inv is None:
            return _lanczos_sharded(op, v0, tol, statics, axis_name, gather)
        return _from_inverse(_lanczos_sharded(inv, v0, tol, statics, axis_name, False), sigma)
    return _lanczos_differentiable(op, v0, tol, statics, inv, sigma)


def _lanczos_sharded(op, v0, tol, statics, axis, gather):
    """:func:`_lanczos_impl` over ``axis``, forward only: the implicit VJP (its CG
    solves and products) is written for unsharded vectors, so a derivative is refused
    with a clear error instead of failing inside a collective's missing rule."""
    leaves, treedef = jax.tree_util.tree_flatten(op)

    @jax.custom_jvp
    def run(leaves, v0, tol):
        a = jax.tree_util.tree_unflatten(treedef, leaves)
        return _lanczos_impl(a, v0, tol, axis=axis, gather=gather, **statics)

    @run.defjvp
    def _no_derivative(primals, tangents):
        raise TypeError(
            "lanczos_eigh with `axis_name` is forward-only (no derivative across "
            "devices): differentiate the single-device call, or apply "
            "jax.lax.stop_gradient to `a`, `v0` and `tol`"
        )

    return run(leaves, v0, tol)


def _from_inverse(res, sigma):
    """Eigenpairs of ``A`` from those of ``(A - sigma I)^{-1}``, nearest ``sigma`` first."""
    lam = sigma + 1 / res.eigenvalues
    order = jnp.argsort(jnp.abs(lam - sigma))
    return res._replace(eigenvalues=lam[order], eigenvectors=res.eigenvectors[:, order])


def _lanczos_differentiable(op, v0, tol, statics, inv, sigma):
    """:func:`_lanczos_impl` (on ``inv`` when given) with the implicit VJP w.r.t. ``op``."""
    leaves, treedef = jax.tree_util.tree_flatten(op)

    @jax.custom_vjp
    def run(leaves):
        if inv is None:
            return _lanczos_impl(jax.tree_util.tree_unflatten(treedef, leaves), v0, tol, **statics)
        return _from_inverse(_lanczos_impl(inv, v0, tol, **statics), sigma)

    def fwd(leaves):
        res = run(leaves)
        return res, (leaves, res.eigenvalues, res.eigenvectors)

    def bwd(saved, g):
        leaves, lam, vecs = saved
        a = jax.tree_util.tree_unflatten(treedef, leaves)
        return (_eigh_vjp(a, lam, vecs, g.eigenvalues, g.eigenvectors, leaves),)

    run.defvjp(fwd, full_precision(bwd))  # traced after the forward call returned
    return run(leaves)


def _eigh_vjp(op, lam, vecs, g_lam, g_vecs, leaves):
    """Cotangent of ``op``'s arrays for ``A V = V diag(lam)`` (``V`` orthonormal, ``k`` columns).

    ``A_bar = sym(X V^T)`` with ``X = V diag(g_lam) + V C + U``: ``C_ji = v_j^T g_i /
    (lam_i - lam_j)`` (``j != i``) inside ``span(V)``, and ``U_i = -(P (A - lam_i) P)^+
    P g_i`` outside it (``P = I - V V^T``), solved by CG on the projected square
    ``P (A - lam_i)^2 P`` (positive definite there whatever the sign pattern).
    """
    dt = vecs.dtype
    k = lam.shape[0]
    g_lam = jnp.zeros_like(lam) if _is_zero_cotangent(g_lam) else g_lam.astype(dt)
    x = vecs * g_lam[None, :]
    if not _is_zero_cotangent(g_vecs):
        g_vecs = g_vecs.astype(dt)
        diff = lam[None, :] - lam[:, None]  # [j, i] = lam_i - lam_j
        off = ~jnp.eye(k, dtype=bool)
        c = jnp.where(off, (vecs.T @ g_vecs) / jnp.where(off, diff, jnp.ones_like(diff)), 0)
        x = x + vecs @ c.astype(dt)

        def proj(z):
            return z - vecs @ (vecs.T @ z)

        def outside(li, gi):
            def shifted(z):
                return op.matvec(z) - li * z

            def normal(z):
                z = proj(z)
                return proj(shifted(proj(shifted(z))))

            rhs = -proj(shifted(proj(gi)))  # (P S P)^2 u = -(P S P) g  =>  u = -(P S P)^+ g
            tol = jnp.finfo(dt).eps ** 0.75
            return proj(cg(normal, rhs, tol=tol, max_iters=10 * vecs.shape[0]).x)

        x = x + jax.vmap(outside, in_axes=(0, 1), out_axes=1)(lam, g_vecs)
    # sym(X V^T) contracted into the operator's arrays: one VJP of A [V, X].
    both = jnp.concatenate([vecs, x], axis=1)
    cot = jnp.concatenate([x, vecs], axis=1) * jnp.asarray(0.5, dt)

    def product(leaves_):
        a = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(op), leaves_)
        return a.matmat(both.astype(a.dtype))

    _, pull = jax.vjp(product, list(leaves))
    return pull(cot.astype(op.dtype))[0]


def _is_zero_cotangent(g):
    return g is None or type(g).__name__ == "Zero" or (
        hasattr(g, "dtype") and g.dtype == jax.dtypes.float0
    )


class _Cycle(NamedTuple):
    vr: jax.Array  # (m + b, n) basis rows: kept Ritz vectors, then the residual block
    t: jax.Array  # (m + b, m + b) projected matrix: kept Ritz values, predicted coupling
    start: jax.Array  # first row block the next cycle builds (0, then `keep`)
    locked: jax.Array  # (m + b,) bool: kept Ritz pairs whose residual met the tolerance
    theta: jax.Array  # (m,) Ritz values of the last cycle, wanted first
    norm: jax.Array  # running estimate of ||A||_2 (largest Ritz value in magnitude so far)
    asym: jax.Array  # largest asymmetry of the projection seen so far


def _normalize_rows(w, basis, wnorm, norms, axis=None):
    """``w = L q`` with orthonormal rows ``q`` (``w`` already orthogonal to ``basis``).

    One row: ``L = ||w||`` (``norms``, already computed). A block: Cholesky-QR2 on
    the ``(b, b)`` Gram. When ``w`` lost more than three digits to the projection
    (or is rank deficient: an exhausted Krylov space) the robust orthonormalisation
    of :func:`orth_robust` against ``basis`` takes over, whose result is orthogonal
    to ``basis`` whatever ``w`` is. With ``axis`` the columns of ``w`` and ``basis``
    are row-sharded: the Gram is ``psum``-ed (``L`` replicated), the fallback is
    the sharded one.
    """
    if w.shape[0] == 1:
        lo = norms[:, None]
        q = w / lo
        ok = all_finite(lo) & (norms[0] > 1e-3 * wnorm)  # a non-finite w has a non-finite norm
    else:

        def chol(x):
            lo = jnp.linalg.cholesky(psum(x @ x.T, axis))
            return lax.linalg.triangular_solve(lo, x, left_side=True, lower=True), lo

        q1, l1 = chol(w)
        q, l2 = chol(q1)
        lo = l1 @ l2
        d = jnp.abs(jnp.diagonal(l1))
        ok = _all_finite(axis, (q,), (lo,)) & (jnp.min(d) > 1e-3 * wnorm)

    def robust(w):
        qc, r = orth_robust(w.T, basis.T, axis)
        return qc.T, r.T

    return lax.cond(ok, lambda w: (q, lo), robust, w)


def _project(w, vr, axis=None):
    """``(w - h V, h)`` with ``h = w V^T``: one classical Gram–Schmidt pass of the rows of ``w``.

    Written as matrix-vector products for a single row (XLA:CPU runs the ``(1, n)``
    by ``(n, m)`` GEMM form several times slower than the GEMV) and as ``V w^T``
    (no transposed operand) for a block. With ``axis`` (columns row-sharded) ``h``
    is ``psum``-ed.
    """
    if w.shape[0] == 1:
        h = psum(vr @ w[0], axis)
        return w - (h @ vr)[None], h[None]
    ht = psum(vr @ w.T, axis)
    return w - lax.dot_general(ht, vr, (((0,), (0,)), ((), ()))), ht.T


def _row_norms(w, axis=None):
    """Norms of the rows of ``w`` (their entries split over ``axis`` when given)."""
    return jnp.sqrt(psum(jnp.sum(jnp.square(w), axis=1), axis))


def _extend(op, vr, t, locked, j0, m, b, axis=None):
    """Block Lanczos steps ``j = j0, j0 + b, ..., m - b`` on the rows of ``vr`` (``m + b`` rows).

    Row block ``j`` is ``q_j``. A step takes from ``A q_j`` the part the recurrence
    predicts (row block ``j`` of ``t``: ``L_{j-b}`` on ``q_{j-b}``, or after a
    restart the coupling to the kept Ritz vectors) and the diagonal block
    ``q_j A q_j^T``; one classical Gram–Schmidt pass against the whole basis
    (rows not yet built are zero) then removes what rounding left, and a second
    pass runs only when that one cancelled more than ``1 - 1/sqrt(2)`` of the norm
    (the Daniel–Gragg–Kaufman–Stewart test): the local step plays the part of
    the first of the two passes of full reorthogonalisation at the price of a
    few vector operations. The coefficients fill column block ``j`` of
    ``t = V^T A V`` (mirrored; rows of locked pairs decoupled), and the remainder
    ``L_j q_{j+1}`` gives the next block (rows ``m:m + b`` hold the final
    residual block: ``A V^T = V^T T + q^T L E^T``). Returns ``(vr, t, asym)``,
    ``asym`` the largest difference between the computed ``(A q_j) . q_i`` and its
    prediction over the predicted rows, and between ``q_j A q_j^T`` and its
    transpose. With ``axis`` the columns of ``vr`` are row-sharded and every sum
    over them is ``psum``-ed; ``t`` and ``asym`` are replicated.
    """
    rows = jnp.arange(vr.shape[0], dtype=jnp.int32)
    half = jnp.asarray(0.5, t.dtype)

    def step(j, carry, pred_rows):
        vr, t, asym = carry
        q = lax.dynamic_slice_in_dim(vr, j, b)
        w = op.matmat(q.T).T
        pred = lax.dynamic_slice_in_dim(t, j, b)  # (b, m + b): zero from column j on
        w = w - pred_rows(pred, vr, j)
        diag = psum(w @ q.T if b > 1 else jnp.sum(w * q)[None, None], axis)
        asym = jnp.maximum(asym, jnp.max(jnp.abs(diag - diag.T)))
        diag = (diag + diag.T) * half
        w = w - diag @ q if b > 1 else w - diag[0, 0] * q
        w, h = _project(w, vr, axis)
        norms = _row_norms(w, axis)
        # the pass took h from w: ||w|| fell below 1/sqrt(2) of its norm before the
        # pass iff ||w|| < ||h|| (the two are orthogonal); then project once more
        again = jnp.any(norms < _row_norms(h))

        def second(w):
            w, h2 = _project(w, vr, axis)
            return w, h2, _row_norms(w, axis)

        w, h2, norms = lax.cond(again, second, lambda w: (w, jnp.zeros_like(h), norms), w)
        h = h + h2 + pred  # h[a, i] = (A q_{j+a}) . v_i
        rest = lax.dynamic_slice_in_dim(h, j, b, axis=1)  # rounding left on q_j itself
        h = lax.dynamic_update_slice_in_dim(h, diag + (rest + rest.T) * half, j, 1)
        # ||A q_{j+a}||: its coefficients on the basis and the remainder are orthogonal
        wnorm = jnp.sqrt(jnp.max(jnp.sum(jnp.square(h), axis=1) + jnp.square(norms)))
        # for a symmetric A the passes find only rounding on the predicted rows
        band = (rows < j) & ~locked
        asym = jnp.maximum(asym, jnp.max(jnp.where(band[None, :], jnp.abs(h - pred), 0)))
        h = jnp.where(locked[None, :], jnp.zeros_like(h), h)
        t = lax.dynamic_update_slice_in_dim(t, h.T, j, 1)
        t = lax.dynamic_update_slice_in_dim(t, h, j, 0)
        qn, lmat = _normalize_rows(w, vr, wnorm, norms, axis)
        vr = lax.dynamic_update_slice_in_dim(vr, qn, j + b, 0)
        t = lax.dynamic_update_slice(t, lmat.T, (j + b, j))
        t = lax.dynamic_update_slice(t, lmat, (j, j + b))
        return vr, t, asym

    def full(pred, vr, j):  # after a restart: coupling to every kept vector
        return pred[0] @ vr if b == 1 else pred @ vr

    def local(pred, vr, j):  # inside a cycle: L_{j-b} on q_{j-b} only
        i = jnp.maximum(j - b, 0)
        return lax.dynamic_slice_in_dim(pred, i, b, axis=1) @ lax.dynamic_slice_in_dim(vr, i, b)

    carry = step(j0, (vr, t, jnp.zeros((), t.dtype)), full)
    return lax.fori_loop(j0 // b + 1, m // b, lambda i, c: step(i * b, c, local), carry)


def _ritz(t, rank, m, b, which):
    """Ritz values / coordinates of ``t[:m, :m]`` (wanted first) and their residual norms."""
    theta, s = jnp.linalg.eigh(t[:m, :m])
    order = _select(theta, which, m)
    theta, s = theta[order], s[:, order]
    lmat = t[m:, m - b : m].T
    res = jnp.sqrt(jnp.sum(jnp.square(lmat.T @ s[m - b :]), axis=0))  # ||A y_i - theta_i y_i||
    return theta, s, res


@functools.partial(
    jax.jit,
    static_argnames=("rank", "b", "m", "keep", "max_restarts", "which", "axis", "gather"),
)
def _lanczos_impl(op, v0, tol, *, rank, b, m, keep, max_restarts, which, axis=None,
                  gather=False):
    """The Lanczos loop. With ``axis`` the rows of ``v0`` and of every basis vector are
    this device's; ``op`` is the local ``(n_d, n)`` row block when ``gather`` (the
    input of a product is gathered), else it maps local blocks to local blocks."""
    dt = op.dtype
    op, ct = _working_operator(op, axis if gather else None, symmetric_rows=True)
    n = op.shape[0]  # local rows
    q0 = orth_robust(v0, None, axis)[0]
    op, _, c = _scaled(op, op.matmat(q0), axis)
    size = m + b  # the basis and the residual block
    idx = jnp.arange(keep)

    def cycle(st, _):
        vr, t, asym = _extend(op, st.vr, st.t, st.locked, st.start, m, b, axis)
        theta, s, res = _ritz(t, rank, m, b, which)
        norm = jnp.maximum(st.norm, jnp.max(jnp.abs(theta)))
        err = jnp.max(res[:rank]) / jnp.where(norm > 0, norm, jnp.ones_like(norm))
        # thick restart: the `keep` wanted Ritz vectors, then the residual block q, with
        # A y_i = theta_i y_i + q^T coupling_i (coupling = L^T s_last); pairs whose
        # residual met the tolerance are locked (decoupled from the new directions)
        # one GEMM with the whole basis builds the next one: rows :keep the Ritz vectors
        # (s^T on the first m rows), then the residual block (picked by an identity),
        # zeros after. A product with the slice vr[:m] first copied it (XLA:CPU),
        # and filling a fresh array cost as much again: ~1.3 ms against ~0.45 ms at
        # n = 1e4, m = 30 in float64.
        pick = jnp.zeros((size, size), ct).at[:keep, :m].set(s[:, :keep].T)
        pick = pick.at[keep : keep + b, m:].set(jnp.eye(b, dtype=ct))
        vr = pick @ vr
        coupling = t[m:, m - b : m] @ s[m - b :, :keep]
        locked = jnp.zeros((size,), bool).at[:keep].set(res[:keep] <= 0.5 * tol * norm)
        coupling = jnp.where(locked[None, :keep], jnp.zeros_like(coupling), coupling)
        t = jnp.zeros((size, size), ct).at[idx, idx].set(theta[:keep])
        t = t.at[keep : keep + b, :keep].set(coupling)
        start = jnp.asarray(keep, jnp.int32)
        return _Cycle(vr, t, start, locked, theta, norm, jnp.maximum(st.asym, asym)), err

    zero = jnp.zeros((), ct)
    state0 = _Cycle(
        jnp.zeros((size, n), ct).at[:b].set(q0.T), jnp.zeros((size, size), ct),
        jnp.zeros((), jnp.int32), jnp.zeros((size,), bool), jnp.zeros((m,), ct), zero, zero,
    )
    out = fixed_point_loop(cycle, state0, max_iters=max_restarts,
                           stop=lambda s, err: err <= tol, dtype=ct)
    st = out.state
    # the returned Ritz vectors are the first rows of the restarted basis; their true
    # residuals decide `converged` (and are the last recorded error)
    y = st.vr[:rank].T
    theta = st.theta[:rank]
    true_err = _relative_residual(theta, y, op.matmat(y), st.norm, axis)
    errors = out.errors.at[out.n_iters - 1].set(true_err)
    asym = st.asym / jnp.where(st.norm > 0, st.norm, jnp.ones_like(st.norm))
    converged = (true_err <= tol) & _all_finite(axis, (y,), (theta,))
    converged = converged & _symmetric_enough(asym, ct)
    return EighResult((theta * c).astype(dt), y.astype(dt), out.n_iters, converged, errors)
