"""K-FAC (Martens & Grosse 2015), FISMO and natural gradient on the digits deep autoencoder.

The classic deep-autoencoder benchmark at digits scale (see
``experiments/kfac/autoencoder.py``): training loss vs steps and vs wall time for
SGD with momentum, Adam (learning-rate sweep), subjax K-FAC, subjax FISMO,
subjax natural gradient (CG, Hessian-free style) and kfac-jax's optimizer. The
target is the loss of the best Adam after its 2000 steps. One harness step = one
(optimizer, setting) cell; wall times are warm (the step is compiled first).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import optax

from experiments.harness import Experiment, markdown_table, new_figure, save_figure
from experiments.kfac.autoencoder import (
    kfac_step,
    load_digits_pixels,
    make_model,
    ng_step,
    optax_step,
)
from subjax import optim


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    adam_steps: int = 2000
    adam_lrs: tuple = (3e-3, 1e-2, 3e-2)
    sgd_steps: int = 2000
    second_order_steps: int = 400
    ng_steps: int = 200
    record_every: int = 10
    kfac_jax: bool = True

    def __post_init__(self):
        for k in ("adam_steps", "sgd_steps", "second_order_steps", "ng_steps", "record_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1")


def _cells(cfg):
    cells = [("adam", {"lr": lr}) for lr in cfg.adam_lrs]
    cells += [("sgd momentum", {"lr": 0.1})]
    cells += [("subjax kfac", {"lr": 0.1, "damping": 0.03, "norm_constraint": 1e-2}),
              ("subjax kfac adaptive", {"damping": 1e-3, "damping_factor": 0.8,
                                        "refresh_every": 5}),
              ("subjax fismo", {"lr": 2e-2}),
              ("subjax natural gradient", {"lr": 1.0, "damping": 0.1, "max_iters": 10})]
    if cfg.kfac_jax:
        cells += [("kfac-jax", {"initial_damping": 1.0})]
    return cells


def _run_optax_like(step, params, state, x, steps, record_every, seed):
    key = jax.random.key(seed)
    jax.block_until_ready(step(params, state, x, key))  # compile; its result is discarded
    losses, times = [], []
    t0 = time.perf_counter()
    for i in range(steps):
        params, state, loss = step(params, state, x, jax.random.fold_in(key, i))
        if i % record_every == 0 or i == steps - 1:
            losses.append(float(loss))
            times.append(time.perf_counter() - t0)
    return losses, times


def run_cell(cfg, name, setting, x):
    apply_fn, params = make_model(cfg.seed)
    if name == "adam":
        opt = optax.adam(setting["lr"])
        step, steps = optax_step(apply_fn, opt), cfg.adam_steps
    elif name == "sgd momentum":
        opt = optax.sgd(setting["lr"], momentum=0.9)
        step, steps = optax_step(apply_fn, opt), cfg.sgd_steps
    elif name == "subjax kfac":
        opt = optim.kfac(setting["lr"], damping=setting["damping"],
                         norm_constraint=setting["norm_constraint"])
        step, steps = kfac_step(apply_fn, opt), cfg.second_order_steps
    elif name == "subjax kfac adaptive":  # exact quadratic-model step, LM damping
        opt = optim.kfac(1.0, damping=setting["damping"], adaptive_step=True,
                         adaptive_damping=True, damping_factor=setting["damping_factor"],
                         refresh_every=setting["refresh_every"], stale_ratio=None)
        step = kfac_step(apply_fn, opt, adaptive=True, exact_step=True)
        steps = cfg.second_order_steps
    elif name == "subjax fismo":
        opt = optim.fismo(setting["lr"])
        step, steps = optax_step(apply_fn, opt), cfg.second_order_steps
    elif name == "subjax natural gradient":
        opt = optim.natural_gradient(setting["lr"], damping=setting["damping"],
                                     likelihood="bernoulli", max_iters=setting["max_iters"])
        step, steps = ng_step(apply_fn, opt), cfg.ng_steps
    else:
        return _run_kfac_jax(cfg, setting, x)
    state = opt.init(params)
    losses, times = _run_optax_like(step, params, state, x, steps, cfg.record_every, cfg.seed)
    return losses, times, steps


def _run_kfac_jax(cfg, setting, x):
    from experiments.kfac.peers import make_kfac_jax, to_dict_params

    _, p = make_model(cfg.seed)
    opt, _ = make_kfac_jax(initial_damping=setting["initial_damping"])
    rng = jax.random.key(cfg.seed)
    # compile on a throw-away copy (kfac-jax donates its parameter buffers)
    warm = to_dict_params(p)
    st = opt.init(warm, rng, x)
    warm, st, stats = opt.step(warm, st, rng, batch=x, global_step_int=0)
    jax.block_until_ready(stats["loss"])
    params = to_dict_params(p)
    st = opt.init(params, rng, x)
    losses, times = [], []
    t0 = time.perf_counter()
    for i in range(cfg.second_order_steps):
        params, st, stats = opt.step(params, st, jax.random.fold_in(rng, i), batch=x,
                                     global_step_int=i)
        if i % cfg.record_every == 0 or i == cfg.second_order_steps - 1:
            losses.append(float(stats["loss"]))
            times.append(time.perf_counter() - t0)
    return losses, times, cfg.second_order_steps


class KFAC(Experiment):
    name = "kfac"
    title = "K-FAC / FISMO / natural gradient on the digits deep autoencoder"
    config_cls = Config
    quick = {"adam_lrs": (3e-3, 1e-2), "sgd_steps": 1000, "second_order_steps": 250,
             "ng_steps": 60}
    full = {}

    def num_steps(self, cfg):
        return len(_cells(cfg))

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        name, setting = _cells(cfg)[i]
        x = load_digits_pixels()
        losses, times, steps = run_cell(cfg, name, setting, x)
        return state, {"optimizer": name, "setting": setting, "steps": steps,
                       "record_every": cfg.record_every, "losses": losses,
                       "wall_times": times, "final_loss": losses[-1],
                       "total_time": times[-1]}

    def summarize(self, cfg, state, history):
        adam = [h for h in history if h["optimizer"] == "adam"]
        best = min(adam, key=lambda h: h["final_loss"])
        target = best["final_loss"]
        rows = []
        for h in history:
            hit = next((j for j, v in enumerate(h["losses"]) if v <= target), None)
            steps_to = None if hit is None else hit * h["record_every"]
            rows.append({
                "optimizer": h["optimizer"], "setting": str(h["setting"]),
                "final_loss": round(h["final_loss"], 3), "steps": h["steps"],
                "ms_per_step": round(1e3 * h["total_time"] / h["steps"], 2),
                "steps_to_target": steps_to,
                "time_to_target_s": None if hit is None else round(h["wall_times"][hit], 2),
            })
        return {"target_loss": target, "best_adam": best["setting"], "rows": rows}

    def report(self, cfg, results, history, outdir):
        fig, axes = new_figure(1, 2, figsize=(10, 3.6))
        for h in history:
            steps = [j * h["record_every"] for j in range(len(h["losses"]))]
            lab = f"{h['optimizer']} {h['setting']}"
            axes[0].plot(steps, h["losses"], label=lab)
            axes[1].plot(h["wall_times"], h["losses"], label=lab)
        for ax in axes:
            ax.set_yscale("log")
            ax.set_ylim(top=60)
            ax.axhline(results["target_loss"], color="k", ls=":", lw=1)
            ax.set_ylabel("training loss (BCE, summed over pixels)")
        axes[0].set_xlabel("step")
        axes[1].set_xlabel("wall time (s, warm)")
        axes[0].legend(fontsize=6)
        img = save_figure(fig, outdir, "curves.png", "training loss vs steps and vs wall time")
        return (f"Target: best Adam's loss after {cfg.adam_steps} steps = "
                f"{results['target_loss']:.3f} ({results['best_adam']}).\n\n"
                f"{markdown_table(results['rows'])}\n\n{img}\n")


EXPERIMENT = KFAC()
