"""The three K-FAC settings: models, data, losses and the training loops they share.

- ``autoencoder``: the digits deep autoencoder of :mod:`experiments.kfac.autoencoder`
  (Bernoulli likelihood on the 64 pixels), trained on the train split of a seed;
- ``cnn``: two 3x3 convolutions (8 and 16 channels, the second with stride 2, tanh)
  and a dense 10-way head on the 8x8 digits (categorical likelihood);
- ``transformer``: one pre-norm causal transformer block (two heads, width 32, tanh
  MLP of width 64) on next-token prediction over the sparse second-order Markov
  corpus of :mod:`experiments.natural_galore.lm`; its attention projections, MLP and
  output layer are ``nnx.Linear`` applied at every position, i.e. weight-shared dense
  layers for K-FAC (K-FAC-expand).

Every setting trains full batch on a fixed training set, so the training loss is a
deterministic function of the step and "steps to a target loss" is well defined.
Losses are reported per example (autoencoder: summed over the 64 pixels; CNN: one
label) or per token (transformer).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import data
from experiments.kfac.autoencoder import AutoEncoder
from experiments.natural_galore import lm
from subjax import fisher, optim

SETTINGS = ("autoencoder", "cnn", "transformer")
TASK = lm.Task(vocab=16, support=3, concentration=0.5, seq_len=16)


class CNN(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), strides=(2, 2), padding="SAME",
                              rngs=rngs)
        self.head = nnx.Linear(4 * 4 * 16, 10, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv1(x))
        h = jnp.tanh(self.conv2(h))
        return self.head(h.reshape(h.shape[0], -1))


class Transformer(nnx.Module):
    """One pre-norm causal block; every matrix is an ``nnx.Linear`` used at every position."""

    def __init__(self, rngs: nnx.Rngs, vocab: int = TASK.vocab, seq_len: int = TASK.seq_len,
                 d: int = 32, heads: int = 2):
        init = nnx.initializers.normal(0.1)
        self.heads = heads
        self.emb = nnx.Embed(vocab, d, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (seq_len, d)))
        self.ln1, self.ln2 = nnx.LayerNorm(d, rngs=rngs), nnx.LayerNorm(d, rngs=rngs)
        self.wq, self.wk, self.wv, self.wo = (nnx.Linear(d, d, rngs=rngs) for _ in range(4))
        self.w1, self.w2 = nnx.Linear(d, 2 * d, rngs=rngs), nnx.Linear(2 * d, d, rngs=rngs)
        self.out = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens):
        n, t = tokens.shape
        h = self.emb(tokens) + self.pos[...][:t]
        d = h.shape[-1]
        dh = d // self.heads
        x = self.ln1(h)
        q, k, v = (w(x).reshape(n, t, self.heads, dh) for w in (self.wq, self.wk, self.wv))
        h = h + self.wo(lm.causal_attention(q, k, v))
        h = h + self.w2(jnp.tanh(self.w1(self.ln2(h))))
        return self.out(h)


@dataclasses.dataclass(frozen=True)
class Data:
    train: tuple  # (inputs, labels)
    val: tuple
    test: tuple
    floor: float | None = None  # the transformer corpus's loss floor (nats per token)


@functools.lru_cache(maxsize=8)
def load(setting: str, seed: int, n_seqs: int = 256) -> Data:
    """The train / validation / test data of ``setting`` for ``seed``."""
    if setting == "transformer":
        chain = lm.make_chain(TASK, seed)
        rng = np.random.default_rng(seed + 1)
        tr, va, te = (lm.sample(TASK, chain, n, rng) for n in (n_seqs, n_seqs, 2 * n_seqs))
        return Data(*((s[:, :-1], s[:, 1:]) for s in (tr, va, te)),
                    floor=lm.loss_floor(chain, TASK.seq_len))
    d = data.digits(seed)

    def pack(split):
        if setting == "autoencoder":
            x = jnp.asarray(split.x)
            return x, x
        return jnp.asarray(split.images[..., None]), jnp.asarray(split.y)

    return Data(pack(d.train), pack(d.val), pack(d.test))


def likelihood(setting: str) -> str:
    return "bernoulli" if setting == "autoencoder" else "categorical"


def per_unit(setting: str) -> int:
    """Divisor from the summed NLL per example to the reported loss (per token)."""
    return TASK.seq_len if setting == "transformer" else 1


def params(setting: str, seed: int):
    """The parameters of ``setting``'s model initialised from ``seed``."""
    return nnx.split(_MODELS[setting](nnx.Rngs(seed)), nnx.Param)[1]


