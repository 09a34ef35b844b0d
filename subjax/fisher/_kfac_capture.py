"""Capture of K-FAC statistics from dense layers, without rewriting the model.

How it works. A *registered* dense layer computes ``y = x @ kernel + bias`` as
usual; while a capture is active (only inside :func:`kfac_grads_and_stats`) it
additionally records its input rows ``a = [x, 1]`` and adds a zero "tap" ``e``
to its output, ``y + e``. Differentiating with respect to ``e`` gives the
gradient of the loss with respect to the layer's pre-activations, so one forward
and one (or two) backward passes give the parameter gradients *and* the
Kronecker factors::

    A = (1/R) sum_rows a a^T                  (d_in + 1, d_in + 1)
    G = (1/N) sum_rows delta delta^T          (d_out, d_out)

where ``delta`` is the per-example gradient of the NLL with respect to the
layer's outputs, with targets *sampled* from the model (``fisher="true"``, the
K-FAC Fisher) or the observed labels (``fisher="empirical"``); ``N`` is the
batch size and ``R`` the number of rows the layer saw (``R = N`` for an MLP;
for inputs with extra axes or a layer applied several times the rows are pooled,
K-FAC-expand style, or averaged per example first with
``weight_sharing="reduce"``).

Registering layers:

- Flax NNX: :func:`register_dense(model)` turns every ``nnx.Linear`` of the
  model (in place) into a recording layer named by its path (``"encoder/0"``).
  Parameters, shapes and outputs are unchanged; outside a capture the layer is
  exactly ``nnx.Linear``.
- Pure JAX: call :func:`tag_dense(name, x, kernel, bias)` in place of
  ``x @ kernel + bias``, with ``name`` the path of the layer's parameters in the
  params pytree (``params["enc"]["kernel"]`` -> ``"enc"``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from subjax._core import choice, compute_dtype, path_name, static_int
from subjax.fisher import _likelihood as lk
from subjax.fisher._core import _batch_size

Params = Any


class Linearization(NamedTuple):
    """The model linearised at the current parameters on the current batch.

    Returned by :func:`kfac_grads_and_stats` with ``linearization=True``; the
    linear map reuses the residuals of the forward pass that gave the loss, the
    gradient and the statistics, so a Jacobian-vector product costs one linear
    pass (no second forward pass). Only valid inside the traced function that
    built it.

    Attributes:
      outputs: the model outputs ``z`` on the batch, ``(N, ...)``.
      jvp: ``v -> J v``, a params-shaped tangent to the output tangent.
      likelihood: the output likelihood the loss was computed with.
    """

    outputs: jax.Array
    jvp: Callable[[Any], jax.Array]
    likelihood: str


class KFACStats(NamedTuple):
    """Kronecker factors of one dense layer from one batch (float32, or float64 in x64).

    Attributes:
      a: ``(d_in + 1, d_in + 1)`` (``d_in`` without bias) second moment of inputs.
      g: ``(d_out, d_out)`` second moment of the per-example output gradients.
    """

    a: jax.Array
    g: jax.Array


_LOCAL = threading.local()


def _current():
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


class _Capture:
    def __init__(self, eps=None):
        self.eps = eps
        self.counts: dict[str, int] = {}
        self.shapes: dict[str, jax.ShapeDtypeStruct] = {}
        self.acts: dict[str, jax.Array] = {}
        self.meta: dict[str, tuple[int, int, bool]] = {}

    def __enter__(self):
        if not hasattr(_LOCAL, "stack"):
            _LOCAL.stack = []
        _LOCAL.stack.append(self)
        return self

    def __exit__(self, *exc):
        _LOCAL.stack.pop()

    def record(self, name: str, x, y, has_bias: bool):
        if not isinstance(name, str) or not name:
            raise ValueError(
                "a K-FAC-registered dense layer has no name: call "
                "subjax.fisher.register_dense(model) on the whole model"
            )
        d_in, d_out = x.shape[-1], y.shape[-1]
        prev = self.meta.get(name)
        if prev is not None and prev != (d_in, d_out, has_bias):
            raise ValueError(f"dense layer {name!r} was called with inconsistent shapes")
        self.meta[name] = (d_in, d_out, has_bias)
        i = self.counts.get(name, 0)
        self.counts[name] = i + 1
        key = f"{name}#{i}"
        if self.eps is None:  # shape pass
            self.shapes[key] = jax.ShapeDtypeStruct(y.shape, y.dtype)
            return y
        a = jax.lax.stop_gradient(x).reshape(-1, d_in).astype(compute_dtype(x.dtype))
        if has_bias:
            a = jnp.concatenate([a, jnp.ones((a.shape[0], 1), a.dtype)], axis=1)
        self.acts[key] = a
        return y + self.eps[key].astype(y.dtype)


def tag_dense(name: str, x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None):
    """``x @ kernel + bias``, recorded for K-FAC when a capture is active.

    Args:
      name: path of this layer's parameters in the params pytree, ``/``-joined
        (``params["enc"][0]["kernel"]`` -> ``"enc/0"``).
      x: inputs ``(..., d_in)``.
      kernel: ``(d_in, d_out)``.
      bias: ``(d_out,)`` or None.

    Returns:
      ``x @ kernel (+ bias)``.
    """
    if jnp.ndim(kernel) != 2:
        raise ValueError(f"`kernel` must be 2-D (d_in, d_out), got shape {jnp.shape(kernel)}")
    y = x @ kernel
    if bias is not None:
        y = y + bias
    cap = _current()
    if cap is None:
        return y
    return cap.record(name, x, y, bias is not None)


def conv_patches(conv, inputs) -> jax.Array:
    """The input patches of an ``nnx.Conv``: rows ``a`` with ``conv(x) = a @ W + b``.

    ``(N, *out_spatial, prod(kernel_size) * c_in)``, features in the order of
    ``kernel.reshape(-1, c_out)`` (window position major, input channel minor), so
    the convolution is the dense layer ``patches @ kernel.reshape(-1, c_out)``
    applied at every output position.
    """
    ks = tuple(conv.kernel_size)
    nsp = len(ks)
    if conv.feature_group_count != 1:
        raise ValueError(
            "K-FAC capture supports nnx.Conv with feature_group_count=1 only, got "
            f"{conv.feature_group_count}")
    per_dim = lambda v: (1,) * nsp if v is None else (
        (v,) * nsp if isinstance(v, int) else tuple(v))
    x = inputs.reshape((-1,) + inputs.shape[inputs.ndim - nsp - 1:])
    strides, dil = per_dim(conv.strides), per_dim(conv.kernel_dilation)
    pad = conv.padding
    if isinstance(pad, str) and pad.upper() in ("CIRCULAR", "REFLECT", "CAUSAL"):
        raise ValueError(f"K-FAC capture does not support nnx.Conv padding={pad!r}")
    if not isinstance(pad, str):
        pad = [(p, p) if isinstance(p, int) else tuple(p) for p in per_dim(pad)]
    spec = "N" + "DHW"[-nsp:] + "C"
    p = jax.lax.conv_general_dilated_patches(
        x, ks, strides, pad, lhs_dilation=per_dim(conv.input_dilation), rhs_dilation=dil,
        dimension_numbers=(spec, "DHW"[-nsp:] + "IO", spec))
    c = x.shape[-1]
    p = p.reshape(p.shape[:-1] + (c,) + ks)  # features come out channel-major
    p = jnp.moveaxis(p, p.ndim - nsp - 1, -1)
    return p.reshape(p.shape[: 1 + nsp] + (-1,))


_RECORDING_CLASSES: dict[type, type] = {}


def _recording_class(base: type) -> type:
    from flax import nnx

    cls = _RECORDING_CLASSES.get(base)
    if cls is not None:
        return cls
    rows = conv_patches if issubclass(base, nnx.Conv) else (lambda mod, x: x)

    def __call__(self, inputs, *args, **kwargs):
        y = base.__call__(self, inputs, *args, **kwargs)
        cap = _current()
        if cap is None:
            return y
        return cap.record(self.kfac_name, rows(self, inputs), y,
                          getattr(self, "bias", None) is not None)

    cls = type(
        f"KFAC{base.__name__}",
        (base,),
        {"__call__": __call__, "__module__": __name__, "__qualname__": f"KFAC{base.__name__}",
         "_kfac_recording": True},
    )
    _RECORDING_CLASSES[base] = cls
    return cls


def register_dense(model, include: Callable[[tuple, Any], bool] | None = None) -> tuple[str, ...]:
    """Make every ``nnx.Linear`` and ``nnx.Conv`` of an NNX model record K-FAC statistics.

    A convolution is recorded as the dense layer it is on its input patches
    (:func:`conv_patches`): ``A`` over ``prod(kernel_size) * c_in + 1`` patch
    features, ``G`` over ``c_out``, every output position a row (pooled by
    ``weight_sharing`` as for sequences). Other layers (LayerNorm, embeddings, ...)
    are not recorded and get the identity preconditioner in ``subjax.optim.kfac``.

    Each selected layer's class becomes a recording subclass (same parameters,
    same outputs) and it gets a static ``kfac_name`` attribute: its path in the
    model (``"encoder/layers/0"``), which is also the path of its ``kernel`` in
    ``nnx.split(model, nnx.Param)``. Call it once, before ``nnx.split``.

    Args:
      model: a Flax NNX module.
      include: optional ``(path, layer) -> bool`` to register only some layers.

    Returns:
      The registered layer names, in traversal order.

    Raises:
      ValueError: if the model has no ``nnx.Linear`` / ``nnx.Conv`` layer (to select).
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise TypeError(f"`model` must be a flax.nnx.Module, got {type(model).__name__}")
    names = []
    for path, mod in nnx.iter_modules(model):
        if not isinstance(mod, nnx.Linear | nnx.Conv):
            continue
        if include is not None and not include(path, mod):
            continue
        name = path_name(path)
        if not getattr(type(mod), "_kfac_recording", False):
            mod.__class__ = _recording_class(type(mod))
        mod.kfac_name = name
        names.append(name)
    if not names:
        raise ValueError(
            "`model` has no nnx.Linear or nnx.Conv layer to register for K-FAC (only those "
            "and their subclasses are supported; use subjax.fisher.tag_dense in custom layers)"
        )
    return tuple(names)


