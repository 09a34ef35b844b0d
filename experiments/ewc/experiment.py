"""Rank-1 Fisher EWC for a diffusion model (Wang et al. 2025) at toy scale.

The paper's setting on 8x8 digits: a class-conditional denoising diffusion model
(DDPM, an MLP noise predictor) learns the digits class-incrementally, two classes
per task, with **generative replay**: while learning task ``k`` each batch is half
real images of the new classes, half images of the earlier classes sampled from
the model as it was when the task began. On top of replay, EWC penalties protect
the parameters of every earlier task:

- ``replay``: no penalty;
- ``diagonal``: the diagonal empirical Fisher of the denoising loss;
- ``rank-1``: the paper's rank-1 Fisher, the normalised mean gradient with its
  Rayleigh quotient (``subjax.fisher.rank_one``);
- ``low-rank``: the top ``rank`` eigenpairs of the empirical Fisher
  (``subjax.fisher.low_rank``).

Each task's Fisher is the empirical Fisher of the per-example denoising loss
(a Gaussian likelihood on the noise), taken at the end of the task on its real
images at uniformly drawn noise levels. The three are approximations of one
matrix, on one scale, so they share one strength grid. The penalty is
``subjax.fisher.ewc_penalty`` summed over earlier tasks.

Measured:

- the paper's central observation: the share of the top eigenvalue of the
  per-sample-gradient Gram matrix ``G G^T`` (``G`` the per-sample gradients of the
  denoising loss at one noise level) against the noise level, on the model after
  the first task; and the alignment of the top eigenvector with the mean gradient;
- forgetting: a Fréchet distance (FD) between class-conditional samples of the
  final model and real images, on the features of a classifier trained once per
  seed on the training split (the FID recipe with a digits classifier in place of
  Inception), over the classes of the earlier tasks; also the share of those
  samples the classifier assigns to their conditioning class.

Strengths are chosen on the validation split (FD against validation images) with
the same budget for every method (``experiments.stats.tune``: the grid extended
past an edge optimum); the test split is read at the chosen strength. One cell =
one training run (seed, method, strength) or the Gram spectrum of one seed.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from experiments import stats
from experiments.data import digits
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure
from experiments.training import fit, softmax_nll
from subjax import fisher

METHODS = ("replay", "diagonal", "rank-1", "low-rank")
PENALISED = METHODS[1:]
TIME_FEATURES = 16


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    n_tasks: int = 5                   # two classes per task
    hidden: int = 128
    diffusion_steps: int = 50
    beta_max: float = 0.2
    steps_per_task: int = 500
    batch: int = 128
    lr: float = 1e-3
    rank: int = 8                      # low-rank EWC
    fisher_examples: int = 256
    samples_per_class: int = 100       # evaluation samples (and replay set) per class
    gram_examples: int = 64
    gram_levels: int = 10
    strength_grid: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0)
    budget: int = 5                    # validation runs per method (grid + extensions)
    tune_seeds: int = 0                # seeds whose strengths are tuned (0: every seed)
    classifier_steps: int = 500

    def __post_init__(self):
        for k in ("seeds", "hidden", "diffusion_steps", "steps_per_task", "batch", "rank",
                  "fisher_examples", "samples_per_class", "gram_examples", "classifier_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not 2 <= self.n_tasks <= 5:
            raise ValueError(f"n_tasks must be in 2..5, got {self.n_tasks}")
        if self.gram_levels < 2:
            raise ValueError(f"gram_levels must be >= 2, got {self.gram_levels}")
        if not 0 < self.beta_max < 1 or not self.lr > 0:
            raise ValueError("beta_max must be in (0, 1) and lr > 0")
        if len(self.strength_grid) < 2 or min(self.strength_grid) <= 0:
            raise ValueError("strength_grid must hold at least two positive values")
        if self.budget < len(self.strength_grid):
            raise ValueError(f"budget must be >= the grid size {len(self.strength_grid)}")
        if not 0 <= self.tune_seeds <= self.seeds:
            raise ValueError(f"tune_seeds must be in 0..seeds={self.seeds}, got "
                             f"{self.tune_seeds}")


# --------------------------------------------------------------------------- diffusion


def schedule(cfg: Config):
    """``(betas, alpha_bars)`` of the linear DDPM schedule (float32 numpy)."""
    betas = np.linspace(1e-3, cfg.beta_max, cfg.diffusion_steps, dtype=np.float64)
    return betas.astype(np.float32), np.cumprod(1.0 - betas).astype(np.float32)


def snr(cfg: Config) -> np.ndarray:
    _, ab = schedule(cfg)
    return ab / (1.0 - ab)


def init_denoiser(key, hidden):
    sizes = (64 + 10 + TIME_FEATURES, hidden, hidden, 64)
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (i, o)) / np.sqrt(i), "b": jnp.zeros((o,))}
            for k, i, o in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def denoise(params, inputs):
    """Predicted noise from ``inputs = (x_t, label one-hot, t / T)``."""
    x, onehot, tau = inputs
    freqs = jnp.exp(jnp.linspace(0.0, math.log(100.0), TIME_FEATURES // 2))
    ang = tau[:, None] * freqs[None, :]
    h = jnp.concatenate([x, onehot, jnp.sin(ang), jnp.cos(ang)], axis=1)
    for layer in params[:-1]:
        h = jax.nn.silu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def noised(cfg: Config, key, x0, t):
    """``(x_t, noise)`` for clean images ``x0`` at steps ``t``."""
    ab = jnp.asarray(schedule(cfg)[1])[t]
    eps = jax.random.normal(key, x0.shape)
    return jnp.sqrt(ab)[:, None] * x0 + jnp.sqrt(1 - ab)[:, None] * eps, eps


def _inputs(cfg, xt, y, t):
    return xt, jax.nn.one_hot(y, 10), t.astype(jnp.float32) / cfg.diffusion_steps


def diffusion_batch(cfg: Config, key, x0, y):
    """Denoising inputs and targets at uniformly drawn noise levels."""
    kt, ke = jax.random.split(key)
    t = jax.random.randint(kt, (x0.shape[0],), 0, cfg.diffusion_steps)
    xt, eps = noised(cfg, ke, x0, t)
    return _inputs(cfg, xt, y, t), eps


@jax.jit(static_argnames=("cfg",))
def sample(cfg: Config, params, key, labels):
    """DDPM ancestral sampling of images conditioned on ``labels``."""
    betas, ab = (jnp.asarray(v) for v in schedule(cfg))
    n = labels.shape[0]

    def body(carry, t):
        x, key = carry
        key, kz = jax.random.split(key)
        eps = denoise(params, _inputs(cfg, x, labels, jnp.full((n,), t)))
        mean = (x - betas[t] / jnp.sqrt(1 - ab[t]) * eps) / jnp.sqrt(1 - betas[t])
        z = jax.random.normal(kz, x.shape)
        x = mean + jnp.where(t > 0, jnp.sqrt(betas[t]), 0.0) * z
        return (x, key), None

    key, k0 = jax.random.split(key)
    x = jax.random.normal(k0, (n, 64))
    (x, _), _ = jax.lax.scan(body, (x, key), jnp.arange(cfg.diffusion_steps - 1, -1, -1))
    return jnp.clip(x, -1.0, 1.0)


def _loss(params, inputs, eps):
    return jnp.mean(jnp.sum((denoise(params, inputs) - eps) ** 2, axis=1))


# --------------------------------------------------------------------------- EWC


def _pad_rows(x, rows):
    return jnp.concatenate([x, jnp.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


def task_fisher(cfg: Config, method: str, params, key, x0, y):
    """The Fisher of ``method`` at ``params`` on one task's images: ``fisher_examples``
    images drawn from ``x0`` (with replacement), each at a uniformly drawn noise level."""
    rows = -(-x0.shape[0] // 256) * 256  # one compiled program for every task
    return _task_fisher(cfg, method, params, key, _pad_rows(x0, rows),
                        _pad_rows(y.astype(jnp.int32), rows), x0.shape[0])


@jax.jit(static_argnames=("cfg", "method"))
def _task_fisher(cfg: Config, method: str, params, key, x0, y, n):
    """:func:`task_fisher` on images zero-padded past their first ``n`` rows."""
    kb, kr = jax.random.split(key)
    idx = jax.random.randint(kb, (cfg.fisher_examples,), 0, n)
    inputs, eps = diffusion_batch(cfg, kb, x0[idx], y[idx])
    if method == "diagonal":
        return fisher.diag_empirical(denoise, params, inputs, eps, likelihood="gaussian")
    if method == "rank-1":
        return fisher.rank_one(denoise, params, inputs, labels=eps, likelihood="gaussian")
    return fisher.low_rank(denoise, params, inputs, cfg.rank, key=kr, labels=eps,
                           likelihood="gaussian", kind="empirical", oversample=10)


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _penalty(params, anchors, fishers, active, strength):
    """``sum_k active_k * ewc_penalty(params, anchor_k, fisher_k, strength)``."""
    per = jax.vmap(lambda a, f: fisher.ewc_penalty(params, a, f, strength))(anchors, fishers)
    return jnp.sum(active * per)


def train_task(cfg: Config, params, key, x_new, y_new, x_old, y_old, anchors, fishers,
               active, strength):
    """Adam on one task; half of each batch replayed from ``(x_old, y_old)`` when given.

    The image sets are zero-padded to sizes that do not depend on the task (new
    images to a multiple of 256 rows, replayed ones to the replay set of the last
    task), so every task of a method runs one compiled program.
    """
    rows_new = -(-x_new.shape[0] // 256) * 256
    rows_old = max(2 * (cfg.n_tasks - 1) * cfg.samples_per_class, x_old.shape[0])
    return _train_task(cfg, params, key, _pad_rows(x_new, rows_new),
                       _pad_rows(y_new.astype(jnp.int32), rows_new), x_new.shape[0],
                       _pad_rows(x_old, rows_old), _pad_rows(y_old.astype(jnp.int32), rows_old),
                       x_old.shape[0], anchors, fishers, active, strength)


@jax.jit(static_argnames=("cfg",))
def _train_task(cfg: Config, params, key, x_new, y_new, n_new, x_old, y_old, n_old, anchors,
                fishers, active, strength):
    """:func:`train_task` on padded image sets holding ``n_new`` and ``n_old`` rows; with
    no replayed images (``n_old = 0``) both halves of a batch are new images."""
    opt = optax.adam(cfg.lr)
    half = cfg.batch // 2

    def objective(p, inputs, eps):
        return _loss(p, inputs, eps) + _penalty(p, anchors, fishers, active, strength)

    def body(carry, k):
        p, s = carry
        k1, k2, k3 = jax.random.split(k, 3)
        i = jax.random.randint(k1, (cfg.batch,), 0, n_new)
        j = jax.random.randint(k2, (cfg.batch - half,), 0, jnp.maximum(n_old, 1))
        replay = n_old > 0
        x0 = jnp.concatenate([x_new[i[:half]], jnp.where(replay, x_old[j], x_new[i[half:]])])
        y = jnp.concatenate([y_new[i[:half]], jnp.where(replay, y_old[j], y_new[i[half:]])])
        inputs, eps = diffusion_batch(cfg, k3, x0, y)
        u, s = opt.update(jax.grad(objective)(p, inputs, eps), s, p)
        return (optax.apply_updates(p, u), s), None

    keys = jax.random.split(key, cfg.steps_per_task)
    (params, _), _ = jax.lax.scan(body, (params, opt.init(params)), keys)
    return params


# --------------------------------------------------------------------------- evaluation


def _features(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"])


def _logits(p, x):
    return _features(p, x) @ p["w2"] + p["b2"]


def _classifier_loss(p, x, y):
    return softmax_nll(_logits(p, x), y)


@functools.lru_cache(maxsize=4)
def _classifier(steps: int, seed: int):
    """A 64-128-10 tanh classifier trained for ``steps`` on the training split of
    ``seed``; returns ``features(x)`` and ``predict(x)`` for images in [-1, 1]."""
    data = digits(seed)
    k1, k2 = jax.random.split(jax.random.key(10_000 + seed))
    p = {"w1": jax.random.normal(k1, (64, 128)) / 8.0, "b1": jnp.zeros(128),
         "w2": jax.random.normal(k2, (128, 10)) / np.sqrt(128), "b2": jnp.zeros(10)}
    p = fit(_classifier_loss, p, jnp.asarray(2 * data.train.x - 1), jnp.asarray(data.train.y),
            3e-3, steps)
    return (lambda x: np.asarray(_features(p, jnp.asarray(x)), np.float64),
            lambda x: np.asarray(jnp.argmax(_logits(p, jnp.asarray(x)), -1)))


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` and ``b``."""
    from scipy import linalg

    ma, mb = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(ca @ cb)
    root = np.real(root)
    return float(np.sum((ma - mb) ** 2) + np.trace(ca + cb - 2 * root))


