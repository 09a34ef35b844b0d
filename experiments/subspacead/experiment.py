"""SubspaceAD on digits: patch-feature PCA residuals vs PaDiM and a patch memory bank.

One digit class is normal; a detector sees ``shots`` normal training images
(``experiments/data.py`` splits) and scores the normal test images of that class,
the same images with a synthetic **local defect** (a 2x2 block inverted, with its
pixel mask), and test images of other digits (semantic anomalies).

Features are patch features, as in the paper: at each of the 64 pixel positions a
fixed random convolution map (a 5x5 window, ``channels`` Gaussian filters, ReLU;
the same map for every method and seed) plus the position. Detectors:

- **SubspaceAD**: one PCA subspace of every training patch feature
  (``subjax.linalg.randomized_svd``, rank by ``energy_rank``); a pixel's score is
  its feature's residual (``residual_norms``); an image's score is the mean of
  its ``top_k`` pixel scores;
- **PaDiM-style**: a Gaussian per position (mean, covariance shrunk towards a
  multiple of the identity), Mahalanobis pixel score, image score = max;
- **patch memory bank** (PatchCore / AnomalyDINO-style): distance of a pixel's
  feature to the nearest training patch feature, image score = max;
- **image PCA** (the image-level SubspaceAD on raw pixels): image score only.

Image AUROC (local defects, semantic anomalies) and pixel AUROC (local defects)
per normal digit, averaged over digits; one cell = one (seed, shots).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.metrics import roc_auc_score

import subjax.linalg as sl
from experiments import stats
from experiments.data import digits
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure

METHODS = ("SubspaceAD", "PaDiM", "memory bank", "image PCA")
METRICS = ("image AUROC, local defects", "image AUROC, other digits", "pixel AUROC")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    shots: tuple[int, ...] = (1, 5, 20)
    normal_digits: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    channels: int = 48          # random filters of the feature map
    window: int = 5             # side of the filter window
    position_weight: float = 1.0
    energy: float = 0.95        # PCA variance kept
    top_k: int = 3              # pixels averaged into SubspaceAD's image score
    shrinkage: float = 0.1      # PaDiM: weight of the identity in the covariance

    def __post_init__(self):
        if self.seeds < 1 or self.channels < 1 or self.top_k < 1:
            raise ValueError("seeds, channels and top_k must be >= 1")
        if self.window < 1 or self.window % 2 == 0:
            raise ValueError(f"window must be odd and >= 1, got {self.window}")
        if not self.shots or min(self.shots) < 1 or max(self.shots) > 100:
            raise ValueError("shots must lie in [1, 100]")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if not self.shrinkage > 0:
            raise ValueError(f"shrinkage must be > 0, got {self.shrinkage}")
        if not set(self.normal_digits) <= set(range(10)) or not self.normal_digits:
            raise ValueError("normal_digits must be digits 0-9")


@functools.lru_cache(maxsize=4)
def _filters(window: int, channels: int) -> np.ndarray:
    rng = np.random.default_rng(12345)  # the one fixed feature map
    w = rng.standard_normal((window * window, channels)) / window
    b = 0.1 * rng.standard_normal(channels)
    return np.concatenate([w, b[None]]).astype(np.float32)


def features(cfg: Config, images: np.ndarray) -> np.ndarray:
    """``(n, 8, 8)`` images -> ``(n, 64, channels + 2)`` patch features."""
    r = cfg.window // 2
    pad = np.pad(images, ((0, 0), (r, r), (r, r)))
    win = np.lib.stride_tricks.sliding_window_view(pad, (cfg.window, cfg.window), axis=(1, 2))
    win = win.reshape(len(images), 64, cfg.window * cfg.window)
    wb = _filters(cfg.window, cfg.channels)
    feat = np.maximum(win @ wb[:-1] + wb[-1], 0.0)
    ii, jj = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    pos = np.stack([ii.ravel(), jj.ravel()], 1).astype(np.float32) / 7.0 - 0.5
    pos = np.broadcast_to(cfg.position_weight * pos, (len(images), 64, 2))
    return np.concatenate([feat, pos], -1).astype(np.float32)


def add_defects(images: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """Invert one 2x2 block per image where that changes at least 1.5 in total."""
    out, masks = images.copy(), np.zeros(images.shape, bool)
    for n, img in enumerate(images):
        for _ in range(100):
            i, j = rng.integers(0, 7, 2)
            if np.abs(1.0 - 2.0 * img[i:i + 2, j:j + 2]).sum() >= 1.5:
                break
        out[n, i:i + 2, j:j + 2] = 1.0 - img[i:i + 2, j:j + 2]
        masks[n, i:i + 2, j:j + 2] = True
    return out, masks


def _pca(train: np.ndarray, energy: float, key):
    """Mean and basis of the PCA subspace of the rows of ``train``."""
    mu = train.mean(axis=0)
    n = train.shape[0]
    if n < 2:
        return mu, jnp.zeros((train.shape[1], 0), jnp.float32)
    xc = train - mu  # (samples, dim); factor it in its tall orientation
    tall = xc.shape[1] >= xc.shape[0]
    a = jnp.asarray(xc.T if tall else xc)
    full = min(a.shape)
    rank = full - 1  # centring removes one dimension
    res = sl.randomized_svd(a, rank, key=key, oversample=full - rank, n_steps=4)
    basis = res.u if tall else res.vt.T  # principal directions in feature space
    return mu, basis[:, : int(sl.energy_rank(res.s, energy))]


def _residuals(x: np.ndarray, mu, q) -> np.ndarray:
    return np.asarray(sl.residual_norms(jnp.asarray((x - mu).T), q))


def _nn_dist(x: np.ndarray, bank: np.ndarray) -> np.ndarray:
    d2 = (x**2).sum(1)[:, None] - 2.0 * x @ bank.T + (bank**2).sum(1)[None]
    return np.sqrt(np.maximum(d2.min(1), 0.0))


def _padim(train: np.ndarray, test: np.ndarray, shrinkage: float) -> np.ndarray:
    """Per-position Mahalanobis distances; ``train`` (n, 64, d), ``test`` (m, 64, d)."""
    d = train.shape[-1]
    mu = train.mean(0)
    xc = train - mu
    cov = np.einsum("npi,npj->pij", xc, xc) / max(train.shape[0] - 1, 1)
    scale = np.trace(cov, axis1=1, axis2=2) / d + 1e-3
    cov = cov + shrinkage * scale[:, None, None] * np.eye(d)
    prec = np.linalg.inv(cov)
    diff = test - mu
    return np.sqrt(np.maximum(np.einsum("mpi,pij,mpj->mp", diff, prec, diff), 0.0))


def _pixel_scores(cfg, method, train_f, test_f, key):
    m, n = len(test_f), len(train_f)
    if method == "SubspaceAD":
        mu, q = _pca(train_f.reshape(n * 64, -1), cfg.energy, key)
        return _residuals(test_f.reshape(m * 64, -1), mu, q).reshape(m, 64)
    if method == "PaDiM":
        return _padim(train_f, test_f, cfg.shrinkage)
    return _nn_dist(test_f.reshape(m * 64, -1), train_f.reshape(n * 64, -1)).reshape(m, 64)


def _image_score(cfg, method, pix):
    if method == "SubspaceAD":
        return np.sort(pix, 1)[:, -cfg.top_k:].mean(1)
    return pix.max(1)


def run_digit(cfg: Config, seed: int, shots: int, digit: int) -> dict:
    data = digits(seed)
    rng = np.random.default_rng([seed, shots, digit])
    train_rows = rng.permutation(np.flatnonzero(data.train.y == digit))[:shots]
    train = data.train.images[train_rows]
    normal = data.test.classes([digit]).images
    defect, masks = add_defects(normal, rng)
    others = data.test.images[data.test.y != digit]
    others = others[rng.choice(len(others), len(normal), replace=False)]
    test = np.concatenate([normal, defect, others])
    key = jax.random.fold_in(jax.random.key(seed), shots * 10 + digit)
    train_f, test_f = features(cfg, train), features(cfg, test)
    k = len(normal)
    y_defect = np.r_[np.zeros(k), np.ones(k)]
    y_other = y_defect
    pix_mask = np.concatenate([np.zeros((k, 64), bool), masks.reshape(k, 64)]).ravel()
    out = {}
    for method in METHODS:
        if method == "image PCA":
            mu, q = _pca(train.reshape(shots, 64), cfg.energy, key)
            img = _residuals(test.reshape(len(test), 64), mu, q)
            pix_auc = None
        else:
            pix = _pixel_scores(cfg, method, train_f, test_f, key)
            img = _image_score(cfg, method, pix)
            pix_auc = float(roc_auc_score(pix_mask, pix[: 2 * k].ravel()))
        out[method] = {
            METRICS[0]: float(roc_auc_score(y_defect, img[: 2 * k])),
            METRICS[1]: float(roc_auc_score(y_other, np.r_[img[:k], img[2 * k:]])),
            METRICS[2]: pix_auc,
        }
    return out


def run_cell(cfg: Config, seed: int, shots: int) -> dict:
    per = [run_digit(cfg, seed, shots, d) for d in cfg.normal_digits]
    out = {}
    for method in METHODS:
        out[method] = {}
        for metric in METRICS:
            vals = [p[method][metric] for p in per]
            out[method][metric] = None if vals[0] is None else float(np.mean(vals))
    return out


CLAIMS = (
    ("SubspaceAD", "memory bank", METRICS[0],
     "one-shot: SubspaceAD beats the patch memory bank on local defects (image AUROC)"),
    ("SubspaceAD", "PaDiM", METRICS[0],
     "one-shot: SubspaceAD beats PaDiM-style Gaussians on local defects (image AUROC)"),
    ("SubspaceAD", "image PCA", METRICS[0],
     "one-shot: patch features beat the image-level residual on local defects"),
    ("SubspaceAD", "memory bank", METRICS[2],
     "one-shot: SubspaceAD localises defects better than the memory bank (pixel AUROC)"),
)
PAPER = "97.1% one-shot image AUROC on MVTec-AD, above prior few-shot methods"


class SubspaceAD(CellExperiment):
    name = "subspacead"
    title = "SubspaceAD: patch-feature PCA residuals vs PaDiM and a memory bank, on digits"
    config_cls = Config
    quick = {"seeds": 3, "shots": (1, 5), "normal_digits": (0, 3, 5, 8)}
    full = {"seeds": 10}
    figures = ("subspacead_auroc.png",)

    def expected_cells(self, cfg):
        return cfg.seeds * len(cfg.shots)

    def run_cell(self, cfg, cell):
        return run_cell(cfg, cell["seed"], cell["shots"])

    def sweep(self, cfg, cells):
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        res = {n: [cells(seed=s, shots=n) for s in seeds] for n in cfg.shots}
        shots0 = min(cfg.shots)
        claims = []
        for a, b, metric, text in CLAIMS:
            va = [r[a][metric] for r in res[shots0]]
            vb = [r[b][metric] for r in res[shots0]]
            cmp = stats.compare(va, vb, quick=cells.quick)
            txt = text if shots0 == 1 else text.replace("one-shot", f"{shots0}-shot")
            claims.append(stats.claim(txt, PAPER, cmp, names=(a, b)))
        rows = []
        for n in cfg.shots:
            for m in METHODS:
                row = {"shots": n, "method": m}
                for metric in METRICS:
                    v = [r[m][metric] for r in res[n]]
                    row[metric] = "—" if v[0] is None else stats.mean_ci(v).format()
                rows.append(row)
        curves = {m: {metric: [stats.mean_ci([r[m][metric] for r in res[n]]).to_dict()
                               for n in cfg.shots] for metric in METRICS[:2]}
                  for m in METHODS}
        return {"claims": claims,
                "tables": {"AUROC by number of normal training images (mean ± 95% CI "
                           "over seeds, each averaged over the normal digits)": rows},
                "curves": curves, "shots": list(cfg.shots)}

    def report(self, cfg, results, history, outdir):
        fig, axes = new_figure(1, 2, figsize=(9, 3.4), sharey=True)
        shots = results["shots"]
        for ax, metric in zip(axes, METRICS[:2], strict=True):
            for m in METHODS:
                est = [stats.Estimate.from_dict(d) for d in results["curves"][m][metric]]
                mean = np.array([e.mean for e in est])
                half = np.array([e.half_width if np.isfinite(e.half_width) else 0.0
                                 for e in est])
                ax.errorbar(shots, mean, yerr=half, marker="o", capsize=3, label=m)
            ax.set_xscale("log")
            ax.set_xticks(shots, [str(n) for n in shots])
            ax.minorticks_off()
            ax.set_xlabel("normal training images")
            ax.set_title(metric, fontsize=9)
        axes[0].set_ylabel("AUROC (mean, 95% CI)")
        axes[0].legend(fontsize=7)
        img = save_figure(fig, outdir, "subspacead_auroc.png", "AUROC vs number of normals")
        return results_markdown(
            f"Normal digits {list(cfg.normal_digits)}, {cfg.seeds} seeds, patch features: "
            f"{cfg.window}x{cfg.window} random ReLU map with {cfg.channels} channels plus "
            "position.", results, img)


EXPERIMENT = SubspaceAD()
