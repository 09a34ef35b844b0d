"""Fisher-weighted SVD vs plain SVD compression of a trained digits MLP (Hsu et al., ICLR 2022).

One cell = one seed: a 64-H-H-10 tanh MLP is trained on the seed's digits split; its two
hidden kernels are replaced by rank-``r`` factorisations computed three ways, with no
fine-tuning afterwards:

- ``svd``: the truncated SVD (least plain reconstruction error, Eckart–Young);
- ``fwsvd``: Fisher-weighted SVD (``subjax.fisher.fisher_weighted_svd``) with one
  importance per output unit (the rows of ``W`` in ``y = W x``, the paper's choice),
  from the diagonal empirical Fisher of the training split;
- ``fwsvd (input rows)``: the same with one importance per input feature.

For every rank the cell records test and validation accuracy, test NLL, the relative
reconstruction error ``||W - W_r||_F / ||W||_F`` over both kernels and the Fisher
quadratic ``sum F (W - W_r)^2`` (the second-order loss increase the weighting targets).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments import stats
from experiments.data import digits
from experiments.harness import SeedSweep, new_figure, results_markdown, save_figure
from experiments.training import fit, softmax_nll
from subjax import fisher, linalg

LAYERS = ("l1", "l2")
METHODS = ("svd", "fwsvd", "fwsvd (input rows)")
AXIS = {"fwsvd": 1, "fwsvd (input rows)": 0}  # Flax kernels are (in, out)
TASKS = {"3 vs 8": (3, 8), "digits 0-4": (0, 1, 2, 3, 4)}
COLUMNS = ["rank", "method", "test acc", "test NLL", "rel. reconstruction error",
           "Fisher quadratic"]


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 10
    hidden: int = 128
    lr: float = 3e-3
    pretrain_steps: int = 400
    finetune_lr: float = 1e-3
    finetune_steps: int = 200
    floor: float = 1e-6
    ranks: tuple[int, ...] = (2, 4, 8)

    def __post_init__(self):
        for k in ("seeds", "hidden", "pretrain_steps", "finetune_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.lr > 0 or not self.finetune_lr > 0 or not self.floor >= 0:
            raise ValueError("lr and finetune_lr must be > 0 and floor >= 0")
        if not self.ranks or not all(1 <= r <= min(64, self.hidden) for r in self.ranks):
            raise ValueError(f"ranks must be in [1, min(64, hidden)], got {self.ranks}")


def _init(key, hidden):
    k1, k2, k3 = jax.random.split(key, 3)
    return {"l1": {"kernel": jax.random.normal(k1, (64, hidden)) / 8.0,
                   "bias": jnp.zeros((hidden,))},
            "l2": {"kernel": jax.random.normal(k2, (hidden, hidden)) / np.sqrt(hidden),
                   "bias": jnp.zeros((hidden,))},
            "out": {"kernel": jax.random.normal(k3, (hidden, 10)) / np.sqrt(hidden),
                    "bias": jnp.zeros((10,))}}


def apply_fn(p, x):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    h = jnp.tanh(h @ p["l2"]["kernel"] + p["l2"]["bias"])
    return h @ p["out"]["kernel"] + p["out"]["bias"]


def _nll(p, x, y):
    return softmax_nll(apply_fn(p, x), y)


@jax.jit
def _scores(p, x, y, classes):
    """Accuracy and NLL of the task head: the logits of the task's ``classes`` only."""
    logits = apply_fn(p, x)[:, classes]
    target = jnp.argmax(y[:, None] == classes[None, :], -1)
    nll = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], 1))
    return jnp.mean(jnp.argmax(logits, -1) == target), nll


def _compress(cfg, params, fis, method, rank):
    out = jax.tree.map(lambda a: a, params)
    for layer in LAYERS:
        w = params[layer]["kernel"]
        if method == "svd":
            lr = linalg.weighted_low_rank(w, rank)
        else:
            lr = fisher.fisher_weighted_svd(w, fis[layer]["kernel"], rank, axis=AXIS[method],
                                            floor=cfg.floor)
        out[layer] = {"kernel": lr.left @ lr.right, "bias": params[layer]["bias"]}
    return out


def _task_cell(cfg, base, data, classes) -> dict:
    train, cls = data.train.classes(classes), jnp.asarray(classes)
    x, y = jnp.asarray(train.x), jnp.asarray(train.y)
    params = fit(_nll, base, x, y, cfg.finetune_lr, cfg.finetune_steps)
    fis = fisher.diag_empirical(apply_fn, params, x, y)  # the task's empirical Fisher
    sets = {k: getattr(data, k).classes(classes) for k in ("val", "test")}

    def evaluate(p):
        row = {}
        for k, s in sets.items():
            acc, nll = _scores(p, jnp.asarray(s.x), jnp.asarray(s.y), cls)
            row[f"{k} acc"] = float(acc)
            if k == "test":
                row["test nll"] = float(nll)
        return row

    norm2 = sum(float(jnp.sum(params[k]["kernel"] ** 2)) for k in LAYERS)
    out = {"full": evaluate(params), "ranks": {}}
    for r in cfg.ranks:
        per = {}
        for m in METHODS:
            p = _compress(cfg, params, fis, m, r)
            diff2 = {k: (params[k]["kernel"] - p[k]["kernel"]) ** 2 for k in LAYERS}
            per[m] = evaluate(p) | {
                "reconstruction": float(np.sqrt(sum(float(jnp.sum(d)) for d in diff2.values())
                                                / norm2)),
                "fisher error": float(sum(jnp.sum(fis[k]["kernel"] * diff2[k])
                                          for k in LAYERS)),
            }
        out["ranks"][str(r)] = per
    return out


