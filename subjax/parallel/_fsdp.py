"""Fully sharded training (FSDP / ZeRO-3) with ``NamedSharding`` and ``jax.jit``.

Parameters and optimizer state live sharded over the ``fsdp`` axis of a 2-D
``(data, fsdp)`` mesh; the batch is split over both axes. The step is an ordinary
jitted function with ``in_shardings`` / ``out_shardings``: XLA's SPMD partitioner
(GSPMD) inserts the all-gathers of the weights for the forward and backward
passes and the reduce-scatters of the gradients, and every large array enters
and leaves the step sharded (XLA:CPU reduces gradients with an all-reduce and a
slice instead of a reduce-scatter).

* :func:`fsdp_spec` — the placement rule for one array shape.
* :func:`fsdp_shardings` — ``NamedSharding`` trees for the parameters, for any
  optax / subjax optimizer state (through ``optax.tree_map_params``) and for the
  batch.
* :func:`fsdp_step` — the jitted training step on those shardings.
* :func:`distributed_eigh` — the context under which K-FAC's and FISMO's
  factor eigendecompositions are split over the devices (each device decomposes
  a share of the factors); :func:`fsdp_step` traces its step under it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from subjax._core import static_int
from subjax.optim import _curvature as cv
from subjax.parallel._data import check_axis, train_step
from subjax.parallel._polar import row_sharded_polar

__all__ = ["FSDPShardings", "distributed_eigh", "fsdp_shardings", "fsdp_spec", "fsdp_step"]

PyTree = Any


def fsdp_spec(shape: Sequence[int], n: int, *, fsdp_axis: str = "fsdp",
              min_size: int = 2**16) -> P:
    """The ``PartitionSpec`` of an array of ``shape`` on an ``fsdp`` axis of size ``n``.

    An array with at least ``min_size`` elements and at least two axes is split
    over ``fsdp_axis`` along its longest axis whose length ``n`` divides (the
    first such on ties: the rows of a square or tall matrix, the rows of the
    tall form ``max(m, k) x min(m, k)`` in general); every other array —
    vectors, scalars, small matrices, shapes with no divisible axis — is
    replicated (``P()``). Low-rank optimizer states such as GaLore's projected
    moments (``max(m, k) x r``) thus follow the long side of the matrix they
    belong to.

    Example:
      >>> from subjax.parallel import fsdp_spec
      >>> fsdp_spec((4096, 1024), 8), fsdp_spec((1024, 4096), 8), fsdp_spec((1024,), 8)
      (P('fsdp', None), P(None, 'fsdp'), P())
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2 or math.prod(shape) < min_size:
        return P()
    best = None
    for i, s in enumerate(shape):
        if s % n == 0 and s >= n and (best is None or s > shape[best]):
            best = i
    if best is None:
        return P()
    return P(*[fsdp_axis if i == best else None for i in range(len(shape))])


class FSDPShardings(NamedTuple):
    """Shardings of a fully sharded training step (pytrees of ``NamedSharding``).

    Attributes:
      params: like the parameters.
      opt_state: like the optimizer state (``None`` when no optimizer was given).
      batch: one ``NamedSharding`` splitting the leading (batch) axis over the
        data-parallel axes (a prefix of every batch leaf).
      replicated: ``NamedSharding(mesh, P())`` (the loss, scalars).
      fsdp_axis: the mesh axis parameters and state are split over.
    """

    params: PyTree
    opt_state: PyTree
    batch: NamedSharding
    replicated: NamedSharding
    fsdp_axis: str = "fsdp"


def _shape(x) -> tuple[int, ...]:
    return tuple(getattr(x, "shape", ()))


def _mesh_axes(mesh, axes, argname: str) -> tuple[str, ...]:
    """``axes`` (a name, names, or None for every mesh axis) as a validated tuple."""
    if axes is None:
        return tuple(mesh.axis_names)
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    for ax in axes:
        check_axis(mesh, ax, argname=argname)
    return axes


