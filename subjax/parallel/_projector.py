"""GaLore's subspace projector on a row-sharded gradient (``shard_map``, no gather).

Under :func:`subjax.parallel.fsdp_step` a GaLore / ``projected`` gradient is split
over the ``fsdp`` axis along its long side, i.e. by the rows of its canonical
tall form ``g`` (``M x N``, ``M >= N``). :func:`sharded_subspace_projector` runs
the subspace projector's refresh inside ``jax.shard_map`` on those row blocks:
it is :func:`subjax.linalg.subspace_iteration` with ``side="right"`` and
``axis_name``, whose tall products are local and whose sums over rows are
``psum``-s, so no device gathers the gradient or a thin ``M x r`` block, and the
refreshed ``N x r`` basis comes out replicated.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from subjax._core import as_compute, choice, static_int
from subjax.linalg import ORTH_METHODS, subspace_iteration
from subjax.optim._projectors import ALIGN_NAMES, Projector, _align, subspace_projector
from subjax.parallel._data import check_axis

__all__ = ["sharded_subspace_projector"]


def sharded_subspace_projector(
    mesh: Mesh,
    axis_name: str = "fsdp",
    *,
    subspace_steps: int = 1,
    init_steps: int = 6,
    align: str | None = "rotation",
    orth_method: str = "cholesky_qr2",
) -> Projector:
    r"""The ``"subspace"`` projector with its refresh sharded over the gradient's rows.

    The same iteration as :func:`subjax.optim.make_projector` ``("subspace")`` —
    ``Q <- orth(g^T orth(g Q))``, ``subspace_steps`` times from the stored basis
    (``init_steps`` times from a seeded Gaussian start at the first refresh),
    a Rayleigh–Ritz rotation, then alignment with the previous basis — run
    inside ``jax.shard_map`` with the rows of the tall gradient ``g`` split over
    ``axis_name``, as :func:`subjax.linalg.subspace_iteration` ``(g, Q,
    side="right", axis_name=axis_name)``: ``g_d Q`` is local, its
    orthonormalization is Cholesky-QR2 on a ``psum`` of ``r x r`` Grams,
    ``g^T W = psum_d g_d^T W_d`` (``N x r``), and the short ``N x r``
    orthonormalization runs redundantly on every device.
    Per refresh step a device moves two ``r x r`` Grams and one ``N x r`` block
    (all-reduces); nothing is gathered. The result equals the one-device
    projector's up to rounding (the Ritz rotation up to column signs; with
    ``align="rotation"`` the aligned bases agree). A gradient whose rows do not
    divide the axis size is refreshed unsharded (as the one-device projector).

    Pass it as ``projector=`` of :func:`subjax.optim.galore` /
    :func:`subjax.optim.projected` and train with :func:`subjax.parallel.fsdp_step`.

    Args:
      mesh: the step's ``jax.sharding.Mesh``.
      axis_name: the mesh axis the gradients' long side is split over.
      subspace_steps, init_steps, align: as in :func:`subjax.optim.make_projector`.
      orth_method: orthonormalization of each step (``subjax.linalg.ORTH_METHODS``).

    Returns:
      A :class:`subjax.optim.Projector`.

    Raises:
      ValueError: ``axis_name`` not in ``mesh``, unknown ``align`` / ``orth_method``,
        non-positive step counts.

    Example:
      >>> import jax, numpy as np
      >>> from jax.sharding import Mesh
      >>> from subjax.optim import galore
      >>> from subjax.parallel import sharded_subspace_projector
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
      >>> opt = galore(1e-3, rank=8, projector=sharded_subspace_projector(mesh))
    """
    n_dev = check_axis(mesh, axis_name)
    subspace_steps = static_int(subspace_steps, "subspace_steps", 1)
    init_steps = static_int(init_steps, "init_steps", 1)
    choice(align, "align", ALIGN_NAMES)
    choice(orth_method, "orth_method", ORTH_METHODS)
    local = subspace_projector(subspace_steps, init_steps, align, orth_method)

    def iterate(g, q, steps):
        """``steps`` subspace steps and the Ritz rotation; ``g`` this device's rows."""
        return subspace_iteration(g, q, max_iters=steps, orth_method=orth_method,
                                  axis_name=axis_name, side="right").vt.T

    def sharded(g, q, q_rand, first):
        q_new = jax.lax.cond(first, lambda: iterate(g, q_rand, init_steps),
                             lambda: iterate(g, q, subspace_steps))
        return _align(q_new, q, align)

    def refresh(g, q, key, first):
        if g.shape[0] % n_dev:
            return local.refresh(g, q, key, first)
        g = as_compute(g)
        q_rand = jax.random.normal(key, q.shape, q.dtype)
        return jax.shard_map(sharded, mesh=mesh, in_specs=(P(axis_name, None), P(), P(), P()),
                             out_specs=P())(g, q, q_rand, first)

    return local._replace(name="sharded_subspace", refresh=refresh)
