"""GaLore with four projectors vs Adam on digits, and the WeLore observation.

A 64-128-128-10 MLP on scikit-learn's digits (full batch). Cells: Adam, and
GaLore (``subjax.optim.galore``) with the exact-SVD, warm subspace-iteration,
DCT and random projectors at several ranks (the two hidden matrices projected,
the 128x10 head and biases unprojected). Per cell: final training loss, test
accuracy, optimizer-state bytes, total time spent in basis refreshes, and the
stable rank / WeLore rank of every weight matrix and of its learned update
``W - W0`` after training (WeLore: low-rank structure emerges non-uniformly
across layers).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subjax.nn as snn
import subjax.optim as so
from experiments.harness import Experiment, markdown_table, new_figure, save_figure

PROJECTORS = ("svd", "subspace", "dct", "random")
LAYERS = ("w1", "w2", "w3")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    ranks: tuple = (4, 16)
    steps: int = 400
    refresh_every: int = 50
    lr: float = 3e-3
    hidden: int = 128
    welore_threshold: float = 0.1


@functools.lru_cache(maxsize=4)
def _digits(seed: int):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    perm = np.random.default_rng(seed).permutation(len(x))
    x, y = x[perm], y[perm]
    n_tr = 1400
    return (jnp.asarray(x[:n_tr]), jnp.asarray(y[:n_tr]), jnp.asarray(x[n_tr:]),
            jnp.asarray(y[n_tr:]))


def _init(key, hidden):
    k1, k2, k3 = jax.random.split(key, 3)
    he = lambda k, a, b: jax.random.normal(k, (a, b), jnp.float32) * np.sqrt(2.0 / a)
    return {"w1": he(k1, 64, hidden), "b1": jnp.zeros(hidden), "w2": he(k2, hidden, hidden),
            "b2": jnp.zeros(hidden), "w3": he(k3, hidden, 10), "b3": jnp.zeros(10)}


def _logits(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"] + p["b2"])
    return h @ p["w3"] + p["b3"]


def _loss(p, x, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_logits(p, x), y))


def _cells(cfg):
    cells = [("adam", 0)]
    for r in cfg.ranks:
        cells += [(p, r) for p in PROJECTORS]
    return cells


def _make_opt(cfg, method, rank):
    if method == "adam":
        return optax.adam(cfg.lr)
    mask = {"w1": True, "b1": False, "w2": True, "b2": False, "w3": False, "b3": False}
    return so.galore(cfg.lr, rank=rank, update_proj_gap=cfg.refresh_every, projector=method,
                     mask=mask, seed=cfg.seed)


def _median_time(f, *args, n=3):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def _set_count(state, count):
    def fix(path, leaf):
        return jnp.asarray(count, jnp.int32) if getattr(path[-1], "name", None) == "count" \
            else leaf

    return jax.tree_util.tree_map_with_path(fix, state)


class GaLoreDigits(Experiment):
    name = "galore"
    title = "GaLore projectors (SVD, subspace iteration, DCT, random) vs Adam; WeLore ranks"
    config_cls = Config
    quick = {"steps": 200}
    full = {"steps": 1500, "ranks": (4, 16, 32), "refresh_every": 100}

    def num_steps(self, cfg):
        return len(_cells(cfg))

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        method, rank = _cells(cfg)[i]
        xtr, ytr, xte, yte = _digits(cfg.seed)
        p0 = _init(jax.random.key(cfg.seed), cfg.hidden)
        opt = _make_opt(cfg, method, rank)

        @jax.jit
        def train(p):
            def body(carry, _):
                p, s = carry
                lval, g = jax.value_and_grad(_loss)(p, xtr, ytr)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), lval

            (p, s), losses = jax.lax.scan(body, (p, opt.init(p)), None, length=cfg.steps)
            return p, s, losses

        t0 = time.perf_counter()
        p, s, losses = jax.block_until_ready(train(p0))
        train_time = time.perf_counter() - t0
        acc = float(jnp.mean(jnp.argmax(_logits(p, xte), -1) == yte))
        state_bytes = int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(s)))
        refresh_time = 0.0
        if method != "adam":
            g = jax.grad(_loss)(p, xtr, ytr)
            upd = jax.jit(opt.update)
            t_ref = _median_time(upd, g, _set_count(s, cfg.refresh_every), p)
            t_ord = _median_time(upd, g, _set_count(s, cfg.refresh_every + 1), p)
            n_ref = -(-cfg.steps // cfg.refresh_every)
            refresh_time = max(t_ref - t_ord, 0.0) * n_ref
        metrics = {
            "method": method, "rank": rank,
            "final_loss": float(losses[-1]), "test_acc": acc,
            "state_bytes": state_bytes,
            "refresh_time_s": refresh_time, "train_time_s": train_time,
            "loss_curve": [float(v) for v in losses[:: max(1, cfg.steps // 50)]],
        }
        for name in LAYERS:
            metrics[f"stable_rank_{name}"] = float(snn.stable_rank(p[name]))
            metrics[f"stable_rank_d{name}"] = float(snn.stable_rank(p[name] - p0[name]))
        ranks = snn.welore_ranks({k: p[k] - p0[k] for k in LAYERS}, cfg.welore_threshold)
        for name in LAYERS:
            metrics[f"welore_rank_d{name}"] = int(ranks[name])
        return state, metrics

    def summarize(self, cfg, state, history):
        adam = next(h for h in history if h["method"] == "adam")
        rows = []
        for h in history:
            rows.append({k: v for k, v in h.items() if k != "loss_curve"})
        sub_vs_svd = {}
        for r in cfg.ranks:
            svd = next(h for h in history if h["method"] == "svd" and h["rank"] == r)
            sub = next(h for h in history if h["method"] == "subspace" and h["rank"] == r)
            sub_vs_svd[str(r)] = (sub["final_loss"] - svd["final_loss"]) / svd["final_loss"]
        return {
            "rows": rows,
            "adam_state_bytes": adam["state_bytes"],
            "subspace_vs_svd_rel_loss_gap": sub_vs_svd,
            "adam_stable_rank_dW": [adam[f"stable_rank_d{n}"] for n in LAYERS],
        }

    def report(self, cfg, results, history, outdir):
        cols = ["method", "rank", "final_loss", "test_acc", "state_bytes", "refresh_time_s",
                "stable_rank_dw1", "stable_rank_dw2", "stable_rank_dw3", "welore_rank_dw1",
                "welore_rank_dw2", "welore_rank_dw3"]
        table = markdown_table(results["rows"], cols)
        fig, ax = new_figure(figsize=(6, 3.6))
        xs = np.linspace(0, cfg.steps, len(history[0]["loss_curve"]))
        for h in history:
            lab = h["method"] if h["method"] == "adam" else f"{h['method']} r={h['rank']}"
            ax.semilogy(xs, h["loss_curve"], label=lab,
                        linestyle="-" if h["rank"] in (0, max(cfg.ranks)) else "--")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.legend(fontsize=6, ncol=2)
        img = save_figure(fig, outdir, "loss.png", "training loss per method")
        fig2, ax2 = new_figure(figsize=(5, 3.2))
        for h in history:
            if h["method"] in ("adam", "svd", "subspace"):
                lab = h["method"] if h["method"] == "adam" else f"{h['method']} r={h['rank']}"
                ax2.plot(LAYERS, [h[f"stable_rank_d{n}"] for n in LAYERS], marker="o", label=lab)
        ax2.set_ylabel("stable rank of W - W0")
        ax2.legend(fontsize=6)
        img2 = save_figure(fig2, outdir, "stable_rank.png", "stable rank of updates per layer")
        return (f"Digits MLP, {cfg.steps} full-batch steps, lr {cfg.lr}, update gap "
                f"{cfg.refresh_every}.\n\n{table}\n\nRelative final-loss gap subspace vs SVD: "
                f"{results['subspace_vs_svd_rel_loss_gap']}\n\n{img}\n\n{img2}\n")


EXPERIMENT = GaLoreDigits()
