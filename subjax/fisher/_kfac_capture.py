"""K-FAC statistics capture: dense and convolution layers found in the traced model.

How it works. :func:`kfac_grads_and_stats` traces ``apply_fn(params, inputs)`` to a
jaxpr once and finds its *layers*: every ``dot_general`` or
``conv_general_dilated`` whose weight operand is a ``kernel`` leaf of ``params``
(possibly cast, as mixed precision and Flax's dtype promotion do). It then runs
that jaxpr again with each product's output ``y`` replaced by ``y + e`` (a zero
"tap") and with the product's input rows ``a = [x, 1]`` (a 1 appended when the
layer has a ``bias``; input patches for a convolution) recorded on the side.
Differentiating with respect to ``e`` gives the gradient of the loss with
respect to the layer's outputs, so one forward and one (or two) backward passes
give the parameter gradients *and* the Kronecker factors::

    A = (1/R) sum_rows a a^T                  (d_in + 1, d_in + 1)
    G = (1/N) sum_rows delta delta^T          (d_out, d_out)

where ``delta`` is the per-example gradient of the NLL with respect to the
layer's outputs, with targets *sampled* from the model (``fisher="true"``, the
K-FAC Fisher) or the observed labels (``fisher="empirical"``); ``N`` is the
batch size and ``R`` the number of rows the layer saw (``R = N`` for an MLP;
for inputs with extra axes or a layer applied several times the rows are pooled,
K-FAC-expand style, or averaged per example first with
``weight_sharing="reduce"``).

Nothing is registered and nothing is mutated: the same rule covers a Flax NNX
model (``apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)``; its
``nnx.Linear`` / ``nnx.Conv`` layers compute exactly these products) and a
pure-JAX function written with ``x @ params["enc"]["kernel"] + ...``. The
layer's name is the path of its ``kernel`` leaf without the last key
(:func:`param_paths` and :func:`subjax._core.path_name`: ``"encoder/0"``),
the name :func:`subjax.optim.kfac` looks the statistics up by.

What counts as a layer. A ``kernel`` leaf (ndim >= 2; a convolution kernel is
``(*window, c_in, c_out)``) every use of which is a product with the kernel's
first axis (``d_in``) contracted against one axis of the other operand, or a
convolution with the kernel in that window-input-output layout and no feature
or batch groups. Calls of ``jax.jit`` functions and ``jax.checkpoint`` blocks
that receive a kernel are followed (the capture inlines them). A kernel used in
any other way (inside ``lax.scan``, a custom derivative, a reshape, a norm of
the weights, ...) is not a layer: it gets no statistics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

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


def param_paths(tree) -> list[tuple]:
    """Key path of every leaf, without the trailing ``.value`` of an NNX variable."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        last = path[-1] if path else None
        if isinstance(last, jax.tree_util.GetAttrKey) and last.name in ("value", "raw_value"):
            path = path[:-1]
        paths.append(path)
    return paths


class KernelLeaves(NamedTuple):
    """A candidate layer of a params pytree: its name and leaf indices."""

    name: str  # path of the kernel without its last key, "/"-joined
    kernel: int  # index of the kernel leaf in jax.tree.leaves(params)
    bias: int | None  # index of the 1-D bias beside it, or None


def kernel_leaves(params) -> tuple[KernelLeaves, ...]:
    """Every ``kernel`` leaf of ndim >= 2 of ``params``, with its ``bias`` sibling.

    The bias is the leaf ``bias`` under the same path, 1-D, of the kernel's last
    size; the layer's name is the kernel's path without ``kernel``.
    """
    leaves = jax.tree.leaves(params)
    paths = param_paths(params)
    index = {path_name(p): i for i, p in enumerate(paths)}
    found = []
    for i, p in enumerate(paths):
        if not p or path_name(p[-1:]) != "kernel" or jnp.ndim(leaves[i]) < 2:
            continue
        b = index.get(path_name(p[:-1] + (jax.tree_util.DictKey("bias"),)))
        if b is not None and (jnp.ndim(leaves[b]) != 1
                              or jnp.shape(leaves[b])[0] != jnp.shape(leaves[i])[-1]):
            b = None
        found.append(KernelLeaves(path_name(p[:-1]), i, b))
    return tuple(found)