def run_seed(cfg: Config, seed: int) -> dict:
    data = digits(seed)
    base = fit(_nll, _init(jax.random.key(seed), cfg.hidden), jnp.asarray(data.train.x),
                  jnp.asarray(data.train.y), cfg.lr, cfg.pretrain_steps)
    return {"seed": seed, **{name: _task_cell(cfg, base, data, classes)
                             for name, classes in TASKS.items()}}


def _col(rows, task, rank, method, metric):
    return [r[task]["ranks"][str(rank)][method][metric] for r in rows]


class FWSVD(SeedSweep):
    name = "fwsvd"
    title = "Fisher-weighted SVD vs SVD compression at equal rank (Hsu et al. 2022)"
    config_cls = Config
    quick = {"seeds": 3, "pretrain_steps": 300, "finetune_steps": 150}
    full = {"seeds": 10}
    figures = ("fwsvd.png",)
    lead_columns = tuple(COLUMNS)
    run_seed = staticmethod(run_seed)

    def sweep(self, cfg, cells):
        rows = self.seed_rows(cfg, cells)
        claims, tables = [], {}
        for task in TASKS:
            for r in cfg.ranks:
                cmp = stats.compare(_col(rows, task, r, "fwsvd", "test acc"),
                                    _col(rows, task, r, "svd", "test acc"), quick=cells.quick)
                claims.append(stats.claim(
                    f"{task}, rank {r}: FWSVD keeps more task accuracy than SVD",
                    "FWSVD > SVD task accuracy at equal rank without fine-tuning (Tables 1-2)",
                    cmp, names=("FWSVD", "SVD")))
        task, mid = next(iter(TASKS)), cfg.ranks[len(cfg.ranks) // 2]
        cmp = stats.compare(_col(rows, task, mid, "fwsvd", "reconstruction"),
                            _col(rows, task, mid, "svd", "reconstruction"), quick=cells.quick)
        claims.append(stats.claim(
            f"{task}, rank {mid}: FWSVD reconstructs the weights worse than SVD",
            "FWSVD has the larger reconstruction error, yet the better accuracy (Sec. 4)",
            cmp, names=("FWSVD", "SVD"), fmt=".4f"))
        for task in TASKS:
            table = [{"rank": "full", "method": "fine-tuned, uncompressed",
                      "test acc": stats.mean_ci([r[task]["full"]["test acc"]
                                                 for r in rows]).format(),
                      "test NLL": stats.mean_ci([r[task]["full"]["test nll"]
                                                 for r in rows]).format(),
                      "rel. reconstruction error": "0", "Fisher quadratic": "0"}]
            for rk in cfg.ranks:
                for m in METHODS:
                    table.append({
                        "rank": rk, "method": m,
                        "test acc": stats.mean_ci(_col(rows, task, rk, m, "test acc")).format(),
                        "test NLL": stats.mean_ci(_col(rows, task, rk, m, "test nll")).format(),
                        "rel. reconstruction error": stats.mean_ci(
                            _col(rows, task, rk, m, "reconstruction")).format(),
                        "Fisher quadratic": stats.mean_ci(
                            _col(rows, task, rk, m, "fisher error")).format(".2g")})
            tables[f"Task {task}: both hidden kernels at rank r, no fine-tuning after "
                   "compression"] = table
        return {"claims": claims, "tables": tables, "per_seed": rows}

    def report(self, cfg, results, history, outdir):
        rows = results["per_seed"]
        fig, axes = new_figure(2, 2, figsize=(9, 6.4))
        for (ax1, ax2), task in zip(axes, TASKS, strict=True):
            for m, style in zip(METHODS, ("o-", "s-", "^--"), strict=True):
                means, errs = [], []
                for r in cfg.ranks:
                    est = stats.mean_ci(_col(rows, task, r, m, "test acc"))
                    means.append(est.mean)
                    errs.append(est.half_width if est.n > 1 else 0.0)
                ax1.errorbar(cfg.ranks, means, yerr=errs, fmt=style, ms=4, capsize=3, label=m)
                rec = [np.mean(_col(rows, task, r, m, "reconstruction")) for r in cfg.ranks]
                ax2.plot(rec, means, style, ms=4, label=m)
                for r, xr, yr in zip(cfg.ranks, rec, means, strict=True):
                    ax2.annotate(f"r={r}", (xr, yr), fontsize=6, textcoords="offset points",
                                 xytext=(3, -8))
            full = np.mean([r[task]["full"]["test acc"] for r in rows])
            for ax in (ax1, ax2):
                ax.axhline(full, color="gray", lw=0.8, ls=":", label="uncompressed")
                ax.set_ylabel(f"{task}: test accuracy")
            ax1.set_xscale("log", base=2)
            ax1.set_xlabel("rank of both hidden kernels")
            ax1.set_title(f"{task}: accuracy vs rank (mean, 95% CI)", fontsize=9)
            ax2.set_xlabel("relative reconstruction error")
            ax2.set_title(f"{task}: accuracy vs reconstruction error", fontsize=9)
        axes[0][0].legend(fontsize=7)
        img = save_figure(fig, outdir, "fwsvd.png", "accuracy vs rank and vs reconstruction")
        return results_markdown(f"{cfg.seeds} seeds; intervals are 95% t-intervals over seeds.",
                                results, img, columns=self.table_columns)


EXPERIMENT = FWSVD()
