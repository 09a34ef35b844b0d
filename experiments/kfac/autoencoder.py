"""The deep autoencoder benchmark on digits, shared by the experiment and the benchmark.

64-128-64-32-8-32-64-128-64, tanh on every hidden layer (the 8-unit code
included), logits out; binary
cross-entropy summed over the 64 pixels (targets = pixels / 16) and averaged over
the 1797 examples; full batch; float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from subjax import fisher

SIZES = (64, 128, 64, 32, 8, 32, 64, 128, 64)


def load_digits_pixels() -> jax.Array:
    from sklearn.datasets import load_digits

    x = load_digits().data.astype(np.float32) / 16.0
    return jnp.asarray(x)


class AutoEncoder(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, sizes=SIZES):
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )

    def __call__(self, x):
        n = len(self.layers)
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i != n - 1:
                x = jnp.tanh(x)
        return x


def make_model(seed: int = 0):
    model = AutoEncoder(nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    return apply_fn, params


def bce_loss(apply_fn, params, x):
    logits = apply_fn(params, x)
    return jnp.mean(jnp.sum(jax.nn.softplus(logits) - x * logits, axis=-1))


def optax_step(apply_fn, opt):
    @jax.jit
    def step(params, state, x, key):
        del key
        loss, grads = jax.value_and_grad(lambda p: bce_loss(apply_fn, p, x))(params)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return step


def kfac_step(apply_fn, opt, adaptive: bool = False, stats_batch: int | None = None,
              exact_step: bool = False):
    """A jitted K-FAC step; ``adaptive`` passes the loss (adaptive damping), ``exact_step``
    the linearisation (``kfac(..., adaptive_step=True)``)."""

    @jax.jit
    def step(params, state, x, key):
        loss, grads, stats, *lin = fisher.kfac_grads_and_stats(
            apply_fn, params, x, x, likelihood="bernoulli", key=key, stats_batch=stats_batch,
            linearization=exact_step,
        )
        extra = {"loss": loss} if adaptive else {}
        if exact_step:
            extra["linearization"] = lin[0]
        updates, state = opt.update(grads, state, params, kfac_stats=stats, **extra)
        return optax.apply_updates(params, updates), state, loss

    return step


def ng_step(apply_fn, opt):
    @jax.jit
    def step(params, state, x, key):
        del key
        loss, grads = jax.value_and_grad(lambda p: bce_loss(apply_fn, p, x))(params)
        updates, state = opt.update(grads, state, params, apply_fn=apply_fn, inputs=x)
        return optax.apply_updates(params, updates), state, loss

    return step
