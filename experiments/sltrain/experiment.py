"""SLTrain and LOST vs pure low-rank vs full-rank pre-training of a small transformer.

One cell = one (method, seed). The corpus of a seed is the sparse second-order Markov
chain of ``experiments/natural_galore/lm.py`` (its exact loss floor is known). A
pre-norm causal transformer (``layers`` blocks, ``heads`` heads, width ``d_model``,
GELU MLP of width ``4 d_model``) is trained from scratch for ``steps`` Adam steps on
fresh batches. Its six block matrices per layer (``wq, wk, wv, wo, w1, w2``) are

- ``full-rank``: dense ``nnx.Linear`` kernels;
- ``low-rank``: ``A B`` of rank ``rank`` (random factors,
  :class:`subjax.nn.LowRankSparseLinear` with an empty sparse part);
- ``sltrain``: ``A B + S`` of rank ``rank - sparse_rank`` with a fixed random support of
  ``sparse_rank (in + out)`` entries (:class:`subjax.nn.LowRankSparseLinear`);
- ``lost``: ``A B + S`` of rank ``rank - sparse_rank`` from the SVD of a dense
  initial kernel, ``S`` on the ``sparse_rank (in + out) / in`` output channels of its
  residual with the largest norms (:class:`subjax.nn.ChannelSparseLowRankLinear`).

The three factorised parametrisations train the same number of numbers per matrix,
``rank (in + out)``. Embeddings, norms and the output layer are dense in all four.
Each method's learning rate is chosen on the validation loss of the first seed with
the same budget, then used for every seed; the test loss is read at that rate only.
Reported: test loss (nats per token) against the loss floor, trained parameters, fixed
support indices, and Adam's state bytes.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import subjax.nn as snn
from experiments import stats
from experiments.harness import (
    CellExperiment,
    claims_table,
    markdown_table,
    new_figure,
    save_figure,
)
from experiments.natural_galore import lm

METHODS = ("full-rank", "low-rank", "sltrain", "lost")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    vocab: int = 32
    support: int = 4
    concentration: float = 0.5
    seq_len: int = 16
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    batch: int = 32
    steps: int = 300
    rank: int = 16
    sparse_rank: int = 4
    n_val: int = 256
    n_test: int = 512
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    budget: int = 4

    def __post_init__(self):
        for k in ("seeds", "vocab", "seq_len", "d_model", "heads", "layers", "batch", "steps",
                  "rank", "sparse_rank", "n_val", "n_test"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.d_model % self.heads:
            raise ValueError("d_model must be a multiple of heads")
        if not self.sparse_rank < self.rank <= self.d_model:
            raise ValueError("need sparse_rank < rank <= d_model")
        if (self.sparse_rank * 5) % 4:
            raise ValueError("sparse_rank must be a multiple of 4 (LOST's channel count of "
                             "the 4 d_model x d_model MLP output matrix is 5 sparse_rank / 4)")
        if len(self.lr_grid) < 2 or not all(v > 0 for v in self.lr_grid):
            raise ValueError("lr_grid needs at least two positive values")
        if self.budget < len(self.lr_grid):
            raise ValueError("budget must cover lr_grid")

    @property
    def task(self) -> lm.Task:
        return lm.Task(vocab=self.vocab, support=self.support,
                       concentration=self.concentration, seq_len=self.seq_len)


# --------------------------------------------------------------------------- model


def make_linear(cfg: Config, method: str, n_in: int, n_out: int, rngs: nnx.Rngs):
    """One block matrix of ``method``; the factorised ones train ``rank (in + out)`` numbers."""
    if method == "full-rank":
        return nnx.Linear(n_in, n_out, use_bias=False, rngs=rngs)
    if method == "low-rank":
        return snn.LowRankSparseLinear(n_in, n_out, rank=cfg.rank, density=0.0, use_bias=False,
                                       rngs=rngs)
    r, extra = cfg.rank - cfg.sparse_rank, cfg.sparse_rank * (n_in + n_out)
    if method == "sltrain":
        return snn.LowRankSparseLinear(n_in, n_out, rank=r, density=extra / (n_in * n_out),
                                       use_bias=False, rngs=rngs)
    return snn.ChannelSparseLowRankLinear(n_in, n_out, rank=r, channels=extra // n_in,
                                          use_bias=False, rngs=rngs)


class Block(nnx.Module):
    def __init__(self, cfg: Config, method: str, rngs: nnx.Rngs):
        d, f = cfg.d_model, 4 * cfg.d_model
        self.heads = cfg.heads
        self.ln1, self.ln2 = nnx.RMSNorm(d, rngs=rngs), nnx.RMSNorm(d, rngs=rngs)
        self.wq, self.wk, self.wv, self.wo = (make_linear(cfg, method, d, d, rngs)
                                              for _ in range(4))
        self.w1 = make_linear(cfg, method, d, f, rngs)
        self.w2 = make_linear(cfg, method, f, d, rngs)

    def __call__(self, h):
        n, t, d = h.shape
        dh = d // self.heads
        x = self.ln1(h)
        q, k, v = (w(x).reshape(n, t, self.heads, dh) for w in (self.wq, self.wk, self.wv))
        h = h + self.wo(lm.causal_attention(q, k, v))
        return h + self.w2(jax.nn.gelu(self.w1(self.ln2(h))))


class LM(nnx.Module):
    def __init__(self, cfg: Config, method: str, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.1)
        self.emb = nnx.Embed(cfg.vocab, cfg.d_model, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (cfg.seq_len, cfg.d_model)))
        self.blocks = nnx.List([Block(cfg, method, rngs) for _ in range(cfg.layers)])
        self.ln = nnx.RMSNorm(cfg.d_model, rngs=rngs)
        self.out = nnx.Linear(cfg.d_model, cfg.vocab, use_bias=False, rngs=rngs)

    def __call__(self, tokens):
        h = self.emb(tokens) + self.pos[...][: tokens.shape[1]]
        for b in self.blocks:
            h = b(h)
        return self.out(self.ln(h))


def loss_fn(model, seqs):
    logp = jax.nn.log_softmax(model(seqs[:, :-1]))
    return jnp.mean(-jnp.take_along_axis(logp, seqs[:, 1:, None], -1))


# --------------------------------------------------------------------------- training


@functools.cache
def _trainer(cfg: Config, method: str):
    """One compiled program per (config, method); seed, learning rate and data are traced."""
    draw_fn = functools.partial(lm.sampler, cfg.task)

    def run(seed, lr, chain, val, test):
        model = LM(cfg, method, nnx.Rngs(jax.random.key(seed)))
        opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
        graph, state = nnx.split((model, opt))
        draw = draw_fn(chain, cfg.batch)

        def body(state, key):
            m, o = nnx.merge(graph, state)
            loss, g = nnx.value_and_grad(loss_fn)(m, draw(key))
            o.update(m, g)
            return nnx.state((m, o)), loss

        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), 1), cfg.steps)
        state, losses = jax.lax.scan(body, state, keys)
        m, _ = nnx.merge(graph, state)
        return loss_fn(m, val), loss_fn(m, test), losses

    return jax.jit(run)


def footprint(cfg: Config, method: str) -> dict:
    """Trained numbers, fixed integer indices and Adam's state bytes (from shapes only)."""
    model = nnx.eval_shape(lambda: LM(cfg, method, nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)

    def count(tree):
        return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))

    def nbytes(tree):
        return int(sum(np.prod(x.shape) * np.dtype(x.dtype).itemsize
                       for x in jax.tree.leaves(tree)))

    blocks = nnx.state(model.blocks, nnx.Param)
    fixed = nnx.state(model, (snn.SparseSupport, snn.SparseChannels))
    adam = jax.eval_shape(optax.adam(1e-3).init, params)
    return {"params": count(params), "block params": count(blocks), "index bytes": nbytes(fixed),
            "adam bytes": nbytes(adam)}


