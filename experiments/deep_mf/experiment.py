"""Gradient descent on four-layer matrix factorisation with a balanced regulariser.

The setting of "global convergence of randomly initialised gradient descent on
four-layer matrix factorization with a balanced regularizer": a rank-``r`` target
``M`` (``n x n``) is fitted by the product ``W4 W3 W2 W1`` of four ``n x n``
factors, by plain gradient descent from a small random Gaussian initialisation on

    f(W) = 1/2 ||W4 W3 W2 W1 - M||_F^2
           + lam/4 * sum_{i=1..3} ||W_{i+1}^T W_{i+1} - W_i W_i^T||_F^2

with ``lam > 0`` (**balanced**) or ``lam = 0`` (**plain**). Without the second
term the imbalances ``W_{i+1}^T W_{i+1} - W_i W_i^T`` are conserved by gradient
flow; the regulariser drives them to zero.

Targets: ``M = U diag(s) V^T`` with Haar-random ``U, V`` and singular values
geometrically spaced from 1 down to ``1 / kappa``, for every rank in ``ranks`` and
condition number in ``kappas``. Each cell is one (method, learning rate, target,
seed): the target and the initialisation depend on the seed only, so the two
methods are paired. The learning rate of each method is chosen on validation
seeds (disjoint from the test seeds) on the hardest target, with the same budget
of validation runs for both methods.

Recorded every ``record_every`` steps: the relative error ``||P - M||_F / ||M||_F``,
the imbalance ``sum_i ||W_{i+1}^T W_{i+1} - W_i W_i^T||_F``, the singular values of
the product ``P`` and of each factor. A *saddle escape* is the step at which the
product's ``k``-th singular value first reaches half the target's ``s_k``.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from experiments import stats
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure

METHODS = ("balanced", "plain")
N_LAYERS = 4
VAL_OFFSET = 1000  # validation seeds are seed + VAL_OFFSET + j: never a test seed
DIVERGED = 1e3


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 10
    n: int = 16                       # target size and width of every factor
    ranks: tuple[int, ...] = (2, 4, 8)
    kappas: tuple[float, ...] = (1.0, 10.0)
    lam: float = 1.0                  # weight of the balance term (``balanced``)
    init_scale: float = 0.1           # factor entries ~ N(0, init_scale^2 / n)
    steps: int = 12000
    record_every: int = 50
    tol: float = 1e-2                 # relative error counted as converged
    lr_grid: tuple[float, ...] = (0.1, 0.2, 0.4)
    lr_budget: int = 5                # validation runs per method
    val_seeds: int = 2

    def __post_init__(self):
        for k in ("seeds", "n", "steps", "record_every", "lr_budget", "val_seeds"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.steps % self.record_every:
            raise ValueError(f"steps={self.steps} must be a multiple of "
                             f"record_every={self.record_every}")
        if not self.ranks or any(not 1 <= r <= self.n for r in self.ranks):
            raise ValueError(f"ranks must lie in [1, n={self.n}], got {self.ranks}")
        if not self.kappas or any(k < 1 for k in self.kappas):
            raise ValueError(f"kappas must be >= 1, got {self.kappas}")
        if self.lam <= 0 or self.init_scale <= 0 or not 0 < self.tol < 1:
            raise ValueError("lam and init_scale must be > 0 and tol in (0, 1)")
        if len(self.lr_grid) < 2 or min(self.lr_grid) <= 0:
            raise ValueError(f"lr_grid needs two or more positive values, got {self.lr_grid}")


def _target(key, n, rank, kappa):
    """``U diag(s) V^T`` with singular values ``geomspace(1, 1/kappa, rank)``, zero-padded."""
    ku, kv = jax.random.split(key)
    u, _ = jnp.linalg.qr(jax.random.normal(ku, (n, n)))
    v, _ = jnp.linalg.qr(jax.random.normal(kv, (n, n)))
    k = jnp.arange(n)
    frac = jnp.where(rank > 1, k / jnp.maximum(rank - 1, 1), 0.0)
    s = jnp.where(k < rank, kappa ** (-frac), 0.0)
    return (u * s) @ v.T, s


def _product(ws):
    p = ws[0]
    for w in ws[1:]:
        p = w @ p
    return p


def _imbalances(ws):
    return [ws[i + 1].T @ ws[i + 1] - ws[i] @ ws[i].T for i in range(len(ws) - 1)]


def objective(ws, m, lam):
    """Fit term plus ``lam / 4`` times the squared imbalances (``ws = (W1, ..., W4)``)."""
    fit = 0.5 * jnp.sum((_product(ws) - m) ** 2)
    bal = sum(jnp.sum(d ** 2) for d in _imbalances(ws))
    return fit + 0.25 * lam * bal


@functools.partial(jax.jit, static_argnames=("n", "steps", "record_every"))
def _trajectory(key, rank, kappa, lam, lr, init_scale, *, n, steps, record_every):
    kt, ki = jax.random.split(key)
    m, s = _target(kt, n, rank, kappa)
    ws = tuple(jax.random.normal(k, (n, n)) * (init_scale / math.sqrt(n))
               for k in jax.random.split(ki, N_LAYERS))
    grad = jax.grad(objective)
    m_norm = jnp.linalg.norm(m)

    def gd(_, ws):
        g = grad(ws, m, lam)
        return tuple(w - lr * gw for w, gw in zip(ws, g, strict=True))

    def record(ws, _):
        ws = jax.lax.fori_loop(0, record_every, gd, ws)
        p = _product(ws)
        rel = jnp.linalg.norm(p - m) / m_norm
        imb = sum(jnp.linalg.norm(d) for d in _imbalances(ws))
        sv_p = jnp.linalg.svd(p, compute_uv=False)
        sv_w = jnp.stack([jnp.linalg.svd(w, compute_uv=False) for w in ws])
        return ws, (rel, imb, sv_p, sv_w)

    _, out = jax.lax.scan(record, ws, None, length=steps // record_every)
    return out + (s,)


def _log_index(n_records, n_points=48):
    """Record indices, roughly log-spaced, always including the first and last."""
    idx = np.unique(np.round(np.geomspace(1, n_records, n_points)).astype(int) - 1)
    return idx


def run_trajectory(cfg, method, lr, rank, kappa, seed, detail=False):
    lam = cfg.lam if method == "balanced" else 0.0
    rel, imb, sv_p, sv_w, s = (np.asarray(a, np.float64) for a in _trajectory(
        jax.random.PRNGKey(seed), rank, float(kappa), lam, float(lr), cfg.init_scale,
        n=cfg.n, steps=cfg.steps, record_every=cfg.record_every))
    steps_at = (np.arange(rel.size) + 1) * cfg.record_every
    finite = bool(np.all(np.isfinite(rel)))

    def first(mask):
        hit = np.flatnonzero(mask)
        return int(steps_at[hit[0]]) if hit.size else None

    out = {
        "finite": finite,
        # a diverged run is kept (and counted) at relative error DIVERGED
        "final_rel_err": float(rel[-1]) if finite else DIVERGED,
        "final_imbalance": float(imb[-1]) if finite else DIVERGED,
        "initial_imbalance": float(imb[0]),
        # first record from which the relative error stays below tol to the end
        "steps_to_tol": first(np.flip(np.cumprod(np.flip(rel < cfg.tol))) > 0),
        # step at which the product's k-th singular value first reaches s_k / 2
        "escapes": [first(sv_p[:, k] >= 0.5 * s[k]) for k in range(rank)],
    }
    idx = _log_index(rel.size)
    out["curve_steps"] = steps_at[idx].tolist()
    out["curve_rel_err"] = np.where(np.isfinite(rel[idx]), rel[idx], 1e9).tolist()
    out["curve_imbalance"] = np.where(np.isfinite(imb[idx]), imb[idx], 1e9).tolist()
    if detail:
        keep = min(cfg.n, rank + 2)
        out["curve_sv_product"] = sv_p[idx, :keep].tolist()
        out["curve_sv_layers"] = sv_w[idx][:, :, :keep].tolist()
        out["target_sv"] = s[:rank].tolist()
    return out


def _round(x):
    """Floats of a nested list to 4 significant digits (plotted curves only)."""
    if isinstance(x, list):
        return [_round(v) for v in x]
    return float(f"{x:.4g}")


def _steps_or_cap(cfg, r):
    """Steps to the tolerance; a run that never reaches it counts as twice the budget."""
    return r["steps_to_tol"] if r["steps_to_tol"] is not None else 2 * cfg.steps


class DeepMF(CellExperiment):
    name = "deep-mf"
    title = "four-layer matrix factorisation by gradient descent, with and without a " \
            "balanced regulariser"
    config_cls = Config
    quick = {"seeds": 2, "ranks": (2, 5), "steps": 6000, "lr_budget": 3, "val_seeds": 1}
    full = {"seeds": 10}
    figures = ("convergence.png", "singular_values.png")
    lead_columns = ("method", "rank", "kappa")

    def expected_cells(self, cfg):
        n_targets = len(cfg.ranks) * len(cfg.kappas)
        return len(METHODS) * (cfg.lr_budget * cfg.val_seeds + cfg.seeds * n_targets)

    def run_cell(self, cfg, cell):
        return run_trajectory(cfg, cell["method"], cell["lr"], cell["rank"], cell["kappa"],
                              cell["seed"], detail=cell.get("detail", False))

    def sweep(self, cfg, cells):
        hard = (max(cfg.ranks), max(cfg.kappas))

        def val_score(method):
            def evaluate(lr):
                runs = [cells(method=method, lr=lr, rank=hard[0], kappa=hard[1],
                              seed=cfg.seed + VAL_OFFSET + j) for j in range(cfg.val_seeds)]
                return float(np.mean([math.log10(_steps_or_cap(cfg, r)) for r in runs]))
            return evaluate

        tuned = stats.tune_methods({m: val_score(m) for m in METHODS},
                                   {m: cfg.lr_grid for m in METHODS},
                                   budget=cfg.lr_budget, maximize=False)
        targets = [(r, k) for r in cfg.ranks for k in cfg.kappas]
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        runs = {m: {t: [cells(method=m, lr=tuned[m].best, rank=t[0], kappa=t[1], seed=s,
                              detail=(s == seeds[0]))
                        for s in seeds] for t in targets} for m in METHODS}

        def per_seed(m, fn, reduce=np.mean):
            return [float(reduce([fn(runs[m][t][i]) for t in targets]))
                    for i in range(len(seeds))]

        worst = per_seed("balanced", lambda r: math.log10(r["final_rel_err"]), np.max)
        c1 = stats.compare(worst, [math.log10(cfg.tol)] * len(seeds), claim="less",
                           quick=cells.quick)
        imb = {m: per_seed(m, lambda r: math.log10(r["final_imbalance"])) for m in METHODS}
        c2 = stats.compare(imb["balanced"], imb["plain"], claim="less", quick=cells.quick)
        spd = {m: per_seed(m, lambda r: math.log2(_steps_or_cap(cfg, r))) for m in METHODS}
        c3 = stats.compare(spd["balanced"], spd["plain"], claim="less", quick=cells.quick)
        claims = [
            stats.claim("with the balance term, GD from random init converges on every target "
                        f"(worst log10 relative error after {cfg.steps} steps below "
                        f"log10 tol = {math.log10(cfg.tol):.0f})",
                        "global convergence from random initialisation in polynomial time "
                        "(main theorem)", c1, names=("balanced", "tol"), fmt=".2f"),
            stats.claim("the balance term drives the factors to balance (log10 final imbalance)",
                        "the regulariser keeps the factors balanced; without it the imbalance "
                        "is conserved", c2, names=("balanced", "plain"), fmt=".2f"),
            stats.claim("the balance term speeds convergence (log2 steps to tol)",
                        "not claimed by the paper (its role is the proof); tested as a "
                        "direction", c3, names=("balanced", "plain"), fmt=".2f"),
        ]

        rows = []
        for t in targets:
            row = {"rank": t[0], "kappa": t[1]}
            for m in METHODS:
                rs = runs[m][t]
                done = [r["steps_to_tol"] for r in rs if r["steps_to_tol"] is not None]
                row[f"{m}: converged"] = f"{len(done)}/{len(rs)}" + "".join(
                    f" ({n_div} diverged)" for n_div in [sum(not r["finite"] for r in rs)]
                    if n_div)
                row[f"{m}: steps to tol"] = (stats.mean_ci(done).format(".0f") if done
                                             else "-")
                row[f"{m}: log10 final rel err"] = stats.mean_ci(
                    [math.log10(r["final_rel_err"]) for r in rs]).format(".2f")
                row[f"{m}: log10 imbalance (start -> end)"] = (
                    f"{np.mean([math.log10(r['initial_imbalance']) for r in rs]):.2f} -> "
                    + stats.mean_ci([math.log10(r["final_imbalance"]) for r in rs]).format(
                        ".2f"))
            rows.append(row)
        esc_rows = []
        for t in targets:
            if t[0] < 2:
                continue
            for m in METHODS:
                rs = runs[m][t]
                times = [[e if e is not None else math.nan for e in r["escapes"]] for r in rs]
                ordered = sum(bool(np.all(np.diff(np.nan_to_num(np.asarray(tt), nan=np.inf))
                                          >= 0)) for tt in times)
                med = np.nanmedian(np.asarray(times, np.float64), axis=0)
                esc_rows.append({"rank": t[0], "kappa": t[1], "method": m,
                                 "median escape step, k = 1..r": ", ".join(
                                     "-" if not np.isfinite(x) else f"{x:.0f}" for x in med),
                                 "escapes in order of s_k": f"{ordered}/{len(rs)}"})
        lr_rows = [{"method": m, "chosen lr": tuned[m].best,
                    "validation log10 steps": round(tuned[m].score, 3),
                    "at grid edge": tuned[m].at_edge,
                    "tried": ", ".join(f"{lr:g}" for lr, _ in tuned[m].tried)}
                   for m in METHODS]
        curves = {}
        for m in METHODS:
            for t in targets:
                cur = np.array([r["curve_rel_err"] for r in runs[m][t]])
                ib = np.array([r["curve_imbalance"] for r in runs[m][t]])
                curves[f"{m}|{t[0]}|{t[1]}"] = {
                    "steps": runs[m][t][0]["curve_steps"],
                    "rel_err": _round(np.exp(np.mean(np.log(cur), 0)).tolist()),
                    "imbalance": _round(np.exp(np.mean(np.log(ib), 0)).tolist())}
        detail = {f"{m}|{t[0]}|{t[1]}": {k: _round(runs[m][t][0][k]) for k in (
            "curve_steps", "curve_sv_product", "curve_sv_layers", "target_sv")}
            for m in METHODS for t in [(max(cfg.ranks), max(cfg.kappas))]}
        return {"claims": claims,
                "tables": {"Convergence per target (test seeds, chosen learning rates)": rows,
                           "Saddle escapes (step at which sigma_k(product) reaches s_k / 2)":
                               esc_rows,
                           "Learning rate chosen on validation seeds (hardest target)":
                               lr_rows},
                "curves": curves, "detail": detail}

    def report(self, cfg, results, history, outdir):
        curves = results["curves"]
        targets = sorted({tuple(k.split("|")[1:]) for k in curves},
                         key=lambda t: (int(t[0]), float(t[1])))
        fig, axes = new_figure(1, 2, figsize=(10, 3.6))
        colors = [f"C{i}" for i in range(len(targets))]
        for (r, k), c in zip(targets, colors, strict=True):
            for m, ls in (("balanced", "-"), ("plain", "--")):
                cur = curves[f"{m}|{r}|{k}"]
                axes[0].loglog(cur["steps"], cur["rel_err"], ls, color=c,
                               label=f"{m}, r={r}, κ={float(k):g}")
                axes[1].loglog(cur["steps"], cur["imbalance"], ls, color=c)
        axes[0].axhline(cfg.tol, color="gray", lw=0.8)
        axes[0].set_xlabel("GD step")
        axes[0].set_ylabel("relative error (geometric mean over seeds)")
        axes[1].set_xlabel("GD step")
        axes[1].set_ylabel("imbalance sum ||W'ᵀW' − WWᵀ||")
        axes[0].legend(fontsize=6, ncol=2)
        axes[0].set_title("solid: balanced, dashed: plain", fontsize=9)
        img = save_figure(fig, outdir, "convergence.png",
                          "relative error and imbalance over GD steps")
        det = results["detail"]
        fig, axes = new_figure(2, N_LAYERS + 1, figsize=(8.5, 3.5), sharex=True)
        for row, m in enumerate(METHODS):
            key = next(k for k in det if k.startswith(m + "|"))
            d = det[key]
            st = d["curve_steps"]
            sp = np.array(d["curve_sv_product"])
            sl = np.array(d["curve_sv_layers"])
            ax = axes[row, 0]
            ax.loglog(st, np.maximum(sp, 1e-6), lw=0.9)
            for s in d["target_sv"]:
                ax.axhline(s, color="gray", lw=0.5, ls=":")
            ax.set_title(f"{m}: product W4W3W2W1", fontsize=8)
            for j in range(N_LAYERS):
                ax = axes[row, j + 1]
                ax.loglog(st, np.maximum(sl[:, j, :], 1e-6), lw=0.9)
                for s in d["target_sv"]:
                    ax.axhline(s ** (1 / N_LAYERS), color="gray", lw=0.5, ls=":")
                ax.set_title(f"{m}: W{j + 1}", fontsize=8)
        for ax in axes[-1]:
            ax.set_xlabel("GD step")
        img += "\n\n" + save_figure(
            fig, outdir, "singular_values.png",
            "singular values of the product and of each factor (first test seed, hardest "
            "target; dotted: s_k and s_k^(1/4))")
        return results_markdown(f"{cfg.seeds} test seeds; intervals are 95% t-intervals over "
                                "seeds.", results, img)


EXPERIMENT = DeepMF()
