"""KSTER: recovering the subjects of a locate-then-edit update from its row space.

Synthetic protocol (no language model). Subject keys ``k_s`` in ``R^d`` are drawn
from an anisotropic Gaussian with covariance ``C``. The editor and the attacker
each estimate ``C`` from their own ``cov_samples`` key samples (``C_ed``,
``C_at``). A MEMIT-style batch edit of ``E`` subjects with target residuals ``R``
writes

    Delta W = R K^T (lambda C_ed + K K^T)^{-1}             (d_out x d)

where ``K`` holds the edited keys (and, under a defence, decoy keys). The
observed change adds ``noise_edits`` unrelated edits of subjects outside the
attacker's candidate pool (the other edits a deployed model has received). The
attacker estimates the rank by the Marchenko–Pastur edge
(``subjax.linalg.marchenko_pastur_rank``), takes the top right singular vectors
(``subjax.linalg.randomized_svd``), scores every candidate by the cosine between
``C_at^{-1} k_s`` and that subspace (``subjax.linalg.residual_norms``) and names
the ``E`` best. Recovery = share of the edited subjects among them.

Defences, each with its utility cost:

- *camouflage* (the paper's): the nearest-key candidate of each edited subject is
  edited too, with a random residual of scale ``alpha`` (its outputs change);
- *zero-residual decoys*: ``decoys`` nearest-key candidates per edited subject
  enter ``K`` with residual 0 (their outputs are preserved by construction).

Utility: edit error ``||Delta W K_E - R|| / ||R||``, and the output change of the
decoys and of bystander candidates relative to the typical edit
``||r_e||``. One cell = one (trial, E) with every noise level and defence.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

import subjax.linalg as sl
from experiments import stats
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 10                   # trials per cell
    d: int = 512                      # key dimension (input of the edited layer)
    d_out: int = 256                  # output dimension
    n_candidates: int = 2000          # subject pool known to the attacker
    ranks: tuple[int, ...] = (1, 4, 16)   # edited subjects E
    noise_edits: tuple[int, ...] = (0, 16, 64, 192)  # unrelated edits in the observed change
    defence_noise: int = 16           # unrelated edits in the defence cells
    alphas: tuple[float, ...] = (0.5, 1.0)  # camouflage residual scales
    decoys: tuple[int, ...] = (1, 4)  # zero-residual decoys per edited subject
    cov_samples: int = 4096           # key samples behind each covariance estimate
    lam: float = 1.0                  # MEMIT covariance weight
    key_decay: float = 0.02           # key covariance eigenvalues exp(-key_decay * i)
    bystanders: int = 200

    def __post_init__(self):
        if min(self.d, self.d_out, self.seeds, self.cov_samples) < 1:
            raise ValueError("d, d_out, seeds and cov_samples must be >= 1")
        if not self.ranks or 2 * max(self.ranks) + 8 > min(self.d, self.d_out):
            raise ValueError("2 * max(ranks) + 8 must not exceed min(d, d_out)")
        if self.n_candidates < 8 * max(self.ranks) + self.bystanders:
            raise ValueError("n_candidates too small for the ranks and bystanders")
        if self.defence_noise not in self.noise_edits:
            raise ValueError("defence_noise must be one of noise_edits")


@functools.lru_cache(maxsize=2)
def _world(cfg: Config, trial: int):
    """Covariance, candidate pool, outside subjects and both estimated covariances."""
    rng = np.random.default_rng([cfg.seed, trial])
    q, _ = np.linalg.qr(rng.standard_normal((cfg.d, cfg.d)))
    ev = np.exp(-cfg.key_decay * np.arange(cfg.d)) + 1e-3

    def draw(n):
        return (rng.standard_normal((n, cfg.d)) * np.sqrt(ev)) @ q.T

    keys = draw(cfg.n_candidates)
    outside = draw(max(cfg.noise_edits) or 1)
    cov_ed, cov_at = (np.cov(draw(cfg.cov_samples).T, bias=True) for _ in range(2))
    return keys, outside, cov_ed, cov_at


def _edit(cfg, cov, k, r):
    """MEMIT-style update writing residuals ``r`` (d_out, n) for keys ``k`` (n, d)."""
    return r @ np.linalg.solve(cfg.lam * cov + k.T @ k, k.T).T


def _attack(cfg, dw_obs, cov_inv_keys, n_pred, key):
    d_out, d = dw_obs.shape
    s_full = np.linalg.svd(dw_obs, compute_uv=False)
    r_max = 2 * max(cfg.ranks) + 8  # one static rank (one compilation) for every cell
    r_hat = int(sl.marchenko_pastur_rank(jnp.asarray(s_full), (d_out, d), margin=1.05))
    r_hat = max(1, min(r_hat, r_max))
    res = sl.randomized_svd(jnp.asarray(dw_obs.T, jnp.float32), r_max, key=key, oversample=10,
                            n_steps=4)
    rel = sl.residual_norms(cov_inv_keys.T, res.u[:, :r_hat], relative=True)  # sin of angle
    score = np.sqrt(np.maximum(0.0, 1.0 - np.asarray(rel, np.float64) ** 2))
    return np.argsort(-score)[:n_pred], r_hat


def _nearest(keys, idx, per, exclude):
    kn = keys / np.linalg.norm(keys, axis=1, keepdims=True)
    sims = kn @ kn[idx].T
    sims[list(exclude)] = -np.inf
    out = []
    for j in range(len(idx)):
        for c in np.argsort(-sims[:, j]):
            if c not in out:
                out.append(int(c))
                if len(out) % per == 0:
                    break
        sims[out, :] = -np.inf
    return np.array(out, int)


def run_cell(cfg: Config, trial: int, e: int) -> dict:
    keys, outside, cov_ed, cov_at = _world(cfg, trial)
    rng = np.random.default_rng([cfg.seed, trial, e])
    cov_inv_keys = jnp.asarray(np.linalg.solve(cov_at, keys.T).T, jnp.float32)
    edited = rng.choice(cfg.n_candidates, size=e, replace=False)
    k_e, r_e = keys[edited], rng.standard_normal((cfg.d_out, e))
    r_norm = float(np.mean(np.linalg.norm(r_e, axis=0)))
    noise = {}
    for m in cfg.noise_edits:
        noise[m] = (_edit(cfg, cov_ed, outside[:m], rng.standard_normal((cfg.d_out, m)))
                    if m else 0.0)
    semantic = _nearest(keys, edited, max(max(cfg.decoys), 1), set(edited.tolist()))
    taken = set(edited.tolist()) | set(semantic.tolist())
    bystanders = np.array([c for c in rng.permutation(cfg.n_candidates) if c not in taken]
                          [: cfg.bystanders])
    key = jax.random.key(cfg.seed * 1000 + trial * 10 + e)

    def outcome(dw, m, decoy_idx):
        pred, r_hat = _attack(cfg, dw + noise[m], cov_inv_keys, e, key)
        res = {"recovery": len(set(pred.tolist()) & set(edited.tolist())) / e,
               "rank_estimate": r_hat,
               "edit_error": float(np.linalg.norm(dw @ k_e.T - r_e) / np.linalg.norm(r_e)),
               "bystander_change": float(np.mean(np.linalg.norm(dw @ keys[bystanders].T,
                                                                axis=0)) / r_norm)}
        if len(decoy_idx):
            res["decoy_change"] = float(np.mean(np.linalg.norm(dw @ keys[decoy_idx].T,
                                                               axis=0)) / r_norm)
            res["decoys_named"] = len(set(pred.tolist()) & set(decoy_idx.tolist())) / e
        return res

    plain = _edit(cfg, cov_ed, k_e, r_e)
    out = {"none": {str(m): outcome(plain, m, np.array([], int)) for m in cfg.noise_edits},
           "chance": e / cfg.n_candidates}
    m = cfg.defence_noise
    first = semantic[:: max(max(cfg.decoys), 1)][:e]  # the nearest decoy of each subject
    for a in cfg.alphas:
        k = np.concatenate([k_e, keys[first]])
        r = np.concatenate([r_e, a * rng.standard_normal((cfg.d_out, len(first)))], axis=1)
        out[f"camouflage alpha={a:g}"] = outcome(_edit(cfg, cov_ed, k, r), m, first)
    for n in cfg.decoys:
        idx = semantic.reshape(e, -1)[:, :n].ravel()
        k = np.concatenate([k_e, keys[idx]])
        r = np.concatenate([r_e, np.zeros((cfg.d_out, len(idx)))], axis=1)
        out[f"zero-residual decoys x{n}"] = outcome(_edit(cfg, cov_ed, k, r), m, idx)
    return out


class KSTER(CellExperiment):
    name = "kster"
    title = "KSTER: spectral recovery of edited subjects from a low-rank edit (synthetic)"
    config_cls = Config
    quick = {"seeds": 3, "ranks": (4, 16), "n_candidates": 1000, "cov_samples": 2048,
             "noise_edits": (0, 16, 64)}
    full = {"seeds": 10}
    figures = ("kster_recovery.png",)

    def defences(self, cfg):
        return ([f"camouflage alpha={a:g}" for a in cfg.alphas]
                + [f"zero-residual decoys x{n}" for n in cfg.decoys])

    def expected_cells(self, cfg):
        return cfg.seeds * len(cfg.ranks)

    def run_cell(self, cfg, cell):
        return run_cell(cfg, cell["trial"], cell["E"])

    def sweep(self, cfg, cells):
        trials = [cfg.seed + i for i in range(cfg.seeds)]
        res = {e: [cells(trial=t, E=e) for t in trials] for e in cfg.ranks}
        m = str(cfg.defence_noise)
        e_big = max(cfg.ranks)
        rows_b = res[e_big]
        claims = []
        cmp = stats.compare([r["none"][m]["recovery"] for r in rows_b],
                            [r["chance"] for r in rows_b], quick=cells.quick)
        claims.append(stats.claim(
            f"the spectral attack names edited subjects above chance ({e_big} edits, "
            f"{m} unrelated edits)", "row space of an edit fingerprints its subjects "
            "(ROME / MEMIT on LLMs)", cmp, names=("recovery", "chance")))
        for d in self.defences(cfg):
            cmp = stats.compare([r[d]["recovery"] for r in rows_b],
                                [r["none"][m]["recovery"] for r in rows_b], claim="less",
                                quick=cells.quick)
            paper = ("semantic decoys defend against the attack" if d.startswith("camouflage")
                     else "not in the paper (output-preserving decoys)")
            claims.append(stats.claim(f"{d} lowers recovery ({e_big} edits)", paper, cmp,
                                      names=(d.split(" alpha")[0].split(" x")[0], "none")))
        rec_rows = []
        for e in cfg.ranks:
            row = {"E": e, "chance": f"{e / cfg.n_candidates:.3f}"}
            for nz in cfg.noise_edits:
                row[f"{nz} unrelated edits"] = stats.mean_ci(
                    [r["none"][str(nz)]["recovery"] for r in res[e]]).format(".2f")
            rec_rows.append(row)
        def_rows = []
        for e in cfg.ranks:
            for d in ["none"] + self.defences(cfg):
                vals = [r["none"][m] if d == "none" else r[d] for r in res[e]]
                row = {"E": e, "defence": d}
                for k, fmt in (("recovery", ".2f"), ("edit_error", ".3f"),
                               ("decoy_change", ".2f"), ("bystander_change", ".3f"),
                               ("decoys_named", ".2f")):
                    v = [x[k] for x in vals if k in x]
                    row[k.replace("_", " ")] = stats.mean_ci(v).format(fmt) if v else "—"
                def_rows.append(row)
        curves = {e: {str(nz): stats.mean_ci([r["none"][str(nz)]["recovery"]
                                              for r in res[e]]).to_dict()
                      for nz in cfg.noise_edits} for e in cfg.ranks}
        bars = {d: stats.mean_ci([r[d]["recovery"] for r in rows_b]).to_dict()
                for d in self.defences(cfg)}
        bars["none"] = stats.mean_ci([r["none"][m]["recovery"] for r in rows_b]).to_dict()
        return {"claims": claims,
                "tables": {"Recovery without defence (precision at E)": rec_rows,
                           f"Defences at {m} unrelated edits: recovery and utility cost "
                           "(output changes relative to a typical edit)": def_rows},
                "curves": {str(k): v for k, v in curves.items()}, "bars": bars}

    def report(self, cfg, results, history, outdir):
        fig, (a1, a2) = new_figure(1, 2, figsize=(9.5, 3.4))
        for e, cur in results["curves"].items():
            xs = [int(k) for k in cur]
            est = [stats.Estimate.from_dict(v) for v in cur.values()]
            a1.errorbar([x + 1 for x in xs], [x.mean for x in est],
                        yerr=[x.half_width if np.isfinite(x.half_width) else 0 for x in est],
                        marker="o", capsize=3, label=f"E={e}")
        a1.set_xscale("log")
        a1.set_xlabel("unrelated edits in the observed change (+1)")
        a1.set_ylabel("recovery (precision at E)")
        a1.set_ylim(-0.02, 1.02)
        a1.legend(fontsize=8)
        names = list(results["bars"])
        est = [stats.Estimate.from_dict(results["bars"][n]) for n in names]
        a2.bar(range(len(names)), [x.mean for x in est],
               yerr=[x.half_width if np.isfinite(x.half_width) else 0 for x in est], capsize=3)
        a2.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=7)
        a2.set_ylabel(f"recovery, E={max(cfg.ranks)}")
        a2.set_title(f"defences at {cfg.defence_noise} unrelated edits", fontsize=9)
        img = save_figure(fig, outdir, "kster_recovery.png", "recovery vs noise and defences")
        return results_markdown(
            f"Synthetic keys d={cfg.d}, d_out={cfg.d_out}, {cfg.n_candidates} candidates, "
            f"covariances from {cfg.cov_samples} samples, {cfg.seeds} trials per cell.",
            results, img)


EXPERIMENT = KSTER()