@jax.jit(static_argnames=("cfg",))
def _gradient_matrix(cfg: Config, params, key, x0, y, level):
    """The flattened per-sample gradients of the denoising loss at noise step ``level``."""
    t = jnp.full((x0.shape[0],), level)
    xt, eps = noised(cfg, key, x0, t)
    g = fisher.per_example_grads(_loss, params, _inputs(cfg, xt, y, t), eps)
    return jax.vmap(lambda tree: ravel_pytree(tree)[0])(g)


def gram_spectrum(cfg: Config, params, key, x0, y) -> dict:
    """Top-eigenvalue share of the per-sample-gradient Gram matrix per noise level,
    and the cosine between the top eigenvector and the mean gradient."""
    n = min(cfg.gram_examples, x0.shape[0])
    levels = np.unique(np.linspace(0, cfg.diffusion_steps - 1, cfg.gram_levels).round()
                       ).astype(int)
    share, align = [], []
    for lvl in levels:
        G = np.asarray(_gradient_matrix(cfg, params, jax.random.fold_in(key, int(lvl)),
                                        x0[:n], y[:n], jnp.int32(lvl)), np.float64)
        w, v = np.linalg.eigh(G @ G.T)
        share.append(float(w[-1] / w.sum()))
        top = G.T @ v[:, -1]
        mean = G.mean(0)
        align.append(float(abs(top @ mean) / (np.linalg.norm(top) * np.linalg.norm(mean))))
    return {"levels": levels.tolist(), "snr": snr(cfg)[levels].tolist(), "share": share,
            "alignment": align}


