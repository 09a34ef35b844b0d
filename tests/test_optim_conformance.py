"""The shared optimizer conformance suite.

Checks, for every registered :class:`optim_conformance.OptimCase`, what a user
of optax relies on: jit, ``lax.cond`` (stable state structure), ``optax.chain``,
``optax.inject_hyperparams``, ``optax.MultiSteps``, ``init`` on
``jax.ShapeDtypeStruct`` parameters (via ``jax.eval_shape``), dtype
preservation (float32, bfloat16), stable state shapes, no recompilation on the
second step, and that a small problem's loss goes down.
"""

from __future__ import annotations

import glob
import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optim_conformance import OptimCase

# optax's own transforms (adam's bias correction, MultiSteps) are not clean under
# strict dtype promotion, and every case runs inside them here.
pytestmark = pytest.mark.standard_promotion

_HERE = os.path.dirname(os.path.abspath(__file__))


def _discover() -> list[OptimCase]:
    cases = []
    for path in sorted(glob.glob(os.path.join(_HERE, "optim_cases_*.py"))):
        name = os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        cases.extend(mod.CASES)
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), f"duplicate case names: {names}"
    return cases


CASES = _discover()
params_ids = [c.name for c in CASES]


def _setup(case: OptimCase, dtype=jnp.float32):
    kp, kb = jax.random.split(jax.random.key(42))
    params = case.init_params(kp, dtype)
    batch = case.make_batch(kb)
    return params, batch


def _struct(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def _assert_finite(tree):
    for leaf in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            assert bool(jnp.all(jnp.isfinite(leaf))), "non-finite value"


@pytest.mark.parametrize("case", CASES, ids=params_ids)
def test_jit_update_matches_eager(case):
    opt = case.make(**case.kwargs)
    params, batch = _setup(case)
    state = opt.init(params)
    grads, extra = case.grads(params, batch)
    u_eager, s_eager = opt.update(grads, state, params, **extra)
    u_jit, s_jit = jax.jit(lambda g, s, p, e: opt.update(g, s, p, **e))(grads, state, params, extra)
    assert jax.tree.structure(u_jit) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(u_eager), jax.tree.leaves(u_jit), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   rtol=2e-4, atol=2e-5)
    assert _struct(s_eager) == _struct(s_jit)
    _assert_finite(u_jit)


@pytest.mark.parametrize("case", CASES, ids=params_ids)
def test_update_inside_lax_cond(case):
    opt = case.make(**case.kwargs)
    params, batch = _setup(case)
    state = opt.init(params)
    grads, extra = case.grads(params, batch)

    @jax.jit
    def maybe_update(pred, g, s, p, e):
        def do(_):
            return opt.update(g, s, p, **e)

        def skip(_):
            return jax.tree.map(jnp.zeros_like, g), s

        return jax.lax.cond(pred, do, skip, None)

    u, s = maybe_update(jnp.asarray(True), grads, state, params, extra)
    u0, s0 = maybe_update(jnp.asarray(False), grads, state, params, extra)
    assert _struct(s) == _struct(state)
    for leaf in jax.tree.leaves(u0):
        assert not bool(jnp.any(leaf != 0))


@pytest.mark.parametrize("case", CASES, ids=params_ids)
def test_chain_with_clipping(case):
    opt = optax.chain(optax.clip_by_global_norm(10.0), case.make(**case.kwargs))
    params, batch = _setup(case)
    state = opt.init(params)
    loss0 = float(case.loss(params, batch))
    step = _make_step(case, opt)
    for _ in range(case.decrease_steps):
        params, state = step(params, state, batch)
    assert float(case.loss(params, batch)) < loss0


@pytest.mark.parametrize("case", CASES, ids=params_ids)
def test_inject_hyperparams_zero_learning_rate_freezes(case):
    opt = optax.inject_hyperparams(case.make)(**case.kwargs)
    params, batch = _setup(case)
    state = opt.init(params)
    assert "learning_rate" in state.hyperparams
    grads, extra = case.grads(params, batch)
    u, state = opt.update(grads, state, params, **extra)
    assert any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(u))
    state.hyperparams["learning_rate"] = jnp.zeros_like(state.hyperparams["learning_rate"])
    u, _ = opt.update(grads, state, params, **extra)
    for leaf in jax.tree.leaves(u):
        np.testing.assert_allclose(np.asarray(leaf, np.float32), 0.0, atol=1e-7)


@pytest.mark.parametrize("case", CASES, ids=params_ids)
def test_multisteps_accumulates(case):
    opt = optax.MultiSteps(case.make(**case.kwargs), every_k_schedule=2)
    params, batch = _setup(case)
    state = opt.init(params)
    grads, extra = case.grads(params, batch)
    u1, state = opt.update(grads, state, params, **extra)
    for leaf in jax.tree.leaves(u1):
        assert not bool(jnp.any(leaf != 0)), "MultiSteps must hold the first micro-step"
    u2, state = opt.update(grads, state, params, **extra)
    assert any(bool(jnp.any(leaf != 0)) for leaf in jax.tree.leaves(u2))


@pytest.mark.parametrize("case", CASES, ids=params_ids)
def test_init_on_shape_dtype_struct(case):
    opt = case.make(**case.kwargs)
    params, _ = _setup(case)
    structs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    abstract_state = jax.eval_shape(opt.init, structs)
    concrete_state = opt.init(params)
    assert _struct(abstract_state) == _struct(concrete_state)


_DTYPE_CASES = [(c, jnp.dtype(d)) for c in CASES for d in c.dtypes]


@pytest.mark.parametrize(
    ("case", "dtype"), _DTYPE_CASES, ids=[f"{c.name}-{d.name}" for c, d in _DTYPE_CASES]
)
def test_dtype_preserved(case, dtype):
    opt = case.make(**case.kwargs)
    params, batch = _setup(case, dtype)
    state = opt.init(params)
    step = _make_step(case, opt)
    for _ in range(2):
        params, state = step(params, state, batch)
    for leaf in jax.tree.leaves(params):
        assert leaf.dtype == dtype
    _assert_finite(params)


@pytest.mark.parametrize("case", CASES, ids=params_ids)
def test_state_shapes_stable_and_no_recompile(case):
    opt = case.make(**case.kwargs)
    params, batch = _setup(case)
    state = opt.init(params)
    before = _struct(state)
    step = _make_step(case, opt)
    for _ in range(3):
        params, state = step(params, state, batch)
        assert _struct(state) == before
    assert step._cache_size() == 1, "the step recompiled after the first call"


@pytest.mark.parametrize("case", CASES, ids=params_ids)
def test_loss_goes_down(case):
    opt = case.make(**case.kwargs)
    params, batch = _setup(case)
    state = opt.init(params)
    loss0 = float(case.loss(params, batch))
    step = _make_step(case, opt)
    for _ in range(case.decrease_steps):
        params, state = step(params, state, batch)
    loss1 = float(case.loss(params, batch))
    assert np.isfinite(loss1)
    assert loss1 < case.decrease_factor * loss0, (loss0, loss1)


def _make_step(case: OptimCase, opt: optax.GradientTransformation):
    @jax.jit
    def step(params, state, batch):
        grads, extra = case.grads(params, batch)
        updates, state = opt.update(grads, state, params, **extra)
        return optax.apply_updates(params, updates), state

    return step
