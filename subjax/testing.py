"""subjax.testing — conformance checks for optax gradient transformations.

What an optax or Flax user relies on, as plain functions that raise
``AssertionError`` with a message: run them on your own transform (in pytest or
anywhere), the way subjax runs them on each of its optimizers. The checks cover
what ``optax.contrib``'s common test suite asserts — extra keyword arguments,
``optax.inject_hyperparams``, dtype preservation, gradient accumulation with
``optax.MultiSteps``, state stability under ``lax.cond``, learning-rate
schedules, convergence — plus an orbax checkpoint round trip,
``optax.tree_map_params``, ``flax.nnx.Optimizer`` under ``nnx.jit`` and complex
parameters (supported, or refused with a clear error).

A :class:`TransformCase` says how to build the transform and on which problem to
exercise it; :func:`check_all` runs every check.

Example:
  >>> import optax
  >>> from subjax.testing import TransformCase, check_all
  >>> case = TransformCase("sgd", optax.sgd, {"learning_rate": 0.05, "momentum": 0.9})
  >>> check_all(case, skip=("orbax", "nnx"))  # doctest: +SKIP

Not imported by ``import subjax``: ``import subjax.testing`` (it needs flax and
orbax, which subjax's optimizers do not).
"""

import dataclasses
import functools
import inspect
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

Params = Any
Batch = Any

__all__ = [
    "CHECKS",
    "TransformCase",
    "check_all",
    "check_complex_params",
    "check_converges",
    "check_dtype_preserved",
    "check_extra_args",
    "check_full_precision",
    "check_init_abstract",
    "check_inject_hyperparams",
    "check_jit_matches_eager",
    "check_multisteps",
    "check_nnx_optimizer",
    "check_orbax_round_trip",
    "check_schedule",
    "check_state_stable",
    "check_tree_map_params",
    "matmul_precisions",
    "quadratic_batch",
    "quadratic_loss",
    "quadratic_params",
]


# --- the default problem ------------------------------------------------------------


def quadratic_params(key: jax.Array, dtype=jnp.float32) -> Params:
    """A small two-leaf regression model: a ``(6, 4)`` matrix ``w`` and a ``(4,)`` bias ``b``."""
    k1, k2 = jax.random.split(key)
    return {
        "w": (0.1 * jax.random.normal(k1, (6, 4))).astype(dtype),
        "b": (0.1 * jax.random.normal(k2, (4,))).astype(dtype),
    }


