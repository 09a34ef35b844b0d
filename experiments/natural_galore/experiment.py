"""Natural GaLore vs GaLore vs Adam: a small transformer language model on a synthetic corpus.

The corpus of a seed is a sparse second-order Markov chain (``lm.py``): its loss
floor is known exactly, and it has a first-order level (which tokens may follow the
current one) below which a model only gets by attending to the token before. A
pre-norm causal transformer is trained for a limited budget of ``steps`` steps on
fresh batches with

- ``adam``: ``optax.adam``;
- ``galore``: ``subjax.optim.galore`` (rank ``rank``, exact-SVD projector, refresh
  every ``refresh_every`` steps) on every attention and MLP matrix; embeddings,
  norms and the output matrix unprojected, updated by the same Adam;
- ``natural galore``: the same with ``natural_history`` — the projected gradient is
  preconditioned by the inverse of a damped empirical Fisher of the last
  ``natural_history`` projected gradients (Woodbury).

One cell = one (seed, method, learning rate): a training run, its validation and
test loss, its training-loss curve and its compiled run time. Each method's
learning rate is chosen on the validation loss with the same budget of runs
(``stats.tune``); the test loss is read at the chosen rate, paired by seed.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import stats
from experiments.harness import (
    CellExperiment,
    claims_table,
    markdown_table,
    new_figure,
    run_cost,
    save_figure,
)
from experiments.natural_galore import lm
from subjax import optim as so

METHODS = ("adam", "galore", "natural galore")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    vocab: int = 32
    support: int = 4          # successors of each token (the first-order structure)
    concentration: float = 0.5  # Dirichlet weights over them, per pair (second order)
    seq_len: int = 32
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    batch: int = 32
    steps: int = 300
    rank: int = 8
    refresh_every: int = 50
    natural_history: int = 8
    natural_damping: float = 0.1
    n_val: int = 256
    n_test: int = 512
    lr_grid: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    budget: int = 4

    def __post_init__(self):
        for k in ("seeds", "vocab", "seq_len", "d_model", "heads", "layers", "batch", "steps",
                  "rank", "refresh_every", "natural_history", "n_val", "n_test"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        _ = (self.task, self.arch)  # validates them
        if not self.natural_damping > 0:
            raise ValueError("natural_damping must be > 0")
        if len(self.lr_grid) < 2 or not all(v > 0 for v in self.lr_grid):
            raise ValueError("lr_grid needs at least two positive values")
        if self.budget < len(self.lr_grid):
            raise ValueError("budget must cover lr_grid")

    @property
    def task(self) -> lm.Task:
        return lm.Task(self.vocab, self.support, self.concentration, self.seq_len)

    @property
    def arch(self) -> lm.Arch:
        return lm.Arch(self.d_model, self.heads, self.layers)


def make_optimizer(cfg: Config, method: str, lr):
    if method == "adam":
        return optax.adam(lr)
    kw = {"projector": "svd", "weight_dimension_numbers": lm.block_matrix_dims}
    if method == "natural galore":
        kw |= {"natural_history": cfg.natural_history, "natural_damping": cfg.natural_damping}
    return so.galore(lr, rank=cfg.rank, update_proj_gap=cfg.refresh_every, **kw)


@functools.lru_cache(maxsize=8)
def _compiled(cfg: Config, method: str):
    """The training run of ``method``, compiled ahead of time (timed without compilation)."""
    def run(params, lr, key, chain):
        return lm.train(cfg.task, cfg.batch, functools.partial(lm.loss, cfg.arch),
                        make_optimizer(cfg, method, lr), params, key, chain, cfg.steps)

    shapes = (lm.param_shapes(cfg.arch, cfg.task), *lm.run_shapes(cfg.task))
    return jax.jit(run).lower(*shapes).compile()


_eval = jax.jit(lm.loss, static_argnums=0)


def state_bytes(cfg: Config, method: str) -> int:
    return lm.state_bytes(make_optimizer(cfg, method, 1e-3), lm.param_shapes(cfg.arch, cfg.task))


@functools.lru_cache(maxsize=4)
def _data(cfg: Config, seed: int):
    return lm.splits(cfg.task, seed, cfg.n_val, cfg.n_test)


def run_cell(cfg: Config, seed: int, method: str, lr: float) -> dict:
    chain, val, test, floors = _data(cfg, seed)
    params = lm.init(cfg.arch, cfg.task, jax.random.key(seed))
    run = _compiled(cfg, method)
    t0 = time.perf_counter()
    p, losses = jax.block_until_ready(
        run(params, jnp.float32(lr), jax.random.key(seed + 100), chain))
    seconds = time.perf_counter() - t0
    losses = np.asarray(losses, np.float64)
    return {"val": float(_eval(cfg.arch, p, val)), "test": float(_eval(cfg.arch, p, test)),
            "mean train loss": float(losses.mean()) if np.all(np.isfinite(losses)) else "nan",
            "train curve": losses.tolist(), "seconds": seconds, **floors}


def _finite(x) -> float:
    x = float(x)
    return x if np.isfinite(x) else np.inf


class NaturalGaLore(CellExperiment):
    name = "natural-galore"
    title = "Natural GaLore vs GaLore vs Adam on a small transformer LM (limited budget)"
    config_cls = Config
    quick = {"seeds": 2, "steps": 120, "batch": 16, "lr_grid": (3e-3, 1e-2), "budget": 2,
             "n_val": 128, "n_test": 256}
    full = {"seeds": 5}
    figures = ("natural_galore.png",)

    def run_cell(self, cfg, cell):
        return run_cell(cfg, cell["seed"], cell["method"], cell["lr"])

    def sweep(self, cfg, cells):
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        rows = []
        for s in seeds:
            row = {}
            for m in METHODS:
                tuned = stats.tune(
                    lambda lr, s=s, m=m: _finite(cells(seed=s, method=m, lr=lr)["val"]),
                    cfg.lr_grid, budget=cfg.budget, maximize=False)
                tried = [cells(seed=s, method=m, lr=lr) for lr, _ in tuned.tried]
                best = cells(seed=s, method=m, lr=tuned.best)
                # compiled run time of this method: the median over its runs of this seed
                row[m] = {**{k: best[k] for k in ("val", "test", "mean train loss",
                                                  "train curve", "loss floor",
                                                  "first-order floor")},
                          "lr": tuned.best, "tuning": tuned.to_dict(),
                          "seconds": float(np.median([r["seconds"] for r in tried])),
                          "state bytes": state_bytes(cfg, m)}
            rows.append(row)
        claims = []
        paper = ("Natural GaLore below GaLore in perplexity at equal steps and memory, "
                 "close to full-rank AdamW (LLaMA pre-training)")
        for foil in ("galore", "adam"):
            cmp = stats.compare(_col(rows, "natural galore", "test"), _col(rows, foil, "test"),
                                claim="less", quick=cells.quick)
            claims.append(stats.claim(
                f"Natural GaLore reaches a lower test loss than {foil} in {cfg.steps} steps",
                paper, cmp, names=("Natural GaLore", foil)))
        cmp = stats.compare(_col(rows, "natural galore", "mean train loss"),
                            _col(rows, "galore", "mean train loss"), claim="less",
                            quick=cells.quick)
        claims.append(stats.claim(
            "Natural GaLore converges faster than GaLore (lower mean training loss over "
            "the budget)", "faster convergence than GaLore in the first steps", cmp,
            names=("Natural GaLore", "galore")))
        table = []
        for m in METHODS:
            table.append({
                "method": m,
                "test loss (nats/token)": stats.mean_ci(_col(rows, m, "test")).format(),
                "mean training loss": stats.mean_ci(_col(rows, m, "mean train loss")).format(),
                "optimizer state (KiB)": round(rows[0][m]["state bytes"] / 1024, 1),
                "time per step vs adam": stats.mean_ci(
                    [r[m]["seconds"] / r["adam"]["seconds"] for r in rows]).format(".2f"),
                "lr (median)": float(np.median(_col(rows, m, "lr"))),
                "lr at grid edge": f"{sum(r[m]['tuning']['at_edge'] for r in rows)}/{len(rows)}",
            })
        floors = [{"floor": k, "nats/token": stats.mean_ci(_col(rows, "adam", k)).format()}
                  for k in ("first-order floor", "loss floor")]
        tables = {f"{cfg.steps} steps of batch {cfg.batch} x {cfg.seq_len} tokens "
                  "(mean ± 95% CI over seeds)": table,
                  "Loss floors of the corpus (exact; first order = seeing only the current "
                  "token)": floors}
        return {"claims": claims, "tables": tables, "per_seed": rows}

    def readme_tables(self, summary):
        results = summary.get("results", {})
        parts = [claims_table(results.get("claims") or [])]
        parts += [f"**{t}**\n\n{markdown_table(r)}"
                  for t, r in (results.get("tables") or {}).items()]
        parts.append(run_cost(summary))
        return "\n\n".join(parts)

    def report(self, cfg, results, history, outdir):
        rows = results["per_seed"]
        fig, (ax1, ax2) = new_figure(1, 2, figsize=(9, 3.4))
        k = max(1, cfg.steps // 30)
        for m in METHODS:
            curves = np.asarray(_col(rows, m, "train curve"))
            mean = np.convolve(curves.mean(0), np.ones(k) / k, mode="valid")
            steps = np.arange(len(mean)) + k
            ax1.plot(steps, mean, label=m)
            per_step = np.median(_col(rows, m, "seconds")) / cfg.steps
            ax2.plot(steps * per_step, mean, label=m)
        for key, ls in (("first-order floor", "--"), ("loss floor", ":")):
            for ax in (ax1, ax2):
                ax.axhline(np.mean(_col(rows, "adam", key)), color="gray", lw=0.8, ls=ls,
                           label=key)
        for ax in (ax1, ax2):
            ax.set_ylabel("training loss (moving average)")
            ax.set_ylim(top=min(2.5, ax.get_ylim()[1]))
        ax1.set_xlabel("step")
        ax2.set_xlabel("compiled run time (s)")
        ax1.legend(fontsize=7)
        img = save_figure(fig, outdir, "natural_galore.png", "training loss vs steps and time")
        parts = [f"{cfg.seeds} seeds; intervals are 95% t-intervals over seeds.",
                 claims_table(results["claims"])]
        parts += [f"**{t}**\n\n{markdown_table(r)}" for t, r in results["tables"].items()]
        parts.append(img)
        return "\n\n".join(parts) + "\n"


def _col(rows, method, metric):
    return [r[method][metric] for r in rows]


EXPERIMENT = NaturalGaLore()