# --------------------------------------------------------------------------- one run


def _task_classes(k):
    return (2 * k, 2 * k + 1)


def run(cfg: Config, seed: int, method: str, strength: float) -> dict:
    """Class-incremental training with replay (and EWC); FD and sample accuracy."""
    data = digits(seed)
    features, predict = _classifier(cfg.classifier_steps, seed)
    key = jax.random.key(seed)
    params = init_denoiser(jax.random.fold_in(key, 0), cfg.hidden)
    n_prev = cfg.n_tasks - 1
    zeros_like = lambda tree: jax.tree.map(lambda x: jnp.zeros((n_prev,) + x.shape, x.dtype),
                                           tree)
    anchors = zeros_like(params)
    if method == "diagonal":
        fishers = zeros_like(params)
    else:  # rank-1, low-rank (and an inactive placeholder for replay)
        k = cfg.rank if method == "low-rank" else 1
        fishers = fisher.LowRankFisher(jnp.zeros((n_prev, k)),
                                       jax.tree.map(lambda x: jnp.zeros((n_prev, k) + x.shape),
                                                    params))
    active = jnp.zeros((n_prev,))
    after = []  # FD of each task's classes (vs validation) right after learning it
    for k in range(cfg.n_tasks):
        cls = _task_classes(k)
        split = data.train.classes(cls)
        x_new, y_new = jnp.asarray(2 * split.x - 1), jnp.asarray(split.y)
        kk = jax.random.fold_in(key, 100 + k)
        if k == 0:
            x_old, y_old = jnp.zeros((0, 64)), jnp.zeros((0,), jnp.int32)
        else:  # the replay set: samples of every earlier class from the current model
            y_old = jnp.repeat(jnp.arange(2 * k), cfg.samples_per_class)
            x_old = sample(cfg, params, jax.random.fold_in(kk, 1), y_old)
        params = train_task(cfg, params, jax.random.fold_in(kk, 2), x_new, y_new, x_old, y_old,
                            anchors, fishers, active, jnp.asarray(strength, jnp.float32))
        after.append(_fd(cfg, params, jax.random.fold_in(kk, 3), cls, data.val, features))
        if method != "replay" and k < n_prev:
            f = task_fisher(cfg, method, params, jax.random.fold_in(kk, 4), x_new, y_new)
            anchors = jax.tree.map(lambda s, x: s.at[k].set(x), anchors, params)
            fishers = jax.tree.map(lambda s, x: s.at[k].set(x), fishers, f)
            active = active.at[k].set(1.0)
    old = tuple(c for k in range(n_prev) for c in _task_classes(k))
    kf = jax.random.fold_in(key, 999)
    out = {"seed": seed, "method": method, "strength": strength,
           "fd_after": after,
           "val_fd_old": _fd(cfg, params, kf, old, data.val, features),
           "test_fd_old": _fd(cfg, params, kf, old, data.test, features),
           "test_fd_all": _fd(cfg, params, kf, tuple(range(2 * cfg.n_tasks)), data.test,
                              features)}
    ys = jnp.repeat(jnp.asarray(old), cfg.samples_per_class)
    xs = sample(cfg, params, jax.random.fold_in(key, 998), ys)
    out["sample_acc_old"] = float(np.mean(predict(xs) == np.asarray(ys)))
    return out


