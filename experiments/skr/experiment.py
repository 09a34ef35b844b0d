"""SKR: Krylov subspace recycling over a sequence of Darcy-flow systems.

Protocol after "Accelerating Data Generation for Neural Operators via Krylov
Subspace Recycling" (SKR): generating a neural-operator training set means
solving many PDE discretisations whose coefficients differ only in a random
field. Each system is ``-div(kappa grad u) = 1`` on the unit square with zero
Dirichlet data, a 5-point finite-volume discretisation on an ``N x N`` interior
grid (face coefficients the harmonic mean of the two cells), ``kappa = exp(g)``
with ``g`` a smoothed Gaussian random field of standard deviation
``field_std``. The matrices are SPD; every system has the same sparsity pattern
(BCOO with shared indices, so one compilation serves the whole sequence), solved
in float64.

SKR sorts the systems by similarity (a greedy nearest-neighbour chain on the
fields) and solves them in that order with a recycling Krylov solver; the paper
uses GCRO-DR, here ``subjax.linalg.gcro_dr`` (restarted GMRES augmented by a
recycled space of ``k`` harmonic Ritz vectors, basis size ``restart``), next to
its SPD counterpart ``subjax.linalg.recycled_cg`` (deflated CG whose recycled
subspace, the ``k`` smallest Ritz vectors, carries over). Contenders per trial,
same tolerance: independent CG and independent GMRES(``restart``) per system,
recycled CG in generation order and in similarity order, GCRO-DR in similarity
order. Metrics: Krylov iterations (products with ``A``) and wall time per system
(after compilation; the first system of each recycled sequence, which builds the
subspace, included), and per-trial paired speed-ups of each recycling solver over
its independent counterpart.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse as jsparse

import subjax.linalg as sl
from experiments import stats
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure

METHODS = ("cg", "gmres", "recycled cg (generation order)", "recycled cg (sorted)",
           "gcro-dr (sorted)")
#: (recycling solver, its independent counterpart)
PAIRS = (("recycled cg (sorted)", "cg"), ("gcro-dr (sorted)", "gmres"),
         ("gcro-dr (sorted)", "cg"))


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 10              # trials (independent sequences)
    grid: int = 48               # interior grid points per side: n = grid^2 unknowns
    n_systems: int = 40          # systems per sequence
    field_std: float = 1.0       # standard deviation of log kappa
    length_scale: float = 0.1    # correlation length of log kappa (unit square)
    tol: float = 1e-8            # relative residual, every solver (float64)
    k: int = 10                  # recycled dimension (recycled CG and GCRO-DR)
    n_store: int = 40            # search directions kept for the recycled-CG update
    restart: int = 40            # GMRES / GCRO-DR basis size per cycle (recycled included)

    def __post_init__(self):
        if min(self.seeds, self.grid, self.n_systems, self.k, self.n_store) < 1:
            raise ValueError("seeds, grid, n_systems, k and n_store must be >= 1")
        if not self.k < self.restart <= self.grid ** 2:
            raise ValueError("restart must exceed k and not exceed grid^2")
        if self.k + self.n_store > self.grid ** 2:
            raise ValueError("k + n_store must not exceed grid^2")
        if not 0 < self.tol < 1:
            raise ValueError("tol must be in (0, 1)")


def _fields(cfg: Config, trial: int) -> np.ndarray:
    """``(n_systems, grid, grid)`` log-permeability fields (Gaussian-filtered noise)."""
    rng = np.random.default_rng([cfg.seed, trial])
    w = rng.standard_normal((cfg.n_systems, cfg.grid, cfg.grid))
    f = np.fft.fftfreq(cfg.grid, d=1.0 / cfg.grid)
    k2 = f[:, None] ** 2 + f[None, :] ** 2
    filt = np.exp(-2 * (np.pi * cfg.length_scale) ** 2 * k2)
    g = np.real(np.fft.ifft2(np.fft.fft2(w) * filt))
    g -= g.mean(axis=(1, 2), keepdims=True)
    return g * (cfg.field_std / g.std(axis=(1, 2), keepdims=True))


def _pattern(n: int):
    """Row / column indices of the 5-point stencil on an ``n x n`` grid (fixed order)."""
    idx = np.arange(n * n).reshape(n, n)
    rows, cols = [idx.ravel()], [idx.ravel()]
    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        src = idx[max(0, -di): n - max(0, di), max(0, -dj): n - max(0, dj)]
        dst = idx[max(0, di): n - max(0, -di), max(0, dj): n - max(0, -dj)]
        rows.append(src.ravel())
        cols.append(dst.ravel())
    return np.concatenate(rows), np.concatenate(cols)


def _values(kappa: np.ndarray) -> np.ndarray:
    """Matrix entries of ``-div(kappa grad)`` in :func:`_pattern` order (scaled by h^2)."""
    n = kappa.shape[0]
    pad = np.pad(kappa, 1, mode="edge")  # boundary faces use the cell's own kappa
    c = pad[1:-1, 1:-1]
    faces = []
    for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        nb = pad[1 + di: n + 1 + di, 1 + dj: n + 1 + dj]
        faces.append(2 * c * nb / (c + nb))  # harmonic mean
    diag = sum(faces).ravel()
    off = []
    for (di, dj), face in zip(((1, 0), (-1, 0), (0, 1), (0, -1)), faces, strict=True):
        off.append(-face[max(0, -di): n - max(0, di), max(0, -dj): n - max(0, dj)].ravel())
    return np.concatenate([diag] + off)


def _similarity_order(g: np.ndarray) -> list[int]:
    """Greedy nearest-neighbour chain through the fields, starting from the first."""
    flat = g.reshape(len(g), -1)
    d = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    order, left = [0], set(range(1, len(g)))
    while left:
        nxt = min(left, key=lambda j: d[order[-1], j])
        order.append(nxt)
        left.remove(nxt)
    return order


_COMPILED: set = set()


@functools.lru_cache(maxsize=2)
def _solvers(cfg: Config) -> dict:
    """``{name: (first solve, recycled solve or None)}``, jitted once per config (every
    trial has the same shapes, so one compilation serves them all)."""
    cap = 20 * cfg.grid ** 2
    cg = jax.jit(lambda a, b: sl.cg(a, b, tol=cfg.tol, max_iters=cap))
    gmres = jax.jit(lambda a, b: sl.gmres(a, b, restart=cfg.restart, tol=cfg.tol, max_iters=cap))
    first_cg = jax.jit(lambda a, b: sl.recycled_cg(a, b, k=cfg.k, n_store=cfg.n_store,
                                                   tol=cfg.tol, max_iters=cap))
    rec_cg = jax.jit(lambda a, b, w: sl.recycled_cg(a, b, w, n_store=cfg.n_store, tol=cfg.tol,
                                                    max_iters=cap))
    first_gd = jax.jit(lambda a, b: sl.gcro_dr(a, b, k=cfg.k, restart=cfg.restart, tol=cfg.tol,
                                               max_iters=cap))
    rec_gd = jax.jit(lambda a, b, u: sl.gcro_dr(a, b, u, restart=cfg.restart, tol=cfg.tol,
                                                max_iters=cap))
    return {"cg": (cg, None), "gmres": (gmres, None), "recycled cg": (first_cg, rec_cg),
            "gcro-dr": (first_gd, rec_gd)}


def run_cell(cfg: Config, trial: int) -> dict:
    with jax.enable_x64(True):  # float64, as PDE data generation uses
        return _run_cell(cfg, trial)


def _run_cell(cfg: Config, trial: int) -> dict:
    g = _fields(cfg, trial)
    rows, cols = _pattern(cfg.grid)
    indices = jnp.asarray(np.stack([rows, cols], axis=1), jnp.int32)
    n = cfg.grid ** 2
    mats = [jsparse.BCOO((jnp.asarray(_values(np.exp(gi)), jnp.float64), indices),
                         shape=(n, n)) for gi in g]
    b = jnp.ones(n, jnp.float64) / (cfg.grid + 1) ** 2
    solvers = _solvers(cfg)
    cg, gmres = solvers["cg"][0], solvers["gmres"][0]
    first_cg, rec_cg = solvers["recycled cg"]
    first_gd, rec_gd = solvers["gcro-dr"]
    if cfg not in _COMPILED:  # compile outside the timing, once per config
        jax.block_until_ready((cg(mats[0], b), gmres(mats[0], b)))
        jax.block_until_ready(rec_cg(mats[0], b, first_cg(mats[0], b).recycle))
        jax.block_until_ready(rec_gd(mats[0], b, first_gd(mats[0], b).recycle))
        _COMPILED.add(cfg)
    order = _similarity_order(g)

    def run(method):
        iters, conv, w = [], [], None
        first, again = solvers[method.split(" (")[0]]
        sequence = order if method.endswith("(sorted)") else range(len(mats))
        t0 = time.perf_counter()
        for i in sequence:
            if again is None:
                res = first(mats[i], b)
            else:
                res = first(mats[i], b) if w is None else again(mats[i], b, w)
                w = res.recycle
            iters.append(res.n_iters)
            conv.append(res.converged)
        jax.block_until_ready((iters, conv))
        seconds = time.perf_counter() - t0
        return {"iters_per_system": float(np.mean(iters)), "converged": float(np.mean(conv)),
                "ms_per_system": 1e3 * seconds / len(mats)}

    out = {m: run(m) for m in METHODS}
    d = np.linalg.norm((g[1:] - g[:-1]).reshape(len(g) - 1, -1), axis=1)
    ds = np.linalg.norm((g[order[1:]] - g[order[:-1]]).reshape(len(g) - 1, -1), axis=1)
    out["field_step"] = {"generation order": float(d.mean()), "sorted": float(ds.mean())}
    return out


class SKR(CellExperiment):
    name = "skr"
    title = "SKR: Krylov subspace recycling over a sequence of Darcy-flow systems"
    config_cls = Config
    quick = {"seeds": 3, "grid": 24, "n_systems": 10, "k": 8, "n_store": 32, "restart": 32}
    full = {"seeds": 10}
    figures = ("skr_iterations.png",)
    lead_columns = ("method", "iterations / system", "ms / system", "quantity")

    def expected_cells(self, cfg):
        return cfg.seeds

    def run_cell(self, cfg, cell):
        return run_cell(cfg, cell["trial"])

    def sweep(self, cfg, cells):
        rows = [cells(trial=cfg.seed + i) for i in range(cfg.seeds)]

        def col(m, key):
            return [r[m][key] for r in rows]

        claims = []
        paper = "up to 13.9x speed-up over independent solves (GCRO-DR, their PDE data sets)"
        for fast, base in PAIRS[:2]:
            for key, what in (("iters_per_system", "iterations"), ("ms_per_system", "wall time")):
                cmp = stats.compare(col(fast, key), col(base, key), claim="less",
                                    quick=cells.quick)
                claims.append(stats.claim(
                    f"{fast.split(' (')[0]} in similarity order needs less {what} per system "
                    f"than independent {base}", paper, cmp, names=(fast, base), fmt=".1f"))
        cmp = stats.compare(col("recycled cg (sorted)", "iters_per_system"),
                            col("recycled cg (generation order)", "iters_per_system"),
                            claim="less", quick=cells.quick)
        claims.append(stats.claim(
            "sorting the systems by similarity lowers the iterations of recycled CG",
            "sorting is part of SKR (ablation reported as helpful)", cmp,
            names=("sorted", "generation order"), fmt=".1f"))
        table = []
        for m in METHODS:
            table.append({
                "method": m,
                "iterations / system": stats.mean_ci(col(m, "iters_per_system")).format(".1f"),
                "ms / system": stats.mean_ci(col(m, "ms_per_system")).format(".1f"),
                "converged share": stats.mean_ci(col(m, "converged")).format(".2f"),
            })
        summary = []
        for fast, base in PAIRS:
            for key, what in (("ms_per_system", "speed-up, wall time"),
                              ("iters_per_system", "iteration ratio")):
                ratio = [p / q for p, q in zip(col(base, key), col(fast, key), strict=True)]
                summary.append({"quantity": f"{what} ({base} / {fast})",
                                "value": stats.mean_ci(ratio).format(".2f")})
        summary.append({
            "quantity": "mean field distance between consecutive systems, generation order / "
                        "sorted",
            "value": f"{np.mean([r['field_step']['generation order'] for r in rows]):.1f}"
                     f" / {np.mean([r['field_step']['sorted'] for r in rows]):.1f}"})
        bars = {m: stats.mean_ci(col(m, "iters_per_system")).to_dict() for m in METHODS}
        return {"claims": claims,
                "tables": {"Per-system cost (mean and 95% CI over trials)": table,
                           "Paired speed-ups (mean and 95% CI of per-trial ratios)": summary},
                "bars": bars}

    def report(self, cfg, results, history, outdir):
        fig, ax = new_figure(1, 1, figsize=(6.5, 3.2))
        names = list(results["bars"])
        est = [stats.Estimate.from_dict(results["bars"][m]) for m in names]
        ax.bar(range(len(names)), [e.mean for e in est],
               yerr=[e.half_width if np.isfinite(e.half_width) else 0 for e in est], capsize=3)
        ax.set_xticks(range(len(names)), [m.replace(" (", "\n(") for m in names], fontsize=8)
        ax.set_ylabel("Krylov iterations per system")
        img = save_figure(fig, outdir, "skr_iterations.png", "iterations per system")
        return results_markdown(
            f"Darcy flow on a {cfg.grid} x {cfg.grid} grid, {cfg.n_systems} systems per "
            f"sequence, log-permeability std {cfg.field_std}, length {cfg.length_scale}, "
            f"tol {cfg.tol:g}, recycled dimension {cfg.k}, GMRES / GCRO-DR basis "
            f"{cfg.restart}, {cfg.seeds} trials.",
            results, img)


EXPERIMENT = SKR()