# -- finding and tapping the layer products in the model's jaxpr --------------------------

# a kernel keeps its identity through these (dtype casts, sharding annotations)
_PASS_THROUGH = frozenset({"convert_element_type", "copy", "copy_p", "sharding_constraint",
                           "mesh_cast", "reshard", "pvary", "pcast"})
# calls the capture follows into (and inlines) when they receive a kernel
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "checkpoint", "remat", "remat2"})


class _Product(NamedTuple):
    name: str  # the layer
    x: int  # position of the layer input among the equation's operands
    kind: str  # "dense" | "conv"


def _product(eqn, named: list) -> _Product | None:
    """The layer product computed by ``eqn`` (``named``: kernel name of each operand)."""
    ins = eqn.invars
    if eqn.primitive.name == "dot_general" and len(ins) == 2:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        for k, ck, cx in ((1, rc, lc), (0, lc, rc)):
            if (named[k] is not None and named[1 - k] is None and not lb and not rb
                    and tuple(ck) == (0,) and len(cx) == 1 and ins[k].aval.ndim == 2):
                return _Product(named[k], 1 - k, "dense")
    if (eqn.primitive.name == "conv_general_dilated" and named[1] is not None
            and named[0] is None):
        p, nsp = eqn.params, ins[1].aval.ndim - 2
        if (p["feature_group_count"] == 1 and p["batch_group_count"] == 1 and 1 <= nsp <= 3
                and tuple(p["dimension_numbers"].rhs_spec) == (nsp + 1, nsp, *range(nsp))):
            return _Product(named[1], 0, "conv")
    return None


def _out_perm(eqn, prod: _Product) -> tuple[int, ...]:
    """Axes of the product's output in row order with ``d_out`` last."""
    nd = eqn.outvars[0].aval.ndim
    if prod.kind == "conv":
        o = eqn.params["dimension_numbers"].out_spec
        return (o[0], *o[2:], o[1])
    return tuple(range(nd)) if prod.x == 0 else (*range(1, nd), 0)


def _input_rows(eqn, prod: _Product, x) -> jax.Array:
    """The layer's input rows ``(..., d_in)``, aligned with :func:`_out_perm` of its output.

    A dense product contracts the kernel's ``d_in`` with one axis of ``x``, which goes
    last. A convolution is the dense layer ``patches @ kernel.reshape(-1, c_out)`` at
    every output position; its patches have features ordered like that reshape
    (window position major, input channel minor).
    """
    x = jax.lax.stop_gradient(x)
    if prod.kind == "dense":
        (lc, rc), _ = eqn.params["dimension_numbers"]
        return jnp.moveaxis(x, (lc if prod.x == 0 else rc)[0], -1)
    p = eqn.params
    lhs = p["dimension_numbers"].lhs_spec
    window = tuple(eqn.invars[1].aval.shape[:-2])
    nsp = len(window)
    x = jnp.transpose(x, (lhs[0], *lhs[2:], lhs[1]))  # (N, *spatial, c_in)
    spec = "N" + "DHW"[-nsp:] + "C"
    patches = jax.lax.conv_general_dilated_patches(
        x, window, p["window_strides"], p["padding"], lhs_dilation=p["lhs_dilation"],
        rhs_dilation=p["rhs_dilation"], dimension_numbers=(spec, spec[1:-1] + "IO", spec),
        precision=jax.lax.Precision.HIGHEST)
    patches = patches.reshape(patches.shape[:-1] + (x.shape[-1],) + window)  # channel major
    patches = jnp.moveaxis(patches, nsp + 1, -1)
    return patches.reshape(patches.shape[: nsp + 1] + (-1,))


class _Tap(NamedTuple):
    name: str
    out: jax.ShapeDtypeStruct  # the product's output
    perm: tuple[int, ...]  # its axes in row order, d_out last


