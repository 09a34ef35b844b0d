"""Network, tasks and training of the SC-LoRA experiment.

A small Flax NNX network is pretrained on digits (the preserved task: 10-way
classification through ``keep_head``). Fine-tuning adapts the trunk (two hidden
``64 x 64`` layers, fully or through LoRA adapters) and trains a fresh head
``new_head`` on a new task: the same digits rotated by ``angle`` degrees (labels
unchanged). Forgetting is the drop of the preserved task's accuracy through the
untouched ``keep_head``. Splits come from ``experiments/data.py``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import subjax.nn as snn
from experiments.data import Split, digits

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


def rotate(split: Split, angle: float) -> Split:
    """Every image rotated by ``angle`` degrees about its centre (bilinear, zero fill)."""
    from scipy.ndimage import rotate as _rotate

    imgs = _rotate(split.images, angle, axes=(1, 2), reshape=False, order=1, cval=0.0)
    return Split(np.clip(imgs, 0.0, 1.0).reshape(len(split), 64).astype(np.float32), split.y)


@functools.lru_cache(maxsize=4)
def tasks(seed: int, angle: float) -> dict[str, Split]:
    d = digits(seed)
    return {"keep_tr": d.train, "keep_va": d.val, "keep_te": d.test,
            "new_tr": rotate(d.train, angle), "new_va": rotate(d.val, angle),
            "new_te": rotate(d.test, angle)}


def _xent(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def accuracy(model, split: Split, head: str) -> float:
    logits = model(jnp.asarray(split.x), head=head)
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(split.y)))


@functools.lru_cache(maxsize=2)
def _pretrained_state(seed: int, steps: int):
    tr = digits(seed).train
    model = Net(nnx.Rngs(seed))
    opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    x, y = jnp.asarray(tr.x), jnp.asarray(tr.y)

    @nnx.jit
    def step(m, o):
        g = nnx.grad(lambda m: _xent(m(x, head="keep"), y))(m)
        o.update(m, g)

    for _ in range(steps):
        step(model, opt)
    return nnx.split(model)


def pretrained(seed: int, steps: int) -> Net:
    """A fresh copy of the pretrained network (cached per ``(seed, steps)``)."""
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


def finetune(model: Net, new_tr: Split, keep_va: Split, keep_te: Split, steps: int, lr: float,
             lora: bool, eval_every: int) -> list[dict]:
    """Train on the new task (trunk adapters when ``lora``, else the whole trunk) plus
    the new head; every ``eval_every`` steps record the training loss and the
    preserved task's validation and test accuracy."""
    x, y = jnp.asarray(new_tr.x), jnp.asarray(new_tr.y)
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

    trace = []
    for i in range(steps):
        loss = float(step(model, opt))
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            trace.append({"step": i + 1, "loss": loss,
                          "keep_val": accuracy(model, keep_va, "keep"),
                          "keep_test": accuracy(model, keep_te, "keep")})
    return trace
