"""Benchmark: subjax.ot vs ott-jax Sinkhorn and POT ``sinkhorn_log``.

Time to marginal error ``|P1 - a|_1 + |P^T1 - b|_1 <= 1e-6`` on two 2-D Gaussian
clouds (uniform weights, squared-Euclidean cost), epsilon = rel * mean(C).
Every contender's accuracy column is the L1 marginal error of its own output
recomputed in float64 — a contender that stopped at its iteration cap shows it.
The case note gives the regularised-cost agreement with POT where POT was run.

    python -m experiments.bench ot --quick     # ~3 min on 2 cores
    python -m experiments.bench ot             # n in {500, 1000, 2000}, long
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import Case, Contender
from subjax import ot

TOL = 1e-6


def _x64(fn, enable):
    def run():
        with jax.enable_x64(enable):
            return fn()
    return run


def _marginal_error(P, n, m):
    P = np.asarray(P, np.float64)
    return float(np.abs(P.sum(1) - 1 / n).sum() + np.abs(P.sum(0) - 1 / m).sum())


def _ott_solver(eps, max_iterations):
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    solver = ott_sinkhorn.Sinkhorn(threshold=TOL, max_iterations=max_iterations)
    return jax.jit(lambda C: solver(linear_problem.LinearProblem(
        geometry.Geometry(cost_matrix=C, epsilon=eps))))


def _case(n, rel, dtype_name, ott_cap, with_pot, with_sinkhorn, repeats=None):
    import ot as pot

    x64 = dtype_name == "float64"
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        kx, ky = jax.random.split(jax.random.key(n))
        x = jax.random.normal(kx, (n, 2), dtype)
        y = jax.random.normal(ky, (n, 2), dtype) + 0.5
        C = ot.cost_matrix(x, y)
        eps = float(rel * jnp.mean(C))
        newton = jax.jit(lambda C: ot.sinkhorn_newton(C, epsilon=eps, tol=TOL))
        sns = jax.jit(lambda C: ot.sparse_newton_sinkhorn(C, epsilon=eps, tol=TOL))
        sk = jax.jit(lambda C: ot.sinkhorn(C, epsilon=eps, tol=TOL, max_iters=ott_cap))
        ott_fn = _ott_solver(eps, ott_cap)

    def acc_ours(out):
        with jax.enable_x64(x64):  # the plan in the solve's own precision
            return _marginal_error(out.plan(), n, n)

    def acc_ott(out):
        # ott's iteration count is only known after its (possibly minutes-long) run:
        # appended to the case note here rather than solved once more at set-up.
        case.note += (f"; ott iterations {int(out.n_iters)}"
                      f"{'' if bool(out.converged) else ' (NOT converged at cap)'}")
        with jax.enable_x64(x64):
            return _marginal_error(out.matrix, n, n)

    contenders = [
        Contender("subjax sinkhorn_newton", _x64(lambda: newton(C), x64), acc_ours),
        Contender("subjax sns", _x64(lambda: sns(C), x64), acc_ours),
    ]
    if with_sinkhorn:
        contenders.append(Contender("subjax sinkhorn", _x64(lambda: sk(C), x64), acc_ours))
    contenders.append(Contender("ott-jax Sinkhorn", _x64(lambda: ott_fn(C), x64), acc_ott,
                                note=f"lse_mode, threshold={TOL}, max_iterations={ott_cap}"))

    # iteration counts (and POT agreement) once, outside the timing
    with jax.enable_x64(x64):
        o_new, o_sns = newton(C), sns(C)
        notes = [f"eps={eps:.4g} (rel {rel} x mean cost); iterations: newton "
                 f"{int(o_new.n_iters)} (CG {int(o_new.n_linear_iters)}), sns "
                 f"{int(o_sns.n_iters)}"]
        if with_pot:
            Cn = np.asarray(C, np.float64)
            w = np.full(n, 1 / n)
            pot_fn = lambda: pot.sinkhorn(w, w, Cn, eps, method="sinkhorn_log", stopThr=TOL,
                                          numItermax=ott_cap)
            contenders.append(Contender("POT sinkhorn_log", pot_fn,
                                        lambda P: _marginal_error(P, n, n)))
            # agreement with a tightly converged POT plan (not timed)
            P = pot.sinkhorn(w, w, Cn, eps, method="sinkhorn_log", stopThr=1e-11,
                             numItermax=100_000)
            reg_pot = float(np.sum(P * Cn) + eps * np.sum(P * np.log(P * n * n + 1e-300) - P)
                            + eps)
            reg_ours = float(o_new.reg_ot_cost)
            notes.append(f"reg. cost subjax {reg_ours:.10g} vs POT {reg_pot:.10g} "
                         f"(rel. diff {abs(reg_ours - reg_pot) / abs(reg_pot):.1e})")
    case = Case(
        name=f"entropic OT n={n} eps={rel}*mean(C) {dtype_name}",
        params={"n": n, "rel_epsilon": rel, "epsilon": eps, "dtype": dtype_name, "tol": TOL},
        contenders=contenders,
        reference="subjax sinkhorn_newton",
        accuracy_label="L1 marginal error of the returned plan",
        max_seconds=40.0,
        repeats=repeats,
        note="; ".join(notes),
    )
    return case


def cases(quick: bool) -> list[Case]:
    import os

    only = os.environ.get("SUBJAX_BENCH_OT_ONLY")  # e.g. "1000,0.01,float64": one full case
    if only:
        n, rel, dt = only.split(",")
        return [_case(int(n), float(rel), dt, 20000, with_pot=False, with_sinkhorn=False,
                      repeats=1)]
    if quick:
        return [
            _case(500, 0.1, "float64", 5000, with_pot=True, with_sinkhorn=True),
            _case(500, 0.1, "float32", 5000, with_pot=False, with_sinkhorn=True),
            # ott needs > 10,000 iterations here: one timed run each (plus the warm-up)
            _case(500, 0.01, "float64", 20000, with_pot=False, with_sinkhorn=False, repeats=1),
        ]
    out = []
    for n in (500, 1000, 2000):
        for rel in (0.1, 0.01, 0.001):
            for dt in ("float64", "float32"):
                out.append(_case(n, rel, dt, 20000, with_pot=(rel == 0.1 and n <= 1000),
                                 with_sinkhorn=(rel == 0.1)))
    return out
