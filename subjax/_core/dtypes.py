"""The one compute-dtype rule.

Linear algebra that loses accuracy in low precision (QR, Cholesky, eigh, SVD,
log-sum-exp over many terms) runs in at least float32 and casts back. Every
family asks this module, never its own copy.
"""

from __future__ import annotations

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
    """``a @ b`` at the full precision of its dtype.

    On GPUs and TPUs the default precision lets a float32 product run in TF32 or
    bfloat16 passes (about three significant digits). Where a product feeds a
    tolerance test or an exponent divided by a small epsilon (point-cloud costs,
    plan products), that error would pass for convergence error, so those
    products ask for ``HIGHEST``. On CPUs the default is already exact.
    """
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
