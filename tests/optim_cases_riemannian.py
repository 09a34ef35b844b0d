"""Conformance cases for the Riemannian optimizers (subjax.optim._riemannian).

The parameters mix a Stiefel leaf, a Grassmann stack (3 points) and an ordinary
bias; the loss is a Brockett / trace cost on the manifold leaves plus a regression
term on the bias, shifted so that it is positive with minimum 0.
"""

import jax
import jax.numpy as jnp
from optim_conformance import OptimCase

from subjax.manifolds import SPD, Grassmann, Sphere, Stiefel
from subjax.optim import manifold_muon, riemannian_adam, riemannian_sgd

_ST = Stiefel(6, 3)
_GR = Grassmann(5, 2)
_MANIFOLDS = {"w": _ST, "v": _GR, "b": None}
_N = jnp.diag(jnp.array([3.0, 2.0, 1.0]))


def _init_params(key, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w": _ST.random_point(k1, (), jnp.float32).astype(dtype),
        "v": _GR.random_point(k2, (3,), jnp.float32).astype(dtype),
        "b": (0.1 * jax.random.normal(k3, (4,))).astype(dtype),
    }


def _batch(key):
    k1, k2, k3 = jax.random.split(key, 3)
    a = jax.random.normal(k1, (6, 6))
    c = jax.random.normal(k2, (3, 5, 5))
    a = a @ a.T / 6.0
    c = c @ jnp.swapaxes(c, -1, -2) / 5.0
    target = jax.random.normal(k3, (4,))
    wa, va = jnp.linalg.eigh(a)[0], jnp.linalg.eigh(c)[0]
    # minimum of the Brockett cost -tr(W^T A W N) and of -tr(V^T C V) per point
    fmin = -jnp.sum(wa[::-1][:3] * jnp.diag(_N)) - jnp.sum(va[:, ::-1][:, :2])
    return {"a": a, "c": c, "target": target, "fmin": fmin}


def _loss(params, batch):
    w = params["w"].astype(jnp.float32)
    v = params["v"].astype(jnp.float32)
    b = params["b"].astype(jnp.float32)
    brockett = -jnp.trace(w.T @ batch["a"] @ w @ _N)
    pca = -jnp.sum(jnp.swapaxes(v, -1, -2) @ batch["c"] * jnp.swapaxes(v, -1, -2))
    return brockett + pca - batch["fmin"] + jnp.sum((b - batch["target"]) ** 2)


_common = dict(init_params=_init_params, make_batch=_batch, loss=_loss, decrease_steps=150,
               decrease_factor=0.5)

CASES = [
    OptimCase("riemannian_sgd_momentum", riemannian_sgd,
              {"learning_rate": 0.05, "momentum": 0.9, "manifolds": _MANIFOLDS,
               "refresh_every": 7}, **_common),
    OptimCase("riemannian_sgd_nesterov_cayley", riemannian_sgd,
              {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True,
               "manifolds": _MANIFOLDS, "retraction": "cayley"}, **_common),
    OptimCase("riemannian_adam", riemannian_adam,
              {"learning_rate": 0.03, "manifolds": _MANIFOLDS}, **_common),
    OptimCase("manifold_muon", manifold_muon,
              {"learning_rate": 0.05, "momentum": 0.5, "manifolds": _MANIFOLDS}, **_common),
]


# Sphere and SPD (affine metric: parallel transport, exponential retraction) next to a
# plain leaf: the loss -x^T A x on the sphere (minimum: the top eigenvalue) plus the
# convex tr(P B) - log det P on SPD (minimum at P = B^{-1}, value 3 + log det B).
_SP = Sphere(4)
_SPD = SPD(3)
_MIXED = {"s": _SP, "p": _SPD, "b": None}


def _init_mixed(key, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "s": _SP.random_point(k1, (), jnp.float32).astype(dtype),
        "p": _SPD.random_point(k2, (), jnp.float32).astype(dtype),
        "b": (0.1 * jax.random.normal(k3, (2,))).astype(dtype),
    }


def _batch_mixed(key):
    k1, k2, k3 = jax.random.split(key, 3)
    a = jax.random.normal(k1, (4, 4))
    a = a @ a.T / 4.0
    c = jax.random.normal(k2, (3, 3))
    bmat = c @ c.T / 3.0 + 0.5 * jnp.eye(3)
    fmin = -jnp.linalg.eigh(a)[0][-1] + 3.0 + jnp.linalg.slogdet(bmat)[1]
    return {"a": a, "bmat": bmat, "target": jax.random.normal(k3, (2,)), "fmin": fmin}


def _loss_mixed(params, batch):
    s = params["s"].astype(jnp.float32)
    p = params["p"].astype(jnp.float32)
    b = params["b"].astype(jnp.float32)
    spd = jnp.trace(p @ batch["bmat"]) - jnp.linalg.slogdet(p)[1]
    return (-s @ batch["a"] @ s + spd - batch["fmin"]
            + jnp.sum((b - batch["target"]) ** 2))


_mixed = dict(init_params=_init_mixed, make_batch=_batch_mixed, loss=_loss_mixed,
              decrease_steps=150, decrease_factor=0.5)

CASES += [
    OptimCase("riemannian_sgd_sphere_spd", riemannian_sgd,
              {"learning_rate": 0.05, "momentum": 0.9, "manifolds": _MIXED,
               "refresh_every": 5}, **_mixed),
]
