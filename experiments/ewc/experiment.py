"""Elastic weight consolidation on split digits: diagonal vs rank-1 vs low-rank Fisher.

Five tasks (digit pairs 0/1, 2/3, ..., 8/9) learned in sequence by one MLP
(64-64-10, tanh) with a shared output layer; each task reads only its two
logits (task-incremental protocol). After task ``t`` the Fisher of that task's
model is taken at its parameters and added to the penalty
``sum_t (lambda/2) (theta - theta_t)^T F_t (theta - theta_t)`` for the following
tasks. Fishers: diagonal true Fisher (exact class expectation), rank-1
(normalised mean gradient, Wang et al. 2025), top-8 eigenpairs of the true Fisher
(randomized Nystrom on the Fisher-vector-product operator). Forgetting of task
``t`` = its accuracy right after learning it minus its final accuracy. One
harness step = one (method, lambda) cell; the strength is swept because the
three Fishers have different scales, and every cell is reported.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.harness import Experiment, markdown_table, new_figure, save_figure
from subjax import fisher

METHODS = ("none", "diagonal", "rank-1", "low-rank")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    hidden: int = 64
    steps_per_task: int = 200
    lr: float = 3e-3
    rank: int = 8
    strengths: tuple = (10.0, 100.0, 1000.0, 10000.0)

    def __post_init__(self):
        if self.steps_per_task < 1 or self.rank < 1 or self.hidden < 1:
            raise ValueError("steps_per_task, rank and hidden must be >= 1")


def _data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    return train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)


def _init(key, hidden):
    k1, k2 = jax.random.split(key)
    return {"h": {"kernel": jax.random.normal(k1, (64, hidden)) / 8.0,
                  "bias": jnp.zeros((hidden,))},
            "out": {"kernel": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
                    "bias": jnp.zeros((10,))}}


def _head(classes):
    cls = jnp.asarray(classes)

    def apply(p, x):
        h = jnp.tanh(x @ p["h"]["kernel"] + p["h"]["bias"])
        return (h @ p["out"]["kernel"] + p["out"]["bias"])[:, cls]

    return apply


def _nll(apply, p, x, y):
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(apply(p, x)), y[:, None], 1))


def _cells(cfg):
    cells = [("none", 0.0)]
    for m in METHODS[1:]:
        cells += [(m, float(s)) for s in cfg.strengths]
    return cells


def run_cell(cfg: Config, method: str, strength: float) -> dict:
    xtr, xte, ytr, yte = _data(cfg.seed)
    tasks = [(2 * t, 2 * t + 1) for t in range(5)]
    params = _init(jax.random.key(cfg.seed), cfg.hidden)
    anchors, fishers = [], []
    opt = optax.adam(cfg.lr)
    acc_after, acc_final = [], []

    def task_data(t, x, y):
        m = np.isin(y, tasks[t])
        return jnp.asarray(x[m]), jnp.asarray((y[m] == tasks[t][1]).astype(np.int32))

    def evaluate(p, t):
        x, y = task_data(t, xte, yte)
        return float(jnp.mean(jnp.argmax(_head(tasks[t])(p, x), -1) == y))

    for t in range(5):
        apply = _head(tasks[t])
        x, y = task_data(t, xtr, ytr)
        pen = fisher.ewc_loss(lambda p, x, y, apply=apply: _nll(apply, p, x, y),
                              anchors, fishers, strength)

        @jax.jit
        def train(p, x, y, pen=pen):
            def body(c, _):
                p, s = c
                g = jax.grad(pen)(p, x, y)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), None

            (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=cfg.steps_per_task)
            return p

        params = train(params, x, y)
        acc_after.append(evaluate(params, t))
        if method != "none":
            if method == "diagonal":
                f = jax.jit(lambda p, x, apply=apply: fisher.diag_true(apply, p, x))(params, x)
            elif method == "rank-1":
                f = fisher.rank_one(apply, params, x, labels=y)
            else:
                f = fisher.low_rank(apply, params, x, cfg.rank, key=jax.random.key(t))
            anchors.append(params)
            fishers.append(f)
    acc_final = [evaluate(params, t) for t in range(5)]
    forgetting = [a - f for a, f in zip(acc_after, acc_final, strict=True)]
    return {"method": method, "strength": strength,
            "final_acc_mean": float(np.mean(acc_final)),
            "forgetting_mean": float(np.mean(forgetting[:-1])),
            "forgetting": [round(v, 4) for v in forgetting],
            "final_acc": [round(v, 4) for v in acc_final]}


class EWC(Experiment):
    name = "ewc"
    title = "EWC on split digits: diagonal vs rank-1 vs low-rank Fisher"
    config_cls = Config
    quick = {"steps_per_task": 150, "strengths": (100.0, 1000.0, 10000.0)}
    full = {}

    def num_steps(self, cfg):
        return len(_cells(cfg))

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        method, s = _cells(cfg)[i]
        return state, run_cell(cfg, method, s)

    def summarize(self, cfg, state, history):
        best = {}
        for m in METHODS:
            rows = [h for h in history if h["method"] == m]
            b = max(rows, key=lambda h: h["final_acc_mean"])
            best[m] = {"strength": b["strength"], "final_acc_mean": b["final_acc_mean"],
                       "forgetting_mean": b["forgetting_mean"], "forgetting": b["forgetting"]}
        return best

    def report(self, cfg, results, history, outdir):
        fig, ax = new_figure(figsize=(6, 3.2))
        for m in METHODS:
            ax.plot(range(1, 6), results[m]["forgetting"], marker="o",
                    label=f"{m} (lambda={results[m]['strength']:g})")
        ax.set_xlabel("task")
        ax.set_ylabel("forgetting (acc after - final acc)")
        ax.legend(fontsize=7)
        img = save_figure(fig, outdir, "forgetting.png", "forgetting per task, best strength")
        rows = [{"method": m, **{k: v for k, v in results[m].items()}} for m in METHODS]
        return (f"Best strength per method (by final mean accuracy), seed {cfg.seed}.\n\n"
                f"{markdown_table(rows)}\n\nAll cells:\n\n{markdown_table(history)}\n\n{img}\n")


EXPERIMENT = EWC()
