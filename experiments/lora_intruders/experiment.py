"""LoRA vs full fine-tuning: intruder dimensions and forgetting at matched accuracy.

Shuttleworth et al. (2024), "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
at toy scale. A 64-256-256-10 ReLU network is pretrained long on digits (the
preserved task) until its 256x256 hidden kernel has a decaying spectrum. It is then
fine-tuned on a new task (the digits rotated by 90 degrees, a fresh head) either
fully (Adam on the trunk) or through LoRA adapters on both trunk kernels with
rsLoRA scaling ``alpha / sqrt(r)``. Each method's learning rate is the smallest
whose new-task *validation* accuracy reaches ``target_acc`` (so the methods are
compared at matched new-task accuracy, each moving the weights as little as that
needs), searched on one shared grid, extended until it brackets the target, with
the same budget for every method (``stats.smallest_reaching``).

Intruder dimensions (``subjax.nn.intruder_dimensions``): a top-``top_k`` singular
vector of the fine-tuned kernel whose best cosine with every pretrained singular
vector is below ``epsilon``. Counted for every ``epsilon`` of a sweep, against the
count a random unit vector would give (the null). Forgetting: drop of the preserved
task's test accuracy through the untouched pretrained head.
One cell = one (seed, method, learning rate).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subjax.nn as snn
from experiments import stats
from experiments.data import Split, digits
from experiments.harness import CellExperiment, new_figure, results_markdown, save_figure

EPSILONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclasses.dataclass(frozen=True)
class Config:
    seed: int = 0
    seeds: int = 5
    width: int = 256
    pretrain_steps: int = 2000
    pretrain_lr: float = 1e-3
    steps: int = 300
    ranks: tuple[int, ...] = (4, 64)
    alpha: float = 8.0                       # rsLoRA: scale alpha / sqrt(r)
    lr_grid: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    lr_budget: int = 5                       # lr evaluations per (seed, method)
    target_acc: float = 0.9                  # new-task validation accuracy to match
    top_k: int = 10
    epsilon: float = 0.5                     # the paper's threshold (for the claim)

    def __post_init__(self):
        for k in ("seeds", "width", "pretrain_steps", "steps", "top_k"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.ranks or min(self.ranks) < 1 or max(self.ranks) > 64:
            raise ValueError("ranks must lie in [1, 64]")
        if len(self.lr_grid) < 2 or min(self.lr_grid) <= 0:
            raise ValueError("lr_grid needs at least two positive values")
        if not 0 < self.target_acc < 1 or not 0 < self.epsilon < 1:
            raise ValueError("target_acc and epsilon must be in (0, 1)")


def _rot(split: Split) -> Split:
    return Split(np.rot90(split.images, k=1, axes=(1, 2)).reshape(len(split), 64).copy(),
                 split.y)


def _forward(p, x, head):
    h = jax.nn.relu(x @ p["l1"] + p["b1"])
    h = jax.nn.relu(h @ p["l2"] + p["b2"])
    return h @ p[head] + p[head + "_b"]


def _xent(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def _acc(p, split: Split, head) -> float:
    return float(jnp.mean(jnp.argmax(_forward(p, jnp.asarray(split.x), head), -1)
                          == jnp.asarray(split.y)))


@functools.partial(jax.jit, static_argnames=("width", "steps"))
def _pretrain(key, x, y, lr, width, steps):
    k1, k2, k3 = jax.random.split(key, 3)
    p = {"l1": jax.random.normal(k1, (64, width)) * np.sqrt(2 / 64),
         "b1": jnp.zeros(width),
         "l2": jax.random.normal(k2, (width, width)) * np.sqrt(2 / width),
         "b2": jnp.zeros(width),
         "keep": jax.random.normal(k3, (width, 10)) / np.sqrt(width), "keep_b": jnp.zeros(10)}
    opt = optax.adamw(lr, weight_decay=1e-4)

    def body(c, _):
        p, s = c
        u, s = opt.update(jax.grad(lambda p: _xent(_forward(p, x, "keep"), y))(p), s, p)
        return (optax.apply_updates(p, u), s), None

    (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), None, length=steps)
    return p


@functools.lru_cache(maxsize=2)
def pretrained(cfg: Config, seed: int):
    d = digits(seed)
    return _pretrain(jax.random.key(seed), jnp.asarray(d.train.x), jnp.asarray(d.train.y),
                     cfg.pretrain_lr, cfg.width, cfg.pretrain_steps)


@functools.partial(jax.jit, static_argnames=("rank", "steps"))
def _finetune(p0, key, x, y, lr, rank, alpha, steps):
    """Fine-tune on ``(x, y)`` with a fresh head; ``rank = 0`` is full fine-tuning."""
    width = p0["l2"].shape[0]
    kh, *ka = jax.random.split(key, 3)
    train = {"new": jax.random.normal(kh, (width, 10)) / np.sqrt(width),
             "new_b": jnp.zeros(10)}
    scale = alpha / np.sqrt(max(rank, 1))
    if rank:
        for k, name in zip(ka, ("l1", "l2"), strict=True):
            d_in = p0[name].shape[0]
            train[name + "_a"] = jax.random.normal(k, (d_in, rank)) / np.sqrt(d_in)
            train[name + "_b"] = jnp.zeros((rank, width))
    else:
        train.update({k: p0[k] for k in ("l1", "b1", "l2", "b2")})

    def merged(t):
        p = dict(p0, new=t["new"], new_b=t["new_b"])
        if rank:
            for name in ("l1", "l2"):
                p[name] = p0[name] + scale * t[name + "_a"] @ t[name + "_b"]
        else:
            p.update({k: t[k] for k in ("l1", "b1", "l2", "b2")})
        return p

    opt = optax.adam(lr)

    def body(c, _):
        t, s = c
        u, s = opt.update(jax.grad(lambda t: _xent(_forward(merged(t), x, "new"), y))(t), s, t)
        return (optax.apply_updates(t, u), s), None

    (t, _), _ = jax.lax.scan(body, (train, opt.init(train)), None, length=steps)
    return merged(t)


@functools.lru_cache(maxsize=8)
def null_similarity(w_pre_bytes: bytes, shape: tuple, n: int = 4000) -> np.ndarray:
    """Best cosine of ``n`` random unit vectors with the pretrained left singular vectors."""
    w = np.frombuffer(w_pre_bytes, np.float32).reshape(shape)
    u = np.linalg.svd(w, full_matrices=False)[0]
    r = np.random.default_rng(0).standard_normal((n, shape[0]))
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    return np.abs(r @ u).max(1)


def run_cell(cfg: Config, seed: int, method: str, lr: float) -> dict:
    d = digits(seed)
    new_tr, new_va, new_te = _rot(d.train), _rot(d.val), _rot(d.test)
    p0 = pretrained(cfg, seed)
    rank = 0 if method == "full" else int(method.split("=")[1])
    p = _finetune(p0, jax.random.key(seed + 1000), jnp.asarray(new_tr.x),
                  jnp.asarray(new_tr.y), lr, rank, cfg.alpha, cfg.steps)
    out = {"val_new": _acc(p, new_va, "new"), "test_new": _acc(p, new_te, "new"),
           "forgetting": _acc(p0, d.test, "keep") - _acc(p, d.test, "keep")}
    for name in ("l1", "l2"):
        w0, w1 = np.asarray(p0[name]), np.asarray(p[name])
        res = snn.intruder_dimensions(w0, w1, top_k=cfg.top_k, epsilon=cfg.epsilon)
        sims = np.asarray(res.max_similarity)
        out[name] = {"max_similarity": sims.tolist(),
                     "relative_update": float(np.linalg.norm(w1 - w0) / np.linalg.norm(w0))}
    return out


def _counts(sims, epsilons=EPSILONS):
    s = np.asarray(sims)
    return [int((s < e).sum()) for e in epsilons]


def _spectrum(w) -> list[float]:
    s = np.linalg.svd(np.asarray(w), compute_uv=False)
    return (s / s[0]).tolist()


class LoRAIntruders(CellExperiment):
    name = "lora-intruders"
    title = "LoRA vs full fine-tuning: intruder dimensions and forgetting (Shuttleworth et al.)"
    config_cls = Config
    quick = {"seeds": 2, "ranks": (4, 64), "pretrain_steps": 1000, "steps": 150,
             "lr_grid": (1e-4, 1e-3), "lr_budget": 4}
    full = {"seeds": 5}
    figures = ("intruders.png",)

    def methods(self, cfg):
        return ("full",) + tuple(f"LoRA r={r}" for r in cfg.ranks)

    def sweep(self, cfg, cells):
        seeds = [cfg.seed + i for i in range(cfg.seeds)]
        chosen: dict[str, list[dict]] = {m: [] for m in self.methods(cfg)}
        lrs: dict[str, list[float]] = {m: [] for m in self.methods(cfg)}
        unmatched = 0
        null_counts = []
        spectra = []
        for s in seeds:
            p0 = pretrained(cfg, s)
            w2 = np.asarray(p0["l2"], np.float32)
            spectra.append(_spectrum(w2))
            null = null_similarity(w2.tobytes(), w2.shape)
            null_counts.append([cfg.top_k * float(np.mean(null < e)) for e in EPSILONS])
            for m in self.methods(cfg):
                t = stats.smallest_reaching(
                    lambda lr, s=s, m=m: cells(seed=s, method=m, lr=lr)["val_new"],
                    cfg.lr_grid, cfg.target_acc, budget=cfg.lr_budget)
                unmatched += t.at_edge
                chosen[m].append(cells(seed=s, method=m, lr=t.best))
                lrs[m].append(t.best)
        quick = cells.quick
        full_ = chosen["full"]
        claims = []
        k_eps = EPSILONS.index(cfg.epsilon) if cfg.epsilon in EPSILONS else None
        for m in self.methods(cfg)[1:]:
            a = [_counts(r["l2"]["max_similarity"], (cfg.epsilon,))[0] for r in chosen[m]]
            b = [_counts(r["l2"]["max_similarity"], (cfg.epsilon,))[0] for r in full_]
            cmp = stats.compare(a, b, quick=quick, level=stats.LEVEL)
            claims.append(stats.claim(
                f"{m} has more intruder dimensions than full fine-tuning (256x256 kernel, "
                f"eps {cfg.epsilon})", "intruders appear with LoRA, mostly not with full "
                "fine-tuning (LLaMA / RoBERTa)", cmp, names=(m, "full"), fmt=".2f"))
        for m in self.methods(cfg)[1:]:
            cmp = stats.compare([r["forgetting"] for r in chosen[m]],
                                [r["forgetting"] for r in full_], quick=quick)
            claims.append(stats.claim(
                f"{m} forgets more than full fine-tuning at matched new-task accuracy",
                "LoRA models forget more of the pretraining distribution", cmp,
                names=(m, "full")))
        rows = []
        for m in self.methods(cfg):
            rs = chosen[m]
            rows.append({
                "method": m,
                "lr (median)": float(np.median(lrs[m])),
                "new-task test acc": stats.mean_ci([r["test_new"] for r in rs]).format(),
                "forgetting": stats.mean_ci([r["forgetting"] for r in rs]).format(),
                f"intruders l2 (eps {cfg.epsilon})": stats.mean_ci(
                    [_counts(r["l2"]["max_similarity"], (cfg.epsilon,))[0]
                     for r in rs]).format(".1f"),
                "intruders l1": stats.mean_ci(
                    [_counts(r["l1"]["max_similarity"], (cfg.epsilon,))[0]
                     for r in rs]).format(".1f"),
                "‖ΔW‖/‖W‖ (l2)": stats.mean_ci(
                    [r["l2"]["relative_update"] for r in rs]).format(),
            })
        null_row = np.mean(null_counts, 0)
        curves = {m: [stats.mean_ci([_counts(r["l2"]["max_similarity"])[j]
                                     for r in chosen[m]]).to_dict()
                      for j in range(len(EPSILONS))] for m in self.methods(cfg)}
        spec = np.mean(spectra, 0)
        return {
            "claims": claims,
            "tables": {
                f"At matched new-task accuracy (smallest lr reaching validation accuracy "
                f"{cfg.target_acc}, the lr grid extended until it brackets it; {unmatched} of "
                f"{len(seeds) * len(chosen)} selections ended unbracketed)": rows,
                "Pretrained 256x256 kernel: singular values / largest": [
                    {f"s_{i + 1}": round(float(spec[i]), 3) for i in (0, 4, 9, 19, 49, 99)}],
            },
            "curves": curves, "null": null_row.tolist(),
            "epsilon_index": k_eps, "spectrum": spec.tolist(),
        }

    def run_cell(self, cfg, cell):
        return run_cell(cfg, cell["seed"], cell["method"], cell["lr"])

    def expected_cells(self, cfg):
        return None  # the lr grids grow until they bracket the target

    def report(self, cfg, results, history, outdir):
        fig, (a1, a2) = new_figure(1, 2, figsize=(9.5, 3.4))
        for m, est in results["curves"].items():
            e = [stats.Estimate.from_dict(d) for d in est]
            half = [x.half_width if np.isfinite(x.half_width) else 0.0 for x in e]
            a1.errorbar(EPSILONS, [x.mean for x in e], yerr=half, marker="o", ms=3,
                        capsize=2, label=m)
        a1.plot(EPSILONS, results["null"], "k--", label="random directions (null)")
        a1.set_xlabel("similarity threshold epsilon")
        a1.set_ylabel(f"intruders among top {cfg.top_k} (l2)")
        a1.legend(fontsize=7)
        a2.semilogy(results["spectrum"], lw=1)
        a2.set_xlabel("index")
        a2.set_ylabel("singular value / largest")
        a2.set_title("pretrained 256x256 kernel", fontsize=9)
        img = save_figure(fig, outdir, "intruders.png",
                          "intruder count vs threshold, with the random-direction null")
        return results_markdown(f"{cfg.seeds} seeds, {cfg.steps} fine-tuning steps, rsLoRA "
                                f"alpha {cfg.alpha}.", results, img)


EXPERIMENT = LoRAIntruders()
