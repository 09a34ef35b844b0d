"""Demo experiment: least squares by gradient descent, against the closed form.

Exercises every part of the harness (seeded config, steps, checkpoints, resume,
report with a table and a plot) in a few seconds. The known answer is the
least-squares solution from ``numpy.linalg.lstsq``; gradient descent with step
``1 / L`` converges to it linearly at rate ``1 - 1/kappa``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.harness import Experiment, markdown_table, new_figure, save_figure


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    n: int = 400           # rows of the design matrix
    d: int = 40            # unknowns
    noise: float = 0.1     # observation noise
    condition: float = 10.0  # condition number of the design matrix
    steps: int = 30        # harness steps
    iters_per_step: int = 25  # gradient-descent iterations per harness step
    checkpoint_every: int = 2

    def __post_init__(self):
        if self.n < self.d:
            raise ValueError(f"n={self.n} must be >= d={self.d}")
        if self.condition < 1:
            raise ValueError(f"condition must be >= 1, got {self.condition}")
        for k in ("n", "d", "steps", "iters_per_step", "checkpoint_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.noise < 0:
            raise ValueError(f"noise must be >= 0, got {self.noise}")


def _problem(cfg: Config):
    """A design matrix with prescribed singular values, and noisy targets."""
    rng = np.random.default_rng(cfg.seed)
    u, _ = np.linalg.qr(rng.standard_normal((cfg.n, cfg.d)))
    v, _ = np.linalg.qr(rng.standard_normal((cfg.d, cfg.d)))
    s = np.geomspace(1.0, 1.0 / cfg.condition, cfg.d)
    a = (u * s) @ v.T
    w_true = rng.standard_normal(cfg.d)
    y = a @ w_true + cfg.noise * rng.standard_normal(cfg.n) / np.sqrt(cfg.n)
    w_star = np.linalg.lstsq(a, y, rcond=None)[0]
    return a.astype(np.float32), y.astype(np.float32), w_star, s[0] ** 2


@jax.jit
def _gd(a, y, w, lr, iters):
    def body(_, w):
        return w - lr * (a.T @ (a @ w - y))

    return jax.lax.fori_loop(0, iters, body, w)


def _loss(a, y, w):
    r = a @ w - y
    return 0.5 * float(r @ r)


class LeastSquaresDemo(Experiment):
    name = "demo"
    title = "Harness demo: least squares by gradient descent"
    config_cls = Config
    quick = {"steps": 30}
    full = {"steps": 200, "n": 2000, "d": 200}

    def num_steps(self, cfg):
        return cfg.steps

    def init_state(self, cfg):
        return {"w": jnp.zeros((cfg.d,), jnp.float32)}

    def step(self, cfg, state, i):
        a, y, w_star, lipschitz = _problem(cfg)
        w = _gd(jnp.asarray(a), jnp.asarray(y), state["w"], 1.0 / lipschitz, cfg.iters_per_step)
        w_np = np.asarray(w, np.float64)
        return {"w": w}, {
            "iteration": (i + 1) * cfg.iters_per_step,
            "loss": _loss(a.astype(np.float64), y.astype(np.float64), w_np),
            "rel_error": float(np.linalg.norm(w_np - w_star) / np.linalg.norm(w_star)),
        }

    def summarize(self, cfg, state, history):
        a, y, w_star, _ = _problem(cfg)
        a64, y64 = a.astype(np.float64), y.astype(np.float64)
        return {
            "iterations": history[-1]["iteration"],
            "final_loss": history[-1]["loss"],
            "optimal_loss": _loss(a64, y64, w_star),
            "final_rel_error": history[-1]["rel_error"],
            "predicted_rate": 1.0 - 1.0 / cfg.condition**2,
        }

    def report(self, cfg, results, history, outdir):
        fig, ax = new_figure(figsize=(5, 3.2))
        its = [h["iteration"] for h in history]
        ax.semilogy(its, [h["rel_error"] for h in history], marker=".", label="GD")
        ax.set_xlabel("gradient-descent iteration")
        ax.set_ylabel("||w - w*|| / ||w*||")
        ax.set_title("least squares, GD vs closed form")
        ax.legend()
        img = save_figure(fig, outdir, "convergence.png", "relative error vs iteration")
        table = markdown_table([results])
        return (
            "Gradient descent on a least-squares problem with condition number "
            f"{cfg.condition:g}; the closed-form optimum comes from `numpy.linalg.lstsq`.\n\n"
            f"{table}\n\n{img}\n"
        )


EXPERIMENT = LeastSquaresDemo()
