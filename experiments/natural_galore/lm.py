"""A synthetic language-modelling task with a known loss floor, and a small causal transformer.

Shared by the ``natural-galore`` and ``galore`` reproductions.

**Corpus.** A sparse second-order Markov chain over ``vocab`` tokens: every token
``b`` has a fixed set ``S(b)`` of ``support`` possible successors (drawn once per
chain), and the next token after the pair ``(a, b)`` is drawn from ``S(b)`` with
weights ``Dirichlet(concentration)`` that depend on the pair. The task therefore has
three levels a model climbs in order: the uniform guess (``log vocab``), the
first-order structure (which tokens can follow ``b``: about ``log support``, learnable
from the current token alone), and the second-order weights, which need the token
before it (attention). Sequences start from two uniform tokens. The expected loss of
the exact conditional distribution, position by position, is the **loss floor**
(:func:`loss_floor`, computed exactly by propagating the pair distribution along the
sequence), and :func:`first_order_floor` is the floor of the best predictor that sees
only the current token.

**Model.** A pre-norm causal transformer: token and position embeddings, ``layers``
blocks of multi-head attention (``wq, wk, wv, wo``) and a GELU MLP (``w1, w2``),
a final RMS norm and an output matrix; 6 weight matrices per block.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

#: the weight matrices of a block (the ones low-rank methods act on).
BLOCK_MATRICES = ("wq", "wk", "wv", "wo", "w1", "w2")


@dataclasses.dataclass(frozen=True)
class Task:
    vocab: int = 32
    support: int = 4
    concentration: float = 0.5
    seq_len: int = 32

    def __post_init__(self):
        if not 2 <= self.support <= self.vocab:
            raise ValueError(f"support must be in [2, vocab], got {self.support}")
        if self.seq_len < 3:
            raise ValueError(f"seq_len must be >= 3, got {self.seq_len}")
        if not self.concentration > 0:
            raise ValueError(f"concentration must be > 0, got {self.concentration}")


def make_chain(task: Task, seed: int) -> np.ndarray:
    """Transition table ``P[a, b, c]`` = probability of ``c`` after the pair ``(a, b)``."""
    rng = np.random.default_rng(seed)
    v, k = task.vocab, task.support
    succ = np.stack([rng.choice(v, k, replace=False) for _ in range(v)])  # S(b)
    weights = rng.dirichlet(np.full(k, task.concentration), size=(v, v))  # (a, b, k)
    chain = np.zeros((v, v, v))
    b_idx = np.broadcast_to(np.arange(v)[None, :, None], (v, v, k))
    a_idx = np.broadcast_to(np.arange(v)[:, None, None], (v, v, k))
    chain[a_idx, b_idx, np.broadcast_to(succ[None], (v, v, k))] = weights
    return chain


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)


def _pair_marginals(chain: np.ndarray, seq_len: int) -> list[np.ndarray]:
    """Distribution of the pair ``(s[t-1], s[t])`` for ``t = 1 .. seq_len - 1``."""
    v = chain.shape[0]
    pair = np.full((v, v), 1.0 / v**2)
    out = [pair]
    for _ in range(seq_len - 2):
        pair = np.einsum("ab,abc->bc", pair, chain)
        out.append(pair)
    return out


def loss_floor(chain: np.ndarray, seq_len: int) -> float:
    """Expected next-token loss (nats) of the exact conditional, averaged over positions.

    Position 0 predicts the second start token (uniform: ``log vocab``); position
    ``t >= 1`` predicts from the pair ``(s[t-1], s[t])``.
    """
    v = chain.shape[0]
    h = _entropy(chain)  # (a, b)
    terms = [np.log(v)] + [float(np.sum(p * h)) for p in _pair_marginals(chain, seq_len)]
    return float(np.mean(terms))


def first_order_floor(chain: np.ndarray, seq_len: int) -> float:
    """The same for the best predictor that sees only the current token ``s[t]``."""
    v = chain.shape[0]
    terms = [np.log(v)]
    for pair in _pair_marginals(chain, seq_len):
        pb = pair.sum(0)  # (b,)
        cond = np.einsum("ab,abc->bc", pair, chain) / np.maximum(pb[:, None], 1e-300)
        terms.append(float(np.sum(pb * _entropy(cond))))
    return float(np.mean(terms))


def sample(task: Task, chain: np.ndarray, n: int, rng: np.random.Generator) -> jax.Array:
    """``n`` sequences of ``seq_len + 1`` tokens (inputs and shifted targets)."""
    seqs = np.zeros((n, task.seq_len + 1), np.int32)
    seqs[:, :2] = rng.integers(0, task.vocab, (n, 2))
    cum = np.cumsum(chain, -1)
    for t in range(2, task.seq_len + 1):
        u = rng.random((n, 1))
        row = cum[seqs[:, t - 2], seqs[:, t - 1]]
        seqs[:, t] = np.minimum((u > row).sum(-1), task.vocab - 1)
    return jnp.asarray(seqs)


def sampler(task: Task, chain: jax.Array, batch: int):
    """A traceable ``key -> (batch, seq_len + 1)`` sampler (fresh data every step)."""
    cum = jnp.cumsum(chain, -1)

    def draw(key):
        k0, k1 = jax.random.split(key)
        start = jax.random.randint(k0, (batch, 2), 0, task.vocab)
        u = jax.random.uniform(k1, (task.seq_len - 1, batch, 1))

        def nxt(prev, ut):
            a, b = prev
            c = jnp.minimum(jnp.sum(ut > cum[a, b], -1), task.vocab - 1)
            return (b, c), c

        _, rest = jax.lax.scan(nxt, (start[:, 0], start[:, 1]), u)
        return jnp.concatenate([start, rest.T], 1)

    return draw


# --------------------------------------------------------------------------- model


@dataclasses.dataclass(frozen=True)
class Arch:
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 4

    def __post_init__(self):
        if self.d_model % self.heads:
            raise ValueError("d_model must be a multiple of heads")


def init(arch: Arch, task: Task, key) -> dict:
    d, v, f = arch.d_model, task.vocab, arch.mlp_ratio * arch.d_model
    keys = iter(jax.random.split(key, 3 + 6 * arch.layers))

    def dense(k, n_in, n_out):
        return jax.random.normal(k, (n_in, n_out)) / np.sqrt(n_in)

    blocks = []
    for _ in range(arch.layers):
        blocks.append({"ln1": jnp.ones(d), "ln2": jnp.ones(d),
                       "wq": dense(next(keys), d, d), "wk": dense(next(keys), d, d),
                       "wv": dense(next(keys), d, d), "wo": dense(next(keys), d, d),
                       "w1": dense(next(keys), d, f), "w2": dense(next(keys), f, d)})
    return {"emb": jax.random.normal(next(keys), (v, d)) * 0.1,
            "pos": jax.random.normal(next(keys), (task.seq_len, d)) * 0.1,
            "blocks": blocks, "ln": jnp.ones(d), "unemb": dense(next(keys), d, v)}


def _norm(x, g):
    return g * x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)


def causal_attention(q, k, v):
    """Causal softmax attention: ``(n, t, heads, dh)`` queries, keys and values to the
    heads' outputs side by side, ``(n, t, heads * dh)``."""
    n, t, _, dh = q.shape
    att = jnp.einsum("nqhd,nkhd->nhqk", q, k) / np.sqrt(dh)
    att = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), att, -1e9), -1)
    return jnp.reshape(jnp.einsum("nhqk,nkhd->nqhd", att, v), (n, t, -1))


