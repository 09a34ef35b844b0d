"""SC-LoRA vs vanilla LoRA, PiSSA and full fine-tuning: forgetting at matched loss.

See ``_setup.py``: a digits network is pretrained (the preserved task), then its
trunk is fine-tuned on rotated digits with a fresh head — fully, or through LoRA
adapters (``nnx.LoRALinear``) initialised three ways: vanilla (He-uniform A, zero
B), PiSSA (``subjax.nn.pissa_init``) and SC-LoRA (``subjax.nn.sclora_init``:
output subspace from the fine-tuning vs preserved-task covariances, weight
``beta``). Along training the fine-tuning loss and the preserved task's accuracy
are recorded; methods are compared at **matched fine-tuning loss**: per (seed,
rank), the loss every method reaches, and each method's forgetting at the first
step it gets there, on the preserved task's test split. SC-LoRA's ``beta`` is
chosen per rank on the validation split (lowest forgetting at the loss it and
vanilla LoRA both reach). One cell = one (seed, rank, method) run.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import subjax.nn as snn
from experiments import stats
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure
from experiments.sclora import _setup as S


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    ranks: tuple[int, ...] = (2, 8)
    betas: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 0.9)
    angle: float = 30.0           # rotation of the new task, degrees
    pretrain_steps: int = 400
    steps: int = 300
    lr: float = 3e-3
    full_lr: float = 1e-3         # full fine-tuning
    eval_every: int = 10

    def __post_init__(self):
        for k in ("seeds", "pretrain_steps", "steps", "eval_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.ranks or min(self.ranks) < 1 or max(self.ranks) > 32:
            raise ValueError("ranks must lie in [1, 32]")
        if not self.betas or not all(0 <= b < 1 for b in self.betas):
            raise ValueError("betas must lie in [0, 1)")
        if not self.lr > 0 or not self.full_lr > 0:
            raise ValueError("lr and full_lr must be > 0")


def run_cell(cfg: Config, seed: int, rank: int, method: str) -> dict:
    t = S.tasks(seed, cfg.angle)
    model = S.pretrained(seed, cfg.pretrain_steps)
    before = {"val": S.accuracy(model, t["keep_va"], "keep"),
              "test": S.accuracy(model, t["keep_te"], "keep")}
    if method != "full":
        import jax.numpy as jnp

        x_keep, x_ft = jnp.asarray(t["keep_tr"].x), jnp.asarray(t["new_tr"].x)
        ins = {"l1": (x_ft, x_keep),
               "l2": (model.features(x_ft, 1), model.features(x_keep, 1))}
        S.to_lora(model, rank, seed)
        for name in ("l1", "l2"):
            layer = getattr(model, name)
            if method == "pissa":
                snn.pissa_init(layer)
            elif method.startswith("sclora"):
                snn.sclora_init(layer, *ins[name], beta=float(method.split("=")[1]))
    init_change = abs(S.accuracy(model, t["keep_te"], "keep") - before["test"])
    lr = cfg.full_lr if method == "full" else cfg.lr
    trace = S.finetune(model, t["new_tr"], t["keep_va"], t["keep_te"], cfg.steps, lr,
                       lora=method != "full", eval_every=cfg.eval_every)
    return {"trace": trace, "keep_before": before, "init_change": init_change,
            "final": {"new_test": S.accuracy(model, t["new_te"], "new"),
                      "keep_test": S.accuracy(model, t["keep_te"], "keep")}}


def _at_loss(run: dict, target: float, split: str) -> dict:
    """Forgetting on ``split`` at the first recorded step whose loss is <= ``target``."""
    for p in run["trace"]:
        if p["loss"] <= target:
            return {"step": p["step"],
                    "forgetting": run["keep_before"][split] - p[f"keep_{split}"]}
    raise ValueError("target loss not reached")  # target is chosen so every run reaches it


def _matched(runs: dict[str, dict], split: str = "test") -> tuple[float, dict[str, dict]]:
    target = max(min(p["loss"] for p in r["trace"]) for r in runs.values())
    return target, {m: _at_loss(r, target, split) for m, r in runs.items()}


class SCLoRA(CellExperiment):
    name = "sclora"
    title = "SC-LoRA (subspace-constrained init) vs LoRA, PiSSA and full fine-tuning: " \
            "forgetting at matched loss"
    config_cls = Config
    quick = {"seeds": 2, "ranks": (4,), "betas": (0.25, 0.75), "steps": 150}
    full = {"seeds": 5}
    figures = ("forgetting.png",)

    def expected_cells(self, cfg):
        return cfg.seeds * (1 + len(cfg.ranks) * (2 + len(cfg.betas)))

    def run_cell(self, cfg, cell):
        return run_cell(cfg, cell["seed"], cell["rank"], cell["method"])

    def sweep(self, cfg, cells):
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        betas = [f"sclora beta={b:g}" for b in cfg.betas]
        claims, rows, beta_rows, curves = [], [], [], {}
        for rank in cfg.ranks:
            runs = {s: {m: cells(seed=s, rank=rank, method=m)
                        for m in ("vanilla", "pissa", *betas)} for s in seeds}
            for s in seeds:
                runs[s]["full"] = cells(seed=s, rank=0, method="full")
            # beta on validation: forgetting at the loss vanilla and every beta reach
            score = {}
            for b in betas:
                score[b] = float(np.mean([_matched({m: runs[s][m] for m in ("vanilla", b)},
                                                   "val")[1][b]["forgetting"] for s in seeds]))
                beta_rows.append({"rank": rank, "beta": b.split("=")[1],
                                  "val forgetting at vanilla-matched loss":
                                  round(score[b], 4)})
            best = min(score, key=score.get)
            methods = ("full", "vanilla", "pissa", best)
            matched = {s: _matched({m: runs[s][m] for m in methods}) for s in seeds}
            forget = {m: [matched[s][1][m]["forgetting"] for s in seeds] for m in methods}
            for foil in ("vanilla", "pissa"):
                cmp = stats.compare(forget[best], forget[foil], claim="less", quick=cells.quick)
                claims.append(stats.claim(
                    f"rank {rank}: SC-LoRA forgets less than {foil} LoRA at matched "
                    "fine-tuning loss", "better fine-tuning / preservation trade-off than "
                    "LoRA and PiSSA (LLM safety, world knowledge)", cmp,
                    names=("SC-LoRA", foil)))
            for m in methods:
                rows.append({
                    "rank": rank, "method": m if m != best else f"SC-LoRA ({best[7:]})",
                    "matched loss": stats.mean_ci([matched[s][0] for s in seeds]).format(),
                    "forgetting at matched loss (test)": stats.mean_ci(forget[m]).format(),
                    "step reached": stats.mean_ci(
                        [matched[s][1][m]["step"] for s in seeds]).format(".0f"),
                    "final new-task test acc": stats.mean_ci(
                        [runs[s][m]["final"]["new_test"] for s in seeds]).format(),
                    "final forgetting (test)": stats.mean_ci(
                        [runs[s][m]["keep_before"]["test"] - runs[s][m]["final"]["keep_test"]
                         for s in seeds]).format()})
            curves[str(rank)] = {m: [[[p["loss"], runs[s][m]["keep_before"]["test"]
                                       - p["keep_test"]] for p in runs[s][m]["trace"]]
                                     for s in seeds] for m in methods}
        return {"claims": claims,
                "tables": {"At matched fine-tuning loss (per seed: the loss every method "
                           "reaches); SC-LoRA at its validation-chosen beta": rows,
                           "SC-LoRA beta on validation": beta_rows},
                "curves": curves}

    def report(self, cfg, results, history, outdir):
        ranks = list(results["curves"])
        fig, axes = new_figure(1, len(ranks), figsize=(4.8 * len(ranks), 3.6), squeeze=False)
        for ax, rank in zip(axes[0], ranks, strict=True):
            for j, (m, per_seed) in enumerate(results["curves"][rank].items()):
                for i, pts in enumerate(per_seed):
                    pts = np.asarray(pts)
                    ax.plot(pts[:, 0], pts[:, 1], color=f"C{j}", lw=1, alpha=0.6,
                            label=m if i == 0 else None)
            ax.set_xscale("log")
            ax.invert_xaxis()
            ax.set_xlabel("fine-tuning loss (training proceeds to the right)")
            ax.set_ylabel("forgetting (preserved test acc. drop)")
            ax.set_title(f"LoRA rank {rank} (full fine-tuning for reference)", fontsize=9)
            ax.legend(fontsize=7)
        img = save_figure(fig, outdir, "forgetting.png", "forgetting along fine-tuning")
        return results_markdown(
            f"New task: digits rotated by {cfg.angle:g} degrees; {cfg.steps} steps, lr "
            f"{cfg.lr} (full fine-tuning {cfg.full_lr}), {cfg.seeds} seeds.", results, img)


EXPERIMENT = SCLoRA()
