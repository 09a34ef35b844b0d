"""Tiny models shared by the subjax.fisher / K-FAC tests and conformance cases."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def mlp_params(key, sizes=(3, 5, 4), dtype=jnp.float32):
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        k1, k2 = jax.random.split(keys[i])
        params[f"l{i}"] = {
            "kernel": (jax.random.normal(k1, (a, b)) / jnp.sqrt(a)).astype(dtype),
            "bias": (0.1 * jax.random.normal(k2, (b,))).astype(dtype),
        }
    return params


def mlp_apply(params, x):
    """tanh MLP as a pure function (K-FAC finds its layers "l0", "l1", ... by their kernels)."""
    n = len(params)
    for i in range(n):
        p = params[f"l{i}"]
        x = x @ p["kernel"] + p["bias"]
        if i < n - 1:
            x = jnp.tanh(x)
    return x


def flat_jacobian(apply_fn, params, x):
    """Per-example output Jacobians as a dense ``(N, out, P)`` array."""
    from jax.flatten_util import ravel_pytree

    flat, unravel = ravel_pytree(params)
    out = apply_fn(params, x)
    jac = jax.jacobian(lambda f: apply_fn(unravel(f), x).reshape(out.shape[0], -1))(flat)
    return jac, out  # (N, O, P)


def output_fisher_dense(likelihood, out):
    """Per-example output Fisher ``(N, O, O)``."""
    if likelihood == "categorical":
        p = jax.nn.softmax(out, axis=-1)
        return jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(p)
    if likelihood == "bernoulli":
        s = jax.nn.sigmoid(out)
        return jax.vmap(jnp.diag)(s * (1 - s))
    return jnp.broadcast_to(jnp.eye(out.shape[-1], dtype=out.dtype), (out.shape[0],) * 1
                            + (out.shape[-1], out.shape[-1]))


def dense_fisher(likelihood, apply_fn, params, x):
    jac, out = flat_jacobian(apply_fn, params, x)
    h = output_fisher_dense(likelihood, out)
    return jnp.einsum("nop,noq,nqr->pr", jac, h, jac) / x.shape[0]