def logits(arch: Arch, p, tokens):
    n, t = tokens.shape
    h = p["emb"][tokens] + p["pos"][:t]
    dh = arch.d_model // arch.heads
    for b in p["blocks"]:
        x = _norm(h, b["ln1"])
        q, k, v = (jnp.reshape(x @ b[w], (n, t, arch.heads, dh)) for w in ("wq", "wk", "wv"))
        h = h + causal_attention(q, k, v) @ b["wo"]
        h = h + jax.nn.gelu(_norm(h, b["ln2"]) @ b["w1"]) @ b["w2"]
    return _norm(h, p["ln"]) @ p["unemb"]


def loss(arch: Arch, p, seqs):
    """Mean next-token cross-entropy (nats) of ``seqs`` (``(n, seq_len + 1)``)."""
    logp = jax.nn.log_softmax(logits(arch, p, seqs[:, :-1]))
    return jnp.mean(-jnp.take_along_axis(logp, seqs[:, 1:, None], -1))


def block_matrix_names(arch: Arch) -> list[str]:
    """``"blocks/<i>/<name>"`` of every block matrix (the ``path_name`` of the leaf)."""
    return [f"blocks/{i}/{w}" for i in range(arch.layers) for w in BLOCK_MATRICES]


# --------------------------------------------------------------------------- training


def param_shapes(arch: Arch, task: Task):
    """``ShapeDtypeStruct`` pytree of the model's parameters."""
    return jax.eval_shape(lambda k: init(arch, task, k), jax.random.key(0))


def block_matrix_dims(params):
    """GaLore dimension numbers selecting the block matrices (``None`` elsewhere)."""
    from optax.contrib import GaLoreDimensionNumbers

    def one(path, leaf):
        name = str(getattr(path[-1], "key", ""))
        return GaLoreDimensionNumbers() if name in BLOCK_MATRICES else None

    return jax.tree_util.tree_map_with_path(one, params)


def state_bytes(opt, params) -> int:
    """Bytes of ``opt``'s state for ``params`` (shapes only; nothing is allocated)."""
    shapes = jax.eval_shape(opt.init, params)
    return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x in jax.tree.leaves(shapes) if hasattr(x, "shape")))


def train(task: Task, batch: int, loss_fn, opt, params, key, chain, steps: int):
    """``steps`` optimizer steps of ``loss_fn(params, seqs)`` on fresh batches drawn from
    ``chain`` (traceable); returns the final parameters and the per-step losses."""
    import optax

    draw = sampler(task, chain, batch)

    def body(carry, k):
        p, s = carry
        seqs = draw(k)
        val, g = jax.value_and_grad(lambda q: loss_fn(q, seqs))(p)
        u, s = opt.update(g, s, p)
        return (optax.apply_updates(p, u), s), val

    (p, _), losses = jax.lax.scan(body, (params, opt.init(params)),
                                  jax.random.split(key, steps))
    return p, losses


def run_shapes(task: Task):
    """Abstract ``(learning rate, key, chain)`` arguments for ahead-of-time compilation."""
    return (jax.ShapeDtypeStruct((), jnp.float32), jax.eval_shape(lambda: jax.random.key(0)),
            jax.ShapeDtypeStruct((task.vocab,) * 3, jnp.float32))


def splits(task: Task, seed: int, n_val: int, n_test: int):
    """The chain of ``seed`` (float32), validation and test sequences, and its floors."""
    chain = make_chain(task, seed)
    rng = np.random.default_rng(seed + 1)
    val = sample(task, chain, n_val, rng)
    test = sample(task, chain, n_test, rng)
    floors = {"loss floor": loss_floor(chain, task.seq_len),
              "first-order floor": first_order_floor(chain, task.seq_len)}
    return jnp.asarray(chain, jnp.float32), val, test, floors
