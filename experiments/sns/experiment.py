"""SNS reproduction (Tang et al., ICLR 2024) at small scale.

Iterations and wall time to marginal error 1e-8 (float64) for Sinkhorn,
Sinkhorn–Newton, SNS (subjax) and ott-jax's Sinkhorn on

- the random assignment problem: ``C ~ U[0, 1]^{n x n}``, uniform marginals;
- digit images from scikit-learn's ``load_digits`` as histograms on the 8x8 pixel
  grid (pixel centres as points, intensities as weights, empty pixels dropped),
  ground cost L1 (``|x - y|_1``) or L2 (``|x - y|_2^2``).

One harness step per (problem, epsilon, method) cell. Each cell compiles once,
then times one warm run. Error histories come from the solvers' ``errors``
arrays; time axes assume equal cost per outer iteration (wall / iterations).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import Experiment, markdown_table, new_figure, save_figure
from subjax import ot

METHODS = ("sinkhorn", "sinkhorn_newton", "sns", "ott-jax")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    n_assignment: int = 500
    assignment_eps: tuple = (0.003, 0.001, 0.0003)
    digits_eps: tuple = (0.03, 0.01, 0.003)   # relative to the mean ground cost
    digit_pairs: int = 2
    tol: float = 1e-8
    sinkhorn_cap: int = 100_000
    sns_row_budget: int = 16

    def __post_init__(self):
        for k in ("n_assignment", "digit_pairs", "sinkhorn_cap", "sns_row_budget"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not (0 < self.tol < 1):
            raise ValueError(f"tol must be in (0, 1), got {self.tol}")


def _digit_hist(img):
    ii, jj = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    pts = np.stack([ii.ravel(), jj.ravel()], 1).astype(np.float64) / 7.0
    w = img.ravel().astype(np.float64)
    keep = w > 0
    return pts[keep], w[keep] / w[keep].sum()


def _problems(cfg):
    """Deterministic list of problems: (label, cost (numpy), a, b, [eps...])."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_assignment
    C = rng.uniform(size=(n, n))
    u = np.full(n, 1 / n)
    probs = [(f"assignment n={n}", C, u, u, list(cfg.assignment_eps))]
    from sklearn.datasets import load_digits

    imgs = load_digits().images
    idx = rng.choice(len(imgs), size=2 * cfg.digit_pairs, replace=False)
    for p in range(cfg.digit_pairs):
        xa, a = _digit_hist(imgs[idx[2 * p]])
        xb, b = _digit_hist(imgs[idx[2 * p + 1]])
        for cost, name in (("l1", "L1"), ("sqeuclidean", "L2")):
            Cd = np.asarray(ot.cost_matrix(jnp.asarray(xa), jnp.asarray(xb), cost))
            mean = float(Cd.mean())
            probs.append((f"digits pair {p} {name}", Cd, a, b,
                          [r * mean for r in cfg.digits_eps]))
    return probs


def _cells(cfg):
    cells = []
    for k, (label, _, _, _, epss) in enumerate(_problems(cfg)):
        for eps in epss:
            for m in METHODS:
                cells.append((k, label, eps, m))
    return cells


def _solver(method, eps, cfg):
    tol = cfg.tol
    if method == "sinkhorn":
        return jax.jit(lambda C, a, b: ot.sinkhorn(C, a, b, eps, tol=tol,
                                                   max_iters=cfg.sinkhorn_cap))
    if method == "sinkhorn_newton":
        return jax.jit(lambda C, a, b: ot.sinkhorn_newton(C, a, b, eps, tol=tol,
                                                          max_iters=500))
    if method == "sns":
        return jax.jit(lambda C, a, b: ot.sparse_newton_sinkhorn(
            C, a, b, eps, tol=tol, max_iters=500,
            row_budget=min(cfg.sns_row_budget, C.shape[1])))
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    solver = ott_sinkhorn.Sinkhorn(threshold=tol, max_iterations=cfg.sinkhorn_cap)
    return jax.jit(lambda C, a, b: solver(linear_problem.LinearProblem(
        geometry.Geometry(cost_matrix=C, epsilon=eps), a, b)))