class _Recorder:
    """What one run of the model's jaxpr saw; handed explicitly through :func:`_run`.

    Analysis run (``eps=None``): the products of every kernel, in order, and the
    kernels with another use. Tapped run: ``eps[key]`` added to the output of the
    product ``key`` (``"name#i"``: the i-th product of layer ``name``) and its input
    rows recorded.
    """

    def __init__(self, eps=None):
        self.eps = eps
        self.counts: dict[str, int] = {}
        self.taps: dict[str, _Tap] = {}
        self.rows: dict[str, jax.Array] = {}
        self.other: set[str] = set()

    def tap(self, eqn, prod: _Product, y=None, x=None):
        i = self.counts.get(prod.name, 0)
        self.counts[prod.name] = i + 1
        key = f"{prod.name}#{i}"
        if self.eps is None:
            aval = eqn.outvars[0].aval
            self.taps[key] = _Tap(prod.name, jax.ShapeDtypeStruct(aval.shape, aval.dtype),
                                  _out_perm(eqn, prod))
            return y
        self.rows[key] = _input_rows(eqn, prod, x)
        return y + self.eps[key].astype(y.dtype)


def _called(eqn):
    """``(jaxpr, consts)`` of a call the capture follows into, or None."""
    if eqn.primitive.name not in _CALLS:
        return None
    j = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
    if isinstance(j, jcore.ClosedJaxpr):
        return j.jaxpr, j.consts
    if isinstance(j, jcore.Jaxpr):
        return j, ()
    return None


def _bind(eqn, args) -> list:
    """The outputs of one equation applied to ``args`` (as ``jax.core.eval_jaxpr`` does)."""
    prim = eqn.primitive
    with eqn.ctx.manager:
        ans = prim.bind(*args, **prim.get_bind_params(eqn.params))
    return list(ans) if prim.multiple_results else [ans]


