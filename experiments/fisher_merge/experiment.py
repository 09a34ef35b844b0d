"""Fisher-weighted model merging on digits (Matena & Raffel, NeurIPS 2022).

The paper's three settings at toy scale, all from one "pretrained" MLP (64-64-10,
tanh) per seed:

- **ensembling**: ``n_models`` models fine-tuned from the base on the same
  10-class task, each on its own random subset of the training split, merged with
  uniform coefficients;
- **robust fine-tuning** (the WiSE-FT setting): the base is pretrained on a broad
  distribution (clean and one-pixel-shifted digits), fine-tuned on clean digits
  only; the fine-tuned model is merged with the base, the coefficient chosen on the
  clean validation split, and scored on shifted test digits;
- **intermediate-task transfer**: a target model fine-tuned on few examples of
  digits 0-4 is merged with a donor fine-tuned on digits 5-9; the hidden layer is
  merged and the target keeps its own head; the coefficient is chosen on the
  target's validation split.

Fishers follow the reference implementation: diagonal *true* Fisher (exact class
expectation), each model's Fisher divided by its global norm, floor 1e-6. The
empirical Fisher and the unnormalised true Fisher are reported alongside. Fisher
and isotropic merging get the same coefficient grid. One cell = one seed.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments import stats
from experiments.data import Split, digits
from experiments.harness import SeedSweep, new_figure, results_markdown, save_figure
from experiments.training import fit, softmax_nll
from subjax import fisher

FISHERS = ("true", "empirical", "true, unnormalised")
SETTINGS = ("ensembling", "robust fine-tuning", "intermediate task")
TARGET, DONOR = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 10
    hidden: int = 64
    lr: float = 3e-3
    base_examples: int = 300       # pretraining rows (clean, plus a shifted copy of each)
    base_steps: int = 200
    finetune_steps: int = 300
    n_models: int = 4              # ensembling: models merged
    subset: float = 0.7            # ensembling: share of the training split each model sees
    target_per_class: int = 4      # intermediate task: target examples per class
    fisher_examples: int = 400
    floor: float = 1e-6
    coefficients: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)

    def __post_init__(self):
        for k in ("seeds", "hidden", "base_examples", "base_steps", "finetune_steps",
                  "target_per_class", "fisher_examples"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.n_models < 2:
            raise ValueError(f"n_models must be >= 2, got {self.n_models}")
        if not 0 < self.subset <= 1:
            raise ValueError(f"subset must be in (0, 1], got {self.subset}")
        if not self.floor > 0 or not self.lr > 0:
            raise ValueError("floor and lr must be > 0")
        if len(self.coefficients) < 2 or not all(0 <= c <= 1 for c in self.coefficients):
            raise ValueError("coefficients must be at least two values in [0, 1]")


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
    return softmax_nll(apply_fn(p, x), y)


@jax.jit
def _fishers(p, x, y):
    return (fisher.diag_true(apply_fn, p, x), fisher.diag_empirical(apply_fn, p, x, y))


def _normalised(f):
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(f)))
    return jax.tree.map(lambda leaf: leaf / norm, f)


def _acc(p, split: Split, classes=None) -> float:
    logits = apply_fn(p, jnp.asarray(split.x))
    if classes is not None:  # a task head reads its own classes only
        cls = jnp.asarray(classes)
        pred = cls[jnp.argmax(logits[:, cls], -1)]
    else:
        pred = jnp.argmax(logits, -1)
    return float(jnp.mean(pred == jnp.asarray(split.y)))


def shift(split: Split, seed: int) -> Split:
    """Every image translated by one pixel up, down, left or right (zero fill)."""
    rng = np.random.default_rng(seed)
    imgs = np.zeros_like(split.images)
    moves = ((1, 0), (-1, 0), (1, 1), (-1, 1))
    for i, k in enumerate(rng.integers(0, 4, len(split))):
        step, axis = moves[k]
        imgs[i] = np.roll(split.images[i], step, axis=axis)
        edge = 0 if step == 1 else -1
        if axis == 0:
            imgs[i][edge, :] = 0.0
        else:
            imgs[i][:, edge] = 0.0
    return Split(imgs.reshape(len(split), 64), split.y)


def _fit(cfg, params, split: Split, steps):
    return fit(_loss, params, jnp.asarray(split.x), jnp.asarray(split.y), cfg.lr, steps)


def _fisher_set(cfg, p, split: Split):
    n = min(cfg.fisher_examples, len(split))
    ft, fe = _fishers(p, jnp.asarray(split.x[:n]), jnp.asarray(split.y[:n]))
    return {"true": _normalised(ft), "empirical": _normalised(fe), "true, unnormalised": ft}


def _merge_two(cfg, a, b, fa, fb, lam, body_only=False):
    """``lam`` on model ``a``; with ``body_only`` the head of ``a`` is kept."""
    w = jnp.asarray([lam, 1.0 - lam])
    if fa is None:
        merged = fisher.average([a, b], weights=w)
    else:
        merged = fisher.fisher_merge([a, b], [fa, fb], weights=w, floor=cfg.floor)
    if body_only:
        merged = {"h": merged["h"], "out": a["out"]}
    return merged


def _tuned_merges(cfg, a, b, fa: dict, fb: dict, val, test_sets, body_only, classes=None,
                  curves=False):
    """Per merge method: coefficient chosen on ``val`` (same grid for all), test scores."""
    out = {}
    methods = {"isotropic": (None, None)}
    methods.update({f"fisher ({k})": (fa[k], fb[k]) for k in FISHERS})
    for name, (f1, f2) in methods.items():
        merged = {c: _merge_two(cfg, a, b, f1, f2, c, body_only) for c in cfg.coefficients}
        scores = [_acc(merged[c], val, classes) for c in cfg.coefficients]
        best = cfg.coefficients[int(np.argmax(scores))]
        out[name] = {"coefficient": best, "val": max(scores),
                     **{k: _acc(merged[best], s, classes) for k, s in test_sets.items()}}
        if curves:  # test accuracy at every coefficient (for the trade-off figure)
            out[name]["curve"] = {k: [_acc(merged[c], s, classes) for c in cfg.coefficients]
                                  for k, s in test_sets.items()}
    return out


def run_seed(cfg: Config, seed: int) -> dict:
    data = digits(seed)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    test_shift, val_shift = shift(data.test, seed + 1), shift(data.val, seed + 2)

    # pretraining on a broad distribution: clean rows and a shifted copy of each
    idx = rng.choice(len(data.train), cfg.base_examples, replace=False)
    pre = Split(data.train.x[idx], data.train.y[idx])
    pre_shift = shift(pre, seed + 3)
    broad = Split(np.concatenate([pre.x, pre_shift.x]), np.concatenate([pre.y, pre_shift.y]))
    base = _fit(cfg, _init(key, cfg.hidden), broad, cfg.base_steps)
    row: dict = {"seed": seed, "base": {"test": _acc(base, data.test),
                                        "shifted test": _acc(base, test_shift)}}

    # ensembling: same task, different training subsets, uniform merge
    n_sub = int(round(cfg.subset * len(data.train)))
    models, fis = [], []
    for _ in range(cfg.n_models):
        sub = rng.choice(len(data.train), n_sub, replace=False)
        part = Split(data.train.x[sub], data.train.y[sub])
        p = _fit(cfg, base, part, cfg.finetune_steps)
        models.append(p)
        fis.append(_fisher_set(cfg, p, part))
    ens = {"members (mean)": float(np.mean([_acc(p, data.test) for p in models])),
           "isotropic": _acc(fisher.average(models), data.test)}
    for k in FISHERS:
        ens[f"fisher ({k})"] = _acc(
            fisher.fisher_merge(models, [f[k] for f in fis], floor=cfg.floor), data.test)
    row["ensembling"] = ens

    # robust fine-tuning: fine-tuned (clean) merged with the base, chosen on clean val
    tuned = models[0]
    ft_f, base_f = fis[0], _fisher_set(cfg, base, broad)
    robust = _tuned_merges(cfg, tuned, base, ft_f, base_f, data.val,
                           {"test": data.test, "shifted test": test_shift}, body_only=False,
                           curves=True)
    robust["fine-tuned"] = {"coefficient": 1.0, "val": _acc(tuned, data.val),
                            "test": _acc(tuned, data.test),
                            "shifted test": _acc(tuned, test_shift)}
    robust["val shifted (fine-tuned)"] = _acc(tuned, val_shift)
    row["robust fine-tuning"] = robust

    # intermediate task: few-shot target (0-4) merged with a donor (5-9), target head kept
    tgt_rows = np.concatenate([np.flatnonzero(data.train.y == c)[: cfg.target_per_class]
                               for c in TARGET])
    tgt = Split(data.train.x[tgt_rows], data.train.y[tgt_rows])
    donor_data = data.train.classes(DONOR)
    target = _fit(cfg, base, tgt, cfg.finetune_steps)
    donor = _fit(cfg, base, donor_data, cfg.finetune_steps)
    val_t, test_t = data.val.classes(TARGET), data.test.classes(TARGET)
    inter = _tuned_merges(cfg, target, donor, _fisher_set(cfg, target, tgt),
                          _fisher_set(cfg, donor, donor_data), val_t, {"test": test_t},
                          body_only=True, classes=TARGET)
    inter["target only"] = {"coefficient": 1.0, "val": _acc(target, val_t, TARGET),
                            "test": _acc(target, test_t, TARGET)}
    row["intermediate task"] = inter
    return row


def _col(rows, setting, method, metric=None):
    return [r[setting][method] if metric is None else r[setting][method][metric] for r in rows]


CLAIMS = (
    # (setting, metric, text, paper figure)
    ("ensembling", None, "ensembling: Fisher merge beats isotropic averaging",
     "Fisher > isotropic merge of BERT-base seed ensembles on GLUE (Sec. 4.1)"),
    ("robust fine-tuning", "shifted test",
     "robust fine-tuning: Fisher merge with the base beats isotropic merging on shifted data",
     "Fisher merge of fine-tuned + pretrained CLIP vs WiSE-FT on ImageNet shifts (Sec. 4.2)"),
    ("intermediate task", "test",
     "intermediate task: Fisher merge with a donor beats isotropic merging",
     "Fisher > isotropic merge of RoBERTa target + donor on GLUE (Sec. 4.3)"),
    ("intermediate task", "test",
     "intermediate task: merging with a donor beats the target alone",
     "merging a donor improves the target task (Sec. 4.3)"),
)


class FisherMerge(SeedSweep):
    name = "fisher-merge"
    title = "Fisher-weighted merging: ensembling, robust fine-tuning, intermediate tasks " \
            "(Matena & Raffel 2022)"
    config_cls = Config
    quick = {"seeds": 3, "base_steps": 120, "finetune_steps": 150, "n_models": 3}
    full = {"seeds": 10}
    figures = ("merge.png", "robust.png")

    run_seed = staticmethod(run_seed)

    def sweep(self, cfg, cells):
        rows = self.seed_rows(cfg, cells)
        claims = []
        for i, (setting, metric, text, paper) in enumerate(CLAIMS):
            foil = "target only" if i == 3 else "isotropic"
            a = _col(rows, setting, "fisher (true)", metric)
            b = _col(rows, setting, foil, metric)
            cmp = stats.compare(a, b, quick=cells.quick)
            claims.append(stats.claim(text, paper, cmp, names=("Fisher", foil.split()[0])))
        tables = {}
        ens = [{"method": m, "test acc (10 classes)": stats.mean_ci(
            _col(rows, "ensembling", m)).format()}
            for m in ("members (mean)", "isotropic") + tuple(f"fisher ({k})" for k in FISHERS)]
        tables["Ensembling: 10-class test accuracy"] = ens
        rob = []
        for m in ("fine-tuned", "isotropic") + tuple(f"fisher ({k})" for k in FISHERS):
            rob.append({"method": m,
                        "coefficient on fine-tuned": stats.mean_ci(
                            _col(rows, "robust fine-tuning", m, "coefficient")).format(".2f"),
                        "clean test": stats.mean_ci(
                            _col(rows, "robust fine-tuning", m, "test")).format(),
                        "shifted test": stats.mean_ci(
                            _col(rows, "robust fine-tuning", m, "shifted test")).format()})
        rob.append({"method": "base", "coefficient on fine-tuned": "0",
                    "clean test": stats.mean_ci([r["base"]["test"] for r in rows]).format(),
                    "shifted test": stats.mean_ci(
                        [r["base"]["shifted test"] for r in rows]).format()})
        tables["Robust fine-tuning: accuracy, coefficient chosen on clean validation"] = rob
        inter = []
        for m in ("target only", "isotropic") + tuple(f"fisher ({k})" for k in FISHERS):
            inter.append({"method": m,
                          "coefficient on target": stats.mean_ci(
                              _col(rows, "intermediate task", m, "coefficient")).format(".2f"),
                          "target test acc (digits 0-4)": stats.mean_ci(
                              _col(rows, "intermediate task", m, "test")).format()})
        tables["Intermediate task: target accuracy, coefficient chosen on target validation"] = \
            inter
        return {"claims": claims, "tables": tables, "per_seed": rows}

    def report(self, cfg, results, history, outdir):
        rows = results["per_seed"]
        fig, axes = new_figure(1, 3, figsize=(10, 3.2))
        panels = (("ensembling", None, ("isotropic", "fisher (true)", "fisher (empirical)"),
                   "ensembling: test acc"),
                  ("robust fine-tuning", "shifted test",
                   ("fine-tuned", "isotropic", "fisher (true)", "fisher (empirical)"),
                   "robust FT: shifted test acc"),
                  ("intermediate task", "test",
                   ("target only", "isotropic", "fisher (true)", "fisher (empirical)"),
                   "intermediate task: target test acc"))
        for ax, (setting, metric, methods, title) in zip(axes, panels, strict=True):
            for j, m in enumerate(methods):
                v = _col(rows, setting, m, metric)
                est = stats.mean_ci(v)
                ax.scatter([j] * len(v), v, s=10, alpha=0.5)
                if est.n > 1:
                    ax.errorbar(j, est.mean, yerr=est.half_width, fmt="o", color="k")
            ax.set_xticks(range(len(methods)), [m.replace(" ", "\n", 1) for m in methods],
                          fontsize=7)
            ax.set_title(title, fontsize=9)
        axes[0].set_ylabel("accuracy (mean, 95% CI)")
        img = save_figure(fig, outdir, "merge.png", "merged-model accuracy per seed")
        fig, ax = new_figure(figsize=(4.6, 3.4))
        for m, style in (("isotropic", "o-"), ("fisher (true)", "s-"),
                         ("fisher (empirical)", "^-")):
            cur = [r["robust fine-tuning"][m]["curve"] for r in rows]
            clean = np.mean([c["test"] for c in cur], 0)
            shifted = np.mean([c["shifted test"] for c in cur], 0)
            ax.plot(clean, shifted, style, ms=3, label=m)
        ax.set_xlabel("clean test acc")
        ax.set_ylabel("shifted test acc")
        ax.set_title("fine-tuned (+) base merges, coefficient 0..1", fontsize=9)
        ax.legend(fontsize=7)
        img += "\n\n" + save_figure(fig, outdir, "robust.png",
                                     "clean vs shifted accuracy along the merge coefficient")
        return results_markdown(f"{cfg.seeds} seeds; intervals are 95% t-intervals over "
                                "seeds.", results, img)


EXPERIMENT = FisherMerge()