@functools.cache
def model_fn(setting: str):
    """``apply_fn(params, inputs)`` of ``setting`` (one per setting, shared by every seed,
    so each compiled step serves every seed); K-FAC finds its dense and convolution
    layers in the trace of ``apply_fn``."""
    graphdef = nnx.split(_MODELS[setting](nnx.Rngs(0)), nnx.Param)[0]

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    return apply_fn


_MODELS = {"autoencoder": AutoEncoder, "cnn": CNN, "transformer": Transformer}


def loss_fn(setting: str, apply_fn: Callable):
    """``(params, x, y) -> mean NLL per example`` (per token for the transformer)."""
    bernoulli, unit = likelihood(setting) == "bernoulli", per_unit(setting)

    def loss(p, x, y):
        z = apply_fn(p, x)
        if bernoulli:
            nll = jax.nn.softplus(z) - y * z
        else:
            nll = -jnp.take_along_axis(jax.nn.log_softmax(z), y[..., None], -1)
        return jnp.sum(nll) / (z.shape[0] * unit)

    return loss


# --------------------------------------------------------------------------- training


def first_order(name: str, lr):
    if name == "adam":
        return optax.adam(lr)
    if name == "sgd momentum":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"unknown first-order method {name!r}")


def _chunked(update, chunk: int):
    """A jitted run of ``chunk`` steps of ``update(carry, i, batch) -> (carry, loss)``.

    The data are arguments, not constants (XLA would constant-fold the first layer's
    statistics). The scan is unrolled: XLA's CPU convolutions inside a loop body run
    about ten times slower than outside one. ``chunk=1`` is one plain jitted step
    (the second-order steps, which compile much faster outside a scan).
    """
    if chunk == 1:
        @jax.jit
        def one(carry, i, batch):
            carry, loss = update(carry, i, batch)
            return carry, loss[None]

        return one

    @jax.jit
    def run(carry, start, batch):
        def body(c, i):
            return update(c, start + i, batch)

        return jax.lax.scan(body, carry, jnp.arange(chunk), unroll=True)

    return run


def _drive(run, carry, batch, steps: int, chunk: int, target: float | None):
    """Run ``steps`` steps in jitted chunks (compiled first on a throw-away call).

    Returns ``(carry, losses, times)``: the training loss before every step and the
    wall time at the end of every step (steps inside a chunk share its time evenly).
    Stops after the chunk in which the loss reaches ``target`` when given.
    """
    jax.block_until_ready(run(carry, jnp.int32(0), batch))  # compile; its result is discarded
    losses, times = [], []
    t0 = time.perf_counter()
    done = 0
    while done < steps:
        t_start = time.perf_counter() - t0
        carry, ls = run(carry, jnp.int32(done), batch)
        ls = np.asarray(jax.block_until_ready(ls), np.float64)
        t_end = time.perf_counter() - t0
        losses += ls.tolist()
        times += (t_start + (t_end - t_start) * np.arange(1, chunk + 1) / chunk).tolist()
        done += chunk
        if target is not None and np.min(ls) <= target:
            break
    return carry, losses[:steps], times[:steps]


@functools.cache
def first_order_run(setting: str, name: str, chunk: int):
    """Jitted ``chunk`` steps ``(carry, start, (x, y, lr)) -> (carry, losses)`` of Adam or
    SGD with momentum; ``carry = (params, first_order(name, 1.0).init(params))``."""
    loss = loss_fn(setting, model_fn(setting))

    def update(carry, i, batch):
        p, s = carry
        x, y, lr = batch
        value, g = jax.value_and_grad(loss)(p, x, y)
        u, s = first_order(name, lr).update(g, s, p)
        return (optax.apply_updates(p, u), s), value

    return _chunked(update, chunk)


def train_first_order(setting: str, name: str, lr: float, seed: int, steps: int,
                      chunk: int = 10):
    """``steps`` full-batch steps of Adam or SGD with momentum 0.9 at learning rate ``lr``."""
    p = params(setting, seed)
    x, y = load(setting, seed).train
    carry = (p, first_order(name, 1.0).init(p))
    (p, _), losses, times = _drive(first_order_run(setting, name, chunk), carry,
                                   (x, y, jnp.float32(lr)), steps, chunk, None)
    return p, losses, times


#: subjax K-FAC with its adaptive step: step size and momentum from the exact quadratic
#: model on the gradient's linearisation, Levenberg-Marquardt damping from 1e-3,
#: eigendecompositions refreshed every 5 steps.
KFAC = dict(learning_rate=1.0, damping=1e-3, adaptive_step=True, adaptive_damping=True,
            damping_factor=0.8, refresh_every=5, stale_ratio=None)


