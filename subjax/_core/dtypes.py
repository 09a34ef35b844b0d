"""The one compute-dtype rule and the one matrix-product precision rule.

Linear algebra that loses accuracy in low precision (QR, Cholesky, eigh, SVD,
log-sum-exp over many terms) runs in at least float32 and casts back. Its matrix
products run at the full precision of their dtype: on GPUs and TPUs JAX's default
lets a float32 product run in TF32 or bfloat16 passes (about three significant
digits), which an orthonormal basis, a Ritz residual, a constraint check or a
cost divided by a small epsilon cannot absorb. Every family asks this module,
never its own copy.
"""

from __future__ import annotations

import functools
import types

import jax
import jax.numpy as jnp


def compute_dtype(dtype, *, allow_complex: bool = False) -> jnp.dtype:
    """The dtype to compute in for inputs of ``dtype``: at least 32 bits.

    ``bfloat16`` / ``float16`` become ``float32``; ``float32`` / ``float64`` stay.
    Integer and bool inputs become ``float32`` (they are data, not precision).
    Complex dtypes are kept when ``allow_complex`` and rejected otherwise.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        if not allow_complex:
            raise TypeError(f"complex dtype {dtype} is not supported here")
        return dtype
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize >= 4:
        return dtype
    return jnp.dtype(jnp.float32)


def as_compute(x, *, allow_complex: bool = False) -> jax.Array:
    """``x`` as an array in its :func:`compute_dtype`."""
    x = jnp.asarray(x)
    return x.astype(compute_dtype(x.dtype, allow_complex=allow_complex))


def result_dtype(*xs) -> jnp.dtype:
    """The floating dtype of the widest floating input (float32 if none is floating)."""
    dts = [jnp.dtype(x.dtype) for x in xs if jnp.issubdtype(jnp.dtype(x.dtype), jnp.inexact)]
    if not dts:
        return jnp.dtype(jnp.float32)
    return max(dts, key=lambda d: d.itemsize)


def exact_matmul(a, b) -> jax.Array:
    """``a @ b`` at the full precision of its dtype (``Precision.HIGHEST``).

    For a product that feeds a tolerance test or an exponent divided by a small
    epsilon (point-cloud costs, plan products) wherever it is traced. On CPUs the
    default is already exact.
    """
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def full_precision(fn):
    """Trace ``fn`` with every matrix product that names no precision at ``HIGHEST``.

    The context is JAX's ``default_matmul_precision``, read when a product is traced,
    so it covers everything ``fn`` traces, jitted helpers and a user's callable
    included. A returned optax-style transformation (a named tuple of ``init`` and
    ``update``) or plain function is wrapped too: its products are traced later, on
    the caller's schedule. Idempotent.
    """
    if getattr(fn, "_full_precision", False):
        return fn

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.default_matmul_precision("highest"):
            out = fn(*args, **kwargs)
        return _full_precision_result(out)

    wrapped._full_precision = True
    return wrapped


def _full_precision_result(out):
    fields = getattr(out, "_fields", None)
    if fields is not None and "init" in fields and "update" in fields:
        return out._replace(init=full_precision(out.init), update=full_precision(out.update))
    if isinstance(out, types.FunctionType):
        return full_precision(out)
    return out


def full_precision_exports(namespace: dict, exclude=()) -> None:
    """Wrap every function a package exports (its ``__all__``; classes stay as they
    are) in :func:`full_precision`, except the names in ``exclude``."""
    for name in namespace["__all__"]:
        obj = namespace[name]
        if callable(obj) and not isinstance(obj, type) and name not in exclude:
            namespace[name] = full_precision(obj)