def _fd(cfg, params, key, classes, split, features) -> float:
    ys = jnp.repeat(jnp.asarray(classes), cfg.samples_per_class)
    xs = sample(cfg, params, key, ys)
    real = split.classes(classes)
    return frechet(features(xs), features(2 * real.x - 1))


def gram_cell(cfg: Config, seed: int) -> dict:
    """The Gram spectrum of the model after the first task (no penalty, no replay)."""
    data = digits(seed)
    key = jax.random.key(seed)
    params = init_denoiser(jax.random.fold_in(key, 0), cfg.hidden)
    split = data.train.classes(_task_classes(0))
    x_new, y_new = jnp.asarray(2 * split.x - 1), jnp.asarray(split.y)
    empty = (jnp.zeros((0, 64)), jnp.zeros((0,), jnp.int32))
    n_prev = cfg.n_tasks - 1
    anchors = jax.tree.map(lambda x: jnp.zeros((n_prev,) + x.shape), params)
    params = train_task(cfg, params, jax.random.fold_in(jax.random.fold_in(key, 100), 2),
                        x_new, y_new, *empty, anchors, anchors, jnp.zeros((n_prev,)),
                        jnp.asarray(0.0, jnp.float32))
    return gram_spectrum(cfg, params, jax.random.fold_in(key, 7), x_new, y_new)


