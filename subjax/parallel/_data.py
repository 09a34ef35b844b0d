"""Data parallelism with ``jax.shard_map``: split the batch over a mesh axis, average grads.

Two pieces that compose:

* :func:`train_step` builds an ordinary per-shard training step
  ``(params, opt_state, batch) -> (params, opt_state, loss)`` from a loss and an
  optax optimizer. Given ``axis_name`` it averages the loss and the gradients over
  that axis with ``jax.lax.pmean``; the very same function runs under
  ``jax.shard_map``, ``jax.pmap`` or (``axis_name=None``) on one device.
* :func:`data_parallel` turns any per-shard step into a jitted ``shard_map``-ed
  step: the arguments named by ``batch_argnums`` are split along their leading
  axis over ``axis_name``; every other argument and every output is replicated.

Helpers :func:`shard_batch` and :func:`replicate` place host data on a mesh; they
also work when the mesh spans several processes (``jax.distributed``), where each
process passes only its own slice of the batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "data_parallel",
    "train_step",
    "shard_batch",
    "replicate",
    "check_axis",
    "axis_size",
]

PyTree = Any


def check_axis(mesh: Mesh, axis_name: str, *, argname: str = "axis_name") -> int:
    """Validate that ``axis_name`` names an axis of ``mesh``; return its size.

    Raises:
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` / ``AbstractMesh``.
      ValueError: ``axis_name`` is not one of ``mesh.axis_names``.
    """
    if not isinstance(mesh, (Mesh, jax.sharding.AbstractMesh)):
        raise TypeError(f"`mesh` must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if not isinstance(axis_name, str):
        raise TypeError(f"`{argname}` must be a str naming a mesh axis, got {axis_name!r}")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"{argname}={axis_name!r} is not an axis of the mesh; "
            f"mesh axis names are {tuple(mesh.axis_names)}"
        )
    return int(mesh.shape[axis_name])


def axis_size(mesh: Mesh, axis_name: str) -> int:
    """Number of devices along ``axis_name`` of ``mesh`` (validated)."""
    return check_axis(mesh, axis_name)


def _check_batch(batch: PyTree, n: int, axis_name: str, argname: str) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        raise ValueError(f"`{argname}` (a batch argument) has no array leaves to split")
    sizes = set()
    for leaf in leaves:
        shape = jnp.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`{argname}` (a batch argument) has a scalar leaf; every batch leaf needs a "
                f"leading batch axis to split over mesh axis {axis_name!r}"
            )
        sizes.add(int(shape[0]))
    if len(sizes) != 1:
        raise ValueError(
            f"`{argname}` (a batch argument) has leaves with different leading sizes "
            f"{sorted(sizes)}; they must share one batch axis"
        )
    (size,) = sizes
    if size % n:
        raise ValueError(
            f"batch size {size} of `{argname}` is not divisible by the size {n} of mesh axis "
            f"{axis_name!r}; pad or drop examples so that it is a multiple of {n}"
        )
    return size


def _normalize_argnums(batch_argnums: int | Sequence[int], nargs: int) -> tuple[int, ...]:
    if isinstance(batch_argnums, int):
        batch_argnums = (batch_argnums,)
    out = []
    for i in batch_argnums:
        if not isinstance(i, int):
            raise TypeError(f"`batch_argnums` must hold ints, got {i!r}")
        j = i + nargs if i < 0 else i
        if not 0 <= j < nargs:
            raise ValueError(
                f"batch_argnums entry {i} is out of range for a call with {nargs} positional "
                "arguments"
            )
        out.append(j)
    return tuple(sorted(set(out)))


def data_parallel(
    step_fn: Callable[..., Any],
    mesh: Mesh,
    *,
    axis_name: str = "data",
    batch_argnums: int | Sequence[int] = -1,
    out_specs: Any = None,
    donate_argnums: int | Sequence[int] = (),
    jit: bool = True,
    check_vma: bool = True,
) -> Callable[..., Any]:
    r"""Run ``step_fn`` data-parallel: batch split over ``axis_name``, the rest replicated.

    The returned function takes the same positional arguments as ``step_fn``.
    Every leaf of the arguments in ``batch_argnums`` is split along its leading
    axis into ``mesh.shape[axis_name]`` equal shards; ``step_fn`` runs once per
    shard inside :func:`jax.shard_map` and must itself average what has to agree
    across shards (gradients, loss, optimizer statistics) with
    ``jax.lax.pmean(x, axis_name)`` — :func:`train_step` does this for an optax
    optimizer. With ``n`` equal shards, the mean of the shard means is the mean
    over the full batch, so the step equals the single-device step on the whole
    batch (up to floating-point summation order):

    .. math:: \bar g = \frac1n \sum_{s=1}^n \nabla L(\theta; B_s)
              = \nabla L(\theta; B) \quad (|B_s| = |B|/n).

    Outputs are replicated (``out_specs=P()``) unless ``out_specs`` says otherwise;
    an output that still varies across shards (a gradient someone forgot to
    average) is rejected by shard_map's replication check at trace time.

    Args:
      step_fn: per-shard step; positional arguments only.
      mesh: a ``jax.sharding.Mesh`` (may have more axes; the others are left
        replicated).
      axis_name: the mesh axis to split the batch over.
      batch_argnums: index (or indices) of the batch argument(s); default the last.
      out_specs: optional ``PartitionSpec`` pytree (prefix) for the outputs;
        default replicated.
      donate_argnums: forwarded to ``jax.jit`` (e.g. ``(0, 1)`` to donate params and
        optimizer state).
      jit: wrap in ``jax.jit`` (default). With ``False`` the shard_map-ed function
        is returned unjitted (for use inside a larger jitted function).
      check_vma: forwarded to ``jax.shard_map``. With ``True`` (default) JAX tracks
        which values vary across shards, rejects a varying output returned as
        replicated, and differentiating w.r.t. a *replicated* value sums the
        cotangent over the axis. Code that differentiates w.r.t. arrays it creates
        itself (``jnp.zeros`` taps, as some curvature-statistics capture code does)
        then gets summed per-example cotangents; ``check_vma=False`` restores
        purely local autodiff (and drops the replication check).

    Returns:
      ``step(*args)`` with the same outputs as ``step_fn``; ``step.lower(*args)``
      lowers it for given (e.g. ``jax.ShapeDtypeStruct``) arguments, to inspect
      the compiled memory and collectives without running it.

    Raises:
      ValueError: ``axis_name`` not in the mesh, or a batch leading size not
        divisible by the axis size (raised when the step is called).

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from jax.sharding import Mesh
      >>> from subjax.parallel import data_parallel, train_step
      >>> mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
      >>> loss = lambda w, b: jnp.mean((b["x"] @ w - b["y"]) ** 2)
      >>> opt = optax.sgd(0.1)
      >>> step = data_parallel(train_step(loss, opt, axis_name="data"), mesh)
      >>> w = jnp.zeros(2)
      >>> batch = {"x": jnp.eye(2), "y": jnp.ones(2)}
      >>> w, s, l = step(w, opt.init(w), batch)
      >>> float(l)
      1.0

    References:
      Li et al., "PyTorch Distributed: Experiences on Accelerating Data Parallel
      Training", VLDB 2020 (the all-reduce data-parallel step). JAX
      documentation, "Manual parallelism with shard_map".
    """
    n = check_axis(mesh, axis_name)
    if not callable(step_fn):
        raise TypeError(f"`step_fn` must be callable, got {type(step_fn).__name__}")
    if isinstance(donate_argnums, int):
        donate_argnums = (donate_argnums,)
    donate_argnums = tuple(donate_argnums)
    out = P() if out_specs is None else out_specs
    cache: dict[tuple[int, ...], Callable[..., Any]] = {}

    def build(nargs: int, argnums: tuple[int, ...]) -> Callable[..., Any]:
        key = (nargs, *argnums)
        if key not in cache:
            in_specs = tuple(P(axis_name) if i in argnums else P() for i in range(nargs))
            fn = jax.shard_map(
                step_fn, mesh=mesh, in_specs=in_specs, out_specs=out, check_vma=check_vma
            )
            if jit:
                fn = jax.jit(fn, donate_argnums=donate_argnums)
            cache[key] = fn
        return cache[key]

    @functools.wraps(step_fn)
    def step(*args):
        argnums = _normalize_argnums(batch_argnums, len(args))
        for i in argnums:
            _check_batch(args[i], n, axis_name, f"args[{i}]")
        fn = build(len(args), argnums)
        try:
            return fn(*args)
        except ValueError as e:
            if "require replication" in str(e) or "varying" in str(e).lower():
                raise ValueError(
                    f"an output of `step_fn` varies across mesh axis {axis_name!r} but is "
                    "returned replicated; average it inside the step with "
                    f"jax.lax.pmean(x, {axis_name!r}) (gradients, loss, statistics) or give "
                    f"`out_specs` for outputs that are meant to stay sharded. JAX said: {e}"
                ) from e
            raise

    def lower(*args):
        """``jax.jit(...).lower`` of the step for these (possibly abstract) arguments."""
        if not jit:
            raise ValueError("`lower` needs data_parallel(..., jit=True)")
        argnums = _normalize_argnums(batch_argnums, len(args))
        for i in argnums:
            _check_batch(args[i], n, axis_name, f"args[{i}]")
        return build(len(args), argnums).lower(*args)

    step.lower = lower
    return step


def _pmean_floats(tree: PyTree, axis_name: str) -> PyTree:
    def f(x):
        x = jnp.asarray(x)
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return jax.lax.pmean(x, axis_name)
        return x

    return jax.tree_util.tree_map(f, tree)


def train_step(
    loss_fn: Callable[..., Any],
    optimizer: optax.GradientTransformation,
    *,
    axis_name: str | None = None,
    has_aux: bool = False,
    extra_args_fn: Callable[[PyTree, PyTree], dict] | None = None,
    grad_fn: Callable[[PyTree, PyTree], tuple] | None = None,
) -> Callable[[PyTree, PyTree, PyTree], tuple]:
    r"""A training step ``(params, opt_state, batch) -> (params, opt_state, loss)``.

    Computes ``loss_fn(params, batch)`` and its gradient on the local batch, then
    (when ``axis_name`` is given) averages loss and gradients over the named axis,
    and applies ``optimizer``:

    .. math:: g = \operatorname{pmean}_{\text{axis}} \nabla_\theta L(\theta; B_\text{local}),
              \quad \theta \leftarrow \theta + \text{update}(g).

    ``optimizer.update`` receives ``params`` (Riemannian and weight-decay
    transforms need them) and, if ``extra_args_fn`` is given, the keyword
    arguments it returns, computed on the *local* shard — e.g. K-FAC curvature
    statistics. Such optimizers average their statistics themselves: build
    them with the same ``axis_name`` (``subjax.optim.kfac(..., axis_name="data")``),
    so that the 8-shard step equals the 1-device step.

    The step runs under :func:`data_parallel` (``shard_map``), under ``jax.pmap``
    with the same ``axis_name``, or — with ``axis_name=None`` — on one device.

    Args:
      loss_fn: ``loss_fn(params, batch) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``); the loss is the mean over the examples of ``batch``.
      optimizer: an ``optax.GradientTransformation`` (extra-args variants too).
      axis_name: mapped axis to average over, or ``None`` on a single device.
      has_aux: ``loss_fn`` returns ``(loss, aux)``; floating aux leaves are
        averaged over the axis too.
      extra_args_fn: optional ``(params, local_batch) -> dict`` of extra keyword
        arguments for ``optimizer.update``.
      grad_fn: optional ``(params, local_batch) -> (loss, grads, extra)`` used instead
        of ``jax.value_and_grad(loss_fn)`` when the gradient and the optimizer's
        statistics come out of one pass, e.g. K-FAC::

            def grad_fn(p, b):
                loss, g, stats = subjax.fisher.kfac_grads_and_stats(
                    apply_fn, p, b["x"], b["y"], fisher="empirical")
                return loss, g, {"kfac_stats": stats}

        ``loss_fn`` may then be ``None``; ``extra`` is merged with
        ``extra_args_fn``'s.

    Returns:
      ``step(params, opt_state, batch) -> (params, opt_state, loss)``; with
      ``has_aux`` the last element is ``(loss, aux)``.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from subjax.parallel import train_step
      >>> step = train_step(lambda w, b: jnp.sum((w - b) ** 2), optax.sgd(0.25))
      >>> w = jnp.zeros(2)
      >>> w, _, loss = step(w, optax.sgd(0.25).init(w), jnp.ones(2))
      >>> w.tolist(), float(loss)
      ([0.5, 0.5], 2.0)

    References:
      Goyal et al., "Accurate, Large Minibatch SGD: Training ImageNet in 1 Hour",
      2017 (synchronous data parallelism by gradient all-reduce).
    """
    if grad_fn is None and not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    if grad_fn is not None and not callable(grad_fn):
        raise TypeError(f"`grad_fn` must be callable, got {type(grad_fn).__name__}")
    if grad_fn is not None and has_aux:
        raise ValueError("`has_aux=True` is not supported with `grad_fn`; return aux in `extra`")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation (with init and update), "
            f"got {type(optimizer).__name__}"
        )
    if axis_name is not None and not isinstance(axis_name, str):
        raise TypeError(f"`axis_name` must be a str or None, got {axis_name!r}")

    def step(params, opt_state, batch):
        local = params
        if axis_name is not None:
            # Differentiate w.r.t. a per-shard copy so that the gradient stays local
            # (shard_map would otherwise psum it implicitly); average explicitly.
            local = _to_varying(params, axis_name)
        if grad_fn is None:
            out, grads = jax.value_and_grad(loss_fn, has_aux=has_aux)(local, batch)
            extra = {}
        else:
            out, grads, extra = grad_fn(local, batch)
            extra = dict(extra)
        if extra_args_fn is not None:
            extra.update(extra_args_fn(local, batch))
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            out = (
                (jax.lax.pmean(out[0], axis_name), _pmean_floats(out[1], axis_name))
                if has_aux
                else jax.lax.pmean(out, axis_name)
            )
        updates, opt_state = optimizer.update(grads, opt_state, params, **extra)
        params = optax.apply_updates(params, updates)
        return params, opt_state, out

    return step


def _to_varying(tree: PyTree, axis_name: str) -> PyTree:
    """Mark replicated values as per-shard (no-op outside shard_map's VMA typing)."""

    def f(x):
        try:
            return jax.lax.pcast(x, axis_name, to="varying")
        except ValueError as e:  # already varying (e.g. a sharded input): keep it
            if "from=varying" in str(e):
                return x
            raise

    return jax.tree_util.tree_map(f, tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place every leaf of ``tree`` on all devices of ``mesh`` (replicated).

    Works across processes: each process passes the same full value.
    """
    sharding = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )


def shard_batch(batch: PyTree, mesh: Mesh, axis_name: str | Sequence[str] = "data") -> PyTree:
    """Split ``batch`` (leading axis) over ``axis_name`` of ``mesh`` as a global array.

    ``axis_name`` may be a tuple of mesh axes (``("data", "fsdp")`` for
    :func:`subjax.parallel.fsdp_step`): the batch is then split over their product.

    In a single process ``batch`` is the full batch. When the mesh spans several
    processes, each process passes its own contiguous slice (its
    ``1/process_count`` share, in process order) and the result is the global
    batch, as with ``jax.make_array_from_process_local_data``.

    Raises:
      ValueError: ``axis_name`` not in the mesh, or the global batch size not
        divisible by the axis size.
    """
    axes = (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)
    if not axes:
        raise ValueError("`axis_name` must name at least one mesh axis")
    n = 1
    for ax in axes:
        n *= check_axis(mesh, ax)
    local = _check_batch(batch, 1, axis_name, "batch")
    global_size = local * jax.process_count()
    if global_size % n:
        raise ValueError(
            f"batch size {global_size} of `batch` is not divisible by the size {n} of mesh "
            f"axis {axis_name!r}"
        )
    sharding = NamedSharding(mesh, P(axes if len(axes) > 1 else axes[0]))

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_process_local_data(
            sharding, x, (global_size, *x.shape[1:])
        )

    return jax.tree_util.tree_map(put, batch)