def _run(jaxpr, consts, args, origin: dict, rec: _Recorder):
    """Run (``args`` given) or only analyse (``args=None``) ``jaxpr`` with taps.

    ``origin`` maps variables to the name of the kernel they hold (a params leaf,
    or a cast of one). Returns the outputs (None when analysing) and the kernel
    name of each output (or None).
    """
    env = {}
    if args is not None:
        env.update(zip(jaxpr.constvars, consts, strict=True))
        env.update(zip(jaxpr.invars, args, strict=True))

    def read(v):
        return v.val if isinstance(v, jcore.Literal) else env[v]

    def name_of(v):
        return origin.get(v) if isinstance(v, jcore.Var) else None

    for eqn in jaxpr.eqns:
        named = [name_of(v) for v in eqn.invars]
        if all(n is None for n in named):  # no kernel involved: as traced
            if args is not None:
                env.update(zip(eqn.outvars, _bind(eqn, map(read, eqn.invars)), strict=True))
            continue
        called = _called(eqn)
        if called is not None:  # follow the kernel into the call
            inner = {v: n for v, n in zip(called[0].invars, named, strict=True)
                     if n is not None}
            ans, out_named = _run(called[0], called[1],
                                  None if args is None else list(map(read, eqn.invars)),
                                  inner, rec)
            origin.update({v: n for v, n in zip(eqn.outvars, out_named, strict=True)
                           if n is not None})
            if args is not None:
                env.update(zip(eqn.outvars, ans, strict=True))
            continue
        prod = _product(eqn, named)
        if prod is None:
            if eqn.primitive.name in _PASS_THROUGH and len(eqn.invars) == len(eqn.outvars):
                origin.update({v: n for v, n in zip(eqn.outvars, named, strict=True)
                               if n is not None})
            else:
                rec.other.update(n for n in named if n is not None)
        if args is None:
            if prod is not None:
                rec.tap(eqn, prod)
            continue
        ans = _bind(eqn, map(read, eqn.invars))
        if prod is not None:
            ans = [rec.tap(eqn, prod, ans[0], read(eqn.invars[prod.x]))]
        env.update(zip(eqn.outvars, ans, strict=True))
    out_named = [name_of(v) for v in jaxpr.outvars]
    return (None if args is None else [read(v) for v in jaxpr.outvars]), out_named


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
      apply_fn: ``(params, inputs) -> outputs``, a Flax NNX model merged from
        ``params`` or a pure-JAX function; its layers are found in its trace (module
        docstring): each ``kernel`` leaf of ``params`` used only as ``x @ kernel``
        or as a convolution kernel. There must be at least one.
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

    closed, out_shape = jax.make_jaxpr(apply_fn, return_shape=True)(params, inputs)
    lk.check_outputs(likelihood, out_shape)
    lk.check_labels(likelihood, out_shape, labels)
    table = {k.name: k for k in kernel_leaves(params)}

    def origin(names):
        return {closed.jaxpr.invars[k.kernel]: k.name for k in table.values() if k.name in names}

    found = _Recorder()
    _, out_named = _run(closed.jaxpr, closed.consts, None, origin(table), found)
    found.other.update(n for n in out_named if n is not None)
    taps = {key: t for key, t in found.taps.items() if t.name not in found.other}
    if not taps:
        raise ValueError(
            "`apply_fn` runs no dense or convolution layer for K-FAC: a layer is a 'kernel' "
            "leaf of `params` (ndim >= 2, an optional 'bias' beside it) used only as "
            "`x @ kernel` or as a convolution kernel; found kernels "
            f"{sorted(table)}, of which {sorted(found.other)} have other uses")
    layers = {t.name for t in taps.values()}
    eps0 = {key: _vary_like(jnp.zeros(t.out.shape, t.out.dtype), inputs)
            for key, t in taps.items()}
    out_tree = jax.tree.structure(out_shape)

    def tapped(p, eps):
        rec = _Recorder(eps)
        outs, _ = _run(closed.jaxpr, closed.consts, jax.tree.leaves((p, inputs)),
                       origin(layers), rec)
        return jax.tree.unflatten(out_tree, outs), rec.rows

    out, f_jvp, f_vjp, acts = _linear_pass(tapped, params, eps0, has_aux=True)
    loss, cot = jax.value_and_grad(lambda z: lk.mean_nll(likelihood, z, labels))(out)
    grads, eps_grads = f_vjp(cot.astype(out.dtype))
    if fisher == "true":
        y_s = lk.sample(likelihood, key, out)
        cot_s = jax.grad(lambda z: lk.mean_nll(likelihood, z, y_s))(out)
        _, eps_grads = f_vjp(cot_s.astype(out.dtype))
    stats = {}
    for name in dict.fromkeys(t.name for t in taps.values()):  # in order of first use
        keys = [key for key, t in taps.items() if t.name == name]
        rows, outs = [], []
        for key in keys:
            a = acts[key].astype(compute_dtype(acts[key].dtype))
            if table[name].bias is not None:
                a = jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)
            d = jnp.transpose(eps_grads[key], taps[key].perm).astype(a.dtype)
            if weight_sharing == "reduce" and (d.ndim < 2 or d.shape[0] != n):
                raise ValueError(
                    f"weight_sharing='reduce' groups a layer's rows by example: layer "
                    f"{name!r} computed outputs of shape {d.shape} (rows, d_out last), whose "
                    f"leading axis is not the batch axis ({n})")
            rows.append(a)
            outs.append(d)
        if weight_sharing == "expand":  # every row is an example
            a = jnp.concatenate([r.reshape(-1, r.shape[-1]) for r in rows], axis=0)
            d = jnp.concatenate([o.reshape(-1, o.shape[-1]) for o in outs], axis=0)
        else:  # reduce: one row per example, inputs averaged, output gradients summed
            a = jnp.concatenate([r.reshape(n, -1, r.shape[-1]) for r in rows],
                                axis=1).mean(axis=1)
            d = jnp.concatenate([o.reshape(n, -1, o.shape[-1]) for o in outs],
                                axis=1).sum(axis=1)
        a_f = (a.T @ a) / a.shape[0]
        g_f = (d.T @ d) * n  # delta = n * d  ->  (1/n) sum delta delta^T
        stats[name] = KFACStats(a=a_f, g=g_f)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    if linearization:
        no_tap = jax.tree.map(jnp.zeros_like, eps0)
        return loss, grads, stats, Linearization(out, lambda v: f_jvp(v, no_tap), likelihood)
    return loss, grads, stats
