"""Maestro's ordered dropout on factorised layers (Horváth et al., ICML 2024), small scale.

Three settings, each trained with ordered dropout (``od``: at every step keep the
first ``k`` components, ``k`` uniform in ``{1, ..., r}``, via
:class:`subjax.nn.OrderedDropoutLinear`) and without it (``plain``: all ``r`` kept):

- **svd**: fit a linear map ``y = x A^T`` (``A`` of size ``out x in`` with known,
  distinct singular values) on inputs uniform in ``[-1, 1]^in`` (isotropic
  covariance). With ordered dropout the best layer is, for every ``k``, the best
  rank-``k`` approximation, so component ``i`` of the factors must point along
  the ``i``-th singular vectors: we measure the angle between ``U[:, i]`` and the
  ``i``-th right singular vector and between ``V[i, :]`` and the ``i``-th left one;
- **pca**: a linear autoencoder ``x -> x U V`` on centred digits: component ``i``
  must point along the ``i``-th principal axis of the training split (the encoder's
  columns are compared within the range of the data: along pixels that never vary
  they keep their initial values);
- **mlp**: a 64-``hidden``-10 ReLU MLP on digits whose first layer is factorised
  (rank ``r``); after training the layer is truncated to ``k`` components (the
  footprint) and the test accuracy measured. The foils are the same factorised
  layer trained without ordered dropout (truncated the same way), and a dense
  first layer truncated by its SVD after training.

Learning rates of the MLPs are chosen on the validation split, the same budget for
each method; test accuracy is read once at the chosen values.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import subjax.nn as snn
from experiments import stats
from experiments.data import digits
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure

MLP_METHODS = ("od", "plain", "dense+svd")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    svd_in: int = 16
    svd_out: int = 12
    svd_rank: int = 8
    svd_samples: int = 2048
    pca_rank: int = 8
    linear_steps: int = 3000
    linear_lr: float = 1e-2
    hidden: int = 128
    mlp_rank: int = 32
    mlp_steps: int = 800
    keeps: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    claim_keep: int = 4
    lr_grid: tuple[float, ...] = (3e-3, 1e-2, 3e-2)
    lr_budget: int = 5

    def __post_init__(self):
        for k in ("seeds", "svd_in", "svd_out", "svd_rank", "svd_samples", "pca_rank",
                  "linear_steps", "hidden", "mlp_rank", "mlp_steps", "lr_budget"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.svd_rank > min(self.svd_in, self.svd_out):
            raise ValueError("svd_rank must be <= min(svd_in, svd_out)")
        if any(not 1 <= k <= self.mlp_rank for k in self.keeps) or \
                self.claim_keep not in self.keeps:
            raise ValueError("keeps must lie in [1, mlp_rank] and contain claim_keep")


def _fit(model, loss_fn, steps, lr, seed, ordered):
    """Full-batch Adam for ``steps`` steps in one compiled loop; ``loss_fn(model, rngs)``
    gets ``rngs`` None when not ordered. Updates ``model`` in place; returns the last loss."""
    opt = nnx.Optimizer(model, optax.adam(lr), wrt=nnx.Param)
    graph, state = nnx.split((model, opt))

    @jax.jit
    def run(state):
        def body(i, carry):
            state, _ = carry
            m, o = nnx.merge(graph, state)

            def loss(m):
                rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(seed), i)) \
                    if ordered else None
                return loss_fn(m, rngs)

            val, g = nnx.value_and_grad(loss)(m)
            o.update(m, g)
            return nnx.state((m, o)), val

        return jax.lax.fori_loop(0, steps, body, (state, jnp.zeros(())))

    state, last = run(state)
    nnx.update((model, opt), state)
    return float(last)


def _angles(a, b):
    """Angle in degrees between matching columns of ``a`` and ``b`` (sign-free)."""
    a = a / np.linalg.norm(a, axis=0, keepdims=True)
    b = b / np.linalg.norm(b, axis=0, keepdims=True)
    cos = np.clip(np.abs(np.sum(a * b, 0)), 0.0, 1.0)
    return np.degrees(np.arccos(cos)).tolist()


def run_svd(cfg, method, seed):
    key = jax.random.key(seed)
    k1, k2, k3 = jax.random.split(key, 3)
    left, _ = jnp.linalg.qr(jax.random.normal(k1, (cfg.svd_out, cfg.svd_out)))
    right, _ = jnp.linalg.qr(jax.random.normal(k2, (cfg.svd_in, cfg.svd_in)))
    n_sv = min(cfg.svd_in, cfg.svd_out)
    s = jnp.geomspace(4.0, 0.25, n_sv)
    a = (left[:, :n_sv] * s) @ right[:, :n_sv].T                   # (out, in)
    x = jax.random.uniform(k3, (cfg.svd_samples, cfg.svd_in), minval=-1.0, maxval=1.0)
    y = x @ a.T
    layer = snn.OrderedDropoutLinear(cfg.svd_in, cfg.svd_out, rank=cfg.svd_rank,
                                     use_bias=False, rngs=nnx.Rngs(seed))
    _fit(layer, lambda m, r: jnp.mean(jnp.sum((m(x, rngs=r) - y) ** 2, -1)),
         cfg.linear_steps, cfg.linear_lr, seed, method == "od")
    u, v = np.asarray(layer.u[...]), np.asarray(layer.v[...])
    r = cfg.svd_rank
    best = [float(jnp.sqrt(jnp.sum(s[k:] ** 2))) for k in range(1, r + 1)]
    trunc = [float(jnp.linalg.norm(layer.kernel(k).T - a)) for k in range(1, r + 1)]
    return {"angle_in": _angles(u, np.asarray(right[:, :r])),
            "angle_out": _angles(v.T, np.asarray(left[:, :r])),
            "trunc_err_ratio": [t / b for t, b in zip(trunc, best, strict=True)]}


def run_pca(cfg, method, seed):
    data = digits(seed)
    x = data.train.x - data.train.x.mean(0)
    evals, evecs_all = np.linalg.eigh(np.cov(x.T))
    order = np.argsort(evals)[::-1]
    evecs = evecs_all[:, order[: cfg.pca_rank]]
    # pixels that never vary leave the encoder's components along them untouched by
    # training (they do not change the loss): compare within the data's range
    span = evecs_all[:, evals > 1e-8 * evals.max()]
    xj = jnp.asarray(x)
    layer = snn.OrderedDropoutLinear(64, 64, rank=cfg.pca_rank, use_bias=False,
                                     rngs=nnx.Rngs(seed))
    _fit(layer, lambda m, r: jnp.mean(jnp.sum((m(xj, rngs=r) - xj) ** 2, -1)),
         cfg.linear_steps, cfg.linear_lr, seed, method == "od")
    return {"angle_in": _angles(span @ (span.T @ np.asarray(layer.u[...])), evecs),
            "angle_out": _angles(np.asarray(layer.v[...]).T, evecs)}


class _MLP(nnx.Module):
    def __init__(self, cfg, factorised, rngs):
        if factorised:
            self.first = snn.OrderedDropoutLinear(64, cfg.hidden, rank=cfg.mlp_rank, rngs=rngs)
        else:
            self.first = nnx.Linear(64, cfg.hidden, rngs=rngs)
        self.head = nnx.Linear(cfg.hidden, 10, rngs=rngs)

    def __call__(self, x, rngs=None, keep=None):
        if isinstance(self.first, snn.OrderedDropoutLinear):
            h = self.first(x, rngs=rngs, keep=keep)
        else:
            h = self.first(x)
        return self.head(jax.nn.relu(h))


def _accuracy(logits, y):
    return float(jnp.mean(jnp.argmax(logits, -1) == y))


def _svd_truncated(model, x, k):
    """Dense first layer replaced by its rank-``k`` SVD truncation."""
    w = model.first.kernel[...]
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    wk = (u[:, :k] * s[:k]) @ vt[:k]
    h = jax.nn.relu(x @ wk + model.first.bias[...])
    return model.head(h)


def run_mlp(cfg, method, lr, seed, split):
    data = digits(seed)
    xtr, ytr = jnp.asarray(data.train.x), jnp.asarray(data.train.y)
    ev = data.val if split == "val" else data.test
    xe, ye = jnp.asarray(ev.x), jnp.asarray(ev.y)
    model = _MLP(cfg, method != "dense+svd", nnx.Rngs(seed))

    def loss(m, r):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(m(xtr, rngs=r), ytr))

    _fit(model, loss, cfg.mlp_steps, lr, seed, method == "od")
    acc = {}
    for k in cfg.keeps:
        logits = _svd_truncated(model, xe, k) if method == "dense+svd" else model(xe, keep=k)
        acc[str(k)] = _accuracy(logits, ye)
    full = model(xe)
    return {"acc": acc, "acc_full": _accuracy(full, ye)}


def footprint(cfg, k):
    """Parameters of the first layer kept at rank ``k`` (factors plus bias)."""
    return k * (64 + cfg.hidden) + cfg.hidden


class Maestro(CellExperiment):
    name = "maestro"
    title = "Maestro: ordered dropout recovers SVD / PCA order and enables rank pruning " \
            "(Horváth et al. 2024)"
    config_cls = Config
    quick = {"seeds": 2, "linear_steps": 1500, "mlp_steps": 400, "lr_budget": 3}
    full = {"seeds": 5}
    figures = ("angles.png", "pruning.png")

    def expected_cells(self, cfg):
        return 4 * cfg.seeds + len(MLP_METHODS) * (cfg.lr_budget + cfg.seeds)

    def run_cell(self, cfg, cell):
        if cell["part"] == "svd":
            return run_svd(cfg, cell["method"], cell["seed"])
        if cell["part"] == "pca":
            return run_pca(cfg, cell["method"], cell["seed"])
        return run_mlp(cfg, cell["method"], cell["lr"], cell["seed"], cell["split"])

    def sweep(self, cfg, cells):
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        q = cells.quick
        lin = {p: {m: [cells(part=p, method=m, seed=s) for s in seeds] for m in ("od", "plain")}
               for p in ("svd", "pca")}

        def mean_angle(p, m):
            return [float(np.mean(r["angle_in"] + r["angle_out"])) for r in lin[p][m]]

        def evaluate(m):
            return lambda lr: cells(part="mlp", method=m, lr=lr, seed=cfg.seed,
                                    split="val")["acc_full"]

        tuned = stats.tune_methods({m: evaluate(m) for m in MLP_METHODS},
                                   {m: cfg.lr_grid for m in MLP_METHODS}, budget=cfg.lr_budget)
        mlp = {m: [cells(part="mlp", method=m, lr=tuned[m].best, seed=s, split="test")
                   for s in seeds] for m in MLP_METHODS}
        kc = str(cfg.claim_keep)
        claims = [
            stats.claim("ordered dropout aligns the components of a factorised linear map with "
                        "its singular vectors, in order (mean angle, degrees)",
                        "OD recovers the SVD of a linear map on uniform data (Sec. 5.1)",
                        stats.compare(mean_angle("svd", "od"), mean_angle("svd", "plain"),
                                      claim="less", quick=q),
                        names=("OD", "plain"), fmt=".1f"),
            stats.claim("ordered dropout makes a linear autoencoder recover the principal axes "
                        "in order (mean angle, degrees)",
                        "OD recovers PCA with a linear autoencoder (Sec. 5.1)",
                        stats.compare(mean_angle("pca", "od"), mean_angle("pca", "plain"),
                                      claim="less", quick=q),
                        names=("OD", "plain"), fmt=".1f"),
            stats.claim(f"pruned to rank {cfg.claim_keep} of {cfg.mlp_rank}, the OD-trained "
                        "layer is more accurate than a dense layer truncated by SVD",
                        "Maestro's low-rank models beat post-hoc SVD pruning at equal "
                        "footprint (Sec. 5.2)",
                        stats.compare([r["acc"][kc] for r in mlp["od"]],
                                      [r["acc"][kc] for r in mlp["dense+svd"]], quick=q),
                        names=("OD", "SVD"), fmt=".3f"),
        ]
        angle_rows = []
        for p in ("svd", "pca"):
            for m in ("od", "plain"):
                rs = lin[p][m]
                n_comp = len(rs[0]["angle_in"])
                angle_rows.append({
                    "setting": p, "method": m,
                    **{f"angle {i + 1}": stats.mean_ci([r["angle_in"][i] for r in rs]).format(
                        ".1f") for i in range(n_comp)}})
        prune_rows = []
        for k in cfg.keeps:
            row = {"kept rank": k, "first-layer parameters": footprint(cfg, k)}
            for m in MLP_METHODS:
                row[m] = stats.mean_ci([r["acc"][str(k)] for r in mlp[m]]).format()
            prune_rows.append(row)
        lr_rows = [{"method": m, "chosen lr": tuned[m].best, "val acc": round(tuned[m].score, 4),
                    "at grid edge": tuned[m].at_edge} for m in MLP_METHODS]
        curves = {p: {m: {"in": np.mean([r["angle_in"] for r in lin[p][m]], 0).tolist(),
                          "out": np.mean([r["angle_out"] for r in lin[p][m]], 0).tolist()}
                      for m in ("od", "plain")} for p in ("svd", "pca")}
        prune = {m: {str(k): [r["acc"][str(k)] for r in mlp[m]] for k in cfg.keeps}
                 for m in MLP_METHODS}
        return {"claims": claims,
                "tables": {"Angle (degrees) between component i of U and the i-th singular "
                           "vector / principal axis": angle_rows,
                           "Digits MLP: test accuracy after pruning the first layer to rank k":
                               prune_rows,
                           "MLP learning rate chosen on validation (full rank)": lr_rows},
                "curves": curves, "prune": prune}

    lead_columns = ("setting", "method", "kept rank", "first-layer parameters")

    def table_columns(self, rows):
        """The lead columns, the others, then the angle columns by their index."""
        return sorted(super().table_columns(rows), key=lambda k: (
            k not in self.lead_columns, int(k.split()[-1]) if k.startswith("angle ") else 0))

    def report(self, cfg, results, history, outdir):
        fig, axes = new_figure(1, 2, figsize=(8.5, 3.2))
        for ax, p, title in zip(axes, ("svd", "pca"), ("linear map: angle to singular vector",
                                                       "autoencoder: angle to principal axis"),
                                strict=True):
            for m, style in (("od", "o-"), ("plain", "s--")):
                c = results["curves"][p][m]
                idx = np.arange(1, len(c["in"]) + 1)
                ax.plot(idx, c["in"], style, ms=3, label=f"{m}: U column")
                ax.plot(idx, c["out"], style, ms=3, alpha=0.5, label=f"{m}: V row")
            ax.set_xlabel("component i")
            ax.set_ylabel("angle (degrees, mean over seeds)")
            ax.set_title(title, fontsize=9)
            ax.set_ylim(0, 92)
        axes[0].legend(fontsize=7)
        img = save_figure(fig, outdir, "angles.png", "angles to the true directions, in order")
        fig, ax = new_figure(figsize=(4.8, 3.4))
        for m, style in (("od", "o-"), ("plain", "s--"), ("dense+svd", "^-")):
            ks = sorted(int(k) for k in results["prune"][m])
            means = [np.mean(results["prune"][m][str(k)]) for k in ks]
            ax.plot([footprint(cfg, k) for k in ks], means, style, ms=3, label=m)
        ax.set_xscale("log")
        ax.set_xlabel("first-layer parameters at the kept rank")
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.legend(fontsize=7)
        img += "\n\n" + save_figure(fig, outdir, "pruning.png", "accuracy vs footprint")
        return results_markdown(f"{cfg.seeds} seeds; intervals are 95% t-intervals over seeds.",
                                results, img)


EXPERIMENT = Maestro()
