"""GaLore projectors vs Adam on a small transformer LM, then WeLore's rank allocation.

The task and model are those of ``experiments/natural_galore/lm.py``: a sparse
second-order Markov corpus with an exact loss floor, and a pre-norm causal
transformer, here with ``layers = 4`` blocks (24 block matrices).

**Pre-training** (one cell per seed, method, learning rate): ``adam``, and
``subjax.optim.galore`` on the 24 block matrices with the ``svd``, ``subspace``
(warm subspace iteration), ``dct`` and ``random`` projectors, all with the same
moment handling (``align=None``: the Adam moments are carried across a refresh
unrotated, as in the GaLore paper; no projector gets an alignment the others lack).
Each method's learning rate is chosen on the validation loss with the same budget.

**WeLore** (on the Adam model pre-trained at its chosen rate): every block matrix
``W = U S V^T`` is replaced by its rank-``r`` truncation ``(U_r S_r^{1/2})
(S_r^{1/2} V_r^T)`` with ranks from

- ``uniform``: one rank for every matrix;
- ``welore``: one global threshold on the normalised singular values
  ``sigma_i / sigma_1`` (the rule of ``subjax.nn.welore_ranks``), set so that the factors
  hold no more parameters than the uniform ones (equal budget).

Then only the low-rank factors are fine-tuned (the rest frozen) on the same corpus,
with a learning rate chosen on validation for each allocation with the same budget.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import stats
from experiments.harness import (
    CellExperiment,
    claims_table,
    markdown_table,
    new_figure,
    run_cost,
    save_figure,
)
from experiments.natural_galore import lm
from subjax import optim as so

METHODS = ("adam", "svd", "subspace", "dct", "random")
ALLOCATIONS = ("uniform", "welore")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    vocab: int = 32
    support: int = 4
    concentration: float = 0.5
    seq_len: int = 32
    d_model: int = 64
    heads: int = 4
    layers: int = 4
    batch: int = 32
    steps: int = 400            # pre-training steps
    rank: int = 8               # GaLore rank
    refresh_every: int = 50
    lr_grid: tuple[float, ...] = (3e-3, 1e-2)
    budget: int = 3             # validation runs per method (pre-training and fine-tuning)
    tune_seeds: int = 0         # seeds whose learning rates are tuned (0: every seed)
    methods: tuple[str, ...] = METHODS  # pre-training methods run (adam and svd always)
    keep: float = 0.25          # factor parameters / dense block-matrix parameters
    ft_steps: int = 150
    ft_lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    tolerance: float = 0.05     # nats: "matches" means within this of the reference
    n_val: int = 256
    n_test: int = 512

    def __post_init__(self):
        for k in ("seeds", "layers", "batch", "steps", "rank", "refresh_every", "ft_steps",
                  "n_val", "n_test"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not {"adam", "svd"} <= set(self.methods) <= set(METHODS):
            raise ValueError(f"methods must include adam and svd, from {METHODS}; got "
                             f"{self.methods}")
        if not 0 <= self.tune_seeds <= self.seeds:
            raise ValueError(f"tune_seeds must be in 0..seeds={self.seeds}, got "
                             f"{self.tune_seeds}")
        _ = (self.task, self.arch)  # validates them
        if not 0 < self.keep < 1:
            raise ValueError(f"keep must be in (0, 1), got {self.keep}")
        for g in (self.lr_grid, self.ft_lr_grid):
            if len(g) < 2 or not all(v > 0 for v in g):
                raise ValueError("learning-rate grids need at least two positive values")
        if self.budget < max(len(self.lr_grid), len(self.ft_lr_grid)):
            raise ValueError("budget must cover the learning-rate grids")
        if not self.tolerance > 0:
            raise ValueError("tolerance must be > 0")

    @property
    def task(self) -> lm.Task:
        return lm.Task(self.vocab, self.support, self.concentration, self.seq_len)

    @property
    def arch(self) -> lm.Arch:
        return lm.Arch(self.d_model, self.heads, self.layers)


# --------------------------------------------------------------------------- pre-training


def make_optimizer(cfg: Config, method: str, lr):
    if method == "adam":
        return optax.adam(lr)
    return so.galore(lr, rank=cfg.rank, update_proj_gap=cfg.refresh_every, projector=method,
                     weight_dimension_numbers=lm.block_matrix_dims, align=None, seed=0)


@functools.lru_cache(maxsize=8)
def _compiled_pretrain(cfg: Config, method: str):
    def run(params, lr, key, chain):
        return lm.train(cfg.task, cfg.batch, functools.partial(lm.loss, cfg.arch),
                        make_optimizer(cfg, method, lr), params, key, chain, cfg.steps)

    shapes = (lm.param_shapes(cfg.arch, cfg.task), *lm.run_shapes(cfg.task))
    return jax.jit(run).lower(*shapes).compile()


_eval = jax.jit(lm.loss, static_argnums=0)


@functools.lru_cache(maxsize=4)
def _data(cfg: Config, seed: int):
    return lm.splits(cfg.task, seed, cfg.n_val, cfg.n_test)


@functools.lru_cache(maxsize=32)
def _pretrain(cfg: Config, seed: int, method: str, lr: float):
    chain = _data(cfg, seed)[0]
    params = lm.init(cfg.arch, cfg.task, jax.random.key(seed))
    run = _compiled_pretrain(cfg, method)
    t0 = time.perf_counter()
    p, losses = jax.block_until_ready(
        run(params, jnp.float32(lr), jax.random.key(seed + 100), chain))
    return p, np.asarray(losses, np.float64), time.perf_counter() - t0


def state_bytes(cfg: Config, method: str) -> int:
    return lm.state_bytes(make_optimizer(cfg, method, 1e-3), lm.param_shapes(cfg.arch, cfg.task))


def pretrain_cell(cfg: Config, seed: int, method: str, lr: float) -> dict:
    _, val, test, floors = _data(cfg, seed)
    p, losses, seconds = _pretrain(cfg, seed, method, lr)
    k = max(1, cfg.steps // 50)
    return {"val": float(_eval(cfg.arch, p, val)), "test": float(_eval(cfg.arch, p, test)),
            "curve": losses[::k].tolist(), "seconds": seconds, **floors}


# --------------------------------------------------------------------------- WeLore


def _matrices(cfg: Config, params) -> dict[str, np.ndarray]:
    return {f"{i}/{w}": np.asarray(params["blocks"][i][w], np.float64)
            for i in range(cfg.layers) for w in lm.BLOCK_MATRICES}


def allocate(spectra: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]],
             keep: float) -> dict[str, dict[str, int]]:
    """Uniform ranks holding ``keep`` of the dense parameters, and WeLore's ranks (one
    threshold on ``sigma_i / sigma_1`` for every matrix) within the same budget."""
    dense = sum(m * n for m, n in shapes.values())
    per_rank = sum(m + n for m, n in shapes.values())
    r_uniform = max(1, int(keep * dense // per_rank))
    budget = r_uniform * per_rank
    uniform = {k: min(r_uniform, min(shapes[k])) for k in shapes}
    normalized = {k: s / s[0] for k, s in spectra.items()}

    def ranks_at(t):
        return {k: max(1, int(np.sum(v >= t))) for k, v in normalized.items()}

    def cost(r):
        return sum(r[k] * sum(shapes[k]) for k in r)

    # the smallest threshold (most parameters) whose ranks fit the budget
    candidates = np.unique(np.concatenate(list(normalized.values())))
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(ranks_at(candidates[mid])) <= budget:
            hi = mid
        else:
            lo = mid + 1
    welore = ranks_at(candidates[lo])
    return {"uniform": uniform, "welore": welore, "threshold": float(candidates[lo])}


def _factors(cfg: Config, params, ranks: dict[str, int]):
    """Full-width factors ``A (m, N)``, ``B (N, n)`` and column masks of rank ``r``."""
    factors, masks = {}, {}
    for key, w in _matrices(cfg, params).items():
        u, s, vt = np.linalg.svd(w, full_matrices=False)
        root = np.sqrt(s)
        factors[key] = {"a": jnp.asarray(u * root, jnp.float32),
                        "b": jnp.asarray(root[:, None] * vt, jnp.float32)}
        masks[key] = jnp.asarray(np.arange(len(s)) < ranks[key], jnp.float32)
    return factors, masks


def _assemble(cfg: Config, frozen, factors, masks):
    blocks = []
    for i, b in enumerate(frozen["blocks"]):
        b = dict(b)
        for w in lm.BLOCK_MATRICES:
            f, m = factors[f"{i}/{w}"], masks[f"{i}/{w}"]
            b[w] = (f["a"] * m) @ f["b"]
        blocks.append(b)
    return {**frozen, "blocks": blocks}


@functools.lru_cache(maxsize=2)
def _compiled_finetune(cfg: Config):
    def run(factors, frozen, masks, lr, key, chain):
        def loss(f, seqs):
            return lm.loss(cfg.arch, _assemble(cfg, frozen, f, masks), seqs)

        # the masked columns get zero gradients, so Adam leaves them at zero weight
        return lm.train(cfg.task, cfg.batch, loss, optax.adam(lr), factors, key, chain,
                        cfg.ft_steps)

    params = lm.param_shapes(cfg.arch, cfg.task)
    lr, key, chain = lm.run_shapes(cfg.task)
    factors, masks = {}, {}
    for i in range(cfg.layers):
        for w in lm.BLOCK_MATRICES:
            m, n = params["blocks"][i][w].shape
            k = min(m, n)
            factors[f"{i}/{w}"] = {"a": jax.ShapeDtypeStruct((m, k), jnp.float32),
                                   "b": jax.ShapeDtypeStruct((k, n), jnp.float32)}
            masks[f"{i}/{w}"] = jax.ShapeDtypeStruct((k,), jnp.float32)
    return jax.jit(run).lower(factors, params, masks, lr, key, chain).compile()


@functools.lru_cache(maxsize=4)
def _compressed(cfg: Config, seed: int, pre_lr: float):
    p, _, _ = _pretrain(cfg, seed, "adam", pre_lr)
    mats = _matrices(cfg, p)
    spectra = {k: np.linalg.svd(w, compute_uv=False) for k, w in mats.items()}
    alloc = allocate(spectra, {k: w.shape for k, w in mats.items()}, cfg.keep)
    return p, alloc


def welore_cell(cfg: Config, seed: int, pre_lr: float, allocation: str, ft_lr: float) -> dict:
    chain, val, test, _ = _data(cfg, seed)
    p, alloc = _compressed(cfg, seed, pre_lr)
    ranks = alloc[allocation]
    factors, masks = _factors(cfg, p, ranks)
    frozen = p
    before = _assemble(cfg, frozen, factors, masks)
    run = _compiled_finetune(cfg)
    fitted, losses = jax.block_until_ready(
        run(factors, frozen, masks, jnp.float32(ft_lr), jax.random.key(seed + 200), chain))
    after = _assemble(cfg, frozen, fitted, masks)
    mats = _matrices(cfg, p)
    params = sum(ranks[k] * sum(mats[k].shape) for k in ranks)
    return {"dense test": float(_eval(cfg.arch, p, test)),
            "compressed val": float(_eval(cfg.arch, before, val)),
            "compressed test": float(_eval(cfg.arch, before, test)),
            "val": float(_eval(cfg.arch, after, val)),
            "test": float(_eval(cfg.arch, after, test)),
            "ranks": ranks, "factor params": int(params), "threshold": alloc["threshold"],
            "spectra": {k: (np.linalg.svd(w, compute_uv=False) / np.linalg.norm(w, 2)).tolist()
                        for k, w in mats.items()},
            "ft curve": np.asarray(losses)[:: max(1, cfg.ft_steps // 30)].tolist()}


# --------------------------------------------------------------------------- the sweep


def _finite(x) -> float:
    x = float(x)
    return x if np.isfinite(x) else np.inf


def _col(rows, method, metric):
    return [r[method][metric] for r in rows]


class GaLoreWeLore(CellExperiment):
    name = "galore"
    title = "GaLore projectors vs Adam on a 24-matrix transformer LM; WeLore rank allocation"
    config_cls = Config
    quick = {"seeds": 2, "layers": 2, "steps": 120, "batch": 16, "ft_steps": 60,
             "budget": 2, "n_val": 128, "n_test": 256}
    full = {"seeds": 5, "tune_seeds": 1, "methods": METHODS[:4]}
    #: a cell depends on its own seed and rates, not on how many seeds are swept or tuned
    sweep_fields = ("seeds", "tune_seeds", "methods")
    figures = ("galore_pretraining.png", "welore_ranks.png")
    lead_columns = ("method", "test loss", "optimizer state (KiB)", "time per step vs adam",
                    "lr (median)", "lr at grid edge", "allocation", "factor parameters",
                    "ranks min–max (mean over seeds)", "test loss, truncated",
                    "test loss, factors fine-tuned", "ft lr (median)")

    def run_cell(self, cfg, cell):
        if cell["stage"] == "pretrain":
            return pretrain_cell(cfg, cell["seed"], cell["method"], cell["lr"])
        return welore_cell(cfg, cell["seed"], cell["pre_lr"], cell["allocation"],
                           cell["ft_lr"])

    def sweep(self, cfg, cells):
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        n_tuned = cfg.tune_seeds or cfg.seeds

        def choose(s, evaluate, grid, earlier):
            """Tune on seed ``s``'s validation split, or, past the first ``n_tuned``
            seeds, reuse the (lower) median of the rates those seeds chose."""
            if s < cfg.seed + n_tuned:
                t = stats.tune(evaluate, grid, budget=cfg.budget, maximize=False).to_dict()
                return t["best"], t
            rate = sorted(earlier)[(len(earlier) - 1) // 2]
            return rate, {"best": rate, "reused from tuned seeds": sorted(earlier)}

        pre, wel = [], []
        for s in seeds:
            row = {}
            for m in cfg.methods:
                def val(lr, s=s, m=m):
                    return _finite(cells(stage="pretrain", seed=s, method=m, lr=lr)["val"])

                lr, tuning = choose(s, val, cfg.lr_grid, [r[m]["lr"] for r in pre[:n_tuned]])
                tried = [cells(stage="pretrain", seed=s, method=m, lr=v)
                         for v, _ in tuning.get("tried", [(lr, None)])]
                best = cells(stage="pretrain", seed=s, method=m, lr=lr)
                row[m] = {**best, "lr": lr, "tuning": tuning,
                          "seconds": float(np.median([r["seconds"] for r in tried])),
                          "state bytes": state_bytes(cfg, m)}
            pre.append(row)
            wrow = {}
            for a in ALLOCATIONS:
                def fval(lr, s=s, a=a, pre_lr=row["adam"]["lr"]):
                    return _finite(cells(stage="welore", seed=s, pre_lr=pre_lr, allocation=a,
                                         ft_lr=lr)["val"])

                ft_lr, tuning = choose(s, fval, cfg.ft_lr_grid,
                                       [r[a]["ft lr"] for r in wel[:n_tuned]])
                best = cells(stage="welore", seed=s, pre_lr=row["adam"]["lr"], allocation=a,
                             ft_lr=ft_lr)
                wrow[a] = {**best, "ft lr": ft_lr, "tuning": tuning}
            wel.append(wrow)

        q, tol = cells.quick, cfg.tolerance
        claims = []
        for m, ref, text in (
                ("svd", "adam", "GaLore (SVD) trains as well as Adam"),
                ("subspace", "svd", "warm subspace iteration matches the exact SVD projector"),
                ("dct", "svd", "the SVD-free DCT projector matches the SVD projector")):
            if m not in cfg.methods:
                continue
            shifted = [v - tol for v in _col(pre, m, "test")]
            cmp = stats.compare(shifted, _col(pre, ref, "test"), claim="less", quick=q)
            claims.append(stats.claim(
                f"{text}: test loss within {tol} nats ({cfg.steps} steps)",
                "GaLore: comparable perplexity to full-rank Adam in LLaMA pre-training; "
                "DCT / subspace bases: close to GaLore-SVD", cmp,
                names=(f"{m} − {tol}", ref)))
        for key, when in (("compressed test", "after truncation"),
                          ("test", "after fine-tuning the low-rank factors")):
            cmp = stats.compare(_col(wel, "welore", key), _col(wel, "uniform", key),
                                claim="less", quick=q)
            claims.append(stats.claim(
                f"WeLore's rank allocation beats uniform ranks at equal budget ({when})",
                "WeLore: non-uniform ranks from the normalised spectrum beat uniform "
                "rank reduction at 50% compression of LLaMA-2 (perplexity)", cmp,
                names=("welore", "uniform")))

        table = []
        for m in cfg.methods:
            table.append({
                "method": m if m == "adam" else f"galore {m}",
                "test loss": stats.mean_ci(_col(pre, m, "test")).format(),
                "optimizer state (KiB)": round(pre[0][m]["state bytes"] / 1024, 1),
                "time per step vs adam": stats.mean_ci(
                    [r[m]["seconds"] / r["adam"]["seconds"] for r in pre]).format(".2f"),
                "lr (median)": float(np.median(_col(pre, m, "lr"))),
                "lr at grid edge": f"{sum(r[m]['tuning'].get('at_edge', 0) for r in pre)}/"
                                   f"{min(n_tuned, len(pre))} tuned",
            })
        wtable = []
        for a in ALLOCATIONS:
            ranks = np.array([[r[a]["ranks"][k] for k in sorted(r[a]["ranks"])] for r in wel])
            wtable.append({
                "allocation": a,
                "factor parameters": stats.mean_ci(_col(wel, a, "factor params")).format(".0f"),
                "ranks min–max (mean over seeds)": f"{ranks.min(1).mean():.1f}–"
                                                  f"{ranks.max(1).mean():.1f}",
                "test loss, truncated": stats.mean_ci(_col(wel, a, "compressed test")).format(),
                "test loss, factors fine-tuned": stats.mean_ci(_col(wel, a, "test")).format(),
                "ft lr (median)": float(np.median(_col(wel, a, "ft lr"))),
            })
        dense = stats.mean_ci(_col(wel, "uniform", "dense test")).format()
        floors = stats.mean_ci(_col(pre, "adam", "loss floor")).format()
        tables = {
            f"Pre-training, {cfg.steps} steps of batch {cfg.batch} x {cfg.seq_len} tokens, "
            f"GaLore rank {cfg.rank} (loss floor {floors})": table,
            f"WeLore on the Adam model (dense test loss {dense}): factors holding "
            f"{cfg.keep:.0%} of the block-matrix parameters, {cfg.ft_steps} fine-tuning "
            "steps": wtable}
        return {"claims": claims, "tables": tables, "pretrain": pre, "welore": wel}

    def readme_tables(self, summary):
        results = summary.get("results", {})
        parts = [claims_table(results.get("claims") or [])]
        parts += [f"**{t}**\n\n{markdown_table(r, self.table_columns(r))}"
                  for t, r in (results.get("tables") or {}).items()]
        parts.append(run_cost(summary))
        return "\n\n".join(parts)

    def report(self, cfg, results, history, outdir):
        pre, wel = results["pretrain"], results["welore"]
        fig, ax = new_figure(figsize=(5.5, 3.4))
        xs = np.linspace(0, cfg.steps, len(pre[0]["adam"]["curve"]))
        for m in cfg.methods:
            ax.plot(xs, np.mean(_col(pre, m, "curve"), 0),
                    label=m if m == "adam" else f"galore {m}")
        ax.axhline(np.mean(_col(pre, "adam", "first-order floor")), color="gray", ls="--",
                   lw=0.8, label="first-order floor")
        ax.axhline(np.mean(_col(pre, "adam", "loss floor")), color="gray", ls=":", lw=0.8,
                   label="loss floor")
        ax.set_ylim(top=min(2.5, ax.get_ylim()[1]))
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (mean over seeds)")
        ax.legend(fontsize=7)
        img1 = save_figure(fig, outdir, "galore_pretraining.png", "pre-training loss")
        fig2, (a1, a2) = new_figure(1, 2, figsize=(10, 3.4))
        ranks = np.mean([[[r["welore"]["ranks"][f"{i}/{w}"] for w in lm.BLOCK_MATRICES]
                          for i in range(cfg.layers)] for r in wel], 0)
        im = a1.imshow(ranks, cmap="viridis")
        a1.set_xticks(range(len(lm.BLOCK_MATRICES)), lm.BLOCK_MATRICES)
        a1.set_yticks(range(cfg.layers), [f"block {i}" for i in range(cfg.layers)])
        a1.set_title(f"WeLore ranks at equal budget (uniform: "
                     f"{wel[0]['uniform']['ranks']['0/wq']})", fontsize=9)
        fig2.colorbar(im, ax=a1)
        for w, color in zip(lm.BLOCK_MATRICES, [f"C{i}" for i in range(6)], strict=True):
            for i in range(cfg.layers):
                a2.semilogy(wel[0]["welore"]["spectra"][f"{i}/{w}"], color=color, lw=0.8,
                            label=w if i == 0 else None)
        a2.set_xlabel("index")
        a2.set_ylabel("sigma_i / sigma_1 (first seed)")
        a2.legend(fontsize=7)
        img2 = save_figure(fig2, outdir, "welore_ranks.png", "WeLore ranks and spectra")
        parts = [f"{cfg.seeds} seeds; intervals are 95% t-intervals over seeds.",
                 claims_table(results["claims"])]
        parts += [f"**{t}**\n\n{markdown_table(r, self.table_columns(r))}"
                  for t, r in results["tables"].items()]
        parts += [img1, img2]
        return "\n\n".join(parts) + "\n"


EXPERIMENT = GaLoreWeLore()