def _varying_axes(tree) -> tuple:
    """Mesh axes over which the leaves of ``tree`` vary (inside ``shard_map``)."""
    axes: set = set()
    for leaf in jax.tree.leaves(tree):
        aval = jax.typeof(leaf)
        mat = getattr(aval, "manual_axis_type", None)
        varying = getattr(mat, "varying", None) if mat is not None else getattr(aval, "vma", None)
        axes |= set(varying or ())
    return tuple(sorted(axes))


def _vary_like(z, tree):
    """Mark the zero probe ``z`` as varying over the same mesh axes as ``tree``.

    Inside ``shard_map`` a fresh ``jnp.zeros`` is device-invariant, and the VJP with
    respect to an invariant input is summed over the devices; the per-example
    output-gradient probes must instead stay per-device (each device's shard).
    """
    axes = _varying_axes(tree)
    return jax.lax.pcast(z, axes, to="varying") if axes else z


def _linear_pass(fn, *primals, has_aux=False):
    """``fn`` linearised once: outputs, its JVP, its VJP (the JVP transposed), aux."""
    if has_aux:
        out, f_jvp, aux = jax.linearize(fn, *primals, has_aux=True)
    else:
        (out, f_jvp), aux = jax.linearize(fn, *primals), None
    f_vjp = jax.linear_transpose(f_jvp, *primals)
    return out, f_jvp, f_vjp, aux


