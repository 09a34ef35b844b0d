"""Conformance cases for subjax.optim's curvature optimizers.

K-FAC gets its statistics and natural gradient its model function through
``grad_and_extra`` (optax extra arguments), exactly as a user's step would.
"""

import jax
import jax.numpy as jnp
from optim_conformance import OptimCase, default_batch

from subjax import fisher, optim


def _linear_params(key, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {"dense": {"kernel": (0.1 * jax.random.normal(k1, (6, 4))).astype(dtype),
                      "bias": (0.1 * jax.random.normal(k2, (4,))).astype(dtype)}}


def _linear_apply(params, x):
    p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    return x @ p["dense"]["kernel"] + p["dense"]["bias"]


def _mlp_params(key, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {"h": {"kernel": (jax.random.normal(k1, (6, 16)) / 6**0.5).astype(dtype),
                  "bias": jnp.zeros((16,), dtype)},
            "out": {"kernel": (jax.random.normal(k2, (16, 4)) / 4.0).astype(dtype),
                    "bias": jnp.zeros((4,), dtype)}}


def _mlp_apply(params, x):
    p = jax.tree.map(lambda a: a.astype(jnp.float32), params)
    h = jnp.tanh(x @ p["h"]["kernel"] + p["h"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def _loss(apply_fn):
    def loss(params, batch):
        return jnp.mean(jnp.sum((apply_fn(params, batch["x"]) - batch["y"]) ** 2, axis=-1))

    return loss


def _kfac_extra(apply_fn, mode, with_loss=False):
    def grad_and_extra(params, batch):
        loss, grads, stats = fisher.kfac_grads_and_stats(
            apply_fn, params, batch["x"], batch["y"], likelihood="gaussian", fisher=mode,
            key=jax.random.key(0),
        )
        extra = {"kfac_stats": stats}
        if with_loss:
            extra["loss"] = loss
        return grads, extra

    return grad_and_extra


def _ng_extra(apply_fn):
    partial_apply = jax.tree_util.Partial(apply_fn)

    def grad_and_extra(params, batch):
        g = jax.grad(_loss(apply_fn))(params, batch)
        g = jax.tree.map(lambda gi, p: gi.astype(p.dtype), g, params)
        return g, {"apply_fn": partial_apply, "inputs": batch["x"]}

    return grad_and_extra


CASES = [
    OptimCase(
        "fisher.kfac",
        optim.kfac,
        {"learning_rate": 0.5, "damping": 1e-2},
        init_params=_linear_params,
        make_batch=default_batch,
        loss=_loss(_linear_apply),
        grad_and_extra=_kfac_extra(_linear_apply, "true"),
    ),
    OptimCase(
        "fisher.kfac_mlp_factored_adaptive_sampled",
        optim.kfac,
        {"learning_rate": 0.3, "damping": 1e-1, "damping_mode": "factored",
         "adaptive_damping": True, "norm_constraint": 1.0},
        init_params=_mlp_params,
        make_batch=default_batch,
        loss=_loss(_mlp_apply),
        grad_and_extra=_kfac_extra(_mlp_apply, "true", with_loss=True),
    ),
    OptimCase(
        "fisher.natural_gradient",
        optim.natural_gradient,
        {"learning_rate": 0.5, "damping": 1e-2, "likelihood": "gaussian"},
        static_args=("max_iters",),
        init_params=_mlp_params,
        make_batch=default_batch,
        loss=_loss(_mlp_apply),
        grad_and_extra=_ng_extra(_mlp_apply),
    ),
    OptimCase("fisher.fismo", optim.fismo, {"learning_rate": 0.05}, static_args=("ns_steps",)),
]