# --------------------------------------------------------------------------- experiment


class EWC(CellExperiment):
    name = "ewc"
    title = "Rank-1 Fisher EWC for a class-incremental diffusion model with replay " \
            "(Wang et al. 2025)"
    config_cls = Config
    quick = {"seeds": 1, "n_tasks": 3, "hidden": 128, "steps_per_task": 300,
             "samples_per_class": 50, "strength_grid": (10.0, 1000.0), "budget": 2,
             "fisher_examples": 128, "gram_levels": 6, "classifier_steps": 300}
    full = {"tune_seeds": 1, "budget": 7}
    #: a cell depends on its own seed and strength, not on how many seeds are swept or
    #: tuned, nor on the grid and budget that choose its strength
    sweep_fields = ("seeds", "tune_seeds", "strength_grid", "budget")
    figures = ("gram.png", "forgetting.png")
    lead_columns = ("method", "FD earlier classes (test)", "FD all classes (test)",
                    "samples classified as their class (earlier classes)", "strength (median)",
                    "at grid edge", "noise step t", "SNR", "top-eigenvalue share",
                    "cos(top eigenvector, mean gradient)")

    def expected_cells(self, cfg):
        n_tuned = cfg.tune_seeds or cfg.seeds
        return cfg.seeds * (2 + len(PENALISED)) + n_tuned * len(PENALISED) * (cfg.budget - 1)

    def run_cell(self, cfg, cell):
        if cell["kind"] == "gram":
            return gram_cell(cfg, cell["seed"])
        return run(cfg, cell["seed"], cell["method"], cell["strength"])

    def sweep(self, cfg, cells):
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        gram = [cells(kind="gram", seed=s) for s in seeds]
        chosen = {m: [] for m in METHODS}
        tuned = {m: [] for m in PENALISED}
        n_tuned = cfg.tune_seeds or cfg.seeds
        for i, s in enumerate(seeds):
            chosen["replay"].append(cells(kind="run", seed=s, method="replay", strength=0.0))
            for m in PENALISED:
                if i < n_tuned:
                    val = lambda v, s=s, m=m: cells(kind="run", seed=s, method=m,
                                                    strength=float(v))["val_fd_old"]
                    t = stats.tune(val, cfg.strength_grid, budget=cfg.budget, maximize=False)
                    tuned[m].append(t.to_dict())
                    best = t.best
                else:  # the (lower) median of the strengths the tuned seeds chose
                    best = sorted(t["best"] for t in tuned[m])[(n_tuned - 1) // 2]
                chosen[m].append(cells(kind="run", seed=s, method=m, strength=float(best)))
        col = lambda m, key: [r[key] for r in chosen[m]]
        claims = []
        lo, hi = [g["share"][-1] for g in gram], [g["share"][0] for g in gram]
        cmp = stats.compare(lo, hi, claim="greater", quick=cells.quick)
        claims.append(stats.claim(
            "the per-sample-gradient Gram matrix is nearly rank-1 at low SNR: top-eigenvalue "
            "share at the noisiest level above the cleanest",
            "top eigenvalue dominates at low SNR (Fig. 1: effectively rank-1)", cmp,
            names=("low SNR", "high SNR")))
        for a, b, text, paper in (
                ("rank-1", "replay", "rank-1 EWC with replay forgets less than replay alone "
                 "(FD of earlier classes, test)", "forgetting nearly eliminated with replay"),
                ("rank-1", "diagonal", "rank-1 EWC forgets less than diagonal EWC (FD of "
                 "earlier classes, test)", "rank-1 better than diagonal EWC")):
            cmp = stats.compare(col(a, "test_fd_old"), col(b, "test_fd_old"), claim="less",
                                quick=cells.quick)
            claims.append(stats.claim(text, paper, cmp, names=(a, b), fmt=".2f"))
        rows = []
        for m in METHODS:
            edge = sum(t["at_edge"] for t in tuned.get(m, []))
            rows.append({
                "method": m,
                "FD earlier classes (test)": stats.mean_ci(col(m, "test_fd_old")).format(".2f"),
                "FD all classes (test)": stats.mean_ci(col(m, "test_fd_all")).format(".2f"),
                "samples classified as their class (earlier classes)":
                    stats.mean_ci(col(m, "sample_acc_old")).format(".3f"),
                "strength (median)": "" if m == "replay" else
                    f"{np.median([r['strength'] for r in chosen[m]]):g}",
                "at grid edge": "" if m == "replay" else f"{edge}/{len(tuned[m])} tuned"})
        levels = gram[0]["levels"]
        spec = [{"noise step t": t, "SNR": f"{gram[0]['snr'][i]:.3g}",
                 "top-eigenvalue share": stats.mean_ci([g["share"][i] for g in gram]).format(),
                 "cos(top eigenvector, mean gradient)":
                     stats.mean_ci([g["alignment"][i] for g in gram]).format()}
                for i, t in enumerate(levels)]
        return {"claims": claims, "tables": {
            "Forgetting after the last task (strength chosen on validation FD)": rows,
            "Per-sample-gradient Gram matrix after the first task": spec},
            "gram": gram, "chosen": chosen, "tuned": tuned}

    def report(self, cfg, results, history, outdir):
        gram = results["gram"]
        fig, axes = new_figure(1, 2, figsize=(9, 3.2))
        snrs = gram[0]["snr"]
        for key, ax, label in (("share", axes[0], "top-eigenvalue share of G G^T"),
                               ("alignment", axes[1], "|cos(top eigvec, mean grad)|")):
            for g in gram:
                ax.plot(snrs, g[key], "o-", ms=3, alpha=0.5)
            ax.set_xscale("log")
            ax.set_xlabel("SNR = alpha_bar / (1 - alpha_bar)")
            ax.set_ylabel(label)
        img = save_figure(fig, outdir, "gram.png", "Gram spectrum against the noise level")
        fig, ax = new_figure(figsize=(5, 3.2))
        chosen = results["chosen"]
        for j, m in enumerate(METHODS):
            v = [r["test_fd_old"] for r in chosen[m]]
            ax.scatter([j] * len(v), v, s=12, alpha=0.6)
            est = stats.mean_ci(v)
            if est.n > 1:
                ax.errorbar(j, est.mean, yerr=est.half_width, fmt="o", color="k")
        ax.set_xticks(range(len(METHODS)), METHODS)
        ax.set_ylabel("FD, earlier classes (test)")
        img += "\n\n" + save_figure(fig, outdir, "forgetting.png",
                                     "forgetting per method and seed")
        return results_markdown(f"{cfg.seeds} seeds; {cfg.n_tasks} tasks of two classes; "
                                "intervals are 95% t-intervals over seeds.", results, img)


EXPERIMENT = EWC()