class SNS(Experiment):
    name = "sns"
    title = "Sparse Newton Sinkhorn (Tang et al., ICLR 2024)"
    config_cls = Config
    quick = {"n_assignment": 200, "assignment_eps": (0.003, 0.001), "digits_eps": (0.01, 0.003),
             "digit_pairs": 1, "sinkhorn_cap": 20_000}
    full = {}
    checkpoint_every = 1

    def num_steps(self, cfg):
        return len(_cells(cfg))

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        k, label, eps, method = _cells(cfg)[i]
        _, C, a, b, _ = _problems(cfg)[k]
        with jax.enable_x64(True):
            C, a, b = (jnp.asarray(v, jnp.float64) for v in (C, a, b))
            fn = _solver(method, eps, cfg)
            jax.block_until_ready(fn(C, a, b))  # compile
            times = []
            while len(times) < 3 and sum(times) < 2.0:  # median of up to 3 warm runs
                t0 = time.perf_counter()
                out = jax.block_until_ready(fn(C, a, b))
                times.append(time.perf_counter() - t0)
            wall = float(np.median(times))
            if method == "ott-jax":
                P = np.asarray(out.matrix)
                errs = np.asarray(out.errors)
                stride = 10  # ott records every inner_iterations=10
                n_iters = int(out.n_iters)
                converged = bool(out.converged)
                reg = float(out.reg_ot_cost)
            else:
                P = np.asarray(out.plan())
                errs = np.asarray(out.errors)
                stride = 10 if method == "sinkhorn" else 1
                n_iters = int(out.n_iters)
                converged = bool(out.converged)
                reg = float(out.reg_ot_cost)
        a_np, b_np = np.asarray(a), np.asarray(b)
        err = float(np.abs(P.sum(1) - a_np).sum() + np.abs(P.sum(0) - b_np).sum())
        hist = [float(e) for e in errs if e >= 0]
        return state, {
            "problem": label, "epsilon": float(eps), "method": method, "iterations": n_iters,
            "wall_time_s": wall, "converged": converged, "marginal_error": err,
            "reg_cost": reg, "history_stride": stride, "history": hist,
        }

    def summarize(self, cfg, state, history):
        rows = []
        for h in history:
            rows.append({k: h[k] for k in ("problem", "epsilon", "method", "iterations",
                                          "wall_time_s", "converged", "marginal_error")})
        # claim: SNS needs orders of magnitude fewer iterations than Sinkhorn
        ratios = []
        for h in history:
            if h["method"] != "sns":
                continue
            sk = [g for g in history if g["method"] == "sinkhorn" and g["problem"] == h["problem"]
                  and g["epsilon"] == h["epsilon"]][0]
            ratios.append({"problem": h["problem"], "epsilon": h["epsilon"],
                           "sinkhorn_iters": sk["iterations"],
                           "sinkhorn_converged": sk["converged"],
                           "sns_iters": h["iterations"], "sns_converged": h["converged"],
                           "iter_ratio": sk["iterations"] / max(h["iterations"], 1),
                           "time_ratio": sk["wall_time_s"] / max(h["wall_time_s"], 1e-9)})
        return {"rows": rows, "sinkhorn_vs_sns": ratios}

    def report(self, cfg, results, history, outdir):
        groups = {}
        for h in history:
            groups.setdefault((h["problem"], h["epsilon"]), []).append(h)
        imgs = []
        for gi, ((prob, eps), hs) in enumerate(groups.items()):
            fig, axes = new_figure(1, 2, figsize=(9, 3.2))
            for h in hs:
                e = np.asarray(h["history"])
                if e.size == 0:
                    continue
                its = np.arange(e.size) * h["history_stride"]
                t = its * h["wall_time_s"] / max(h["iterations"], 1)
                axes[0].semilogy(its + 1, e, label=h["method"])
                axes[1].semilogy(t, e, label=h["method"])
            for ax, xl in zip(axes, ("outer iteration", "time (s, wall/iters scaled)"),
                              strict=True):
                ax.set_xlabel(xl)
                ax.set_ylabel("marginal error (L1)")
                ax.axhline(cfg.tol, color="gray", lw=0.5)
            axes[0].set_xscale("log")
            axes[0].legend(fontsize=7)
            fig.suptitle(f"{prob}, eps={eps:.3g}", fontsize=9)
            imgs.append(save_figure(fig, outdir, f"errors_{gi}.png", f"{prob} eps={eps:.3g}"))
        table = markdown_table(results["rows"])
        ratio = markdown_table(results["sinkhorn_vs_sns"])
        return (f"Iterations and wall time to marginal error {cfg.tol:g} (float64), "
                f"caps: Sinkhorn / ott-jax {cfg.sinkhorn_cap}, Newton 500.\n\n{table}\n\n"
                f"Sinkhorn vs SNS:\n\n{ratio}\n\n" + "\n\n".join(imgs) + "\n")


EXPERIMENT = SNS()
