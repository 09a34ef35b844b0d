"""Argument checks shared by every family.

Each check names the argument the *user* passed (``name``) and what was
expected. Python-level checks (static ints, choices) always run; value checks
on arrays run when the value is concrete (outside ``jit``) and are skipped under
a trace, where the solver reports failure through ``converged=False`` instead.
Finiteness of a concrete array is reduced on the array's own device: one scalar
crosses to the host, never the array.
"""

from __future__ import annotations

import numbers
import operator
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` is not a tracer (its value can be read now)."""
    return not isinstance(x, jax.core.Tracer)


@jax.jit
def _all_finite_device(x):
    return jnp.all(jnp.isfinite(x))


def all_finite(*xs) -> jax.Array:
    """A traced boolean: every entry of every array is finite."""
    ok = jnp.array(True)
    for x in xs:
        ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def check_finite_if_concrete(x, name: str) -> None:
    """Raise ``ValueError`` if ``x`` is concrete and holds NaN or inf.

    NumPy inputs are checked on the host; JAX arrays on their own device.
    Tracers and non-arrays pass through unchecked.
    """
    if x is None or not is_concrete(x) or not hasattr(x, "dtype"):
        return
    if not jnp.issubdtype(jnp.dtype(x.dtype), jnp.inexact):
        return
    if isinstance(x, np.ndarray | np.generic):
        finite = bool(np.all(np.isfinite(x)))
    else:
        try:
            finite = bool(_all_finite_device(x))
        except jax.errors.ConcretizationTypeError:  # inside an outer trace
            return
    if not finite:
        raise ValueError(f"`{name}` contains NaN or inf entries")


def static_int(value, name: str, minimum: int | None = None) -> int:
    """``value`` as a Python int (a static shape or count), at least ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be a static Python int, got bool")
    try:
        v = operator.index(value)
    except TypeError:
        if isinstance(value, jax.Array) and not is_concrete(value):
            raise TypeError(
                f"`{name}` must be a static Python int, got a traced array; it fixes a shape "
                f"or a loop length, so pass it as a Python int (under optax.inject_hyperparams, "
                f"list it in `static_args`)"
            ) from None
        raise TypeError(
            f"`{name}` must be a static Python int, got {type(value).__name__}"
        ) from None
    if minimum is not None and v < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {v}")
    return v


def optional_static_int(value, name: str, minimum: int | None = None) -> int | None:
    """:func:`static_int`, or ``None`` when ``value`` is ``None``."""
    return None if value is None else static_int(value, name, minimum)


def int_scalar(value, name: str, minimum: int | None = None, *, allow_none: bool = False):
    """An integer scalar that may be traced (a period or count used in arithmetic only).

    A Python int or a 0-d integer array; the bound is checked when concrete. Use
    :func:`static_int` instead when the value fixes a shape or a loop length.
    Returns ``value`` unchanged.
    """
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"`{name}` is required (an int)")
    if isinstance(value, bool):
        raise TypeError(f"`{name}` must be an int, got bool")
    if hasattr(value, "dtype"):
        if np.ndim(value) != 0 or not jnp.issubdtype(jnp.dtype(value.dtype), jnp.integer):
            raise TypeError(
                f"`{name}` must be an int (or a 0-d integer array), got "
                f"{jnp.dtype(value.dtype)} of shape {np.shape(value)}"
            )
        if not is_concrete(value):
            return value
        v = int(value)
    elif isinstance(value, numbers.Integral):
        v = int(value)
    else:
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if minimum is not None and v < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {v}")
    return value


def _concrete_float(value):
    """``float(value)`` when it can be read now, else ``None`` (traced)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if is_concrete(value) and hasattr(value, "dtype"):
        if np.ndim(value) != 0:
            return None
        return float(value)
    return None


def scalar(value, name: str, *, low=None, high=None, low_open=False, high_open=False,
           allow_none: bool = False):
    """A real scalar (Python number or 0-d array) within ``[low, high]``.

    Bounds are checked when the value is concrete; a traced value passes (the
    caller reports failure at run time). Returns ``value`` unchanged.
    """
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"`{name}` is required (a real number)")
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or hasattr(value, "dtype")
    ):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__}")
    if hasattr(value, "dtype"):
        if np.ndim(value) != 0:
            raise ValueError(f"`{name}` must be a scalar, got shape {np.shape(value)}")
        if jnp.issubdtype(jnp.dtype(value.dtype), jnp.complexfloating):
            raise TypeError(f"`{name}` must be real, got dtype {value.dtype}")
    v = _concrete_float(value)
    if v is None:
        return value
    if np.isnan(v):
        raise ValueError(f"`{name}` must be a number, got nan")
    lo_bad = low is not None and (v <= low if low_open else v < low)
    hi_bad = high is not None and (v >= high if high_open else v > high)
    if lo_bad or hi_bad:
        lb = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hb = "" if high is None else f"{high}" + (")" if high_open else "]")
        if low is not None and high is not None:
            rng = f"in {lb}, {hb}"
        elif low is not None:
            rng = f"{'>' if low_open else '>='} {low}"
        else:
            rng = f"{'<' if high_open else '<='} {high}"
        raise ValueError(f"`{name}` must be {rng}, got {v}")
    return value


def positive(value, name: str, *, allow_none: bool = False):
    """A scalar ``> 0`` (checked when concrete)."""
    return scalar(value, name, low=0.0, low_open=True, allow_none=allow_none)


def nonnegative(value, name: str, *, allow_none: bool = False):
    """A scalar ``>= 0`` (checked when concrete)."""
    return scalar(value, name, low=0.0, allow_none=allow_none)


def unit_interval(value, name: str, *, closed_low: bool = False, closed_high: bool = False,
                  allow_none: bool = False):
    """A scalar in ``(0, 1)``; ``closed_low`` / ``closed_high`` include an end."""
    return scalar(value, name, low=0.0, high=1.0, low_open=not closed_low,
                  high_open=not closed_high, allow_none=allow_none)


def choice(value, name: str, options: Sequence) -> object:
    """``value`` if it is one of ``options`` (strings compared exactly)."""
    if value not in tuple(options):
        opts = ", ".join(repr(o) for o in options)
        raise ValueError(f"`{name}` must be one of {opts}; got {value!r}")
    return value


def floating_array(x, name: str, *, ndim: int | None = None, allow_complex: bool = False):
    """``x`` as a JAX array with a floating dtype (and ``ndim`` dimensions if given)."""
    if x is None:
        raise TypeError(f"`{name}` is required (an array)")
    try:
        arr = jnp.asarray(x)
    except TypeError:
        raise TypeError(f"`{name}` must be an array, got {type(x).__name__}") from None
    kinds = jnp.inexact if allow_complex else jnp.floating
    if not jnp.issubdtype(arr.dtype, kinds):
        what = "a floating" if allow_complex else "a real floating"
        raise TypeError(f"`{name}` must have {what} dtype, got {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {arr.shape}")
    return arr


def check_key(key, name: str = "key"):
    """A ``jax.random`` key (raw ``uint32[2]`` or typed)."""
    if key is None:
        raise TypeError(f"`{name}` is required (a jax.random key)")
    if not isinstance(key, jax.Array):
        raise TypeError(f"`{name}` must be a jax.random key, got {type(key).__name__}")
    return key


def bound_axis_size(axis_name, name: str = "axis_name") -> int:
    """The size of the mesh axis ``axis_name``, which must be bound (inside ``shard_map``)."""
    if not isinstance(axis_name, str):
        raise TypeError(f"`{name}` must be a mesh axis name (str), got {type(axis_name).__name__}")
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError:
        raise ValueError(
            f"`{name}`={axis_name!r} is not a bound mesh axis: call this inside "
            f"`jax.shard_map` over a mesh with that axis (or pass `{name}=None`)"
        ) from None
