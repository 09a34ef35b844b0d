"""Low-rank projected optimizers: subjax ``galore`` vs ``optax.contrib.galore``.

Timed: the optimizer update alone (the gradient is a fixed array, no model), at a
refresh step (basis recomputed: subspace iteration for subjax, float32 SVD for
optax) and at an ordinary step (project, Adam, project back). The accuracy
column is the final loss of the same optimizer after ``steps`` updates on a fixed
least-squares problem of the same matrix shape (``min_W ||X W - Y||^2 / 2n``,
``Y = X W*`` with a decaying spectrum), lower is better; the exact-SVD projector
of subjax is listed for the "within 1% of exact SVD" comparison.

The update time averaged over a refresh period of ``T`` steps is
``(refresh + (T - 1) * step) / T``; ``docs/lowrank.md`` derives it from the
two cases' medians for ``T = 200`` (GaLore's default gap).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import subjax.optim as so
from experiments.bench import Case, Contender

RANK = 128


def _problem(m: int, n: int, seed: int = 0, n_samples: int = 256):
    rng = np.random.default_rng(seed)
    k = min(m, n)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    s = 1.0 / (1.0 + np.arange(k)) ** 0.7
    w_star = (u * s) @ v.T
    x = rng.standard_normal((n_samples, m))  # unit-variance features
    y = x @ w_star
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


def _final_loss(opt, x, y, steps: int) -> float:
    m, n = x.shape[1], y.shape[1]
    loss = lambda w: 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=-1))

    @jax.jit
    def run(w):
        def body(carry, _):
            w, s = carry
            g = jax.grad(loss)(w)
            u, s = opt.update(g, s, w)
            return (optax.apply_updates(w, u), s), None

        (w, _), _ = jax.lax.scan(body, (w, opt.init(w)), None, length=steps)
        return loss(w)

    return float(run(jnp.zeros((m, n), jnp.float32)))


def _at_count(state, count: int):
    """``state`` with every ``count`` field (any optax / subjax state) set to ``count``."""

    def fix(path, leaf):
        name = getattr(path[-1], "name", None) if path else None
        if name == "count":
            return jnp.asarray(count, jnp.int32)
        return leaf

    return jax.tree_util.tree_map_with_path(fix, state)


def cases(quick: bool) -> list[Case]:
    shapes = [(1024, 1024), (4096, 1024)]
    gap = 200
    # the fixed problem: quick mode runs it on the 1024x1024 shape only
    loss_steps, loss_gap = (40, 20) if quick else (300, 50)
    loss_shapes = {(1024, 1024)} if quick else set(shapes)
    lr = 1e-2
    out = []
    makers = {
        "subjax": functools.partial(so.galore, rank=RANK, projector="subspace"),
        "subjax exact svd": functools.partial(so.galore, rank=RANK, projector="svd"),
        "optax.contrib.galore": lambda lr, update_proj_gap: optax.contrib.galore(
            lr, rank=RANK, update_proj_gap=update_proj_gap),
    }
    timed = ("subjax", "optax.contrib.galore") if quick else tuple(makers)
    for m, n in shapes:
        g = jax.random.normal(jax.random.key(0), (m, n), jnp.float32)
        w = jnp.zeros((m, n), jnp.float32)
        finals = {}
        if (m, n) in loss_shapes:  # final loss on the fixed problem (set-up, not timed)
            x, y = _problem(m, n)
            finals = {name: _final_loss(mk(lr, update_proj_gap=loss_gap), x, y, loss_steps)
                      for name, mk in makers.items()}
        note = ""
        if finals:
            gap_rel = (finals["subjax"] - finals["subjax exact svd"]) / finals["subjax exact svd"]
            note = (f"final loss: subspace {finals['subjax']:.5g}, exact svd "
                    f"{finals['subjax exact svd']:.5g} (relative gap {gap_rel:+.2%}), optax "
                    f"{finals['optax.contrib.galore']:.5g}")
        opts = {name: makers[name](lr, update_proj_gap=gap) for name in timed}
        for kind, count in (("refresh step", gap), ("ordinary step", 1)):
            contenders = []
            for name, opt in opts.items():
                # state primed by one real update, then its step count set so that
                # the timed update is (or is not) a refresh; for subjax count=gap
                # is a warm refresh (from the stored basis), not the first one
                state = opt.update(g, opt.init(w), w)[1]
                state = _at_count(state, count)
                f = jax.jit(opt.update)
                contenders.append(Contender(
                    name,
                    functools.partial(f, g, state, w),
                    accuracy=(lambda out, v=finals[name]: v) if finals else None,
                ))
            out.append(Case(
                name=f"galore update {m}x{n} r{RANK}: {kind}",
                params={"m": m, "n": n, "rank": RANK, "refresh_every": gap, "kind": kind,
                        "loss_steps": loss_steps, "loss_refresh_every": loss_gap, "lr": lr},
                contenders=contenders,
                reference="subjax",
                accuracy_label=(f"final loss after {loss_steps} steps "
                                f"(refresh every {loss_gap} steps, lr {lr}) on a fixed LS problem"),
                repeats=3 if quick else 7,
                max_seconds=15.0 if quick else 60.0,
                note=note,
            ))
    return out