def fsdp_shardings(
    params: PyTree,
    mesh: Mesh,
    optimizer: optax.GradientTransformation | None = None,
    opt_state: PyTree = None,
    *,
    fsdp_axis: str = "fsdp",
    batch_axes: str | Sequence[str] | None = None,
    min_size: int = 2**16,
) -> FSDPShardings:
    r"""``NamedSharding``\ s for parameters, optimizer state and batch of an FSDP step.

    Parameters follow :func:`fsdp_spec`: large matrices are split over
    ``fsdp_axis`` (along their longest divisible axis), small leaves are
    replicated. The optimizer state is mapped with ``optax.tree_map_params``:
    a leaf at a parameter's place in the state (Adam's moments, momentum, the
    per-parameter fields of subjax's states) gets the parameter's sharding when
    it has the parameter's shape, and its own :func:`fsdp_spec` otherwise (a
    K-FAC factor ``d x d``, a GaLore projected moment ``max(m, k) x r`` or
    basis); every other state leaf (counts, scalars, projector states outside
    the parameter tree) gets its own :func:`fsdp_spec`. The batch is split
    along its leading axis over ``batch_axes`` (default: every mesh axis, so
    that each device sees a distinct slice, as in ZeRO-3).

    Args:
      params: the parameters (arrays or ``jax.ShapeDtypeStruct``).
      mesh: a ``jax.sharding.Mesh`` (or ``AbstractMesh``) with ``fsdp_axis``.
      optimizer: the optax transformation whose state is to be sharded.
      opt_state: its state (arrays or abstract, e.g. ``jax.eval_shape(opt.init,
        params)``); computed abstractly from ``optimizer`` when omitted.
      fsdp_axis: the mesh axis parameters and state are split over.
      batch_axes: the mesh axis (or axes) the batch is split over; default all.
      min_size: arrays with fewer elements stay replicated.

    Returns:
      :class:`FSDPShardings`.

    Raises:
      ValueError: ``fsdp_axis`` or a batch axis is not a mesh axis.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from jax.sharding import Mesh
      >>> from subjax.parallel import fsdp_shardings
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
      >>> params = {"w": jnp.zeros((512, 256)), "b": jnp.zeros(256)}
      >>> sh = fsdp_shardings(params, mesh, optax.adam(1e-3))
      >>> sh.params["w"].spec, sh.params["b"].spec, sh.opt_state[0].mu["w"].spec
      (P('fsdp', None), P(), P('fsdp', None))
    """
    n = check_axis(mesh, fsdp_axis, argname="fsdp_axis")
    min_size = static_int(min_size, "min_size", 0)
    batch_axes = _mesh_axes(mesh, batch_axes, "batch_axes")

    def own(x) -> NamedSharding:
        return NamedSharding(mesh, fsdp_spec(_shape(x), n, fsdp_axis=fsdp_axis,
                                             min_size=min_size))

    param_sh = jax.tree.map(own, params)
    state_sh = None
    if optimizer is not None:
        if opt_state is None:
            opt_state = jax.eval_shape(optimizer.init, params)

        def like_param(leaf, p, sh):
            return sh if _shape(leaf) == _shape(p) else own(leaf)

        # tree_map_params marks the param-shaped subtrees of the state by running
        # init on a placeholder; an init that cannot run on it is mapped leafwise.
        try:
            state_sh = optax.tree_map_params(
                optimizer, like_param, opt_state, params, param_sh,
                transform_non_params=lambda v: jax.tree.map(own, v))
        except (TypeError, ValueError, AttributeError):
            state_sh = jax.tree.map(own, opt_state)
    batch = NamedSharding(mesh, P(batch_axes if len(batch_axes) > 1 else batch_axes[0]))
    return FSDPShardings(param_sh, state_sh, batch, NamedSharding(mesh, P()), fsdp_axis)


@contextlib.contextmanager
def distributed_eigh(mesh: Mesh, axes: str | Sequence[str] | None = None) -> Iterator[None]:
    """Split K-FAC's / FISMO's factor eigendecompositions over the devices of ``mesh``.

    A context manager for the *tracing* of a jitted step (enter it inside the
    function ``jax.jit`` traces). Within it, the eigendecompositions that
    :func:`subjax.optim.kfac` and :func:`subjax.optim.fismo` refresh are
    computed as in Distributed Shampoo and kfac-jax's distributed inverses:
    factors of equal shape are stacked, the stack is split over ``axes``
    (padded with identity matrices to a multiple of the number of devices), and
    each device runs the eigensolver only on its own ``ceil(L / p)`` of the
    ``L`` stacked factors — no device gathers another's factors; the
    eigen-pieces then go (all-to-all / broadcast) to wherever the optimizer
    state keeps them. The results are those of the one-device eigensolver,
    matrix by matrix. :func:`fsdp_step` traces its step under this context.

    Args:
      mesh: the ``jax.sharding.Mesh`` of the step.
      axes: the mesh axis (or axes) the stacks are split over; default every
        axis of the mesh (every device takes a share).

    Raises:
      ValueError: an axis is not a mesh axis.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jax.sharding import Mesh
      >>> from subjax.optim import kfac
      >>> from subjax.parallel import distributed_eigh
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
      >>> def update(opt, grads, state, params, stats):
      ...     with distributed_eigh(mesh):
      ...         return opt.update(grads, state, params, kfac_stats=stats)
    """
    with cv.distributed_eigh(mesh, _mesh_axes(mesh, axes, "axes")):
        yield


