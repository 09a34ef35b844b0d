"""The polar factor (``msign``) of a row-sharded tall matrix, without a gather.

``msign(X) = U sign(S) V^T`` for ``X = U S V^T`` is what manifold Muon's dual
ascent and polar retraction compute. On a tall ``m x k`` matrix split by rows
over a mesh axis it factors through a sharded QR: ``X = Q R`` with ``Q`` from
:func:`subjax.linalg.orthonormalize` with ``axis_name`` (Cholesky-QR2 on a
``psum`` of ``k x k`` Grams, TSQR fallback) and ``R = psum_d Q_d^T X_d``; then
``msign(X) = Q msign(R)`` with the ``k x k`` SVD of ``R`` done redundantly on
every device. A device moves ``O(k^2)`` words and keeps only its rows.

:func:`row_sharded_polar` is the trace-time context under which
:func:`subjax.optim.manifold_muon` takes this path; :func:`subjax.parallel.fsdp_step`
enters it with its ``fsdp`` axis.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from subjax.linalg import orthonormalize
from subjax.parallel._data import check_axis

__all__ = ["row_sharded_polar", "sharded_msign"]

# (mesh, axis_name) while tracing under row_sharded_polar, else None
_ROWS: contextvars.ContextVar = contextvars.ContextVar("row_sharded_polar", default=None)


def sharded_msign(x: jax.Array, axis_name: str) -> jax.Array:
    r"""``U sign(S) V^T`` of a row-sharded tall matrix; call inside ``shard_map``.

    ``x`` (``(..., m_d, k)``) is this device's row block of ``X`` (``m >= k``);
    returns the matching row block of ``msign(X)``: ``Q msign(R)`` from the
    sharded QR ``X = Q R`` (:func:`subjax.linalg.orthonormalize` with
    ``axis_name``) and the SVD of the ``k x k`` factor ``R``. Zero singular
    values give zero directions, as in the one-device ``msign``.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh, PartitionSpec as P
      >>> from subjax.parallel import sharded_msign
      >>> x = jax.random.normal(jax.random.key(0), (40, 3))
      >>> polar = jax.shard_map(lambda x: sharded_msign(x, "rows"),
      ...                       mesh=Mesh(np.array(jax.devices()[:1]), ("rows",)),
      ...                       in_specs=P("rows"), out_specs=P("rows"))
      >>> u, _, vt = jnp.linalg.svd(x, full_matrices=False)
      >>> bool(jnp.allclose(polar(x), u @ vt, atol=1e-5))
      True
    """
    q = orthonormalize(x, "cholesky_qr2", axis_name=axis_name)
    r = jax.lax.psum(jnp.swapaxes(q, -1, -2) @ x, axis_name)
    u, s, vt = jnp.linalg.svd(r, full_matrices=False)
    return q @ ((u * jnp.sign(s)[..., None, :]) @ vt)


@contextlib.contextmanager
def row_sharded_polar(mesh: Mesh, axis_name: str = "fsdp") -> Iterator[None]:
    """Trace manifold Muon's ``msign`` as :func:`sharded_msign` over ``axis_name``.

    Within the context (at trace time: enter it in the function ``jax.jit``
    traces), every ``msign`` of :func:`subjax.optim.manifold_muon` on a tall
    matrix (2-D) whose rows divide the axis size runs inside ``jax.shard_map``
    with the rows split over ``axis_name``: no device gathers the matrix. Other
    shapes (wide, rows not divisible, leaves with leading batch axes) keep the
    one-device SVD. :func:`subjax.parallel.fsdp_step` traces
    its step under this context.

    Raises:
      ValueError: ``axis_name`` is not a mesh axis.
    """
    check_axis(mesh, axis_name)
    token = _ROWS.set((mesh, axis_name))
    try:
        yield
    finally:
        _ROWS.reset(token)


def msign_rows(x: jax.Array) -> jax.Array | None:
    """:func:`sharded_msign` of a global ``x`` under :func:`row_sharded_polar`, else None."""
    active = _ROWS.get()
    if active is None or x.ndim != 2:
        return None
    mesh, axis = active
    m, k = x.shape
    if m < k or m % mesh.shape[axis]:
        return None
    spec = P(axis, None)
    return jax.shard_map(lambda xd: sharded_msign(xd, axis), mesh=mesh, in_specs=spec,
                         out_specs=spec)(x)