def quadratic_batch(key: jax.Array) -> Batch:
    """Noiseless linear-regression data ``y = x w* + b*`` (64 samples)."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (64, 6))
    w_true = jax.random.normal(k2, (6, 4))
    b_true = jax.random.normal(k3, (4,))
    return {"x": x, "y": x @ w_true + b_true}


def quadratic_loss(params: Params, batch: Batch) -> jax.Array:
    """Mean squared error of the linear model (computed in float32)."""
    w = params["w"].astype(jnp.float32)
    b = params["b"].astype(jnp.float32)
    pred = batch["x"] @ w + b
    return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))


@dataclasses.dataclass(frozen=True)
class TransformCase:
    """One transform configuration and the problem it is checked on.

    Attributes:
      name: a label for messages and test ids.
      make: factory returning the transform; called as ``make(**kwargs)`` and as
        ``optax.inject_hyperparams(make, static_args)(**kwargs)``.
      kwargs: keyword arguments of ``make``; must include ``learning_rate``.
      static_args: arguments ``optax.inject_hyperparams`` must keep static
        (they fix shapes or loop lengths).
      init_params: ``(key, dtype) -> params`` (a pytree of dicts of arrays).
      make_batch: ``key -> batch``.
      loss: ``(params, batch) -> scalar``.
      grad_and_extra: optional ``(params, batch) -> (grads, extra_args)``; by
        default ``(jax.grad(loss)(params, batch), {})`` with the gradients cast
        to the parameters' dtypes. ``extra_args`` go to ``update`` as keywords.
      decrease_steps: steps of the convergence check.
      decrease_factor: the loss after ``decrease_steps`` must be below
        ``decrease_factor`` times the initial loss.
      dtypes: parameter dtypes of the dtype and accumulation checks.
      complex_steps: steps of the complex-parameter check (a 2 x 2 complex
        quadratic must reach its minimum, or ``init`` must refuse the
        parameters with a ``TypeError`` / ``ValueError`` that says "complex").
      complex_kwargs: ``kwargs`` for the complex check (default: ``kwargs``).
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    kwargs: dict
    static_args: tuple[str, ...] = ()
    init_params: Callable[..., Params] = quadratic_params
    make_batch: Callable[[jax.Array], Batch] = quadratic_batch
    loss: Callable[[Params, Batch], jax.Array] = quadratic_loss
    grad_and_extra: Callable[[Params, Batch], tuple[Params, dict]] | None = None
    decrease_steps: int = 100
    decrease_factor: float = 0.5
    dtypes: tuple = (jnp.float32, jnp.bfloat16)
    complex_steps: int = 300
    complex_kwargs: dict | None = None

    def grads(self, params: Params, batch: Batch) -> tuple[Params, dict]:
        """``(grads, extra_args)`` at ``params``."""
        if self.grad_and_extra is not None:
            return self.grad_and_extra(params, batch)
        g = jax.grad(self.loss)(params, batch)
        g = jax.tree.map(lambda gi, p: gi.astype(p.dtype), g, params)
        return g, {}

    def setup(self, dtype=jnp.float32) -> tuple[Params, Batch]:
        """``(params, batch)`` from fixed keys."""
        kp, kb = jax.random.split(jax.random.key(42))
        return self.init_params(kp, dtype), self.make_batch(kb)

    def transform(self) -> optax.GradientTransformation:
        return self.make(**self.kwargs)


# --- helpers ------------------------------------------------------------------------


def _fail(case: TransformCase, what: str) -> None:
    raise AssertionError(f"[{case.name}] {what}")


def _struct(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _close(case, what, a, b, rtol=2e-4, atol=2e-5):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        _fail(case, f"{what}: structures differ ({jax.tree.structure(a)} vs "
                    f"{jax.tree.structure(b)})")
    for x, y in zip(la, lb, strict=True):
        xx, yy = np.asarray(x), np.asarray(y)
        if np.issubdtype(xx.dtype, np.inexact) or np.issubdtype(yy.dtype, np.inexact):
            xx = xx.astype(np.complex128 if np.iscomplexobj(xx) else np.float64)
            yy = yy.astype(np.complex128 if np.iscomplexobj(yy) else np.float64)
        try:
            np.testing.assert_allclose(xx, yy, rtol=rtol, atol=atol)
        except AssertionError as e:
            _fail(case, f"{what}: {e}")


def _finite(case, what, tree):
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and not bool(
                jnp.all(jnp.isfinite(leaf))):
            _fail(case, f"{what}: non-finite values")


def _nonzero(tree) -> bool:
    return any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(tree))


def _step_fn(case: TransformCase, opt):
    @jax.jit
    def step(params, state, batch):
        grads, extra = case.grads(params, batch)
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step


# --- the checks ---------------------------------------------------------------------


def check_extra_args(case: TransformCase) -> None:
    """``update`` accepts (and ignores) an unknown keyword argument, under ``jit``,
    and does not recompile on the second call."""
    opt = case.transform()
    params, batch = case.setup()
    state = opt.init(params)
    grads, extra = case.grads(params, batch)

    @jax.jit
    def step(g, s, p, e):
        return opt.update(g, s, p, **e, unexpected_extra_arg_nobody_expects=1)

    try:
        u1, s1 = step(grads, state, params, extra)
    except TypeError as e:
        _fail(case, f"update rejects an extra keyword argument: {e} (return an "
                    "optax.GradientTransformationExtraArgs)")
    u0, _ = opt.update(grads, state, params, **extra)
    _close(case, "updates with an extra argument", u1, u0)
    step(grads, s1, params, extra)
    if step._cache_size() != 1:
        _fail(case, "update recompiled on the second call")


