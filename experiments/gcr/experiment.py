"""GCR: softmax head vs Grassmann class representation head (Wang, Li & Zhang, ICCV 2023).

Small-scale protocol (README.md): an MLP feature extractor with a softmax (linear)
head, a cosine-softmax head (normalised features and class vectors, the same logit
scale as GCR) or a GCR head (each class a p-dim subspace, logit =
scale * ||W_c^T normalize(x)||), trained on the *base* classes of

- ``digits``: the shared 8x8 digits splits (``experiments.data.digits``), base
  classes 0-6, held-out 7-9;
- ``mixture``: a synthetic Gaussian mixture, 40 classes each made of 4 sub-clusters
  (multi-modal classes), base classes 0-29, held-out 30-39.

The body (and the softmax / cosine heads) is trained by AdamW; the GCR head by
``subjax.optim.riemannian_sgd`` (momentum, polar retraction) on the Grassmann
manifold, through ``optax.partition`` over ``subjax.nn.manifolds_of(model)``.
Training runs to convergence: the validation loss is read every ``eval_every``
steps and training stops after ``patience`` reads without improvement (or at
``max_steps``); the parameters of the best read are kept.

Reported per cell (one dataset, head and seed): test accuracy on the base classes;
transferability = accuracy of a logistic-regression probe on frozen, L2-normalised
features of the held-out classes; intra-class variability = mean within-class
variance / total variance of the normalised features of the base-class test set.
The variability trend over p is tested per seed (least-squares slope of
variability on log2 p), and its interval is taken over seeds.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from experiments import stats
from experiments.data import Split, digits
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure
from subjax.nn import GrassmannClassifier, manifolds_of
from subjax.optim import manifold_labels, riemannian_sgd

DATASETS = ("digits", "mixture")
BASE = {"digits": 7, "mixture": 30}


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5            # seeds per (dataset, head)
    subspace_dims: tuple[int, ...] = (1, 2, 4, 8)
    max_steps: int = 6000     # cap of the early-stopped training
    eval_every: int = 100     # steps between two validation reads
    patience: int = 8         # validation reads without improvement before stopping
    batch: int = 128
    features: int = 128       # feature (penultimate) dimension: p / features <= 1/16
    hidden: int = 256
    scale: float = 10.0       # logit scale of the GCR and cosine heads
    body_lr: float = 1e-3     # AdamW for the body (and the softmax / cosine heads)
    head_lr: float = 0.2      # Riemannian SGD for the GCR head
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def __post_init__(self):
        for k in ("seeds", "max_steps", "eval_every", "patience", "batch", "features",
                  "hidden"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if len(self.subspace_dims) < 2 or min(self.subspace_dims) < 1:
            raise ValueError("subspace_dims needs at least two dimensions >= 1 (trend test)")
        if max(self.subspace_dims) > self.features:
            raise ValueError(f"features={self.features} must be >= the largest subspace_dims")
        if not (self.scale > 0 and self.body_lr > 0 and self.head_lr > 0):
            raise ValueError("scale, body_lr and head_lr must be positive")

    @property
    def heads(self) -> tuple[str, ...]:
        return ("softmax", "cosine") + tuple(f"gcr{p}" for p in self.subspace_dims)


# ---------------------------------------------------------------- data
def _mixture(seed: int) -> dict[str, Split]:
    rng = np.random.default_rng(1234)  # the task is fixed; seeds change split + init
    classes, modes, dim, per_mode = 40, 4, 32, 30
    centers = rng.standard_normal((classes, 1, dim)) * 0.6
    offsets = rng.standard_normal((classes, modes, dim)) * 0.8
    means = (centers + offsets).reshape(classes * modes, dim)
    y = np.repeat(np.arange(classes), modes * per_mode).astype(np.int32)
    mode = np.repeat(np.arange(classes * modes), per_mode)
    x = (means[mode] + rng.standard_normal((len(mode), dim))).astype(np.float32)
    idx = np.random.default_rng(seed).permutation(len(y))
    n_test, n_val = int(0.3 * len(y)), int(0.14 * len(y))
    cut = {"test": idx[:n_test], "val": idx[n_test:n_test + n_val],
           "train": idx[n_test + n_val:]}
    return {k: Split(x[v], y[v]) for k, v in cut.items()}


@functools.lru_cache(maxsize=4)
def _dataset(name: str, seed: int) -> dict:
    if name == "digits":
        d = digits(seed)
        parts = {"train": d.train, "val": d.val, "test": d.test}
    else:
        parts = _mixture(seed)
    base = BASE[name]
    out = {"n_total": sum(len(s) for s in parts.values())}
    for k, s in parts.items():
        out[f"base_{k}"] = s.classes(range(base))
        held = s.classes(range(base, int(s.y.max()) + 1))
        out[f"held_{k}"] = Split(held.x, held.y - base)
    return out


# ---------------------------------------------------------------- model
class CosineHead(nnx.Module):
    """Cosine softmax: ``scale * <normalize(x), normalize(w_c)>``."""

    def __init__(self, features, classes, scale, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (features, classes)))
        self.scale = scale

    def __call__(self, x):
        xn = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
        w = self.w[...]
        wn = w / jnp.maximum(jnp.linalg.norm(w, axis=0, keepdims=True), 1e-12)
        return self.scale * xn @ wn


class Net(nnx.Module):
    def __init__(self, d_in, hidden, features, classes, head, scale, rngs):
        self.l1 = nnx.Linear(d_in, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, features, rngs=rngs)
        if head == "softmax":
            self.head = nnx.Linear(features, classes, rngs=rngs)
        elif head == "cosine":
            self.head = CosineHead(features, classes, scale, rngs)
        else:
            self.head = GrassmannClassifier(features, classes, int(head[3:]), scale, rngs=rngs)

    def features(self, x):
        return self.l2(nnx.gelu(self.l1(x)))

    def __call__(self, x):
        return self.head(self.features(x))


def _make_tx(cfg: Config, model, head: str):
    body = optax.adamw(cfg.body_lr, weight_decay=cfg.weight_decay)
    if not head.startswith("gcr"):
        return body
    mans = manifolds_of(model)
    # GCR public code: no weight decay on the subspaces, SGD + momentum on the head
    return optax.partition(
        {"riemannian": riemannian_sgd(cfg.head_lr, cfg.momentum, manifolds=mans),
         "euclidean": body},
        manifold_labels(mans))


@functools.lru_cache(maxsize=32)
def _trainer(cfg: Config, d_in: int, classes: int, head: str):
    """Jitted ``init``, ``chunk`` (``eval_every`` steps) and ``forward`` for one architecture.

    Every array these functions see has the shape of the whole dataset (splits are
    zero-padded to ``n_total`` rows), so each compiles once per architecture and
    serves every seed and every split.
    """
    def build(key):
        return Net(d_in, cfg.hidden, cfg.features, classes, head, cfg.scale,
                   nnx.Rngs(params=key))

    graphdef, _ = nnx.split(build(jax.random.key(0)), nnx.Param)
    tx = _make_tx(cfg, build(jax.random.key(0)), head)

    def loss(params, xb, yb):
        return optax.softmax_cross_entropy_with_integer_labels(
            nnx.merge(graphdef, params)(xb), yb).mean()

    @jax.jit
    def init(key):
        params = nnx.state(build(key), nnx.Param)
        return params, tx.init(params)

    @jax.jit
    def chunk(params, state, key, x, y, n_valid):
        def body(carry, k):
            params, state = carry
            idx = jax.random.randint(k, (cfg.batch,), 0, n_valid)
            g = jax.grad(loss)(params, x[idx], y[idx])
            u, state = tx.update(g, state, params)
            return (optax.apply_updates(params, u), state), None

        (params, state), _ = jax.lax.scan(body, (params, state),
                                          jax.random.split(key, cfg.eval_every))
        return params, state

    @jax.jit
    def forward(params, x):
        """Logits and penultimate features of the rows of ``x``."""
        model = nnx.merge(graphdef, params)
        f = model.features(x)
        return model.head(f), f

    return init, chunk, forward


def _pad(split: Split, n: int):
    x = np.zeros((n, split.x.shape[1]), np.float32)
    y = np.zeros((n,), np.int32)
    x[: len(split)], y[: len(split)] = split.x, split.y
    return jnp.asarray(x), jnp.asarray(y)


def _apply(forward, params, split: Split, n_total: int):
    """``(logits, features)`` of ``split`` as float64 numpy arrays (one compiled shape)."""
    logits, feats = forward(params, _pad(split, n_total)[0])
    n = len(split)
    return np.asarray(logits, np.float64)[:n], np.asarray(feats, np.float64)[:n]


def _cross_entropy(logits: np.ndarray, y: np.ndarray) -> float:
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(y)), y]))


def _train(cfg: Config, parts: dict, classes: int, head: str, key):
    """Early-stopped training: the best parameters, ``forward`` and the steps to them."""
    tr, va, n_total = parts["base_train"], parts["base_val"], parts["n_total"]
    init, chunk, forward = _trainer(cfg, tr.x.shape[1], classes, head)
    init_key, data_key = jax.random.split(key)
    params, state = init(init_key)
    x, y = _pad(tr, n_total)  # same shapes for every seed: one compilation per head
    best, best_loss, best_step, since, step = params, np.inf, 0, 0, 0
    while step < cfg.max_steps and since < cfg.patience:
        params, state = chunk(params, state, jax.random.fold_in(data_key, step), x, y, len(tr))
        step += cfg.eval_every
        v = _cross_entropy(_apply(forward, params, va, n_total)[0], va.y)
        if not np.isfinite(v):
            break
        if v < best_loss:
            best, best_loss, best_step, since = params, v, step, 0
        else:
            since += 1
    return best, forward, {"best_step": best_step, "steps_run": step,
                           "val_loss": float(best_loss)}


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


def run_cell(cfg: Config, dataset: str, head: str, seed: int) -> dict:
    parts = _dataset(dataset, seed)
    params, forward, fit = _train(cfg, parts, BASE[dataset], head,
                                  jax.random.fold_in(jax.random.key(cfg.seed), seed))
    out = {k: _apply(forward, params, parts[k], parts["n_total"])
           for k in ("base_val", "base_test", "held_train", "held_test")}

    def acc(k):
        return float(np.mean(np.argmax(out[k][0], -1) == parts[k].y))

    def feats(k):
        return _normalize(out[k][1])

    te = parts["base_test"]
    return {"val_acc": acc("base_val"), "test_acc": acc("base_test"),
            "transfer_acc": _probe_accuracy(feats("held_train"), parts["held_train"].y,
                                            feats("held_test"), parts["held_test"].y),
            "variability": _variability(feats("base_test"), te.y), **fit}


def _slope(ps, values) -> float:
    """Least-squares slope of ``values`` on ``log2 p``."""
    return float(np.polyfit(np.log2(np.asarray(ps, float)), np.asarray(values), 1)[0])


PAPER = {
    "accuracy": "ImageNet top-1 error -5.6% (ResNet50-D), -4.5% (ResNeXt50), -3.0% (Swin-T), "
                "-3.5% (Deit3-S) vs softmax (Tab. 2)",
    "cosine": "GCR above cosine softmax on ImageNet (ResNet50-D, Tab. 1)",
    "transfer": "linear-probe transfer 77.98% -> 79.70% (ResNet50-D, Tab. 4)",
    "variability": "intra-class variability grows with the subspace dimension (Tab. 3)",
}


class GCR(CellExperiment):
    name = "gcr"
    title = "GCR: Grassmann class representation vs softmax (Wang, Li, Zhang, ICCV 2023)"
    config_cls = Config
    quick = {"seeds": 2, "subspace_dims": (1, 8), "max_steps": 1200, "patience": 3,
             "features": 64, "hidden": 128}
    full = {"seeds": 5}
    figures = ("gcr_vs_p.png",)

    def expected_cells(self, cfg):
        return len(DATASETS) * len(cfg.heads) * cfg.seeds

    def run_cell(self, cfg, cell):
        return run_cell(cfg, cell["dataset"], cell["head"], cell["seed"])

    def sweep(self, cfg, cells):
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        per = {d: {h: [cells(dataset=d, head=h, seed=s) for s in seeds] for h in cfg.heads}
               for d in DATASETS}
        gcr_heads = [h for h in cfg.heads if h.startswith("gcr")]

        def col(d, h, k):
            return [r[k] for r in per[d][h]]

        claims, chosen, trend = [], {}, {}
        for d in DATASETS:
            # the GCR dimension is chosen on validation accuracy (mean over seeds)
            best = max(gcr_heads, key=lambda h: np.mean(col(d, h, "val_acc")))
            chosen[d] = best
            tag = f"GCR p={best[3:]}"
            for k, foil, key, text in (
                    ("test_acc", "softmax", "accuracy",
                     f"{d}: GCR (p chosen on validation) beats softmax on base-class accuracy"),
                    ("test_acc", "cosine", "cosine",
                     f"{d}: GCR (p chosen on validation) beats cosine softmax on accuracy"),
                    ("transfer_acc", "softmax", "transfer",
                     f"{d}: GCR features transfer better than softmax features")):
                cmp = stats.compare(col(d, best, k), col(d, foil, k), quick=cells.quick)
                claims.append(stats.claim(text, PAPER[key], cmp, names=(tag, foil)))
            ps = [int(h[3:]) for h in gcr_heads]
            slopes = [_slope(ps, [per[d][h][i]["variability"] for h in gcr_heads])
                      for i in range(len(seeds))]
            trend[d] = slopes
            cmp = stats.compare(slopes, [0.0] * len(slopes), quick=cells.quick)
            claims.append(stats.claim(
                f"{d}: intra-class variability grows with p (slope on log2 p)",
                PAPER["variability"], cmp, names=("slope", "0")))
        tables = {}
        for d in DATASETS:
            rows = []
            for h in cfg.heads:
                rows.append({
                    "head": h if not h.startswith("gcr") else f"GCR p={h[3:]}",
                    "val acc": stats.mean_ci(col(d, h, "val_acc")).format(),
                    "test acc": stats.mean_ci(col(d, h, "test_acc")).format(),
                    "transfer (probe) acc": stats.mean_ci(col(d, h, "transfer_acc")).format(),
                    "variability": stats.mean_ci(col(d, h, "variability")).format(),
                    "steps to best val loss": stats.mean_ci(col(d, h, "best_step")).format(".0f"),
                })
            tables[f"{d}: base-class accuracy, held-out-class probe, variability"] = rows
        return {"claims": claims, "tables": tables, "chosen_p": chosen,
                "variability_slopes": trend, "per_cell": per}

    def report(self, cfg, results, history, outdir):
        per = results["per_cell"]
        heads = list(cfg.heads)
        gcr_heads = [h for h in heads if h.startswith("gcr")]
        ps = [int(h[3:]) for h in gcr_heads]
        fig, axes = new_figure(1, 3, figsize=(12, 3.4))
        for ax, key, label in zip(axes, ("test_acc", "transfer_acc", "variability"),
                                  ("test accuracy (base classes)",
                                   "linear-probe accuracy (held-out classes)",
                                   "intra-class / total variance"), strict=True):
            for d, color in zip(DATASETS, ("C0", "C1"), strict=True):
                est = [stats.mean_ci([r[key] for r in per[d][h]]) for h in gcr_heads]
                err = [e.half_width if e.n > 1 else 0.0 for e in est]
                ax.errorbar(ps, [e.mean for e in est], yerr=err, marker="o", color=color,
                            label=f"{d} GCR", capsize=3)
                for h, ls in (("softmax", "--"), ("cosine", ":")):
                    ax.axhline(np.mean([r[key] for r in per[d][h]]), color=color, ls=ls,
                               label=f"{d} {h}")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("subspace dimension p")
            ax.set_title(label, fontsize=9)
        axes[0].legend(fontsize=7)
        img = save_figure(fig, outdir, "gcr_vs_p.png",
                          "accuracy, transfer and variability vs subspace dimension "
                          "(mean, 95% CI over seeds)")
        intro = (f"{cfg.seeds} seeds; training early-stopped on validation loss (at most "
                 f"{cfg.max_steps} steps); features {cfg.features}; intervals are 95% "
                 f"t-intervals over seeds; GCR p chosen on validation: "
                 + ", ".join(f"{d} p={h[3:]}" for d, h in results["chosen_p"].items()) + ".")
        return results_markdown(intro, results, img)


EXPERIMENT = GCR()
