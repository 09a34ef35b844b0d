"""The private core: dtype rule, argument checks, fixed-point loop, tree helpers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from subjax import _core

# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize(
    "dtype, expected",
    [
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float32),
        (jnp.float32, jnp.float32),
        (jnp.int32, jnp.float32),
        (jnp.bool_, jnp.float32),
    ],
)
def test_compute_dtype_at_least_float32(dtype, expected):
    assert _core.compute_dtype(dtype) == jnp.dtype(expected)


def test_compute_dtype_keeps_float64_and_complex_only_when_asked(x64):
    assert _core.compute_dtype(jnp.float64) == jnp.dtype(jnp.float64)
    assert _core.compute_dtype(jnp.complex64, allow_complex=True) == jnp.dtype(jnp.complex64)
    with pytest.raises(TypeError, match="complex"):
        _core.compute_dtype(jnp.complex64)


def test_as_compute_and_result_dtype():
    x = jnp.ones((3,), jnp.bfloat16)
    assert _core.as_compute(x).dtype == jnp.float32
    assert _core.result_dtype(x, jnp.ones(2, jnp.float32)) == jnp.float32
    assert _core.result_dtype(jnp.ones(2, jnp.int32)) == jnp.float32


# --------------------------------------------------------------------------- checks


def test_static_int():
    assert _core.static_int(np.int64(3), "rank", 1) == 3
    with pytest.raises(ValueError, match="`rank` must be >= 1, got 0"):
        _core.static_int(0, "rank", 1)
    with pytest.raises(TypeError, match="`rank`.*bool"):
        _core.static_int(True, "rank")
    with pytest.raises(TypeError, match="`rank` must be a static Python int, got float"):
        _core.static_int(2.0, "rank")

    def traced(r):
        _core.static_int(r, "rank")

    with pytest.raises(TypeError, match="`rank`.*traced.*static_args"):
        jax.jit(traced)(3)
    assert _core.optional_static_int(None, "rank") is None


def test_scalar_bounds_named():
    assert _core.positive(0.5, "epsilon") == 0.5
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="`epsilon` must be > 0"):
            _core.positive(bad, "epsilon")
    with pytest.raises(ValueError, match="`epsilon` must be a number, got nan"):
        _core.positive(float("nan"), "epsilon")
    with pytest.raises(ValueError, match="`beta` must be in"):
        _core.unit_interval(1.0, "beta")
    assert _core.unit_interval(1.0, "beta", closed_high=True) == 1.0
    assert _core.unit_interval(0.0, "beta", closed_low=True) == 0.0
    with pytest.raises(ValueError, match="`tol` must be >= 0"):
        _core.nonnegative(-1e-3, "tol")
    with pytest.raises(ValueError, match="`tol` must be a scalar"):
        _core.nonnegative(jnp.ones(2), "tol")
    with pytest.raises(TypeError, match="`tol` must be a real number, got str"):
        _core.nonnegative("1e-3", "tol")
    with pytest.raises(TypeError, match="`tol` is required"):
        _core.nonnegative(None, "tol")
    assert _core.nonnegative(None, "tol", allow_none=True) is None
    # a concrete 0-d array is checked; a traced one passes through
    with pytest.raises(ValueError, match="`epsilon`"):
        _core.positive(jnp.array(-1.0), "epsilon")
    out = jax.jit(lambda e: _core.positive(e, "epsilon") * 2)(jnp.array(-1.0))
    assert float(out) == -2.0


def test_choice_and_floating_array():
    assert _core.choice("LA", "which", ("LA", "SA")) == "LA"
    with pytest.raises(ValueError, match="`which` must be one of 'LA', 'SA'; got 'XX'"):
        _core.choice("XX", "which", ("LA", "SA"))
    with pytest.raises(TypeError, match="`x` must have a real floating dtype, got int32"):
        _core.floating_array(jnp.arange(3), "x")
    with pytest.raises(ValueError, match="`x` must be 2-D, got shape \\(3,\\)"):
        _core.floating_array(jnp.ones(3), "x", ndim=2)
    assert _core.floating_array(np.ones((2, 2), np.float32), "x").shape == (2, 2)


def test_check_key():
    _core.check_key(jax.random.key(0))
    _core.check_key(jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="`seed_key` is required"):
        _core.check_key(None, "seed_key")
    with pytest.raises(TypeError, match="`key` must be a jax.random key, got int"):
        _core.check_key(0)


@pytest.mark.parametrize("make", [np.asarray, jnp.asarray])
def test_check_finite_if_concrete(make):
    _core.check_finite_if_concrete(make(np.ones(4, np.float32)), "cost")
    _core.check_finite_if_concrete(make(np.arange(4)), "cost")  # ints are always finite
    for bad in (np.nan, np.inf):
        x = np.ones(4, np.float32)
        x[2] = bad
        with pytest.raises(ValueError, match="`cost` contains NaN or inf"):
            _core.check_finite_if_concrete(make(x), "cost")

    def traced(x):
        _core.check_finite_if_concrete(x, "cost")  # skipped under a trace
        return _core.all_finite(x)

    assert not bool(jax.jit(traced)(jnp.array([1.0, jnp.nan])))
    assert bool(_core.all_finite(jnp.ones(3), jnp.zeros(2)))
    assert _core.is_concrete(jnp.ones(2))


# --------------------------------------------------------------------------- loop


def _halving(s, it):
    return s / 2, s


def test_fixed_point_loop_stops_at_tolerance_and_records():
    out = _core.fixed_point_loop(
        _halving, jnp.float32(1.0), max_iters=40, stop=lambda s, e: e < 1e-3
    )
    # errors are 1, 1/2, ..., 2^-10 < 1e-3 at the 11th step
    assert int(out.n_iters) == 11
    np.testing.assert_allclose(out.errors[:11], 2.0 ** -np.arange(11), rtol=0)
    assert np.all(np.asarray(out.errors[11:]) == -1)
    assert out.errors.shape == (40,)
    assert float(out.error) == 2.0**-10
    assert float(out.state) == 2.0**-11


def test_fixed_point_loop_cap_record_every_and_history():
    out = _core.fixed_point_loop(_halving, jnp.float32(1.0), max_iters=7, record_every=3)
    assert int(out.n_iters) == 7
    assert out.errors.shape == (_core.history_size(7, 3),) == (3,)
    np.testing.assert_allclose(out.errors, [1.0, 2.0**-3, 2.0**-6])
    out = _core.fixed_point_loop(_halving, jnp.float32(1.0), max_iters=7, history=2)
    np.testing.assert_allclose(out.errors, [1.0, 0.5])


def test_fixed_point_loop_stops_on_nonfinite():
    def step(s, it):
        s = s * 10.0
        return s, jnp.where(it >= 2, jnp.nan, s)

    out = _core.fixed_point_loop(step, jnp.float32(1.0), max_iters=10)
    assert int(out.n_iters) == 3
    assert np.isnan(float(out.error))
    out = _core.fixed_point_loop(step, jnp.float32(1.0), max_iters=10, stop_on_nonfinite=False)
    assert int(out.n_iters) == 10


def test_fixed_point_loop_jit_vmap_eval_shape():
    def run(x0, tol):
        return _core.fixed_point_loop(_halving, x0, max_iters=30, stop=lambda s, e: e < tol)

    x0 = jnp.array([1.0, 4.0, 0.25], jnp.float32)
    out = jax.jit(jax.vmap(run, in_axes=(0, None)))(x0, jnp.float32(1e-2))
    for i, x in enumerate(np.asarray(x0)):
        one = run(jnp.float32(x), jnp.float32(1e-2))
        assert int(out.n_iters[i]) == int(one.n_iters)
        np.testing.assert_array_equal(out.errors[i], one.errors)
    shapes = jax.eval_shape(run, x0[0], jnp.float32(1e-2))
    assert shapes.errors.shape == (30,) and shapes.n_iters.dtype == jnp.int32


def test_fixed_point_loop_namedtuple_state():
    from typing import NamedTuple

    class S(NamedTuple):
        x: jax.Array
        k: jax.Array

    def step(s, it):
        x = 0.5 * (s.x + 2.0 / s.x)  # Newton for sqrt(2)
        return S(x, s.k + 1), jnp.abs(x - s.x)

    out = _core.fixed_point_loop(
        step, S(jnp.float32(1.0), jnp.int32(0)), max_iters=50, stop=lambda s, e: e < 1e-6
    )
    np.testing.assert_allclose(float(out.state.x), np.sqrt(2.0), rtol=1e-6)
    assert int(out.state.k) == int(out.n_iters) < 10


def test_record_drops_out_of_range_slots():
    e = -jnp.ones((2,))
    e = _core.record(e, 0, 5.0)
    e = _core.record(e, 7, 9.0)  # slot 7 does not exist: dropped
    np.testing.assert_array_equal(e, [5.0, -1.0])


# --------------------------------------------------------------------------- trees


def test_path_names_and_value_at():
    tree = {"layers": [{"kernel": 1, "bias": 2}], "head": (3,)}
    names = [n for n, _ in _core.leaves_with_names(tree)]
    assert names == ["head/0", "layers/0/bias", "layers/0/kernel"]
    sched = optax.linear_schedule(1.0, 0.0, 10)
    assert float(_core.value_at(sched, 5)) == pytest.approx(0.5)
    assert _core.value_at(0.1, 5) == 0.1
