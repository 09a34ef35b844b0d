"""Row-sharded orthonormalization, randomized SVD, subspace iteration and Lanczos.

Thin ``jax.shard_map`` wrappers over :mod:`subjax.linalg`, whose primitives take
``axis_name``: a tall ``(m, n)`` matrix is split by rows over one mesh axis and
the algorithm is the single-device one with every sum over rows a ``psum`` (Gram
matrices, ``A^T Q``, projections) and Householder QR replaced by TSQR. Results
equal the single-device ones up to floating-point summation order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from subjax._core import choice
from subjax.linalg import (
    ORTH_METHODS,
    lanczos_eigh,
    orthonormalize,
    randomized_svd,
    subspace_iteration,
)
from subjax.linalg._randomized import EighResult, RandomizedSVDResult, SubspaceIterationResult
from subjax.parallel._data import check_axis

__all__ = [
    "sharded_lanczos_eigh",
    "sharded_orthonormalize",
    "sharded_randomized_svd",
    "sharded_subspace_iteration",
    "SHARDED_ORTH_METHODS",
]

SHARDED_ORTH_METHODS = ORTH_METHODS


def sharded_orthonormalize(x: jax.Array, axis_name: str, method: str = "cholesky_qr2"):
    r"""Orthonormalize a row-sharded tall matrix; call inside ``shard_map``.

    ``x`` is this device's row block ``X_d`` of ``X = [X_1; ...; X_p]``. Returns
    the matching row block of ``Q`` with ``X = Q R``, ``Q^T Q = I``, ``diag(R) > 0``:

    ``subjax.linalg.orthonormalize(x, method, axis_name=axis_name)``: the same
    algorithm as on one device, with every ``(k, k)`` Gram matrix a ``psum`` of
    local Grams and Householder QR replaced by TSQR (local QR, butterfly reduction
    of the small ``R`` factors). Cholesky-QR2 falls back to TSQR when the Gram
    matrix is too ill-conditioned. QR-type methods give the unique QR factor, equal
    (up to rounding) to ``orthonormalize(X, "householder")`` on the gathered matrix.

    Args:
      x: ``(m_d, k)`` local row block, real floating.
      axis_name: the mesh axis the rows are split over.
      method: one of ``SHARDED_ORTH_METHODS`` (those of ``subjax.linalg.ORTH_METHODS``).

    Returns:
      ``(m_d, k)`` local block of ``Q`` (dtype of ``x``).

    Raises:
      ValueError: outside ``shard_map`` (``axis_name`` not bound), unknown ``method``.

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
    return orthonormalize(x, method, axis_name=axis_name)


def _rows_on(a, mesh, axis_name, argname="a"):
    """``a`` placed with rows split over ``axis_name`` (validated)."""
    n_dev = check_axis(mesh, axis_name)
    if not hasattr(a, "shape") or len(a.shape) != 2:
        raise ValueError(f"`{argname}` must be an (m, n) matrix, got {getattr(a, 'shape', a)}")
    if not jnp.issubdtype(a.dtype, jnp.floating):
        raise TypeError(f"`{argname}` must have a real floating dtype, got {a.dtype}")
    if a.shape[0] % n_dev:
        raise ValueError(
            f"the {a.shape[0]} rows of `{argname}` are not divisible by the size {n_dev} of mesh "
            f"axis {axis_name!r}; pad `{argname}` with zero rows to a multiple of {n_dev}"
        )
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, P(axis_name)))


