"""Fisher-weighted model merging on digits (Matena & Raffel, NeurIPS 2022).

A base MLP (64-64-10, tanh) is trained briefly on a small sample of all ten
classes; from it, one model per task is fine-tuned on that task's classes only
(tasks: digits 0-4 and 5-9). The fine-tuned models are merged by plain
averaging, Fisher merging with the diagonal *true* Fisher (exact expectation
over the predicted classes) and with the diagonal *empirical* Fisher, and task
arithmetic (scale chosen on a validation split); merged models are scored on the
ten-class test set. One harness step = one seed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.harness import Experiment, markdown_table, new_figure, save_figure
from subjax import fisher

METHODS = ("task models (mean)", "average", "fisher (true)", "fisher (empirical)",
           "task arithmetic")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 3
    hidden: int = 64
    base_examples: int = 100  # per-class examples seen by the base is base_examples / 10
    base_steps: int = 150
    finetune_steps: int = 300
    lr: float = 3e-3
    floor: float = 1e-6
    fisher_examples: int = 400

    def __post_init__(self):
        for k in ("seeds", "hidden", "base_examples", "base_steps", "finetune_steps",
                  "fisher_examples"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.floor > 0:
            raise ValueError(f"floor must be > 0, got {self.floor}")


def _data(seed):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    xtr, xva, ytr, yva = train_test_split(xtr, ytr, test_size=0.2, random_state=seed,
                                          stratify=ytr)
    return xtr, ytr, xva, yva, xte, yte


def _init(key, hidden):
    k1, k2 = jax.random.split(key)
    return {"h": {"kernel": jax.random.normal(k1, (64, hidden)) / 8.0,
                  "bias": jnp.zeros((hidden,))},
            "out": {"kernel": jax.random.normal(k2, (hidden, 10)) / np.sqrt(hidden),
                    "bias": jnp.zeros((10,))}}


def apply_fn(p, x):
    h = jnp.tanh(x @ p["h"]["kernel"] + p["h"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def _loss(p, x, y):
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(apply_fn(p, x)), y[:, None], 1))


def _train(params, x, y, steps, lr):
    opt = optax.adam(lr)

    @jax.jit
    def run(params):
        def body(carry, _):
            p, s = carry
            g = jax.grad(_loss)(p, x, y)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), None, length=steps)
        return p

    return run(params)


def _acc(p, x, y):
    return float(jnp.mean(jnp.argmax(apply_fn(p, x), -1) == y))


def run_seed(cfg: Config, seed: int) -> dict:
    xtr, ytr, xva, yva, xte, yte = _data(seed)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(xtr), cfg.base_examples, replace=False)
    base = _train(_init(jax.random.key(seed), cfg.hidden), jnp.asarray(xtr[idx]),
                  jnp.asarray(ytr[idx]), cfg.base_steps, cfg.lr)
    tasks = [np.arange(0, 5), np.arange(5, 10)]
    models, f_true, f_emp = [], [], []
    for t in tasks:
        m = np.isin(ytr, t)
        xt, yt = jnp.asarray(xtr[m]), jnp.asarray(ytr[m])
        p = _train(base, xt, yt, cfg.finetune_steps, cfg.lr)
        models.append(p)
        xf, yf = xt[: cfg.fisher_examples], yt[: cfg.fisher_examples]
        f_true.append(jax.jit(lambda p, x: fisher.diag_true(apply_fn, p, x))(p, xf))
        f_emp.append(jax.jit(lambda p, x, y: fisher.diag_empirical(apply_fn, p, x, y))(p, xf, yf))
    xte_j, xva_j = jnp.asarray(xte), jnp.asarray(xva)
    scales = (0.5, 0.75, 1.0, 1.25)
    best_scale = max(scales, key=lambda s: _acc(fisher.task_arithmetic(base, models, s),
                                                xva_j, yva))
    merged = {
        "average": fisher.average(models),
        "fisher (true)": fisher.fisher_merge(models, f_true, floor=cfg.floor),
        "fisher (empirical)": fisher.fisher_merge(models, f_emp, floor=cfg.floor),
        "task arithmetic": fisher.task_arithmetic(base, models, best_scale),
    }
    row = {"seed": seed, "base": _acc(base, xte_j, yte),
           "task models (mean)": float(np.mean([_acc(p, xte_j, yte) for p in models]))}
    row.update({k: _acc(v, xte_j, yte) for k, v in merged.items()})
    row["task arithmetic scale"] = best_scale
    return row


class FisherMerge(Experiment):
    name = "fisher-merge"
    title = "Fisher-weighted merging vs averaging and task arithmetic (Matena & Raffel 2022)"
    config_cls = Config
    quick = {"seeds": 3}
    full = {"seeds": 10}

    def num_steps(self, cfg):
        return cfg.seeds

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        return state, run_seed(cfg, cfg.seed + i)

    def summarize(self, cfg, state, history):
        out = {}
        for k in ("base",) + METHODS:
            v = np.array([h[k] for h in history])
            out[k] = {"mean": float(v.mean()), "std": float(v.std())}
        wins = [h["fisher (true)"] > h["average"] for h in history]
        out["fisher_true_beats_average_seeds"] = f"{sum(wins)}/{len(wins)}"
        return out

    def report(self, cfg, results, history, outdir):
        rows = [{"method": k, "test acc (10 classes)":
                 f"{results[k]['mean']:.3f} ± {results[k]['std']:.3f}"}
                for k in ("base",) + METHODS]
        fig, ax = new_figure(figsize=(6, 3.2))
        for j, k in enumerate(METHODS):
            v = [h[k] for h in history]
            ax.scatter([j] * len(v), v, s=12)
            ax.errorbar(j, np.mean(v), yerr=np.std(v), fmt="o", color="k")
        ax.set_xticks(range(len(METHODS)), [m.replace(" ", "\n", 1) for m in METHODS],
                      fontsize=7)
        ax.set_ylabel("test accuracy, 10 classes")
        img = save_figure(fig, outdir, "merge.png", "merged-model accuracy per seed")
        return (f"Two tasks (digits 0-4, 5-9), {cfg.seeds} seeds, mean ± std.\n\n"
                f"{markdown_table(rows)}\n\nFisher (true) beats plain averaging on "
                f"{results['fisher_true_beats_average_seeds']} seeds.\n\n"
                f"{markdown_table(history)}\n\n{img}\n")


EXPERIMENT = FisherMerge()
