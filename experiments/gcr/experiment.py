"""GCR: softmax head vs Grassmann class representation head (Wang, Li & Zhang, ICCV 2023).

Small-scale protocol (docs in README.md): an MLP feature extractor with either a
softmax (linear) head or a GCR head (each class a p-dim subspace, logit =
scale * ||W_c^T normalize(x)||), trained on the *base* classes of

- ``digits``: scikit-learn's 8x8 digits, base classes 0-6, held-out 7-9;
- ``mixture``: a synthetic Gaussian mixture, 40 classes each made of 4 sub-clusters
  (multi-modal classes), base classes 0-29, held-out 30-39.

The body is trained by AdamW; the GCR head by ``subjax.optim.riemannian_sgd``
(momentum 0.9, polar retraction) on the Grassmann manifold, through
``optax.partition`` over ``subjax.nn.manifolds_of(model)``. Reported per cell:
test accuracy on base classes; transferability = accuracy of a logistic-regression
probe on frozen, L2-normalised features of the held-out classes; intra-class
variability = mean within-class variance / total variance of the normalised
features of the base-class test set.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments.harness import Experiment, markdown_table, new_figure, save_figure
from subjax.nn import GrassmannClassifier, manifolds_of
from subjax.optim import manifold_labels, riemannian_sgd

HEADS = ("softmax", "gcr1", "gcr2", "gcr4", "gcr8")
DATASETS = ("digits", "mixture")
PAPER = {
    "accuracy": "GCR lowers ImageNet top-1 error by 5.6% (ResNet50-D), 4.5% (ResNeXt50), "
                "3.0% (Swin-T), 3.5% (Deit3-S)",
    "transfer": "linear-probe transfer accuracy up, ResNet50-D 77.98% -> 79.70%",
    "variability": "intra-class feature variability grows with the subspace dimension",
}


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 3            # seeds per (dataset, head)
    train_steps: int = 600    # optimizer steps per run
    batch: int = 128
    features: int = 32        # feature (penultimate) dimension
    hidden: int = 128
    scale: float = 10.0       # GCR logit scale
    body_lr: float = 3e-3     # AdamW for the body (and the softmax head)
    head_lr: float = 0.2      # Riemannian SGD for the GCR head
    momentum: float = 0.9
    weight_decay: float = 1e-4
    checkpoint_every: int = 5

    def __post_init__(self):
        for k in ("seeds", "train_steps", "batch", "features", "hidden", "checkpoint_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.features < 8:
            raise ValueError(f"features={self.features} must be >= 8 (largest subspace_dim)")
        if not (self.scale > 0 and self.body_lr > 0 and self.head_lr > 0):
            raise ValueError("scale, body_lr and head_lr must be positive")


# ---------------------------------------------------------------- data
def _split(x, y, base, seed, test_frac=0.3):
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(y))
    x, y = x[idx], y[idx]
    n_test = int(test_frac * len(y))
    out = {}
    for part, sl in (("test", slice(0, n_test)), ("train", slice(n_test, None))):
        xs, ys = x[sl], y[sl]
        b = ys < base
        out[f"base_{part}"] = (xs[b], ys[b])
        out[f"held_{part}"] = (xs[~b], ys[~b] - base)
    return out


@functools.lru_cache(maxsize=8)
def _dataset(name: str, seed: int):
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y, base = (d.data / 16.0).astype(np.float32), d.target.astype(np.int32), 7
    else:
        rng = np.random.default_rng(1234)  # the task is fixed; seeds change split + init
        classes, modes, dim, per_mode = 40, 4, 32, 30
        centers = rng.standard_normal((classes, 1, dim)) * 0.6
        offsets = rng.standard_normal((classes, modes, dim)) * 0.8
        means = (centers + offsets).reshape(classes * modes, dim)
        lab = np.repeat(np.arange(classes), modes * per_mode)
        mode = np.repeat(np.arange(classes * modes), per_mode)
        x = (means[mode] + 1.0 * rng.standard_normal((len(mode), dim))).astype(np.float32)
        y, base = lab.astype(np.int32), 30
    parts = _split(x, y, base, seed)
    parts["n_total"] = len(y)
    return parts, base


# ---------------------------------------------------------------- model
class Net(nnx.Module):
    def __init__(self, d_in, hidden, features, classes, head, scale, rngs):
        self.l1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, features, rngs=rngs)
        if head == "softmax":
            self.head = nnx.Linear(features, classes, rngs=rngs)
        else:
            self.head = GrassmannClassifier(features, classes, int(head[3:]), scale, rngs=rngs)

    def features(self, x):
        return self.l2(nnx.gelu(self.l1(x)))

    def __call__(self, x):
        return self.head(self.features(x))


def _make_tx(cfg: Config, model, head: str):
    body = optax.adamw(cfg.body_lr, weight_decay=cfg.weight_decay)
    if head == "softmax":
        return body
    mans = manifolds_of(model)
    # GCR public code: no weight decay on the subspaces, SGD + momentum on the head
    return optax.partition(
        {"riemannian": riemannian_sgd(cfg.head_lr, cfg.momentum, manifolds=mans),
         "euclidean": body},
        manifold_labels(mans))


@functools.lru_cache(maxsize=32)
def _trainer(cfg: Config, d_in: int, classes: int, head: str):
    """A jitted ``(seed_key, x, y) -> params`` for one architecture (cached across seeds)."""
    model = Net(d_in, cfg.hidden, cfg.features, classes, head, cfg.scale, nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)
    tx = _make_tx(cfg, model, head)

    def loss(params, xb, yb):
        m = nnx.merge(graphdef, params)
        return optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()

    @jax.jit
    def train(key, x, y, n_valid):
        init_key, data_key = jax.random.split(key)
        m = Net(d_in, cfg.hidden, cfg.features, classes, head, cfg.scale,
                nnx.Rngs(params=init_key))
        params = nnx.state(m, nnx.Param)
        state = tx.init(params)

        def body(carry, k):
            params, state = carry
            idx = jax.random.randint(k, (cfg.batch,), 0, n_valid)
            l, g = jax.value_and_grad(loss)(params, x[idx], y[idx])
            u, state = tx.update(g, state, params)
            return (optax.apply_updates(params, u), state), l

        keys = jax.random.split(data_key, cfg.train_steps)
        (params, _), losses = jax.lax.scan(body, (params, state), keys)
        return params, losses

    return graphdef, train


def _probe_accuracy(ftr, ytr, fte, yte) -> float:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(ftr, ytr)
    return float(clf.score(fte, yte))


def _normalize(f):
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def _variability(f, y) -> float:
    """Mean within-class variance over total variance of the features (in [0, 1])."""
    total = np.mean(np.sum((f - f.mean(0)) ** 2, -1))
    within = np.mean([np.mean(np.sum((f[y == c] - f[y == c].mean(0)) ** 2, -1))
                      for c in np.unique(y)])
    return float(within / total)


def _cells(cfg: Config):
    return [(d, h, s) for d in DATASETS for s in range(cfg.seeds) for h in HEADS]


def run_cell(cfg: Config, dataset: str, head: str, seed: int) -> dict:
    parts, base = _dataset(dataset, cfg.seed * 1000 + seed)
    xtr, ytr = parts["base_train"]
    graphdef, train = _trainer(cfg, xtr.shape[1], base, head)
    key = jax.random.fold_in(jax.random.key(cfg.seed), seed)
    t0 = time.perf_counter()
    n_pad = parts["n_total"]  # same shapes for every seed: one compilation per head
    xpad = np.zeros((n_pad, xtr.shape[1]), np.float32)
    ypad = np.zeros((n_pad,), np.int32)
    xpad[: len(ytr)], ypad[: len(ytr)] = xtr, ytr
    params, losses = train(key, jnp.asarray(xpad), jnp.asarray(ypad), len(ytr))
    jax.block_until_ready(params)
    train_time = time.perf_counter() - t0
    model = nnx.merge(graphdef, params)
    xte, yte = parts["base_test"]
    acc = float(np.mean(np.asarray(jnp.argmax(model(jnp.asarray(xte)), -1)) == yte))
    feats = lambda x: _normalize(np.asarray(model.features(jnp.asarray(x)), np.float64))
    htr, hytr = parts["held_train"]
    hte, hyte = parts["held_test"]
    return {
        "dataset": dataset, "head": head, "p": 0 if head == "softmax" else int(head[3:]),
        "seed": seed, "test_acc": acc,
        "transfer_acc": _probe_accuracy(feats(htr), hytr, feats(hte), hyte),
        "variability": _variability(feats(xte), yte),
        "final_loss": float(np.mean(np.asarray(losses[-20:]))),
        "time_s": train_time,
    }


class GCR(Experiment):
    name = "gcr"
    title = "GCR: Grassmann class representation vs softmax (Wang, Li, Zhang, ICCV 2023)"
    config_cls = Config
    quick = {"seeds": 2, "train_steps": 300}
    full = {"seeds": 5, "train_steps": 1500}
    checkpoint_every = 5

    def num_steps(self, cfg):
        return len(_cells(cfg))

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        dataset, head, seed = _cells(cfg)[i]
        return state, run_cell(cfg, dataset, head, seed)

    def summarize(self, cfg, state, history):
        rows = []
        for d in DATASETS:
            for h in HEADS:
                rs = [r for r in history if r["dataset"] == d and r["head"] == h]
                if not rs:
                    continue
                row = {"dataset": d, "head": h, "p": rs[0]["p"], "seeds": len(rs)}
                for k in ("test_acc", "transfer_acc", "variability"):
                    v = np.array([r[k] for r in rs])
                    row[k] = float(v.mean())
                    row[k + "_std"] = float(v.std())
                rows.append(row)
        verdict = {}
        for d in DATASETS:
            sm = next(r for r in rows if r["dataset"] == d and r["head"] == "softmax")
            gc = [r for r in rows if r["dataset"] == d and r["head"] != "softmax"]
            best = max(gc, key=lambda r: r["test_acc"])
            var = [r["variability"] for r in sorted(gc, key=lambda r: r["p"])]
            verdict[d] = {
                "best_gcr_head": best["head"],
                "accuracy_gain_best_gcr": best["test_acc"] - sm["test_acc"],
                "transfer_gain_best_transfer_gcr": max(r["transfer_acc"] for r in gc)
                - sm["transfer_acc"],
                "variability_increases_with_p": bool(np.all(np.diff(var) > 0)),
                "variability_p1_to_p8": [var[0], var[-1]],
            }
        return {"rows": rows, "verdict": verdict}

    def report(self, cfg, results, history, outdir):
        rows = results["rows"]
        imgs = []
        fig, axes = new_figure(1, 3, figsize=(12, 3.4))
        for ax, key, label in zip(axes, ("test_acc", "transfer_acc", "variability"),
                                  ("test accuracy (base classes)",
                                   "linear-probe accuracy (held-out classes)",
                                   "intra-class / total variance"), strict=True):
            for d, color in zip(DATASETS, ("C0", "C1"), strict=True):
                gc = sorted([r for r in rows if r["dataset"] == d and r["head"] != "softmax"],
                            key=lambda r: r["p"])
                sm = next(r for r in rows if r["dataset"] == d and r["head"] == "softmax")
                ps = [r["p"] for r in gc]
                ax.errorbar(ps, [r[key] for r in gc], yerr=[r[key + "_std"] for r in gc],
                            marker="o", color=color, label=f"{d} GCR", capsize=3)
                ax.axhline(sm[key], color=color, ls="--", label=f"{d} softmax")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("subspace_dim p")
            ax.set_title(label, fontsize=9)
        axes[0].legend(fontsize=7)
        imgs.append(save_figure(fig, outdir, "gcr_vs_p.png",
                                "accuracy, transfer and variability vs subspace dim"))
        cols = ["dataset", "head", "seeds", "test_acc", "test_acc_std", "transfer_acc",
                "transfer_acc_std", "variability", "variability_std"]
        verdict_rows = [{"dataset": d, **v} for d, v in results["verdict"].items()]
        return (
            f"{cfg.seeds} seeds x {cfg.train_steps} steps per cell; body AdamW, GCR head "
            f"Riemannian SGD (polar retraction) on Grassmann(features={cfg.features}, p).\n\n"
            f"{markdown_table(rows, cols)}\n\n{markdown_table(verdict_rows)}\n\n"
            + "\n".join(imgs) + "\n"
        )


EXPERIMENT = GCR()