def sharded_randomized_svd(
    a: jax.Array,
    rank: int,
    *,
    key: jax.Array,
    mesh: Mesh,
    axis_name: str = "data",
    oversample: int | None = None,
    n_steps: int | None = None,
    method: str = "block_krylov",
) -> RandomizedSVDResult:
    r"""Randomized SVD of a tall matrix whose rows are split over a mesh axis.

    ``shard_map`` of :func:`subjax.linalg.randomized_svd` with ``axis_name``: the
    same algorithm, arguments and result (same ``key`` → same Gaussian sketch
    ``Omega``, ``(n, rank + oversample)``, replicated), with the tall products run
    where the rows live:
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
      oversample: extra sketch columns (static); None: ``randomized_svd``'s default.
      n_steps: power / Krylov steps (static); ``None``: ``randomized_svd``'s
        default for the global shape.
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
    a = _rows_on(a, mesh, axis_name)
    f = jax.shard_map(
        lambda a, key: tuple(randomized_svd(a, rank, key=key, oversample=oversample,
                                            n_steps=n_steps, method=method, axis_name=axis_name)),
        mesh=mesh, in_specs=(P(axis_name), P()), out_specs=(P(axis_name), P(), P(), P()),
    )
    return RandomizedSVDResult(*f(a, key))


def sharded_subspace_iteration(
    a: jax.Array,
    q0: jax.Array,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    max_iters: int = 10,
    tol: float | jax.Array | None = None,
    orth_method: str = "cholesky_qr2",
    side: str = "left",
) -> SubspaceIterationResult:
    r"""Block power iteration on a row-sharded tall matrix (warm-startable).

    ``shard_map`` of :func:`subjax.linalg.subspace_iteration` with ``axis_name``:
    ``Q_{t+1} = orth(A orth(A^T Q_t))`` until ``max_iters`` steps or the subspace change
    ``||sin Theta(Q_t, Q_{t+1})||_F / sqrt(k) <= tol``, then Rayleigh–Ritz. Here
    ``A`` and ``Q`` (``(m, k)``) are split by rows over ``axis_name``; ``A^T Q`` is a
    ``psum`` of local products, the tall orthonormalization is Cholesky-QR2 with a
    ``psum`` of the ``(k, k)`` Gram (TSQR fallback), the short one (``(n, k)``, replicated)
    is done redundantly on every device.

    Args:
      a: ``(m, n)`` matrix, ``m`` divisible by the axis size.
      q0: ``(m, k)`` starting basis (sharded like ``a``'s rows) for ``side="left"``;
        ``(n, k)`` (replicated) for ``side="right"``.
      mesh, axis_name: where the rows live.
      max_iters: iteration cap (static).
      tol: optional tolerance on the subspace change (may be traced).
      orth_method: one of ``subjax.linalg.ORTH_METHODS`` (``"householder"`` is TSQR here).
      side: ``"left"`` iterates the left singular subspace (the row-sharded
        ``u`` side), ``"right"`` the right one, ``Q_{t+1} = orth(A^T orth(A Q_t))``
        with the basis replicated (as in ``subspace_iteration``).

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
    choice(side, "side", ("left", "right"))
    a = _rows_on(a, mesh, axis_name)
    rows = a.shape[0] if side == "left" else a.shape[1]
    if getattr(q0, "ndim", None) != 2 or q0.shape[0] != rows:
        raise ValueError(f"`q0` must have shape ({rows}, k), got {getattr(q0, 'shape', q0)}")
    q_spec = P(axis_name) if side == "left" else P()
    if side == "left":
        q0 = _rows_on(q0, mesh, axis_name, "q0")
    f = jax.shard_map(
        lambda a, q0, tol: tuple(subspace_iteration(a, q0, max_iters=max_iters, tol=tol,
                                                    orth_method=orth_method, axis_name=axis_name,
                                                    side=side)),
        mesh=mesh, in_specs=(P(axis_name), q_spec, P()),
        out_specs=(P(axis_name), P(), P(), P(), P(), P()),
    )
    return SubspaceIterationResult(*f(a, q0, tol))


def sharded_lanczos_eigh(
    a: jax.Array,
    rank: int,
    *,
    mesh: Mesh,
    axis_name: str = "data",
    key: jax.Array | None = None,
    v0: jax.Array | None = None,
    block_size: int = 1,
    basis_size: int | None = None,
    max_restarts: int = 100,
    tol: float | jax.Array = 1e-5,
    which: str = "LA",
) -> EighResult:
    r"""Extreme eigenpairs of a symmetric matrix whose rows are split over a mesh axis.

    ``shard_map`` of :func:`subjax.linalg.lanczos_eigh` with ``axis_name``: the same
    thick-restarted (block) Lanczos, arguments and result, with every basis vector
    row-sharded like ``a`` (a product gathers its input block, ``A_d X``) and every
    inner product and norm over the rows a ``psum``; the ``m x m`` Rayleigh–Ritz work
    is repeated on every device. Same ``key`` → the same start as on one device.
    Per device: memory ``O(n^2 / p + m n / p)``; communication per product ``O(n b)``
    words (the gather) and per Gram–Schmidt pass ``O(m b)``. Forward-only.

    Args:
      a: ``(n, n)`` symmetric matrix, ``n`` divisible by ``mesh.shape[axis_name]``;
        placed with rows sharded over ``axis_name`` if it is not already.
      rank: eigenpairs wanted (static).
      mesh, axis_name: where the rows live.
      key: ``jax.random`` key for the random start (or give ``v0``).
      v0: optional ``(n, block_size)`` start block (split like ``a``'s rows).
      block_size, basis_size, max_restarts, tol, which: as in ``lanczos_eigh``.

    Returns:
      :class:`~subjax.linalg.EighResult`; ``eigenvectors`` (``(n, rank)``) are
      row-sharded like ``a``, the rest replicated.

    Raises:
      ValueError: ``axis_name`` not in ``mesh``; rows not divisible; ``a`` not
        square; ``v0`` of the wrong shape; the checks of ``lanczos_eigh``.

    Example:
      >>> import jax, numpy as np, jax.numpy as jnp
      >>> from jax.sharding import Mesh
      >>> from subjax.parallel import sharded_lanczos_eigh
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("rows",))
      >>> a = jnp.diag(jnp.arange(1.0, 101.0))
      >>> res = sharded_lanczos_eigh(a, 2, mesh=mesh, axis_name="rows", key=jax.random.key(0))
      >>> bool(res.converged), [round(float(w), 3) for w in res.eigenvalues]
      (True, [100.0, 99.0])

    References:
      Stewart, "A Krylov–Schur algorithm for large eigenproblems", SIAM J. Matrix
      Anal. Appl. 2001.
    """
    a = _rows_on(a, mesh, axis_name)
    n = a.shape[0]
    if v0 is not None:
        if getattr(v0, "ndim", None) != 2 or v0.shape[0] != n:
            raise ValueError(
                f"`v0` must have shape ({n}, block_size), got {getattr(v0, 'shape', v0)}"
            )
        v0 = _rows_on(v0, mesh, axis_name, "v0")

    def run(a, key, v0, tol):
        return tuple(lanczos_eigh(a, rank, key=key, v0=v0, block_size=block_size,
                                  basis_size=basis_size, max_restarts=max_restarts, tol=tol,
                                  which=which, axis_name=axis_name))

    f = jax.shard_map(
        run, mesh=mesh, in_specs=(P(axis_name), P(), P(axis_name), P()),
        out_specs=(P(), P(axis_name), P(), P(), P()),
    )
    return EighResult(*f(a, key, v0, tol))