@functools.cache
def kfac_step(setting: str):
    """One jitted K-FAC step ``(carry, i, (x, y, key)) -> (carry, loss[None])``;
    ``carry = (params, subjax.optim.kfac(**KFAC).init(params))``."""
    apply_fn, opt = model_fn(setting), optim.kfac(**KFAC)
    lik, unit = likelihood(setting), per_unit(setting)

    def update(carry, i, batch):
        p, s = carry
        x, y, key = batch
        value, g, st, lin = fisher.kfac_grads_and_stats(
            apply_fn, p, x, y, likelihood=lik, key=jax.random.fold_in(key, i),
            linearization=True)
        u, s = opt.update(g, s, p, kfac_stats=st, loss=value, linearization=lin)
        return (optax.apply_updates(p, u), s), value / unit

    return _chunked(update, 1)


def train_kfac(setting: str, seed: int, steps: int, target: float | None = None):
    """At most ``steps`` K-FAC steps, stopping at ``target`` when given."""
    p = params(setting, seed)
    x, y = load(setting, seed).train
    carry = (p, optim.kfac(**KFAC).init(p))
    (p, _), losses, times = _drive(kfac_step(setting), carry, (x, y, jax.random.key(seed)),
                                   steps, 1, target)
    return p, losses, times


@functools.cache
def kfac_jax_optimizer(setting: str):
    """kfac-jax's optimizer with adaptive learning rate, momentum and damping (one per
    setting: its compiled steps serve every seed)."""
    import kfac_jax

    from experiments.kfac.peers import patch_kfac_jax

    patch_kfac_jax()
    apply_fn = model_fn(setting)
    bernoulli = likelihood(setting) == "bernoulli"

    def value(p, batch):
        x, y = batch
        out = apply_fn(p, x)
        if bernoulli:
            kfac_jax.register_sigmoid_cross_entropy_loss(out, y)
            return jnp.mean(jnp.sum(jax.nn.softplus(out) - y * out, axis=-1))
        # one categorical output per position (per token); the loss is per token
        out2, y2 = out.reshape(-1, out.shape[-1]), y.reshape(-1)
        kfac_jax.register_softmax_cross_entropy_loss(out2, y2)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(out2), y2[:, None], -1))

    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(value), l2_reg=0.0,
        use_adaptive_learning_rate=True, use_adaptive_momentum=True,
        use_adaptive_damping=True, initial_damping=1.0, inverse_update_period=5,
        curvature_ema=0.95, num_burnin_steps=0, multi_device=False)


def train_kfac_jax(setting: str, seed: int, steps: int, target: float | None = None):
    """At most ``steps`` kfac-jax steps on the same model and data, stopping at ``target``."""
    opt = kfac_jax_optimizer(setting)
    p0 = params(setting, seed)
    batch = load(setting, seed).train
    rng = jax.random.key(seed)
    copy = functools.partial(jax.tree.map, jnp.array)  # kfac-jax donates its parameters
    # compile on a throw-away copy: the steps that refresh the inverses and those that
    # do not are separate programs
    p = copy(p0)
    st = opt.init(p, rng, batch)
    for i in range(6):
        p, st, stats = opt.step(p, st, rng, batch=batch, global_step_int=i)
    jax.block_until_ready(stats["loss"])
    p = copy(p0)
    st = opt.init(p, rng, batch)
    losses, times = [], []
    t0 = time.perf_counter()
    for i in range(steps):
        p, st, stats = opt.step(p, st, jax.random.fold_in(rng, i), batch=batch,
                                global_step_int=i)
        losses.append(float(stats["loss"]))
        times.append(time.perf_counter() - t0)
        if target is not None and losses[-1] <= target:
            break
    return p, losses, times


@functools.cache
def _eval_fns(setting: str):
    apply_fn = model_fn(setting)
    loss = loss_fn(setting, apply_fn)
    acc = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(apply_fn(p, x), -1) == y))
    return jax.jit(loss), (None if setting == "autoencoder" else acc)


def evaluate(setting: str, p, seed: int) -> dict:
    """Validation and test loss (and accuracy) at parameters ``p``."""
    d = load(setting, seed)
    loss, acc = _eval_fns(setting)
    out = {}
    for split in ("val", "test"):
        x, y = getattr(d, split)
        out[f"{split} loss"] = float(loss(p, x, y))
        if acc is not None:
            out[f"{split} accuracy"] = float(acc(p, x, y))
    if d.floor is not None:
        out["loss floor"] = d.floor
    return out


def reach(losses, times, target: float):
    """``(steps, seconds)`` until the training loss, recorded before each step, is at or
    below ``target``; ``(None, None)`` if it never is."""
    hit = next((i for i, v in enumerate(losses) if v <= target), None)
    return (None, None) if hit is None else (hit, times[hit])
