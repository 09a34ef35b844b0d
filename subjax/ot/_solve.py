"""One entry point that picks the solver: :func:`solve`."""

from __future__ import annotations

import jax

from subjax._core import choice
from subjax.ot._common import OTResult
from subjax.ot._newton import sinkhorn_newton, sparse_newton_sinkhorn
from subjax.ot._sinkhorn import sinkhorn

__all__ = ["solve"]

_SOLVERS = {"sinkhorn": sinkhorn, "newton": sinkhorn_newton, "sns": sparse_newton_sinkhorn}


def choose_method(cost) -> str:
    """The solver :func:`solve` uses for ``cost`` with ``method="auto"``."""
    if not hasattr(cost, "is_online"):  # a dense array
        return "newton"
    # online: SNS, whose CG products read its held top-k rows instead of making two
    # passes over the costs; a handful of columns (<= 16): Newton
    return "sns" if cost.is_online and cost.shape[1] > 16 else "newton"


def solve(
    cost,
    a: jax.Array | None = None,
    b: jax.Array | None = None,
    epsilon: float | jax.Array = 1e-2,
    *,
    method: str = "auto",
    **options,
) -> OTResult:
    r"""Entropic OT with the solver chosen for the geometry.

    ``method="auto"`` picks, from static information only (so it is the same
    under ``jit`` with a traced epsilon):

    - a dense cost (an array, :class:`~subjax.ot.Dense`, a ``PointCloud``
      without ``block_size``): :func:`~subjax.ot.sinkhorn_newton`. At large
      epsilon its Sinkhorn warm-up converges first (then no Newton step runs);
      at small epsilon it beats Sinkhorn by one to two orders of magnitude.
      On dense costs SNS was slower than Newton in every case measured
      (``docs/ot.md``, section *Measured*: 1.4x to 3.4x Newton's time, n = 500
      to 2000, epsilon 0.1 to 0.001 times the mean cost);
    - an online :class:`~subjax.ot.PointCloud` (with ``block_size``):
      :func:`~subjax.ot.sparse_newton_sinkhorn`, whose CG products never touch
      the ``n x m`` plan (dense-product Newton recomputes it blockwise in every
      CG iteration).

    ``method`` may also name a solver: ``"sinkhorn"``, ``"newton"`` or ``"sns"``.

    Args:
      cost, a, b, epsilon: as in :func:`~subjax.ot.sinkhorn`.
      method: ``"auto"``, ``"sinkhorn"``, ``"newton"`` or ``"sns"`` (static).
      **options: keyword arguments of the chosen solver (``tol``, ``max_iters``,
        ``rho_a``, ...).

    Returns:
      :class:`~subjax.ot.OTResult`.

    Example:
      >>> import jax
      >>> from subjax import ot
      >>> x = jax.random.normal(jax.random.key(0), (300, 2))
      >>> pc = ot.PointCloud(x, x + 1.0, block_size=64)
      >>> out = ot.solve(pc, epsilon=0.05, tol=1e-4)   # SNS, online
      >>> bool(out.converged)
      True
    """
    choice(method, "method", ("auto", *_SOLVERS))
    if method == "auto":
        method = choose_method(cost)
    return _SOLVERS[method](cost, a, b, epsilon, **options)
