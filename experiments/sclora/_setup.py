"""Shared set-up of the SC-LoRA and LoRA-intruder experiments.

A small Flax NNX network is pre-trained on scikit-learn's digits (the preserved
task: 10-way classification, head ``keep_head``). Fine-tuning adapts the trunk
(two hidden ``64 x 64`` layers, either fully or through LoRA adapters) and trains a
fresh head ``new_head`` on a new task: the same digits rotated by 90 degrees
(their labels unchanged). Forgetting is the drop of the preserved task's test
accuracy (original digits through the untouched ``keep_head``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import subjax.nn as snn

HIDDEN = 64


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(64, HIDDEN, rngs=rngs)
        self.l2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.keep_head = nnx.Linear(HIDDEN, 10, rngs=rngs)
        self.new_head = nnx.Linear(HIDDEN, 10, rngs=rngs)

    def features(self, x, upto: int = 2):
        h = jax.nn.relu(self.l1(x))
        if upto == 1:
            return h
        return jax.nn.relu(self.l2(h))

    def __call__(self, x, head: str = "keep"):
        h = self.features(x)
        return self.keep_head(h) if head == "keep" else self.new_head(h)


@functools.lru_cache(maxsize=2)
def data(seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    x, y = x[perm], y[perm]
    rot = np.rot90(x.reshape(-1, 8, 8), k=1, axes=(1, 2)).reshape(-1, 64).copy()
    n_tr = 1200
    j = lambda a: jnp.asarray(a)
    return {
        "keep_tr": (j(x[:n_tr]), j(y[:n_tr])), "keep_te": (j(x[n_tr:]), j(y[n_tr:])),
        "new_tr": (j(rot[:n_tr]), j(y[:n_tr])), "new_te": (j(rot[n_tr:]), j(y[n_tr:])),
    }


def _xent(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def accuracy(model, x, y, head):
    return float(jnp.mean(jnp.argmax(model(x, head=head), -1) == y))


@functools.lru_cache(maxsize=2)
def _pretrained_state(seed: int, steps: int):
    d = data(seed)
    model = Net(nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    x, y = d["keep_tr"]

    @nnx.jit
    def step(m, o):
        g = nnx.grad(lambda m: _xent(m(x, head="keep"), y))(m)
        o.update(m, g)

    for _ in range(steps):
        step(model, opt)
    return nnx.split(model)


def pretrained(seed: int, steps: int = 400) -> Net:
    """A fresh copy of the pre-trained network (cached per ``(seed, steps)``)."""
    graphdef, state = _pretrained_state(seed, steps)
    return nnx.merge(graphdef, jax.tree.map(jnp.array, state))


def to_lora(model: Net, rank: int, seed: int) -> Net:
    """Replace the trunk's ``nnx.Linear`` layers by ``nnx.LoRALinear`` (vanilla init:
    He-uniform ``A``, zero ``B``; the base kernel unchanged)."""
    for i, name in enumerate(("l1", "l2")):
        lin = getattr(model, name)
        d_in = lin.kernel[...].shape[0]
        a = nnx.initializers.he_uniform()(jax.random.key(seed * 100 + i), (d_in, rank))
        b = jnp.zeros((rank, HIDDEN), jnp.float32)
        setattr(model, name, snn.unmerge_lora(lin, a, b))
    return model


def trunk_kernel(model: Net, name: str) -> jax.Array:
    """Effective kernel ``W (+ A B)`` of trunk layer ``name``."""
    layer = getattr(model, name)
    if isinstance(layer, nnx.LoRALinear):
        return snn.merge_lora(layer).kernel[...]
    return layer.kernel[...]


def finetune(model: Net, steps: int, lr: float, lora: bool, seed: int = 0):
    """Train on the new task: trunk adapters (``lora``) or the whole trunk, plus the
    new head. Returns the per-step training losses."""
    x, y = data(seed)["new_tr"]
    if lora:
        wrt = nnx.Any(nnx.LoRAParam, nnx.PathContains("new_head"))
    else:
        wrt = nnx.Any(nnx.PathContains("l1"), nnx.PathContains("l2"),
                      nnx.PathContains("new_head"))
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=wrt)

    @nnx.jit
    def step(m, o):
        lval, g = nnx.value_and_grad(lambda m: _xent(m(x, head="new"), y),
                                     argnums=nnx.DiffState(0, wrt))(m)
        o.update(m, g)
        return lval

    return [float(step(model, opt)) for _ in range(steps)]
