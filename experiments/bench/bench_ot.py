"""Benchmark: subjax.ot vs ott-jax Sinkhorn and POT ``sinkhorn_log``.

Dense cases: time to marginal error ``|P1 - a|_1 + |P^T1 - b|_1 <= 1e-6`` on two
2-D Gaussian clouds (uniform weights, squared-Euclidean cost), epsilon = rel *
mean(C). Every contender's accuracy column is the L1 marginal error of its own
output recomputed in float64 — a contender that stopped at its iteration cap
shows it. The case note gives the regularised-cost agreement with POT where POT
was run.

Online cases: float32 point clouds (``PointCloud`` with ``block_size``, never
the ``n x n`` cost), tolerance 1e-3, the subjax solvers against log-domain
Sinkhorn (subjax's own online Sinkhorn and ott-jax's plain ``PointCloud``,
which recomputes the costs every iteration; ott-jax's online ``batch_size``
mode fails on jax 0.10). The note gives each contender's compiled temporary
memory (XLA's ``memory_analysis``) and its iteration counts; the accuracy
column is the marginal error recomputed blockwise in float64 from the
potentials.

    python -m experiments.bench ot --quick     # a few minutes on 2 cores
    python -m experiments.bench ot             # n in {500, 1000, 2000} dense and
                                               # n in {10,000, 50,000} online: hours
    SUBJAX_BENCH_OT_ONLY=1000,0.01,float64 python -m experiments.bench ot    # one dense case
    SUBJAX_BENCH_OT_ONLINE=10000,2,0.001 python -m experiments.bench ot      # one online case
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


ONLINE_TOL = 1e-3
BLOCK = 256
MAX_TEMP_BYTES = 4 * 2**30  # a contender whose compiled temporaries exceed this is not run


def _online_error(f, g, x, y, eps):
    """L1 marginal error of the plan ``exp((f_i + g_j - C_ij)/eps) / (n m)`` (uniform
    weights), blockwise in float64."""
    n, m = x.shape[0], y.shape[0]
    with jax.enable_x64(True):
        f64 = lambda v: jnp.asarray(np.asarray(v, np.float64))
        res = ot.OTResult(
            f=f64(f), g=f64(g), cost=ot.PointCloud(f64(x), f64(y), block_size=BLOCK),
            a=jnp.full((n,), 1 / n), b=jnp.full((m,), 1 / m), epsilon=f64(eps), rho_a=None,
            rho_b=None, error=None, errors=None, n_iters=None, converged=None,
            n_linear_iters=None)
        return float(sum(res.marginal_errors()))


def _ott_pointcloud_solver(eps, max_iterations):
    from ott.geometry import pointcloud
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    solver = ott_sinkhorn.Sinkhorn(threshold=ONLINE_TOL, max_iterations=max_iterations)
    return jax.jit(lambda x, y: solver(linear_problem.LinearProblem(
        pointcloud.PointCloud(x, y, epsilon=eps))))


def _online_case(n, d, rel, sinkhorn_cap=20000):
    """Point clouds of ``n`` points in ``d`` dimensions, float32, tolerance 1e-3."""
    kx, ky = jax.random.split(jax.random.key(n + d))
    x = jax.random.normal(kx, (n, d), jnp.float32)
    y = jax.random.normal(ky, (n, d), jnp.float32) + 0.5
    pc = ot.PointCloud(x, y, block_size=BLOCK)
    eps = float(rel * pc.mean_cost())
    w = 1 / n
    solvers = {
        "subjax sns (online)": (lambda pc: ot.sparse_newton_sinkhorn(
            pc, epsilon=eps, tol=ONLINE_TOL), (pc,)),
        "subjax sinkhorn_newton (online)": (lambda pc: ot.sinkhorn_newton(
            pc, epsilon=eps, tol=ONLINE_TOL), (pc,)),
        "subjax sinkhorn (online)": (lambda pc: ot.sinkhorn(
            pc, epsilon=eps, tol=ONLINE_TOL, max_iters=sinkhorn_cap, record_every=100), (pc,)),
        "ott-jax Sinkhorn (PointCloud)": (_ott_pointcloud_solver(eps, sinkhorn_cap), (x, y)),
    }
    notes = [f"eps={eps:.4g} (rel {rel} x mean cost), block_size={BLOCK}; ott-jax's online "
             f"PointCloud(batch_size=...) fails on jax 0.10 (AttributeError: module "
             f"'jax.interpreters.batching' has no attribute 'is_vmappable'), its plain "
             f"PointCloud is timed; compiled temporaries (XLA memory_analysis):"]
    contenders = []
    for name, (fn, args) in solvers.items():
        compiled = jax.jit(fn).lower(*args).compile()
        mem = compiled.memory_analysis()
        temp = None if mem is None else mem.temp_size_in_bytes
        notes.append(f"{name} {temp / 2**20:.1f} MiB" if temp is not None else f"{name} ?")
        if temp is not None and temp > MAX_TEMP_BYTES:
            notes[-1] += " (not run: over the memory budget of this machine)"
            continue
        if name.startswith("ott"):
            def acc(out, name=name):
                case.note += (f"; {name}: {int(out.n_iters)} iterations"
                              f"{'' if bool(out.converged) else ' (NOT converged at cap)'}")
                log_w = eps * np.log(w)
                return _online_error(np.asarray(out.f) - log_w, np.asarray(out.g) - log_w,
                                     x, y, eps)
        else:
            def acc(out, name=name):
                case.note += (f"; {name}: {int(out.n_iters)} iterations, "
                              f"{int(out.n_linear_iters)} CG"
                              f"{'' if bool(out.converged) else ' (NOT converged)'}")
                return _online_error(out.f, out.g, x, y, eps)
        contenders.append(Contender(name, lambda c=compiled, a=args: c(*a), acc))
    case = Case(
        name=f"online OT n={n} d={d} eps={rel}*mean(C) float32",
        params={"n": n, "d": d, "rel_epsilon": rel, "epsilon": eps, "dtype": "float32",
                "tol": ONLINE_TOL, "block_size": BLOCK},
        contenders=contenders,
        reference="subjax sns (online)",
        accuracy_label="L1 marginal error (float64, blockwise)",
        max_seconds=0.0,  # one timed run each after the warm-up: these are long
        repeats=1,
        note="; ".join(notes[:1]) + " " + ", ".join(notes[1:]),
    )
    return case


def cases(quick: bool) -> list[Case]:
    import os

    only = os.environ.get("SUBJAX_BENCH_OT_ONLY")  # e.g. "1000,0.01,float64": one full case
    if only:
        n, rel, dt = only.split(",")
        return [_case(int(n), float(rel), dt, 20000, with_pot=False, with_sinkhorn=False,
                      repeats=1)]
    online = os.environ.get("SUBJAX_BENCH_OT_ONLINE")  # e.g. "10000,2,0.001": one online case
    if online:
        n, d, rel = online.split(",")
        return [_online_case(int(n), int(d), float(rel))]
    if quick:
        return [
            _case(500, 0.1, "float64", 5000, with_pot=True, with_sinkhorn=True),
            _case(500, 0.1, "float32", 5000, with_pot=False, with_sinkhorn=True),
            # ott needs > 10,000 iterations here: one timed run each (plus the warm-up)
            _case(500, 0.01, "float64", 20000, with_pot=False, with_sinkhorn=False, repeats=1),
            # Sinkhorn needs ~3,000 sweeps here
            _online_case(2000, 2, 0.001),
        ]
    out = []
    for n in (500, 1000, 2000):
        for rel in (0.1, 0.01, 0.001):
            for dt in ("float64", "float32"):
                out.append(_case(n, rel, dt, 20000, with_pot=(rel == 0.1 and n <= 1000),
                                 with_sinkhorn=(rel == 0.1)))
    for n in (10_000, 50_000):
        for d in (2, 10):
            for rel in (0.05, 0.01, 0.001):
                out.append(_online_case(n, d, rel))
    return out