def run_cell(cfg: Config, seed: int, method: str, lr: float) -> dict:
    """One training run: validation and test loss, the training curve, the footprint."""
    chain = lm.make_chain(cfg.task, seed)
    rng = np.random.default_rng(seed + 1)
    val, test = lm.sample(cfg.task, chain, cfg.n_val, rng), lm.sample(cfg.task, chain,
                                                                       cfg.n_test, rng)
    v, t, curve = _trainer(cfg, method)(jnp.asarray(seed, jnp.uint32),
                                        jnp.asarray(lr, jnp.float32),
                                        jnp.asarray(chain, jnp.float32), val, test)
    return {"val": float(v), "test": float(t), "floor": lm.loss_floor(chain, cfg.seq_len),
            "train curve": np.asarray(curve).tolist(), **footprint(cfg, method)}


def _col(rows, method, metric):
    return [r[method][metric] for r in rows]


def _excess(rows, method):
    """Test loss above the seed's loss floor (the corpora of the seeds differ)."""
    return [r[method]["test"] - r[method]["floor"] for r in rows]


class SLTrain(CellExperiment):
    name = "sltrain"
    title = "SLTrain and LOST vs low-rank vs full-rank pre-training of a small transformer"
    config_cls = Config
    quick = {"seeds": 2, "steps": 150, "lr_grid": (3e-3, 1e-2), "budget": 2, "n_val": 128,
             "n_test": 256}
    full = {}
    figures = ("sltrain.png",)
    lead_columns = ("method", "test loss (nats/token)", "minus full-rank",
                    "above the loss floor", "trained params", "in block matrices",
                    "fixed indices (KiB)", "Adam state (KiB)", "lr", "lr at grid edge")

    def expected_cells(self, cfg):
        return len(METHODS) * (len(cfg.lr_grid) + cfg.seeds - 1)

    def run_cell(self, cfg, cell):
        return run_cell(cfg, cell["seed"], cell["method"], cell["lr"])

    def sweep(self, cfg, cells):
        # each method's learning rate: validation loss on the first seed, same budget
        tuned = stats.tune_methods(
            {m: (lambda lr, m=m: cells(method=m, seed=cfg.seed, lr=lr)["val"]) for m in METHODS},
            {m: cfg.lr_grid for m in METHODS}, budget=cfg.budget, maximize=False)
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        rows = [{m: cells(method=m, seed=s, lr=tuned[m].best) for m in METHODS} for s in seeds]
        q = cells.quick
        claims = []
        for method, foil, paper in (
                ("sltrain", "low-rank", "SLTrain perplexity far below low-rank pre-training "
                 "at a similar parameter count, close to full-rank (LLaMA 60M-1B on C4)"),
                ("lost", "low-rank", "LOST below low-rank and close to or below full-rank "
                 "(LLaMA 60M-7B on C4)"),
                ("lost", "sltrain", "LOST below SLTrain at a similar memory budget")):
            cmp = stats.compare(_col(rows, method, "test"), _col(rows, foil, "test"),
                                claim="less", quick=q)
            claims.append(stats.claim(
                f"{method} reaches a lower test loss than {foil} at the same number of "
                f"trained numbers per block matrix", paper, cmp, names=(method, foil)))
        table = []
        for m in METHODS:
            gap = [r[m]["test"] - r["full-rank"]["test"] for r in rows]
            table.append({
                "method": m,
                "test loss (nats/token)": stats.mean_ci(_col(rows, m, "test")).format(),
                "minus full-rank": stats.mean_ci(gap).format() if m != "full-rank" else "0",
                "above the loss floor": stats.mean_ci(_excess(rows, m)).format(),
                "trained params": rows[0][m]["params"],
                "in block matrices": rows[0][m]["block params"],
                "fixed indices (KiB)": round(rows[0][m]["index bytes"] / 1024, 1),
                "Adam state (KiB)": round(rows[0][m]["adam bytes"] / 1024, 1),
                "lr": tuned[m].best,
                "lr at grid edge": tuned[m].at_edge,
            })
        floor = float(np.mean(_col(rows, "full-rank", "floor")))
        title = (f"{cfg.steps} Adam steps of batch {cfg.batch} x {cfg.seq_len} tokens, rank "
                 f"{cfg.rank} (sparse part worth rank {cfg.sparse_rank}); loss floor "
                 f"{floor:.3f} nats/token on average; mean ± 95% CI over seeds")
        return {"claims": claims, "tables": {title: table}, "per_seed": rows}

    def report(self, cfg, results, history, outdir):
        rows = results["per_seed"]
        fig, (ax1, ax2) = new_figure(1, 2, figsize=(9, 3.4))
        k = max(1, cfg.steps // 30)
        for i, m in enumerate(METHODS):
            curve = np.asarray(_col(rows, m, "train curve")).mean(0)
            mean = np.convolve(curve, np.ones(k) / k, mode="valid")
            ax1.plot(np.arange(len(mean)) + k, mean, label=m)
            ci = stats.mean_ci(_excess(rows, m))
            # the three factorised models have the same count: spread them apart a little
            ax2.errorbar([rows[0][m]["params"] / 1e3 + 2.0 * (i - 2) * (i > 0)], [ci.mean],
                         yerr=[[ci.half_width if np.isfinite(ci.half_width) else 0]],
                         fmt="o", capsize=3, label=m)
        floor = float(np.mean(_col(rows, "full-rank", "floor")))
        ax1.axhline(floor, color="gray", lw=0.8, ls=":", label="loss floor (mean)")
        ax1.set_xlabel("step")
        ax1.set_ylabel("training loss (moving average)")
        ax2.set_xlabel("trained parameters (thousands)")
        ax2.set_ylabel("test loss minus the loss floor")
        ax1.legend(fontsize=7)
        img = save_figure(fig, outdir, "sltrain.png", "training loss and test loss vs parameters")
        parts = [f"{cfg.seeds} seeds; intervals are 95% t-intervals over seeds.",
                 claims_table(results["claims"])]
        parts += [f"**{t}**\n\n{markdown_table(r)}" for t, r in results["tables"].items()]
        parts.append(img)
        return "\n\n".join(parts) + "\n"


EXPERIMENT = SLTrain()
