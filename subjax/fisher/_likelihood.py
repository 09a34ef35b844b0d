"""Output likelihoods shared by the Fisher estimators and the curvature optimizers.

A likelihood turns a model's outputs ``z`` (logits or a mean) into a predictive
distribution ``p(y | z)``. It provides the per-example negative log-likelihood,
a sampler, and the product with the *output* Fisher ``F_z = E_y[grad_z log p
grad_z log p^T]`` (which equals the Hessian of the NLL with respect to ``z`` for
these exponential-family likelihoods, so Fisher == Gauss-Newton):

- ``"categorical"``: ``z`` logits of shape ``(N, ..., C)``, labels integers in
  ``[0, C)`` of shape ``(N, ...)``; ``F_z v = p * v - p (p . v)``. A label out of
  range is a ``ValueError`` when the labels are concrete; under a trace it makes
  that example's NLL and gradient NaN.
- ``"bernoulli"``: ``z`` logits, targets in ``[0, 1]`` of the same shape;
  ``F_z = diag(s (1 - s))`` with ``s = sigmoid(z)``.
- ``"gaussian"``: ``z`` the mean, unit variance; ``F_z = I``.

Every NLL is summed over the non-batch axes and returned per example (shape
``(N,)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from subjax._core import choice, compute_dtype, is_concrete

LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


def check_likelihood(likelihood: str) -> str:
    return choice(likelihood, "likelihood", LIKELIHOODS)


def check_outputs(likelihood: str, outputs) -> None:
    """Trace-time shape check of the model outputs for ``likelihood``."""
    if jnp.ndim(outputs) < 1:
        raise ValueError(
            "the model function must return outputs with a leading batch axis, got a "
            f"scalar; `likelihood`={likelihood!r} needs per-example outputs"
        )
    if likelihood == "categorical" and (jnp.ndim(outputs) < 2 or outputs.shape[-1] < 2):
        raise ValueError(
            "`likelihood`='categorical' needs logits of shape (N, ..., C) with C >= 2 "
            f"classes, got outputs of shape {jnp.shape(outputs)}"
        )
    if not jnp.issubdtype(outputs.dtype, jnp.floating):
        raise TypeError(f"model outputs must be floating point, got {outputs.dtype}")


def check_labels(likelihood: str, outputs, labels, arg: str = "labels") -> None:
    if labels is None:
        raise ValueError(f"`{arg}` is required here (got None)")
    if likelihood == "categorical":
        if jnp.shape(labels) != jnp.shape(outputs)[:-1]:
            raise ValueError(
                f"`{arg}` for 'categorical' must be integer class ids of shape "
                f"{jnp.shape(outputs)[:-1]} (the logits' shape without the class axis), "
                f"got {jnp.shape(labels)}"
            )
        if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
            raise TypeError(f"`{arg}` for 'categorical' must be integers, got {labels.dtype}")
        n_classes = jnp.shape(outputs)[-1]
        ids = np.asarray(labels) if is_concrete(labels) else None  # small: read on the host
        if ids is not None and ids.size and not np.all((ids >= 0) & (ids < n_classes)):
            lo, hi = int(ids.min()), int(ids.max())
            raise ValueError(
                f"`{arg}` for 'categorical' must be class ids in [0, {n_classes}), got values "
                f"from {lo} to {hi}"
            )
    elif jnp.shape(labels) != jnp.shape(outputs):
        raise ValueError(
            f"`{arg}` for {likelihood!r} must have the outputs' shape {jnp.shape(outputs)}, "
            f"got {jnp.shape(labels)}"
        )


def _sum_rest(x):
    return jnp.sum(x.reshape(x.shape[0], -1), axis=1)


def nll(likelihood: str, outputs, labels):
    """Per-example negative log-likelihood, shape ``(N,)``, in float32 or wider."""
    z = outputs.astype(compute_dtype(outputs.dtype))
    if likelihood == "categorical":
        logp = jax.nn.log_softmax(z, axis=-1)
        c = z.shape[-1]
        lab = jnp.asarray(labels).astype(jnp.int32)
        picked = jnp.take_along_axis(logp, jnp.clip(lab, 0, c - 1)[..., None], axis=-1)[..., 0]
        # an out-of-range class id makes its example's NLL and gradient NaN (reported,
        # never wrapped to another class or dropped)
        bad = jnp.where((lab >= 0) & (lab < c), 1.0, jnp.nan).astype(z.dtype)
        return -_sum_rest(picked * bad)
    y = jnp.asarray(labels).astype(z.dtype)
    if likelihood == "bernoulli":
        return _sum_rest(jax.nn.softplus(z) - y * z)
    return _sum_rest(0.5 * (y - z) ** 2)


def mean_nll(likelihood: str, outputs, labels):
    return jnp.mean(nll(likelihood, outputs, labels))


def sample(likelihood: str, key, outputs):
    """Draw targets ``y ~ p(y | outputs)`` (stop-gradient)."""
    z = jax.lax.stop_gradient(outputs).astype(compute_dtype(outputs.dtype))
    if likelihood == "categorical":
        return jax.random.categorical(key, z, axis=-1)
    if likelihood == "bernoulli":
        return jax.random.bernoulli(key, jax.nn.sigmoid(z)).astype(z.dtype)
    return z + jax.random.normal(key, z.shape, z.dtype)


def output_fisher_product(likelihood: str, outputs, v):
    """``F_z v`` for the output Fisher of ``likelihood`` at ``outputs`` (per example)."""
    z = jax.lax.stop_gradient(outputs)
    if likelihood == "categorical":
        p = jax.nn.softmax(z.astype(compute_dtype(z.dtype)), axis=-1)
        p = p.astype(v.dtype)
        return p * v - p * jnp.sum(p * v, axis=-1, keepdims=True)
    if likelihood == "bernoulli":
        s = jax.nn.sigmoid(z.astype(compute_dtype(z.dtype))).astype(v.dtype)
        return s * (1 - s) * v
    return v
