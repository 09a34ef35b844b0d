"""subjax.parallel — multi-device and multi-host versions of subjax, on ``jax.shard_map``.

- :func:`data_parallel`, :func:`train_step`: a data-parallel training step
  (batch split over a mesh axis, gradients averaged with ``pmean``).
- :func:`fsdp_shardings`, :func:`fsdp_step`: fully sharded training (FSDP / ZeRO-3)
  on a ``(data, fsdp)`` mesh: large parameters and their optimizer state split over
  ``fsdp`` (``NamedSharding``, ``optax.tree_map_params``), a ``jax.jit`` step that
  keeps them sharded in and out; :func:`fsdp_spec` is the placement rule;
  :func:`distributed_eigh` splits K-FAC's / FISMO's factor eigendecompositions
  over the devices (on in :func:`fsdp_step`); :func:`sharded_subspace_projector`
  refreshes GaLore's basis on the row-sharded gradient (``psum``-ed Grams, no gather);
  :func:`row_sharded_polar` / :func:`sharded_msign`: manifold Muon's polar factor on
  a row-sharded matrix (sharded QR, no gather; on in :func:`fsdp_step`).
- :func:`shard_batch`, :func:`replicate`: put host data on a (multi-process) mesh.
- :func:`sharded_randomized_svd`, :func:`sharded_subspace_iteration`,
  :func:`sharded_orthonormalize`: tall matrices split by rows (Cholesky-QR2 with a
  ``psum`` of the small Gram matrix, TSQR fallback); equal to ``subjax.linalg``.
  :func:`sharded_lanczos_eigh`: thick-restarted Lanczos on a symmetric matrix split
  by rows (row-sharded basis, ``psum``-ed inner products).
- :func:`sharded_sinkhorn`, :func:`sharded_sinkhorn_newton`: the rows of a dense
  cost or point cloud split over the axis; ``subjax.ot``'s solvers run with
  ``axis_name`` inside ``shard_map`` (equal to the single-device solvers).

Multi-host: ``python -m subjax.parallel.launch`` / :func:`initialize` (``jax.distributed``
from ``SUBJAX_*`` environment variables; see ``docs/parallel.md``).
"""

from subjax._core import full_precision_exports
from subjax.parallel._data import (
    axis_size,
    check_axis,
    data_parallel,
    replicate,
    shard_batch,
    train_step,
)
from subjax.parallel._distributed import initialize
from subjax.parallel._fsdp import (
    FSDPShardings,
    distributed_eigh,
    fsdp_shardings,
    fsdp_spec,
    fsdp_step,
)
from subjax.parallel._linalg import (
    SHARDED_ORTH_METHODS,
    sharded_lanczos_eigh,
    sharded_orthonormalize,
    sharded_randomized_svd,
    sharded_subspace_iteration,
)
from subjax.parallel._ot import sharded_sinkhorn, sharded_sinkhorn_newton
from subjax.parallel._polar import row_sharded_polar, sharded_msign
from subjax.parallel._projector import sharded_subspace_projector

__all__ = [
    "FSDPShardings",
    "SHARDED_ORTH_METHODS",
    "axis_size",
    "check_axis",
    "data_parallel",
    "distributed_eigh",
    "fsdp_shardings",
    "fsdp_spec",
    "fsdp_step",
    "initialize",
    "replicate",
    "row_sharded_polar",
    "shard_batch",
    "sharded_lanczos_eigh",
    "sharded_msign",
    "sharded_orthonormalize",
    "sharded_randomized_svd",
    "sharded_sinkhorn",
    "sharded_sinkhorn_newton",
    "sharded_subspace_iteration",
    "sharded_subspace_projector",
    "train_step",
]

# the numerics run at full precision; the training-step helpers run the user's model as
# the user configured it
full_precision_exports(globals(), exclude=(
    "FSDPShardings", "axis_size", "check_axis", "data_parallel", "fsdp_shardings",
    "fsdp_spec", "fsdp_step", "initialize", "replicate", "shard_batch", "train_step"))