def fsdp_step(
    loss_fn: Callable[..., Any] | None,
    optimizer: optax.GradientTransformation,
    shardings: FSDPShardings,
    *,
    has_aux: bool = False,
    extra_args_fn: Callable[[PyTree, PyTree], dict] | None = None,
    grad_fn: Callable[[PyTree, PyTree], tuple] | None = None,
    donate: bool = False,
    distribute: bool = True,
) -> Callable[[PyTree, PyTree, PyTree], tuple]:
    r"""A jitted training step whose parameters and optimizer state stay sharded.

    The step is :func:`subjax.parallel.train_step` on the *global* batch (mean
    loss, its gradient, ``optimizer.update``), compiled with
    ``jax.jit(in_shardings=(params, opt_state, batch), out_shardings=(params,
    opt_state, replicated))`` from :func:`fsdp_shardings`. It computes the same
    update as the one-device step on the whole batch; XLA partitions the
    program: each weight is all-gathered where a matrix product needs it and
    its gradient is reduced back to its shard (a reduce-scatter; XLA:CPU emits
    an all-reduce and a slice), so the parameters and the optimizer state of the
    large matrices occupy ``1/p`` of their size per device between steps
    (``p`` = size of the ``fsdp`` axis). Within the step, a model written as
    unrolled layers keeps every gathered weight and the whole gradient as
    temporaries; a model whose blocks are stacked and run by
    ``jax.lax.scan(jax.checkpoint(block), ...)`` gathers one block at a time.

    Optimizers with batch statistics (K-FAC) get them from ``grad_fn`` on the
    global batch — no ``axis_name`` is needed: the reductions over the batch are
    the partitioner's. With ``distribute``, the factorizations that XLA cannot
    partition are split by hand: K-FAC's and FISMO's eigendecompositions of their
    Kronecker factors over every device of the mesh (:func:`distributed_eigh`:
    with ``L`` equal-shape factors on ``p`` devices, each device decomposes
    ``ceil(L / p)`` of them instead of all ``L``), and manifold Muon's polar
    factors on the rows of the ``fsdp`` axis
    (:func:`subjax.parallel.row_sharded_polar`: a sharded QR and a ``k x k`` SVD
    instead of an all-gather of the matrix).

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (the mean over the batch), or
        ``None`` with ``grad_fn``.
      optimizer: an ``optax.GradientTransformation``.
      shardings: from :func:`fsdp_shardings` (built with this optimizer).
      has_aux, extra_args_fn, grad_fn: as in :func:`subjax.parallel.train_step`.
      donate: donate the parameter and state buffers to the step.
      distribute: trace the step under :func:`distributed_eigh` over all mesh
        axes and :func:`subjax.parallel.row_sharded_polar` over ``fsdp``
        (``False``: XLA's partitioning alone; every device decomposes every
        factor, polar factors gather their matrix).

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)``;
      ``step.lower(params, opt_state, batch)`` lowers it (arguments may be
      ``jax.ShapeDtypeStruct``) to read ``compiled.memory_analysis()`` and the
      HLO without running it.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from jax.sharding import Mesh
      >>> from subjax.parallel import fsdp_shardings, fsdp_step
      >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
      >>> loss = lambda p, b: jnp.mean((b["x"] @ p["w"] - b["y"]) ** 2)
      >>> params, opt = {"w": jnp.zeros((2, 1))}, optax.sgd(0.1)
      >>> sh = fsdp_shardings(params, mesh, opt)
      >>> step = fsdp_step(loss, opt, sh)
      >>> params = jax.device_put(params, sh.params)
      >>> state = jax.jit(opt.init, out_shardings=sh.opt_state)(params)
      >>> batch = jax.device_put({"x": jnp.eye(2), "y": jnp.ones((2, 1))}, sh.batch)
      >>> params, state, l = step(params, state, batch)
      >>> float(l)
      1.0

    References:
      Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion
      Parameter Models", SC 2020. Xu et al., "GSPMD: General and Scalable
      Parallelization for ML Computation Graphs", 2021.
    """
    if not isinstance(shardings, FSDPShardings):
        raise TypeError(
            f"`shardings` must come from fsdp_shardings(...), got {type(shardings).__name__}")
    if shardings.opt_state is None:
        raise ValueError("`shardings` has no optimizer-state shardings; build it with "
                         "fsdp_shardings(params, mesh, optimizer)")
    body = train_step(loss_fn, optimizer, has_aux=has_aux, extra_args_fn=extra_args_fn,
                      grad_fn=grad_fn)
    rep = shardings.replicated

    def step(params, opt_state, batch):
        if not distribute:
            return body(params, opt_state, batch)
        with distributed_eigh(rep.mesh), row_sharded_polar(rep.mesh, shardings.fsdp_axis):
            return body(params, opt_state, batch)

    return jax.jit(
        step,
        in_shardings=(shardings.params, shardings.opt_state, shardings.batch),
        out_shardings=(shardings.params, shardings.opt_state, rep),
        donate_argnums=(0, 1) if donate else (),
    )
