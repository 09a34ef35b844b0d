"""CoSO: continual learning on permuted digits (Cheng et al. 2025).

A sequence of ``n_tasks`` ten-class tasks: task 0 is the digits, task ``t > 0`` the
digits with a fixed random pixel permutation (domain-incremental, one shared head).
A bias-free 64-H-H-10 tanh MLP learns the tasks one after another, each for ``steps``
minibatch steps, with

- ``fine-tune``: Adam, nothing protects earlier tasks;
- ``ewc``: Adam plus the EWC penalty of every earlier task (diagonal empirical
  Fisher at the end of the task, ``subjax.fisher.ewc_loss``);
- ``gpm``: gradient projection memory, a fixed projection of every kernel gradient
  off the span of earlier tasks' layer inputs (``subjax.optim.coso`` with
  ``rank=None``, memory from the input covariance at ``threshold``), Adam on the rest;
- ``coso``: ``subjax.optim.coso`` — Adam in a rank-``r`` subspace of the gradient
  orthogonal to the accumulated memory, refreshed by warm subspace iteration; the
  memory is built from the task's own projected gradients.

Each method tunes one hyperparameter on the validation splits (average accuracy
after the last task) with the same budget: the learning rate for fine-tune, GPM and
CoSO, the EWC strength for EWC. Reported on test: average accuracy after the last
task (ACC) and backward transfer (BWT, the mean change of each earlier task's
accuracy between just after it was learnt and the end).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import stats
from experiments.data import Split, digits
from experiments.harness import SeedSweep, new_figure, results_markdown, save_figure
from subjax import fisher
from subjax.optim import coso, coso_consolidate

METHODS = ("fine-tune", "ewc", "gpm", "coso")
COLUMNS = ["method", "ACC (test)", "BWT (test)", "tuned value (median)", "at grid edge"]
LAYERS = ("l1", "l2", "out")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    n_tasks: int = 5
    hidden: int = 128
    steps: int = 300
    batch: int = 64
    rank: int = 8
    refresh_every: int = 20
    threshold: float = 0.97
    lr: float = 1e-3               # EWC's learning rate (it tunes its strength)
    lr_grid: tuple[float, ...] = (3e-4, 1e-3, 3e-3)
    strength_grid: tuple[float, ...] = (10.0, 100.0, 1000.0)
    budget: int = 4

    def __post_init__(self):
        for k in ("seeds", "hidden", "steps", "batch", "rank", "refresh_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.n_tasks < 2:
            raise ValueError(f"n_tasks must be >= 2, got {self.n_tasks}")
        if not 0 < self.threshold <= 1 or not self.lr > 0:
            raise ValueError("threshold must be in (0, 1] and lr > 0")
        for g in (self.lr_grid, self.strength_grid):
            if len(g) < 2 or not all(v > 0 for v in g):
                raise ValueError("grids need at least two positive values")
        if self.budget < max(len(self.lr_grid), len(self.strength_grid)):
            raise ValueError("budget must cover the grids")


def _init(key, hidden):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"l1": jax.random.normal(k1, (64, hidden)) / 8.0,
            "l2": jax.random.normal(k2, (hidden, hidden)) / np.sqrt(hidden),
            "out": jax.random.normal(k3, (hidden, 10)) / np.sqrt(hidden)}


def _inputs(p, x):
    """The input of every layer (what GPM's memory spans)."""
    h1 = jnp.tanh(x @ p["l1"])
    h2 = jnp.tanh(h1 @ p["l2"])
    return {"l1": x, "l2": h1, "out": h2}


def apply_fn(p, x):
    return _inputs(p, x)["out"] @ p["out"]


def _nll(p, x, y):
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(apply_fn(p, x)), y[:, None], 1))


def _permute(split: Split, perm) -> Split:
    return Split(split.x[:, perm], split.y)


def make_tasks(cfg: Config, seed: int):
    data = digits(seed)
    rng = np.random.default_rng(seed + 7)
    perms = [np.arange(64)] + [rng.permutation(64) for _ in range(cfg.n_tasks - 1)]
    return [{k: _permute(getattr(data, k), p) for k in ("train", "val", "test")} for p in perms]


def _optimizer(method, cfg, value):
    if method == "coso":
        return coso(value, rank=cfg.rank, refresh_every=cfg.refresh_every)
    if method == "gpm":
        return coso(value, rank=None)
    if method == "ewc":
        return optax.adam(cfg.lr)
    return optax.adam(value)


@jax.jit(static_argnames=("cfg", "method"))
def _train_task(params, state, x, y, key, anchors, fishers, strength, value, cfg, method):
    opt = _optimizer(method, cfg, value)  # the tuned value is traced: one compile per method

    def loss(p, xb, yb):
        pen = sum(fisher.ewc_penalty(p, a, f, strength) for a, f in zip(anchors, fishers,
                                                                           strict=True))
        return _nll(p, xb, yb) + pen

    def body(carry, k):
        p, s = carry
        idx = jax.random.choice(k, x.shape[0], (cfg.batch,), replace=False)
        u, s = opt.update(jax.grad(loss)(p, x[idx], y[idx]), s, p)
        return (optax.apply_updates(p, u), s), None

    keys = jax.random.split(key, cfg.steps)
    (p, s), _ = jax.lax.scan(body, (params, state), keys)
    return p, s


@jax.jit
def _acc(p, x, y):
    return jnp.mean(jnp.argmax(apply_fn(p, x), -1) == y)