def check_jit_matches_eager(case: TransformCase) -> None:
    """Jitted and eager updates agree; state shapes and dtypes too."""
    opt = case.transform()
    params, batch = case.setup()
    state = opt.init(params)
    grads, extra = case.grads(params, batch)
    u_eager, s_eager = opt.update(grads, state, params, **extra)
    u_jit, s_jit = jax.jit(lambda g, s, p, e: opt.update(g, s, p, **e))(
        grads, state, params, extra)
    if jax.tree.structure(u_jit) != jax.tree.structure(grads):
        _fail(case, "updates do not have the gradients' structure")
    _close(case, "jit vs eager updates", u_jit, u_eager)
    if _struct(s_eager) != _struct(s_jit):
        _fail(case, "jit and eager states differ in shape or dtype")
    _finite(case, "updates", u_jit)


def check_init_abstract(case: TransformCase) -> None:
    """``init`` traces on ``jax.ShapeDtypeStruct`` parameters (``jax.eval_shape``)."""
    opt = case.transform()
    params, _ = case.setup()
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    if _struct(jax.eval_shape(opt.init, structs)) != _struct(opt.init(params)):
        _fail(case, "abstract and concrete init states differ")


def check_inject_hyperparams(case: TransformCase) -> None:
    """``optax.inject_hyperparams(make, static_args)`` works under ``jit``: the same
    updates and inner state as ``make``; a zero learning rate freezes the parameters."""
    direct = case.transform()
    try:
        injected = optax.inject_hyperparams(case.make, static_args=case.static_args)(
            **case.kwargs)
    except (TypeError, ValueError) as e:
        _fail(case, f"optax.inject_hyperparams(make) failed at construction: {e}")
    params, batch = case.setup()
    grads, extra = case.grads(params, batch)
    s_d = jax.jit(direct.init)(params)
    u_d, s_d = jax.jit(lambda g, s, p, e: direct.update(g, s, p, **e))(grads, s_d, params, extra)
    s_i = jax.jit(injected.init)(params)
    if "learning_rate" not in s_i.hyperparams:
        _fail(case, "learning_rate is not an injected hyperparameter")
    update_i = jax.jit(lambda g, s, p, e: injected.update(g, s, p, **e))
    try:
        u_i, s_i1 = update_i(grads, s_i, params, extra)
    except (TypeError, ValueError, jax.errors.ConcretizationTypeError) as e:
        _fail(case, f"injected update failed under jit: {e}")
    _close(case, "inject_hyperparams updates", u_i, u_d, rtol=1e-5, atol=1e-6)
    _close(case, "inject_hyperparams inner state", s_i1.inner_state, s_d, rtol=1e-5,
           atol=1e-5)
    if not _nonzero(u_i):
        _fail(case, "updates are all zero")
    s_i1.hyperparams["learning_rate"] = jnp.zeros_like(s_i1.hyperparams["learning_rate"])
    u0, _ = update_i(grads, s_i1, params, extra)
    if _nonzero(u0):
        _fail(case, "a zero learning rate does not freeze the parameters")


def check_dtype_preserved(case: TransformCase, dtype) -> None:
    """Parameters keep ``dtype`` (e.g. bfloat16) through two jitted steps and stay finite."""
    dtype = jnp.dtype(dtype)
    opt = case.transform()
    params, batch = case.setup(dtype)
    state = opt.init(params)
    step = _step_fn(case, opt)
    grads, extra = case.grads(params, batch)
    updates, _ = jax.jit(lambda g, s, p, e: opt.update(g, s, p, **e))(grads, state, params,
                                                                      extra)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
        if u.dtype != p.dtype:
            _fail(case, f"update dtype {u.dtype} for a {p.dtype} parameter")
    for _ in range(2):
        params, state = step(params, state, batch)
    for leaf in jax.tree.leaves(params):
        if leaf.dtype != dtype:
            _fail(case, f"parameter dtype changed to {leaf.dtype} from {dtype}")
    _finite(case, "parameters", params)


