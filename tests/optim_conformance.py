"""Registry types for the shared optimizer conformance suite.

Every subjax optax transform registers a case here: add a module
``tests/optim_cases_<family>.py`` that defines ``CASES: list[OptimCase]``.
``tests/test_optim_conformance.py`` discovers those modules and runs every check
on every case. A case describes how to build the optimizer and, optionally, the
problem it is exercised on (parameters, loss, and any extra arguments the
``update`` call needs, e.g. a loss function for a natural-gradient solve or
curvature statistics for K-FAC).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = Any
Batch = Any


def default_params(key: jax.Array, dtype=jnp.float32) -> Params:
    """A small two-leaf regression model: a (6, 4) matrix and a (4,) bias."""
    k1, k2 = jax.random.split(key)
    return {
        "w": (0.1 * jax.random.normal(k1, (6, 4))).astype(dtype),
        "b": (0.1 * jax.random.normal(k2, (4,))).astype(dtype),
    }


def default_batch(key: jax.Array) -> Batch:
    """Noiseless linear regression data with a known solution."""
    k1, k2, k3 = jax.random.split(key, 3)
    x = jax.random.normal(k1, (64, 6))
    w_true = jax.random.normal(k2, (6, 4))
    b_true = jax.random.normal(k3, (4,))
    return {"x": x, "y": x @ w_true + b_true}


def default_loss(params: Params, batch: Batch) -> jax.Array:
    w = params["w"].astype(jnp.float32)
    b = params["b"].astype(jnp.float32)
    pred = batch["x"] @ w + b
    return jnp.mean(jnp.sum((pred - batch["y"]) ** 2, axis=-1))


@dataclasses.dataclass(frozen=True)
class OptimCase:
    """One optimizer configuration checked by the conformance suite.

    Attributes:
      name: test id.
      make: factory returning an ``optax.GradientTransformation``; called as
        ``make(**kwargs)`` and as ``optax.inject_hyperparams(make)(**kwargs)``.
      kwargs: keyword arguments for ``make``; must include ``learning_rate``.
      init_params: ``(key, dtype) -> params``.
      make_batch: ``key -> batch``.
      loss: ``(params, batch) -> scalar`` (float32 computation).
      grad_and_extra: optional ``(params, batch) -> (grads, extra_args)``; by
        default ``(jax.grad(loss)(params, batch), {})``. ``extra_args`` are passed
        to ``update`` as keyword arguments (optax ``GradientTransformationExtraArgs``).
      decrease_steps: steps of the "loss goes down" check.
      decrease_factor: the loss after ``decrease_steps`` must be below
        ``decrease_factor * initial_loss``.
      dtypes: parameter dtypes for the dtype-preservation check.
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    kwargs: dict
    init_params: Callable[..., Params] = default_params
    make_batch: Callable[[jax.Array], Batch] = default_batch
    loss: Callable[[Params, Batch], jax.Array] = default_loss
    grad_and_extra: Callable[[Params, Batch], tuple[Params, dict]] | None = None
    decrease_steps: int = 100
    decrease_factor: float = 0.5
    dtypes: tuple = (jnp.float32, jnp.bfloat16)

    def grads(self, params: Params, batch: Batch) -> tuple[Params, dict]:
        if self.grad_and_extra is not None:
            return self.grad_and_extra(params, batch)
        g = jax.grad(self.loss)(params, batch)
        g = jax.tree.map(lambda gi, p: gi.astype(p.dtype), g, params)
        return g, {}
