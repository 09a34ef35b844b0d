"""Sub-MoE: merging the experts of a small mixture of experts in their joint subspace.

One cell = one seed. A synthetic multi-task problem (``n_tasks`` classification
tasks in families of two related tasks) is drawn, and a top-2 mixture-of-experts
network is trained on it. Its ``n_experts`` experts are then reduced by 25% and 50%
without retraining:

- ``sub-moe``: experts are clustered by the cosine similarity of their outputs on
  calibration inputs (average-linkage agglomerative clustering); each cluster is
  merged with ``subjax.fisher.subspace_merge`` (joint SVD of the concatenated expert
  weights, shared ``U``, router-frequency-weighted average of the ``V_i``), at a
  rank fraction chosen on the validation set;
- ``average``: the same clusters, merged by the router-frequency-weighted parameter
  average (``subjax.fisher.average``);
- ``drop``: the least-used experts are removed and the router chooses among the rest.

A merged expert receives the gate weights of every expert of its cluster (the router
is unchanged). Reported: test accuracy and accuracy retained (compressed / original).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.cluster import hierarchy
from scipy.spatial.distance import squareform

from experiments import stats
from experiments.harness import SeedSweep, new_figure, results_markdown, run_cost, save_figure
from subjax import fisher

METHODS = ("sub-moe", "average", "drop")
COLUMNS = ["experts kept", "method", "test acc", "retained", "rank fraction (val)"]
KERNELS = ("w1", "w2")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    n_tasks: int = 8
    n_features: int = 16
    n_classes: int = 4
    task_noise: float = 0.4        # how far the two tasks of a family differ
    d_model: int = 32
    d_expert: int = 64
    n_experts: int = 8
    top_k: int = 2
    balance: float = 0.01          # weight of the load-balancing loss
    lr: float = 2e-3
    steps: int = 3000
    batch: int = 256
    n_calib: int = 1024
    n_val: int = 2048
    n_test: int = 4096
    reductions: tuple[float, ...] = (0.25, 0.5)
    rank_grid: tuple[float, ...] = (0.25, 0.5, 0.75)
    budget: int = 5

    def __post_init__(self):
        for k in ("seeds", "n_tasks", "n_features", "d_model", "d_expert", "steps", "batch",
                  "n_calib", "n_val", "n_test"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.n_classes < 2 or self.n_tasks % 2:
            raise ValueError("n_classes must be >= 2 and n_tasks even (families of two)")
        if not 1 <= self.top_k < self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts), got {self.top_k}")
        if not all(0 < r < 1 for r in self.reductions):
            raise ValueError(f"reductions must be in (0, 1), got {self.reductions}")
        for r in self.reductions:
            if round(self.n_experts * (1 - r)) < self.top_k:
                raise ValueError("every reduction must keep at least top_k experts")
        if len(self.rank_grid) < 2 or not all(0 < f <= 1 for f in self.rank_grid):
            raise ValueError("rank_grid needs at least two fractions in (0, 1]")
        if self.budget < len(self.rank_grid):
            raise ValueError("budget must cover the rank grid")
        if not self.lr > 0 or self.balance < 0 or self.task_noise < 0:
            raise ValueError("lr must be > 0; balance and task_noise >= 0")


# --------------------------------------------------------------------------- data


def make_tasks(cfg: Config, rng: np.random.Generator) -> dict:
    """Families of two tasks: shared feature map, class map perturbed per task."""
    fam = cfg.n_tasks // 2
    f, c = cfg.n_features, cfg.n_classes
    b = rng.standard_normal((fam, f, f)) / np.sqrt(f)
    a = rng.standard_normal((fam, f, c))
    task_b = np.repeat(b, 2, axis=0)
    task_a = np.repeat(a, 2, axis=0) + cfg.task_noise * rng.standard_normal((cfg.n_tasks, f, c))
    return {"a": task_a.astype(np.float32), "b": (2.0 * task_b).astype(np.float32)}


def sample(cfg: Config, tasks: dict, rng: np.random.Generator, n: int):
    t = rng.integers(0, cfg.n_tasks, n)
    x = rng.standard_normal((n, cfg.n_features)).astype(np.float32)
    feats = np.tanh(np.einsum("nf,nfg->ng", x, tasks["b"][t]))
    y = np.argmax(np.einsum("ng,ngc->nc", feats, tasks["a"][t]), -1).astype(np.int32)
    inp = np.concatenate([x, np.eye(cfg.n_tasks, dtype=np.float32)[t]], axis=1)
    return jnp.asarray(inp), jnp.asarray(y)


# --------------------------------------------------------------------------- model


def init(cfg: Config, key) -> dict:
    ks = jax.random.split(key, 6)
    d, h, e = cfg.d_model, cfg.d_expert, cfg.n_experts
    n_in = cfg.n_features + cfg.n_tasks
    return {
        "emb": jax.random.normal(ks[0], (n_in, d)) / np.sqrt(n_in),
        "router": jax.random.normal(ks[1], (d, e)) * 0.01,
        "experts": {"w1": jax.random.normal(ks[2], (e, d, h)) / np.sqrt(d),
                    "b1": jnp.zeros((e, h)),
                    "w2": jax.random.normal(ks[3], (e, h, d)) / np.sqrt(h),
                    "b2": jnp.zeros((e, d))},
        "head": jax.random.normal(ks[4], (d, cfg.n_classes)) / np.sqrt(d),
    }


def _experts_out(experts, h):
    """``(n, E, d)``: every expert applied to every token."""
    z = jax.nn.relu(jnp.einsum("nd,edh->neh", h, experts["w1"]) + experts["b1"])
    return jnp.einsum("neh,ehd->ned", z, experts["w2"]) + experts["b2"]


def _gates(logits, top_k, mask=None):
    """Top-k softmax gates over the router logits (renormalised over the chosen k)."""
    if mask is not None:
        logits = jnp.where(mask, logits, -jnp.inf)
    top, _ = jax.lax.top_k(logits, top_k)
    keep = logits >= top[:, -1:]
    w = jnp.where(keep, jnp.exp(logits - top[:, :1]), 0.0)
    return w / jnp.sum(w, -1, keepdims=True)


def forward(params, x, top_k, assign=None, mask=None):
    """Logits and the (n, E) gates. ``assign`` maps each original expert to the compressed
    expert that takes its gate weight (the router stays unchanged)."""
    h = x @ params["emb"]
    gates = _gates(h @ params["router"], top_k, mask)
    g = gates if assign is None else gates @ assign
    out = h + jnp.einsum("ne,ned->nd", g, _experts_out(params["experts"], h))
    return out @ params["head"], gates


@jax.jit(static_argnames=("cfg",))
def train(cfg: Config, params, key, tasks):
    opt = optax.adam(cfg.lr)

    def loss(p, x, y):
        logits, gates = forward(p, x, cfg.top_k)
        nll = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        h = x @ p["emb"]
        probs = jax.nn.softmax(h @ p["router"], -1)
        frac = jnp.mean(gates > 0, 0) / cfg.top_k
        return nll + cfg.balance * cfg.n_experts * jnp.sum(frac * jnp.mean(probs, 0))

    def draw(k):
        kt, kx = jax.random.split(k)
        t = jax.random.randint(kt, (cfg.batch,), 0, cfg.n_tasks)
        x = jax.random.normal(kx, (cfg.batch, cfg.n_features))
        feats = jnp.tanh(jnp.einsum("nf,nfg->ng", x, tasks["b"][t]))
        y = jnp.argmax(jnp.einsum("ng,ngc->nc", feats, tasks["a"][t]), -1)
        return jnp.concatenate([x, jax.nn.one_hot(t, cfg.n_tasks)], 1), y

    def body(carry, k):
        p, s = carry
        x, y = draw(k)
        u, s = opt.update(jax.grad(loss)(p, x, y), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (params, opt.init(params)), jax.random.split(key, cfg.steps))
    return p


@jax.jit(static_argnames=("top_k",))
def _accuracy(params, x, y, top_k, assign=None, mask=None):
    logits, _ = forward(params, x, top_k, assign, mask)
    return jnp.mean(jnp.argmax(logits, -1) == y)


# --------------------------------------------------------------------------- compression


def cluster_experts(params, x_calib, n_clusters: int) -> np.ndarray:
    """Cluster label per expert from the cosine similarity of their calibration outputs."""
    h = x_calib @ params["emb"]
    out = np.asarray(_experts_out(params["experts"], h)).transpose(1, 0, 2)
    flat = out.reshape(out.shape[0], -1)
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    dist = np.clip(1.0 - flat @ flat.T, 0.0, None)
    np.fill_diagonal(dist, 0.0)
    tree = hierarchy.linkage(squareform(dist, checks=False), method="average")
    labels = hierarchy.fcluster(tree, n_clusters, criterion="maxclust") - 1
    if len(set(labels)) != n_clusters:  # ties: cut the dendrogram by merge count instead
        labels = hierarchy.cut_tree(tree, n_clusters=n_clusters).ravel()
    return np.asarray(labels)


def merge_experts(params, labels, freq, method: str, rank_frac: float = 1.0):
    """Compressed expert stack (one expert per cluster) and the assignment matrix."""
    n_clusters = int(labels.max()) + 1
    experts = params["experts"]
    merged = {k: [] for k in experts}
    for c in range(n_clusters):
        idx = np.flatnonzero(labels == c)
        w = jnp.asarray(freq[idx] + 1e-6)
        members = [jax.tree.map(lambda a, i=i: a[i], experts) for i in idx]
        avg = fisher.average(members, weights=w)
        for k in experts:
            if method == "sub-moe" and k in KERNELS:
                # share the output space: (out, in) matrices, joint basis over outputs
                mats = jnp.swapaxes(experts[k][idx], 1, 2)
                full = min(mats.shape[1], mats.shape[0] * mats.shape[2])
                rank = max(1, int(round(rank_frac * full)))
                merged[k].append(fisher.subspace_merge(mats, rank, w).T)
            else:
                merged[k].append(avg[k])
    new = dict(params)
    new["experts"] = {k: jnp.stack(v) for k, v in merged.items()}
    assign = jnp.asarray(np.eye(n_clusters, dtype=np.float32)[labels])
    return new, assign


def run_seed(cfg: Config, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tasks = make_tasks(cfg, rng)
    calib, val, test = (sample(cfg, tasks, rng, n) for n in (cfg.n_calib, cfg.n_val, cfg.n_test))
    params = train(cfg, init(cfg, jax.random.key(seed)), jax.random.key(seed + 10_000),
                   {k: jnp.asarray(v) for k, v in tasks.items()})
    _, gates = forward(params, calib[0], cfg.top_k)
    freq = np.asarray(jnp.mean(gates > 0, 0))
    base = {s: float(_accuracy(params, *d, cfg.top_k)) for s, d in (("val", val), ("test", test))}
    row = {"seed": seed, "original": base, "usage": freq.tolist(), "reductions": {}}
    for red in cfg.reductions:
        keep = int(round(cfg.n_experts * (1 - red)))
        labels = cluster_experts(params, calib[0], keep)
        res = {"clusters": labels.tolist()}

        def score(method, frac, data, labels=labels):
            p, assign = merge_experts(params, labels, freq, method, frac)
            return float(_accuracy(p, *data, cfg.top_k, assign))

        tuned = stats.tune(lambda f: score("sub-moe", f, val), cfg.rank_grid,
                           budget=cfg.budget, spacing="linear", bounds=(None, 1.0))
        res["sub-moe"] = {"val": tuned.score, "test": score("sub-moe", tuned.best, test),
                          "rank fraction": tuned.best, "tuning": tuned.to_dict()}
        res["average"] = {"val": score("average", 1.0, val), "test": score("average", 1.0, test)}
        mask = np.zeros(cfg.n_experts, bool)
        mask[np.argsort(-freq, kind="stable")[:keep]] = True
        res["drop"] = {s: float(_accuracy(params, *d, cfg.top_k, None, jnp.asarray(mask)))
                       for s, d in (("val", val), ("test", test))}
        for m in METHODS:
            res[m]["retained"] = res[m]["test"] / base["test"]
        row["reductions"][str(red)] = res
    return row


def _col(rows, red, method, metric="retained"):
    return [r["reductions"][str(red)][method][metric] for r in rows]


def _pct(r):
    return f"{round(100 * r)}%"


class SubMoE(SeedSweep):
    name = "submoe"
    title = "Sub-MoE: joint-SVD expert merging vs averaging vs dropping (Li et al. 2025)"
    config_cls = Config
    quick = {"seeds": 3, "n_val": 1024, "n_test": 2048}
    full = {"seeds": 5}
    figures = ("submoe.png",)

    lead_columns = tuple(COLUMNS)
    run_seed = staticmethod(run_seed)

    def sweep(self, cfg, cells):
        rows = self.seed_rows(cfg, cells)
        claims = []
        paper = {0.25: "96%", 0.5: "86%"}
        for red in cfg.reductions:
            for foil in ("average", "drop"):
                cmp = stats.compare(_col(rows, red, "sub-moe"), _col(rows, red, foil),
                                    quick=cells.quick)
                claims.append(stats.claim(
                    f"{_pct(red)} fewer experts: Sub-MoE retains more accuracy than {foil}",
                    f"Sub-MoE retains {paper.get(red, '?')} of Mixtral-8x7B zero-shot accuracy "
                    f"at {_pct(red)} expert reduction, above merging / pruning baselines",
                    cmp, names=("Sub-MoE", foil)))
        table = [{"experts kept": cfg.n_experts, "method": "original",
                  "test acc": stats.mean_ci([r["original"]["test"] for r in rows]).format(),
                  "retained": "1", "rank fraction (val)": ""}]
        for red in cfg.reductions:
            for m in METHODS:
                frac = (stats.mean_ci(_col(rows, red, m, "rank fraction")).format(".2f")
                        if m == "sub-moe" else "")
                table.append({"experts kept": int(round(cfg.n_experts * (1 - red))),
                              "method": m,
                              "test acc": stats.mean_ci(_col(rows, red, m, "test")).format(),
                              "retained": stats.mean_ci(_col(rows, red, m)).format(),
                              "rank fraction (val)": frac})
        edge = sum(r["reductions"][str(red)]["sub-moe"]["tuning"]["at_edge"]
                   for r in rows for red in cfg.reductions)
        tables = {"Accuracy after compression, no retraining (mean ± 95% CI over seeds)": table}
        return {"claims": claims, "tables": tables, "rank_at_edge": edge, "per_seed": rows}

    def readme_tables(self, summary):
        results = summary.get("results", {})
        note = (f"Sub-MoE's validated rank fraction was at the edge of its grid in "
                f"{results.get('rank_at_edge')} of the tunings.")
        return results_markdown("", results, note, run_cost(summary),
                                columns=self.table_columns).strip()

    def report(self, cfg, results, history, outdir):
        rows = results["per_seed"]
        fig, ax = new_figure(figsize=(5.2, 3.4))
        width = 0.25
        for j, m in enumerate(METHODS):
            ests = [stats.mean_ci(_col(rows, red, m)) for red in cfg.reductions]
            xs = np.arange(len(cfg.reductions)) + (j - 1) * width
            ax.bar(xs, [e.mean for e in ests], width,
                   yerr=[e.half_width if e.n > 1 else 0 for e in ests], capsize=3, label=m)
        ax.set_xticks(range(len(cfg.reductions)),
                      [f"{_pct(r)} fewer experts" for r in cfg.reductions])
        ax.set_ylabel("accuracy retained (mean, 95% CI)")
        lo = min(min(_col(rows, red, m)) for red in cfg.reductions for m in METHODS)
        ax.set_ylim(max(0.0, lo - 0.05), 1.02)
        ax.legend(fontsize=7)
        img = save_figure(fig, outdir, "submoe.png", "accuracy retained after expert reduction")
        return results_markdown(
            f"{cfg.seeds} seeds; intervals are 95% t-intervals over seeds. Sub-MoE rank "
            f"fraction at the edge of its grid in {results['rank_at_edge']} of "
            f"{len(rows) * len(cfg.reductions)} tunings.", results, img,
            columns=self.table_columns)


EXPERIMENT = SubMoE()