def check_multisteps(case: TransformCase, dtype=jnp.float32, every_k: int = 2) -> None:
    """Under ``optax.MultiSteps(every_k_schedule=k)`` the first ``k - 1`` micro-steps
    return exactly zero updates and the ``k``-th a non-zero one."""
    opt = optax.MultiSteps(case.transform(), every_k_schedule=every_k)
    params, batch = case.setup(dtype)
    state = jax.jit(opt.init)(params)
    grads, extra = case.grads(params, batch)
    update = jax.jit(lambda g, s, p, e: opt.update(g, s, p, **e))
    for _ in range(every_k - 1):
        u, state = update(grads, state, params, extra)
        if _nonzero(u):
            _fail(case, "MultiSteps returned a non-zero update on a micro-step")
        for a, p in zip(jax.tree.leaves(u), jax.tree.leaves(params), strict=True):
            if a.dtype != p.dtype:
                _fail(case, f"MultiSteps update dtype {a.dtype} for a {p.dtype} parameter")
    u, state = update(grads, state, params, extra)
    if not _nonzero(u):
        _fail(case, "MultiSteps returned no update after k micro-steps")


def check_state_stable(case: TransformCase) -> None:
    """The state keeps its shapes and dtypes over steps, also through ``lax.cond``
    (taken and not taken), and the jitted step compiles once."""
    opt = case.transform()
    params, batch = case.setup()
    state = opt.init(params)
    before = _struct(state)
    grads, extra = case.grads(params, batch)

    @jax.jit
    def maybe(pred, g, s, p, e):
        return jax.lax.cond(pred, lambda: opt.update(g, s, p, **e),
                            lambda: (jax.tree.map(jnp.zeros_like, g), s))

    u, s = maybe(jnp.asarray(True), grads, state, params, extra)
    if _struct(s) != before:
        _fail(case, "state shapes or dtypes changed through lax.cond")
    u0, _ = maybe(jnp.asarray(False), grads, state, params, extra)
    if _nonzero(u0):
        _fail(case, "the skipped lax.cond branch changed the updates")
    step = _step_fn(case, opt)
    for _ in range(3):
        params, state = step(params, state, batch)
        if _struct(state) != before:
            _fail(case, "state shapes or dtypes changed after a step")
    if step._cache_size() != 1:
        _fail(case, "the step recompiled after the first call")


def check_schedule(case: TransformCase, steps: int = 3) -> None:
    """If ``learning_rate`` is annotated ``optax.ScalarOrSchedule`` (as optax's own
    introspection requires), a constant schedule gives the same iterates as the float."""
    ann = inspect.signature(case.make).parameters.get("learning_rate")
    if ann is None or ann.annotation not in (optax.ScalarOrSchedule, optax.Schedule):
        _fail(case, "learning_rate is not annotated optax.ScalarOrSchedule (optax's schedule "
                    "introspection would skip it)")
    lr = case.kwargs["learning_rate"]
    with_float = case.transform()
    with_sched = case.make(**{**case.kwargs, "learning_rate": optax.constant_schedule(lr)})
    params, batch = case.setup()
    pa = pb = params
    sa, sb = with_float.init(params), with_sched.init(params)
    fa, fb = _step_fn(case, with_float), _step_fn(case, with_sched)
    for _ in range(steps):
        pa, sa = fa(pa, sa, batch)
        pb, sb = fb(pb, sb, batch)
    _close(case, "schedule vs float learning rate", pb, pa, rtol=1e-5, atol=1e-6)