def run_sequence(cfg: Config, tasks, seed: int, method: str, value: float) -> dict:
    """Train on every task in turn; accuracy matrices ``R[i][j]`` on val and test."""
    params = _init(jax.random.key(seed), cfg.hidden)
    opt = _optimizer(method, cfg, value)
    state = opt.init(params)
    anchors, fishers = [], []
    strength = value if method == "ewc" else 0.0
    acc = {"val": [], "test": []}
    for t, task in enumerate(tasks):
        x, y = jnp.asarray(task["train"].x), jnp.asarray(task["train"].y)
        if method == "fine-tune":  # a fresh optimizer state per task, as CoSO's reset
            state = opt.init(params)
        params, state = _train_task(params, state, x, y, jax.random.key(seed * 1000 + t),
                                    tuple(anchors), tuple(fishers), strength, value, cfg, method)
        if method == "ewc":
            anchors.append(params)
            fishers.append(fisher.diag_empirical(apply_fn, params, x, y))
            state = opt.init(params)
        elif method == "coso":
            state = coso_consolidate(state, cfg.threshold)
        elif method == "gpm":
            ins = _inputs(params, x)
            state = coso_consolidate(state, cfg.threshold,
                                     sketch={k: ins[k].T @ ins[k] for k in LAYERS})
        for split in ("val", "test"):
            acc[split].append([float(_acc(params, jnp.asarray(tk[split].x),
                                          jnp.asarray(tk[split].y))) for tk in tasks])
    out = {}
    for split, r in acc.items():
        r = np.asarray(r)
        out[split] = {"acc": float(r[-1].mean()),
                      "bwt": float(np.mean([r[-1, j] - r[j, j] for j in range(len(tasks) - 1)])),
                      "matrix": r.tolist()}
    return out


def run_cell(cfg: Config, seed: int, method: str) -> dict:
    tasks = make_tasks(cfg, seed)
    runs = {}

    def evaluate(v):
        runs[v] = run_sequence(cfg, tasks, seed, method, v)
        return runs[v]["val"]["acc"]

    grid = cfg.strength_grid if method == "ewc" else cfg.lr_grid
    tuned = stats.tune(evaluate, grid, budget=cfg.budget)
    best = runs[tuned.best]
    return {"value": tuned.best, "tuning": tuned.to_dict(), "test": best["test"],
            "val": {k: best["val"][k] for k in ("acc", "bwt")}}


def _col(rows, method, metric):
    return [r[method]["test"][metric] for r in rows]


class CoSO(SeedSweep):
    name = "coso"
    title = "CoSO: orthogonal gradient subspaces for continual learning (Cheng et al. 2025)"
    config_cls = Config
    quick = {"seeds": 2, "n_tasks": 3, "steps": 150, "lr_grid": (1e-3, 3e-3),
             "strength_grid": (100.0, 1000.0), "budget": 2}
    full = {"seeds": 5}
    figures = ("coso.png",)

    methods = METHODS
    lead_columns = tuple(COLUMNS)
    run_seed = staticmethod(run_cell)

    def sweep(self, cfg, cells):
        rows = self.seed_rows(cfg, cells)
        claims = []
        for foil in ("gpm", "ewc", "fine-tune"):
            cmp = stats.compare(_col(rows, "coso", "acc"), _col(rows, foil, "acc"),
                                quick=cells.quick)
            claims.append(stats.claim(
                f"CoSO has a higher average accuracy than {foil}",
                "CoSO beats GPM, EWC and fine-tuning in ACC on permuted / split benchmarks "
                "(Tables 1-2)", cmp, names=("CoSO", foil)))
        cmp = stats.compare(_col(rows, "coso", "bwt"), _col(rows, "fine-tune", "bwt"),
                            quick=cells.quick)
        claims.append(stats.claim("CoSO forgets less than fine-tuning (higher BWT)",
                                  "CoSO's BWT is near zero, fine-tuning's strongly negative",
                                  cmp, names=("CoSO", "fine-tune")))
        table = []
        for m in METHODS:
            vals = [r[m]["value"] for r in rows]
            edge = sum(r[m]["tuning"]["at_edge"] for r in rows)
            table.append({"method": m,
                          "ACC (test)": stats.mean_ci(_col(rows, m, "acc")).format(),
                          "BWT (test)": stats.mean_ci(_col(rows, m, "bwt")).format(),
                          "tuned value (median)": float(np.median(vals)),
                          "at grid edge": f"{edge}/{len(rows)}"})
        tables = {f"Permuted digits, {cfg.n_tasks} tasks (mean ± 95% CI over seeds)": table}
        return {"claims": claims, "tables": tables, "per_seed": rows}

    def report(self, cfg, results, history, outdir):
        rows = results["per_seed"]
        fig, ax = new_figure(figsize=(5.0, 3.4))
        for m, style in zip(METHODS, ("o-", "s-", "^-", "D-"), strict=True):
            final = np.mean([np.asarray(r[m]["test"]["matrix"])[-1] for r in rows], 0)
            ax.plot(range(1, len(final) + 1), final, style, ms=4, label=m)
        ax.set_xlabel("task")
        ax.set_ylabel("test accuracy after the last task")
        ax.set_title("accuracy on each task at the end (mean over seeds)", fontsize=9)
        ax.legend(fontsize=7)
        img = save_figure(fig, outdir, "coso.png", "final accuracy per task")
        return results_markdown(f"{cfg.seeds} seeds; intervals are 95% t-intervals over seeds.",
                                results, img, columns=self.table_columns)


EXPERIMENT = CoSO()