def kfac_grads_and_stats(
    apply_fn: Callable,
    params: Params,
    inputs,
    labels,
    *,
    likelihood: str = "categorical",
    fisher: str = "true",
    key: jax.Array | None = None,
    stats_batch: int | None = None,
    weight_sharing: str = "expand",
    linearization: bool = False,
):
    """Loss, gradient and per-layer K-FAC factors in one forward pass.

    The loss is the mean NLL ``(1/N) sum_i nll(apply_fn(params, inputs)_i, labels_i)``
    of ``likelihood``. The model is linearised once; the backward pass for the
    gradient uses ``labels``; the ``G`` factors use targets sampled from the model
    (``fisher="true"``, an extra backward pass through the same linearisation) or
    the labels (``fisher="empirical"``, no extra pass).

    Args:
      apply_fn: ``(params, inputs) -> outputs``; must run at least one registered
        dense layer (:func:`register_dense` / :func:`tag_dense`).
      params: parameters (e.g. ``nnx.split(model, nnx.Param)[1]`` merged back
        inside ``apply_fn``).
      inputs: model inputs with a leading batch axis ``N``.
      labels: observed targets.
      likelihood: ``"categorical" | "bernoulli" | "gaussian"``.
      fisher: ``"true"`` (sampled targets; ``key`` required) or ``"empirical"``.
      key: PRNG key for the sampled targets.
      stats_batch: if set (static, < N), the factors come from a random subset of
        ``stats_batch`` examples (drawn with ``key``; the first ones when ``key`` is
        None): the gradient is still the full-batch one, the factor statistics cost
        a forward/backward pass over the subset only.
      weight_sharing: how a layer that sees several rows per example (a dense layer
        on ``(N, T, d)`` sequences, attention projections, a layer called several
        times) pools them (Eschenhagen et al., NeurIPS 2023). ``"expand"``: every
        row is an example, ``A = (1/(N R)) sum a a^T``, ``G = (1/N) sum delta
        delta^T`` over all ``N R`` rows. ``"reduce"``: one row per example, the
        inputs averaged and the output gradients summed over its ``R`` rows first
        (each call's leading axis must be the batch axis). The two agree when
        ``R = 1``.
      linearization: also return the model's :class:`Linearization` on the full
        batch (for ``subjax.optim.kfac(..., adaptive_step=True)``: its exact
        quadratic model then costs two linear passes, no new forward pass).

    Returns:
      ``(loss, grads, stats)`` with ``stats`` a dict ``layer name -> KFACStats``,
      to be passed to :func:`subjax.optim.kfac`'s ``update`` as ``kfac_stats=``;
      ``(loss, grads, stats, linearization)`` with ``linearization=True``.
    """
    lk.check_likelihood(likelihood)
    choice(fisher, "fisher", ("true", "empirical"))
    choice(weight_sharing, "weight_sharing", ("expand", "reduce"))
    if fisher == "true" and key is None:
        raise ValueError("`key` is required for fisher='true' (targets are sampled)")
    if labels is None:
        raise ValueError("`labels` is None: the training loss and its gradient need labels")
    n = _batch_size(inputs)
    if stats_batch is not None:
        stats_batch = static_int(stats_batch, "stats_batch", minimum=1)
        if stats_batch < n:
            if key is not None:
                key, k_sub = jax.random.split(key)
                idx = jax.random.permutation(k_sub, n)[:stats_batch]
            else:
                idx = jnp.arange(stats_batch)
            take = lambda t: jax.tree.map(lambda a: a[idx], t)
            _, _, stats = kfac_grads_and_stats(
                apply_fn, params, take(inputs), take(labels),
                likelihood=likelihood, fisher=fisher, key=key, weight_sharing=weight_sharing,
            )
            out, f_jvp, f_vjp, _ = _linear_pass(lambda p: apply_fn(p, inputs), params)
            loss, cot = jax.value_and_grad(lambda z: lk.mean_nll(likelihood, z, labels))(out)
            (grads,) = f_vjp(cot.astype(out.dtype))
            grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
            if linearization:
                return loss, grads, stats, Linearization(out, f_jvp, likelihood)
            return loss, grads, stats

    shape_cap = _Capture()
    with shape_cap:
        out_shape = jax.eval_shape(lambda p: apply_fn(p, inputs), params)
    if not shape_cap.shapes:
        raise ValueError(
            "no K-FAC-registered dense layer ran in `apply_fn`: call "
            "subjax.fisher.register_dense(model) on the NNX model before nnx.split, "
            "or compute dense layers with subjax.fisher.tag_dense(name, x, kernel, bias)"
        )
    lk.check_outputs(likelihood, out_shape)
    lk.check_labels(likelihood, out_shape, labels)
    meta = dict(shape_cap.meta)
    eps0 = {k: _vary_like(jnp.zeros(s.shape, s.dtype), inputs)
            for k, s in shape_cap.shapes.items()}

    def tapped(p, eps):
        cap = _Capture(eps)
        with cap:
            out = apply_fn(p, inputs)
        return out, cap.acts

    out, f_jvp, f_vjp, acts = _linear_pass(tapped, params, eps0, has_aux=True)
    loss, cot = jax.value_and_grad(lambda z: lk.mean_nll(likelihood, z, labels))(out)
    grads, eps_grads = f_vjp(cot.astype(out.dtype))
    if fisher == "true":
        y_s = lk.sample(likelihood, key, out)
        cot_s = jax.grad(lambda z: lk.mean_nll(likelihood, z, y_s))(out)
        _, eps_grads = f_vjp(cot_s.astype(out.dtype))
    stats = {}
    for name, (_, d_out, _) in meta.items():
        keys = [f"{name}#{i}" for i in range(shape_cap.counts[name])]
        if weight_sharing == "expand":  # every row is an example
            a = jnp.concatenate([acts[k] for k in keys], axis=0)
            d = jnp.concatenate(
                [eps_grads[k].reshape(-1, d_out).astype(a.dtype) for k in keys], axis=0)
        else:  # reduce: one row per example, inputs averaged, output gradients summed
            for k in keys:
                if len(shape_cap.shapes[k].shape) < 2 or shape_cap.shapes[k].shape[0] != n:
                    raise ValueError(
                        f"weight_sharing='reduce' groups a layer's rows by example: dense "
                        f"layer {name!r} was called on outputs of shape "
                        f"{shape_cap.shapes[k].shape}, whose leading axis is not the batch "
                        f"axis ({n})")
            a = jnp.concatenate([acts[k].reshape(n, -1, acts[k].shape[-1]) for k in keys],
                                axis=1).mean(axis=1)
            d = jnp.concatenate([eps_grads[k].reshape(n, -1, d_out) for k in keys],
                                axis=1).sum(axis=1).astype(a.dtype)
        a_f = (a.T @ a) / a.shape[0]
        g_f = (d.T @ d) * n  # delta = n * d  ->  (1/n) sum delta delta^T
        stats[name] = KFACStats(a=a_f, g=g_f)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    if linearization:
        no_tap = jax.tree.map(jnp.zeros_like, eps0)
        return loss, grads, stats, Linearization(out, lambda v: f_jvp(v, no_tap), likelihood)
    return loss, grads, stats
