"""KSTER: recovering the subjects of a locate-then-edit update from its row space.

Synthetic protocol (no language model): subjects are key vectors ``k_s`` in
``R^d`` drawn from an anisotropic Gaussian with covariance ``C`` (the second
moment a locate-then-edit method estimates from text). A MEMIT-style batch edit of
``E`` subjects writes

    Delta W = R K_E^T (lambda C + K_E K_E^T)^{-1}           (d_out x d)

with random residuals ``R``; its row space is exactly
``span{C^{-1} k_e : e edited}``. The attacker sees ``Delta W`` plus noise (other
weight changes), knows ``C`` and the keys of a pool of candidate subjects, and

1. estimates the rank of the update by the Marchenko–Pastur edge
   (``subjax.linalg.marchenko_pastur_rank`` on the full spectrum),
2. takes the top right singular vectors ``V`` (``subjax.linalg.randomized_svd``),
3. scores each candidate by ``cos`` of the angle between ``C^{-1} k_s`` and
   ``span(V)`` (``subjax.linalg.residual_norms``), and predicts the ``E``
   highest-scoring candidates.

Recovery rate = fraction of the edited subjects among the predictions.
"Subspace camouflage" adds ``E`` decoy subjects — the candidates whose keys are
nearest to the edited ones (semantic decoys) — to the same edit with residuals
scaled by ``alpha`` (small, harmless changes of the decoys' outputs); their
directions enter the row space and compete with the real ones.

Cells: (rank E) x (noise level) without defence, then (rank E) x (alpha) with
camouflage at a fixed noise level; each cell averages ``trials`` independent
draws.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import subjax.linalg as sl
from experiments.harness import Experiment, markdown_table, new_figure, save_figure


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    d: int = 512  # key dimension (input of the edited layer)
    d_out: int = 256  # output dimension
    n_candidates: int = 2000  # subject pool known to the attacker (edited ones included)
    ranks: tuple = (1, 4, 16, 48)  # number of edited subjects E
    noises: tuple = (0.0, 3.0, 10.0, 30.0)  # noise per entry / RMS entry of Delta W
    alphas: tuple = (0.0, 0.25, 0.5, 1.0)  # decoy residual scale (camouflage)
    camouflage_noise: float = 3.0  # noise level of the camouflage cells
    trials: int = 4
    lam: float = 1.0  # MEMIT covariance weight
    key_decay: float = 0.02  # key covariance eigenvalues exp(-key_decay * i)

    def __post_init__(self):
        if self.d_out < 1 or self.d < 1 or self.trials < 1:
            raise ValueError("d, d_out and trials must be >= 1")
        if max(self.ranks) * 2 > min(self.d, self.d_out):
            raise ValueError(f"2 * max(ranks)={2 * max(self.ranks)} exceeds min(d, d_out)")
        if self.n_candidates < 4 * max(self.ranks):
            raise ValueError("n_candidates must be >= 4 * max(ranks)")


def _cells(cfg: Config):
    cells = [("none", e, nz, 0.0) for e in cfg.ranks for nz in cfg.noises]
    cells += [("camouflage", e, cfg.camouflage_noise, a) for e in cfg.ranks for a in cfg.alphas]
    return cells


def _world(cfg: Config):
    """Key covariance and the candidate pool (fixed by the seed)."""
    rng = np.random.default_rng(cfg.seed)
    q, _ = np.linalg.qr(rng.standard_normal((cfg.d, cfg.d)))
    ev = np.exp(-cfg.key_decay * np.arange(cfg.d)) + 1e-3
    cov = (q * ev) @ q.T
    keys = (rng.standard_normal((cfg.n_candidates, cfg.d)) * np.sqrt(ev)) @ q.T
    return cov, keys


def _attack(dw_obs: np.ndarray, cov_inv_keys: jax.Array, n_pred: int, r_max: int, key):
    """Rank estimate + row-space scores; returns (predicted indices, estimated rank)."""
    d_out, d = dw_obs.shape
    s_full = np.linalg.svd(dw_obs, compute_uv=False)
    r_hat = int(sl.marchenko_pastur_rank(jnp.asarray(s_full), (d_out, d), margin=1.05))
    r_hat = max(1, min(r_hat, r_max))
    # one static rank (one compilation) for every cell; keep the top r_hat vectors
    res = sl.randomized_svd(jnp.asarray(dw_obs.T), r_max, key=key, oversample=10, n_steps=4)
    v = res.u[:, :r_hat]  # right singular vectors of Delta W = left ones of Delta W^T
    rel = sl.residual_norms(cov_inv_keys.T, v, relative=True)  # sin of the angle
    score = np.sqrt(np.maximum(0.0, 1.0 - np.asarray(rel, np.float64) ** 2))
    return np.argsort(-score)[:n_pred], r_hat


def _cell(cfg: Config, cell, i: int) -> dict:
    defence, e, noise, alpha = cell
    cov, keys = _world(cfg)
    cov_inv_keys = jnp.asarray(np.linalg.solve(cov, keys.T).T, jnp.float32)
    rates, r_hats, decoy_hits = [], [], []
    for t in range(cfg.trials):
        rng = np.random.default_rng([cfg.seed, i, t])
        edited = rng.choice(cfg.n_candidates, size=e, replace=False)
        k_e = keys[edited]  # (E, d)
        resid = rng.standard_normal((cfg.d_out, e))
        ks, rs = k_e, resid
        decoys = np.array([], dtype=int)
        if defence == "camouflage" and alpha > 0:
            # semantic decoys: for each edited subject the nearest other candidate
            sims = (keys @ k_e.T) / (np.linalg.norm(keys, axis=1)[:, None]
                                      * np.linalg.norm(k_e, axis=1)[None, :])
            sims[edited] = -np.inf
            decoys = np.unique(np.argmax(sims, axis=0))
            ks = np.concatenate([k_e, keys[decoys]])
            rs = np.concatenate([resid, alpha * rng.standard_normal((cfg.d_out, len(decoys)))],
                                axis=1)
        dw = rs @ np.linalg.solve(cfg.lam * cov + ks.T @ ks, ks.T).T
        rms = np.sqrt(np.mean(dw**2))
        dw_obs = dw + noise * rms * rng.standard_normal(dw.shape)
        r_max = min(2 * max(cfg.ranks) + 8, min(cfg.d, cfg.d_out) - 10)
        pred, r_hat = _attack(dw_obs.astype(np.float32), cov_inv_keys, e, r_max,
                              jax.random.fold_in(jax.random.key(cfg.seed), i * 1000 + t))
        rates.append(len(set(pred.tolist()) & set(edited.tolist())) / e)
        r_hats.append(r_hat)
        decoy_hits.append(len(set(pred.tolist()) & set(decoys.tolist())) / e)
    return {
        "defence": defence,
        "edited": e,
        "noise": noise,
        "alpha": alpha,
        "recovery": float(np.mean(rates)),
        "recovery_min": float(np.min(rates)),
        "decoys_predicted": float(np.mean(decoy_hits)),
        "rank_estimate": float(np.mean(r_hats)),
        "chance": e / cfg.n_candidates,
    }


class KSTER(Experiment):
    name = "kster"
    title = "KSTER: spectral recovery of edited subjects from a low-rank edit (synthetic)"
    config_cls = Config
    quick = {"trials": 2, "ranks": (1, 4, 16), "n_candidates": 1000}
    full = {"trials": 10}
    checkpoint_every = 4

    def num_steps(self, cfg):
        return len(_cells(cfg))

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        t0 = time.perf_counter()
        metrics = _cell(cfg, _cells(cfg)[i], i)
        metrics["cell_time_s"] = time.perf_counter() - t0
        return state, metrics

    def summarize(self, cfg, state, history):
        none = [h for h in history if h["defence"] == "none"]
        cam = [h for h in history if h["defence"] == "camouflage"]
        clean = [h["recovery"] for h in none if h["noise"] == 0.0]
        base = {h["edited"]: h["recovery"] for h in none if h["noise"] == cfg.camouflage_noise}
        cam_full = [h for h in cam if h["alpha"] == max(cfg.alphas)]
        drops = [base[h["edited"]] - h["recovery"] for h in cam_full if h["edited"] in base]
        return {
            "recovery_noiseless_min": float(min(clean)) if clean else None,
            "recovery_noiseless_mean": float(np.mean(clean)) if clean else None,
            "recovery_at_max_noise_mean": float(np.mean(
                [h["recovery"] for h in none if h["noise"] == max(cfg.noises)])),
            "camouflage_alpha": max(cfg.alphas),
            "camouflage_recovery_mean": float(np.mean([h["recovery"] for h in cam_full])),
            "camouflage_drop_mean": float(np.mean(drops)) if drops else None,
            "claim_spectral_recovery_holds": bool(clean and min(clean) >= 0.9),
            "camouflage_drop_by_rank": {str(h["edited"]): base[h["edited"]] - h["recovery"]
                                        for h in cam_full if h["edited"] in base},
            "claim_camouflage_lowers_recovery": bool(drops and float(np.mean(drops)) > 0.2),
        }

    def report(self, cfg, results, history, outdir):
        none = [h for h in history if h["defence"] == "none"]
        cam = [h for h in history if h["defence"] == "camouflage"]
        fig, axes = new_figure(1, 2, figsize=(9, 3.4))
        for e in cfg.ranks:
            rows = [h for h in none if h["edited"] == e]
            axes[0].plot([h["noise"] for h in rows], [h["recovery"] for h in rows], marker="o",
                         label=f"E={e}")
            rows = [h for h in cam if h["edited"] == e]
            axes[1].plot([h["alpha"] for h in rows], [h["recovery"] for h in rows], marker="o",
                         label=f"E={e}")
        axes[0].set_xscale("symlog", linthresh=1.0)
        axes[0].set_xlabel("noise / RMS entry of the edit")
        axes[0].set_ylabel("recovery rate (precision@E)")
        axes[0].set_title("spectral attack, no defence")
        axes[1].set_xlabel("decoy residual scale alpha")
        axes[1].set_title(f"subspace camouflage (noise {cfg.camouflage_noise:g})")
        for ax in axes:
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=8)
        img = save_figure(fig, outdir, "kster_recovery.png", "recovery vs noise and camouflage")
        cols = ["defence", "edited", "noise", "alpha", "recovery", "recovery_min",
                "decoys_predicted", "rank_estimate", "chance"]
        return (
            f"Synthetic keys d={cfg.d}, d_out={cfg.d_out}, {cfg.n_candidates} candidate "
            f"subjects, {cfg.trials} trials per cell.\n\n"
            f"{markdown_table([results])}\n\n{img}\n\n{markdown_table(history, cols)}\n"
        )


EXPERIMENT = KSTER()
