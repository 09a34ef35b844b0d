"""Training loops shared by the reproductions' small digit classifiers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def softmax_nll(logits, labels):
    """Mean negative log-likelihood of integer ``labels`` under softmax ``logits``."""
    logp = jax.nn.log_softmax(logits)
    return jnp.mean(-jnp.take_along_axis(logp, labels[:, None], 1))


@jax.jit(static_argnames=("loss", "steps"))
def fit(loss, params, x, y, lr, steps):
    """``steps`` full-batch Adam steps on ``loss(params, x, y)`` (a module-level function:
    it is a static argument, one compilation per loss and step count)."""
    opt = optax.adam(lr)

    def body(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p, x, y), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
    return p