def check_converges(case: TransformCase) -> None:
    """The loss falls below ``decrease_factor`` times its start in ``decrease_steps``
    jitted steps, also with ``optax.clip_by_global_norm`` chained in front."""
    params0, batch = case.setup()
    loss0 = float(case.loss(params0, batch))
    for opt, label in ((case.transform(), "alone"),
                       (optax.chain(optax.clip_by_global_norm(10.0), case.transform()),
                        "after clip_by_global_norm")):
        params, state = params0, opt.init(params0)
        step = _step_fn(case, opt)
        for _ in range(case.decrease_steps):
            params, state = step(params, state, batch)
        loss1 = float(case.loss(params, batch))
        if not np.isfinite(loss1) or not loss1 < case.decrease_factor * loss0:
            _fail(case, f"loss {loss0:.4g} -> {loss1:.4g} in {case.decrease_steps} steps "
                        f"({label}); expected below {case.decrease_factor} x start")


def check_orbax_round_trip(case: TransformCase) -> None:
    """The state after a step has no zero-size arrays and survives an orbax
    ``StandardCheckpointer`` save / restore bit for bit."""
    import orbax.checkpoint as ocp

    opt = case.transform()
    params, batch = case.setup()
    _, state = _step_fn(case, opt)(params, opt.init(params), batch)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        if np.size(leaf) == 0:
            _fail(case, f"state leaf {jax.tree_util.keystr(path)} has zero size (orbax "
                        "cannot save it; use optax.MaskedNode() or None)")
    with tempfile.TemporaryDirectory() as d:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(f"{d}/state", state)
        ckpt.wait_until_finished()
        restored = ckpt.restore(f"{d}/state", jax.tree.map(ocp.utils.to_shape_dtype_struct,
                                                           state))
    if jax.tree.structure(restored) != jax.tree.structure(state):
        _fail(case, "restored state has another structure")
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        if not np.array_equal(np.asarray(a), np.asarray(b)):
            _fail(case, "restored state differs from the saved one")


def check_tree_map_params(case: TransformCase) -> None:
    """``optax.tree_map_params`` maps the state: the identity keeps it, and the
    mapped state still updates."""
    opt = case.transform()
    params, batch = case.setup()
    step = _step_fn(case, opt)
    _, state = step(params, opt.init(params), batch)
    try:
        same = optax.tree_map_params(opt, lambda p: p, state)
    except Exception as e:  # noqa: BLE001 - report whatever optax raised
        _fail(case, f"optax.tree_map_params failed: {type(e).__name__}: {e}")
    _close(case, "tree_map_params(identity)", same, state, rtol=0, atol=0)
    params1, _ = step(params, same, batch)
    _finite(case, "parameters after a step from the mapped state", params1)


def _module_of(tree):
    from flax import nnx

    class _Node(nnx.Module):
        def __init__(self, sub):
            for k, v in sub.items():
                setattr(self, k, _Node(v) if isinstance(v, dict) else nnx.Param(v))

    if not isinstance(tree, dict):
        raise TypeError("check_nnx_optimizer needs parameters that are (nested) dicts")
    return _Node(tree)


def check_nnx_optimizer(case: TransformCase, steps: int = 10) -> None:
    """A Flax ``nnx.Optimizer`` over a module holding the parameters trains under
    ``nnx.jit`` (``update(model, grads, **extra_args)``); the loss goes down."""
    from flax import nnx

    params, batch = case.setup()
    model = _module_of(params)
    opt = nnx.Optimizer(model, case.transform(), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, opt, batch):
        p = nnx.state(model, nnx.Param).to_pure_dict()
        grads, extra = case.grads(p, batch)
        g_state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(g_state, grads)
        opt.update(model, g_state, **extra)

    loss0 = float(case.loss(params, batch))
    for _ in range(steps):
        train_step(model, opt, batch)
    loss1 = float(case.loss(nnx.state(model, nnx.Param).to_pure_dict(), batch))
    if not np.isfinite(loss1) or not loss1 < loss0:
        _fail(case, f"nnx.Optimizer: loss {loss0:.4g} -> {loss1:.4g} in {steps} steps")


