"""LoRA vs full fine-tuning: intruder dimensions and forgetting vs rank.

Same network and tasks as the SC-LoRA experiment (``experiments/sclora/_setup.py``):
the pre-trained digits trunk is fine-tuned on rotated digits either fully or
through vanilla LoRA adapters of several ranks, for the same number of steps.
For each trunk matrix we count intruder dimensions (top-``k`` singular vectors of
the fine-tuned kernel whose best cosine with every pre-trained singular vector is
below ``epsilon``, ``subjax.nn.intruder_dimensions``) and measure forgetting on
the preserved task.
"""

from __future__ import annotations

import dataclasses

import numpy as np

import subjax.nn as snn
from experiments.harness import Experiment, markdown_table, new_figure, save_figure
from experiments.sclora import _setup as S


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    ranks: tuple = (1, 4, 16)
    seeds: int = 2
    pretrain_steps: int = 400
    steps: int = 150
    lr: float = 3e-3
    top_k: int = 10
    epsilon: float = 0.5


def _cells(cfg):
    return [(r, s) for s in range(cfg.seeds) for r in (0, *cfg.ranks)]  # 0 = full FT


class LoRAIntruders(Experiment):
    name = "lora-intruders"
    title = "LoRA vs full fine-tuning: intruder dimensions and forgetting (Shuttleworth et al.)"
    config_cls = Config
    quick = {"seeds": 1}
    full = {"seeds": 5, "ranks": (1, 2, 4, 8, 16, 32), "steps": 300}

    def num_steps(self, cfg):
        return len(_cells(cfg))

    def init_state(self, cfg):
        return {}

    def step(self, cfg, state, i):
        rank, s = _cells(cfg)[i]
        seed = cfg.seed + s
        d = S.data(seed)
        model = S.pretrained(seed, cfg.pretrain_steps)
        keep_before = S.accuracy(model, *d["keep_te"], head="keep")
        w0 = {n: np.asarray(S.trunk_kernel(model, n)) for n in ("l1", "l2")}
        if rank > 0:
            S.to_lora(model, rank, seed)
        losses = S.finetune(model, cfg.steps, cfg.lr, lora=rank > 0, seed=seed)
        out = {
            "method": "full" if rank == 0 else "lora", "rank": rank, "seed": seed,
            "ft_loss": float(np.mean(losses[-10:])),
            "new_acc": S.accuracy(model, *d["new_te"], head="new"),
            "forgetting": keep_before - S.accuracy(model, *d["keep_te"], head="keep"),
        }
        for n in ("l1", "l2"):
            w1 = S.trunk_kernel(model, n)
            res = snn.intruder_dimensions(w0[n], w1, top_k=cfg.top_k, epsilon=cfg.epsilon)
            out[f"intruders_{n}"] = int(res.count)
            out[f"min_sim_{n}"] = float(np.min(np.asarray(res.max_similarity)))
            out[f"update_norm_{n}"] = float(np.linalg.norm(np.asarray(w1) - w0[n]))
            out[f"update_stable_rank_{n}"] = float(snn.stable_rank(np.asarray(w1) - w0[n]))
        return state, out

    def summarize(self, cfg, state, history):
        rows = []
        for rank in (0, *cfg.ranks):
            hs = [h for h in history if h["rank"] == rank]
            row = {"method": "full" if rank == 0 else f"lora r={rank}", "seeds": len(hs)}
            for k in ("ft_loss", "new_acc", "forgetting", "intruders_l1", "intruders_l2",
                      "min_sim_l2", "update_norm_l2", "update_stable_rank_l2"):
                row[k] = float(np.mean([h[k] for h in hs]))
            rows.append(row)
        return {"rows": rows}

    def report(self, cfg, results, history, outdir):
        table = markdown_table(results["rows"])
        fig, (a1, a2) = new_figure(1, 2, figsize=(8, 3.2))
        rows = results["rows"]
        labels = [r["method"] for r in rows]
        a1.bar(labels, [r["intruders_l1"] + r["intruders_l2"] for r in rows])
        a1.set_ylabel(f"intruders (top {cfg.top_k}, eps {cfg.epsilon}), l1 + l2")
        a2.bar(labels, [r["forgetting"] for r in rows])
        a2.set_ylabel("forgetting (preserved acc. drop)")
        for a in (a1, a2):
            a.tick_params(axis="x", labelrotation=45, labelsize=7)
        img = save_figure(fig, outdir, "intruders.png", "intruder dimensions and forgetting")
        return (f"{cfg.steps} fine-tuning steps, lr {cfg.lr}, {cfg.seeds} seed(s).\n\n"
                f"{table}\n\n{img}\n")


EXPERIMENT = LoRAIntruders()
