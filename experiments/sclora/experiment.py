"""SC-LoRA vs vanilla LoRA vs PiSSA initialisation: fine-tuning loss and forgetting.

See ``_setup.py``: a digits network is pre-trained (preserved task), then its
trunk is fine-tuned through LoRA adapters (``nnx.LoRALinear``) on rotated
digits with a fresh head, for the same number of steps from three adapter
initialisations: vanilla (He-uniform A, zero B), PiSSA (top singular directions
of the base kernel) and SC-LoRA (output subspace from the fine-tuning vs
preserved-task covariances of each layer's outputs, ``subjax.nn.sclora_init``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

import subjax.nn as snn
from experiments.harness import Experiment, markdown_table, new_figure, save_figure
from experiments.sclora import _setup as S

METHODS = ("vanilla", "pissa", "sclora")


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    ranks: tuple = (2, 8)
    seeds: int = 3
    pretrain_steps: int = 400
    steps: int = 150
    lr: float = 3e-3
    beta: float = 0.5


def _cells(cfg):
    return [(m, r, s) for s in range(cfg.seeds) for r in cfg.ranks for m in METHODS]


class SCLoRA(Experiment):
    name = "sclora"
    title = "SC-LoRA (subspace-constrained init) vs LoRA and PiSSA: forgetting at equal steps"
    config_cls = Config
    quick = {"seeds": 1}
    full = {"seeds": 5, "ranks": (1, 2, 4, 8, 16), "steps": 300}

    def num_steps(self, cfg):
        return len(_cells(cfg))

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        method, rank, s = _cells(cfg)[i]
        seed = cfg.seed + s
        d = S.data(seed)
        model = S.pretrained(seed, cfg.pretrain_steps)
        keep_before = S.accuracy(model, *d["keep_te"], head="keep")
        x_keep, x_ft = d["keep_tr"][0], d["new_tr"][0]
        ins = {"l1": (x_ft, x_keep),
               "l2": (model.features(x_ft, 1), model.features(x_keep, 1))}
        S.to_lora(model, rank, seed)
        for name in ("l1", "l2"):
            layer = getattr(model, name)
            if method == "pissa":
                snn.pissa_init(layer)
            elif method == "sclora":
                snn.sclora_init(layer, *ins[name], beta=cfg.beta)
        keep_init = S.accuracy(model, *d["keep_te"], head="keep")
        losses = S.finetune(model, cfg.steps, cfg.lr, lora=True, seed=seed)
        keep_after = S.accuracy(model, *d["keep_te"], head="keep")
        return state, {
            "method": method, "rank": rank, "seed": seed,
            "ft_loss": float(np.mean(losses[-10:])),
            "new_acc": S.accuracy(model, *d["new_te"], head="new"),
            "keep_acc_before": keep_before, "keep_acc_init": keep_init,
            "keep_acc_after": keep_after, "forgetting": keep_before - keep_after,
            "loss_curve": losses[:: max(1, cfg.steps // 50)],
        }

    def summarize(self, cfg, state, history):
        rows = []
        for r in cfg.ranks:
            for m in METHODS:
                hs = [h for h in history if h["method"] == m and h["rank"] == r]
                rows.append({
                    "method": m, "rank": r, "seeds": len(hs),
                    "ft_loss": float(np.mean([h["ft_loss"] for h in hs])),
                    "new_acc": float(np.mean([h["new_acc"] for h in hs])),
                    "forgetting": float(np.mean([h["forgetting"] for h in hs])),
                    "forgetting_sd": float(np.std([h["forgetting"] for h in hs])),
                    "init_changed_function": float(np.max(
                        [abs(h["keep_acc_init"] - h["keep_acc_before"]) for h in hs])),
                })
        return {"rows": rows,
                "keep_acc_pretrained": float(np.mean([h["keep_acc_before"] for h in history]))}

    def report(self, cfg, results, history, outdir):
        table = markdown_table(results["rows"])
        fig, ax = new_figure(figsize=(5, 3.4))
        marks = {"vanilla": "o", "pissa": "s", "sclora": "^"}
        for row in results["rows"]:
            ax.scatter(row["ft_loss"], row["forgetting"], marker=marks[row["method"]],
                       label=f"{row['method']} r={row['rank']}")
        ax.set_xlabel("fine-tuning loss (new task)")
        ax.set_ylabel("forgetting (preserved-task acc. drop)")
        ax.legend(fontsize=6)
        img = save_figure(fig, outdir, "forgetting.png", "forgetting vs fine-tuning loss")
        return (f"Pre-trained preserved-task accuracy {results['keep_acc_pretrained']:.3f}; "
                f"{cfg.steps} fine-tuning steps, lr {cfg.lr}, beta {cfg.beta}, "
                f"{cfg.seeds} seeds.\n\n{table}\n\n{img}\n")


EXPERIMENT = SCLoRA()