def check_complex_params(case: TransformCase) -> None:
    """Complex parameters are supported (a 2 x 2 complex quadratic reaches its
    minimum, gradients conjugated as optax expects) or refused by ``init`` with a
    ``TypeError`` / ``ValueError`` that says "complex"; never silently wrong."""
    target = jnp.array([[1 + 2j, -1j], [0.5, 2 - 1j]], jnp.complex64)
    params = {"z": jnp.zeros((2, 2), jnp.complex64)}

    def loss(p):
        return jnp.sum(jnp.abs(p["z"] - target) ** 2)

    kwargs = case.kwargs if case.complex_kwargs is None else case.complex_kwargs
    opt = case.make(**kwargs)
    try:
        state = opt.init(params)
    except (TypeError, ValueError) as e:
        if "complex" not in str(e):
            _fail(case, f"init refused complex parameters without saying so: {e}")
        return

    @jax.jit
    def step(p, s):
        g = jax.tree.map(jnp.conj, jax.grad(loss)(p))
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    for _ in range(case.complex_steps):
        params, state = step(params, state)
    if not float(loss(params)) < 1e-3:
        _fail(case, f"complex quadratic ends at loss {float(loss(params)):.4g} (> 1e-3): "
                    "complex parameters are mishandled; support them or refuse them in init")


def matmul_precisions(fn, *args, **kwargs) -> list:
    """The ``precision`` of every matrix product (``dot_general``) that ``fn(*args,
    **kwargs)`` traces, nested jaxprs (``jit``, loops, ``cond``) included."""

    def walk(jaxpr, out):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                out.append(eqn.params["precision"])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                    if hasattr(sub, "eqns"):
                        walk(sub, out)
        return out

    return walk(jax.make_jaxpr(functools.partial(fn, **kwargs))(*args).jaxpr, [])


def check_full_precision(case: TransformCase) -> None:
    """Every matrix product ``init`` and ``update`` trace on float32 parameters runs at
    ``Precision.HIGHEST``: on GPUs and TPUs a product left at the default precision
    runs in TF32 or bfloat16 passes (about three significant digits). subjax's own
    transforms pass; not part of :data:`CHECKS`, since a transform may choose speed."""
    opt = case.transform()
    params, batch = case.setup()
    state = opt.init(params)
    grads, extra = case.grads(params, batch)
    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    for what, fn, args in (("init", opt.init, (params,)),
                           ("update", lambda g, s, p: opt.update(g, s, p, **extra),
                            (grads, state, params))):
        low = [p for p in matmul_precisions(fn, *args) if p != highest]
        if low:
            _fail(case, f"{what} traces {len(low)} matrix products below HIGHEST "
                        f"precision: {sorted(set(map(str, low)))}")


CHECKS: dict[str, Callable[[TransformCase], None]] = {
    "extra_args": check_extra_args,
    "jit": check_jit_matches_eager,
    "init_abstract": check_init_abstract,
    "inject_hyperparams": check_inject_hyperparams,
    "multisteps": check_multisteps,
    "state_stable": check_state_stable,
    "schedule": check_schedule,
    "converges": check_converges,
    "orbax": check_orbax_round_trip,
    "tree_map_params": check_tree_map_params,
    "nnx": check_nnx_optimizer,
    "complex": check_complex_params,
}
"""Every single-argument check by name; :func:`check_dtype_preserved` runs per dtype."""


def check_all(case: TransformCase, skip: Sequence[str] = ()) -> None:
    """Run every check in :data:`CHECKS` (minus ``skip``) and the dtype check for each
    of ``case.dtypes``; raise one ``AssertionError`` listing every failure."""
    failures = []
    for name, fn in CHECKS.items():
        if name in skip:
            continue
        try:
            fn(case)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    if "dtype" not in skip:
        for dtype in case.dtypes:
            try:
                check_dtype_preserved(case, dtype)
            except AssertionError as e:
                failures.append(f"dtype {jnp.dtype(dtype).name}: {e}")
    if failures:
        raise AssertionError("\n".join(failures))
