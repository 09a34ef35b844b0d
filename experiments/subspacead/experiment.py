"""SubspaceAD on digits: PCA-residual anomaly detection vs a nearest-neighbour bank.

One digit class is "normal". A detector sees ``n`` normal training images
(``load_digits``: 8x8 pixels, 64 features scaled to [0, 1]) and scores held-out
images; every other digit is an anomaly. Image AUROC per (normal digit, draw),
averaged.

- **SubspaceAD** (PCA subspace of normal features, score = reconstruction
  residual): mean ``mu``, principal directions from
  ``subjax.linalg.randomized_svd`` of the centred training matrix, rank by
  ``subjax.linalg.energy_rank`` (``energy`` of the variance), score
  ``||(I - Q Q^T)(x - mu)||`` via ``subjax.linalg.residual_norms``. With ``n = 1``
  there is no subspace and the score is ``||x - mu||``.
- **Memory bank** (PatchCore-style, image level): distance to the nearest
  training normal.

One harness step per training-set size ``n``; each step covers every normal
digit and ``draws`` random training sets.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import roc_auc_score

import subjax.linalg as sl
from experiments.harness import Experiment, markdown_table, new_figure, save_figure


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    sizes: tuple = (1, 2, 5, 10, 20, 50, 85)  # normal training images
    digits: tuple = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)  # normal classes evaluated
    draws: int = 5  # random training sets per (digit, size)
    energy: float = 0.95  # PCA variance kept
    n_anomalies: int = 600  # anomalous test images per evaluation (random subset)

    def __post_init__(self):
        if min(self.sizes) < 1 or max(self.sizes) > 85:
            raise ValueError("sizes must lie in [1, 85] (half of the smallest class)")
        if not 0.0 < self.energy <= 1.0:
            raise ValueError(f"energy must be in (0, 1], got {self.energy}")
        if self.draws < 1:
            raise ValueError("draws must be >= 1")


def _data():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


def _pca_scores(train: np.ndarray, test: np.ndarray, energy: float, key) -> tuple:
    mu = train.mean(axis=0)
    centred_test = jnp.asarray((test - mu).T)  # (64, n_test) columns
    n = train.shape[0]
    if n < 2:
        return np.asarray(jnp.sqrt(jnp.sum(centred_test**2, axis=0))), 0
    xc = jnp.asarray((train - mu).T)  # (64, n): principal directions = left vectors
    full = min(xc.shape)
    rank = full - 1  # centring removes one dimension
    res = sl.randomized_svd(xc, rank, key=key, oversample=full - rank, n_steps=4)
    k = int(sl.energy_rank(res.s, energy))
    q = res.u[:, :k]
    return np.asarray(sl.residual_norms(centred_test, q)), k


def _knn_scores(train: np.ndarray, test: np.ndarray) -> np.ndarray:
    d2 = (np.sum(test**2, 1)[:, None] - 2.0 * test @ train.T + np.sum(train**2, 1)[None, :])
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def _cell(cfg: Config, n: int, i: int) -> dict:
    x, y = _data()
    auc_pca, auc_knn, ks = [], [], []
    for digit in cfg.digits:
        for draw in range(cfg.draws):
            rng = np.random.default_rng([cfg.seed, digit, draw])
            normal = rng.permutation(np.flatnonzero(y == digit))
            half = len(normal) // 2
            train = x[normal[:half][:n]]
            test_norm = x[normal[half:]]
            anomalies = rng.choice(np.flatnonzero(y != digit), cfg.n_anomalies, replace=False)
            test = np.concatenate([test_norm, x[anomalies]])
            labels = np.concatenate([np.zeros(len(test_norm)), np.ones(cfg.n_anomalies)])
            key = jax.random.fold_in(jax.random.key(cfg.seed), i * 10000 + digit * 100 + draw)
            s_pca, k = _pca_scores(train, test, cfg.energy, key)
            auc_pca.append(roc_auc_score(labels, s_pca))
            auc_knn.append(roc_auc_score(labels, _knn_scores(train, test)))
            ks.append(k)
    return {
        "n_train": n,
        "auroc_subspacead": float(np.mean(auc_pca)),
        "auroc_subspacead_std": float(np.std(auc_pca)),
        "auroc_knn": float(np.mean(auc_knn)),
        "auroc_knn_std": float(np.std(auc_knn)),
        "pca_rank_mean": float(np.mean(ks)),
        "subspacead_wins": float(np.mean(np.asarray(auc_pca) > np.asarray(auc_knn))),
    }


class SubspaceAD(Experiment):
    name = "subspacead"
    title = "SubspaceAD: PCA-residual anomaly detection on digits vs nearest-neighbour bank"
    config_cls = Config
    quick = {"draws": 2, "sizes": (1, 5, 20, 85), "digits": (0, 3, 5, 8)}
    full = {}
    checkpoint_every = 1

    def num_steps(self, cfg):
        return len(cfg.sizes)

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        t0 = time.perf_counter()
        metrics = _cell(cfg, cfg.sizes[i], i)
        metrics["cell_time_s"] = time.perf_counter() - t0
        return state, metrics

    def summarize(self, cfg, state, history):
        one = [h for h in history if h["n_train"] == 1]
        big = max(history, key=lambda h: h["n_train"])
        wins = [h for h in history if h["auroc_subspacead"] > h["auroc_knn"]]
        return {
            "auroc_one_shot_subspacead": one[0]["auroc_subspacead"] if one else None,
            "auroc_one_shot_knn": one[0]["auroc_knn"] if one else None,
            "n_max": big["n_train"],
            "auroc_nmax_subspacead": big["auroc_subspacead"],
            "auroc_nmax_knn": big["auroc_knn"],
            "sizes_where_subspacead_wins": [h["n_train"] for h in wins],
            "paper_one_shot_auroc_mvtec": 0.971,
        }

    def report(self, cfg, results, history, outdir):
        fig, ax = new_figure(figsize=(5.2, 3.4))
        ns = [h["n_train"] for h in history]
        for key_, label in (("auroc_subspacead", "SubspaceAD (PCA residual)"),
                            ("auroc_knn", "nearest-neighbour bank")):
            m = np.array([h[key_] for h in history])
            sd = np.array([h[key_ + "_std"] for h in history])
            ax.plot(ns, m, marker="o", label=label)
            ax.fill_between(ns, m - sd, m + sd, alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("normal training images n")
        ax.set_ylabel("image AUROC")
        ax.set_title("digits, one class normal")
        ax.legend(fontsize=8)
        img = save_figure(fig, outdir, "subspacead_auroc.png", "AUROC vs number of normals")
        cols = ["n_train", "auroc_subspacead", "auroc_subspacead_std", "auroc_knn",
                "auroc_knn_std", "pca_rank_mean", "subspacead_wins"]
        return (
            f"Normal digits {list(cfg.digits)}, {cfg.draws} draws each, "
            f"{cfg.n_anomalies} anomalies per evaluation, PCA energy {cfg.energy}.\n\n"
            f"{markdown_table([results])}\n\n{img}\n\n{markdown_table(history, cols)}\n"
        )


EXPERIMENT = SubspaceAD()
