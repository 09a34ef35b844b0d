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
memory (XLA's ``memory_analysis``); the accuracy column is the marginal error
recomputed blockwise in float64 from the potentials.

Sinkhorn sweeps have a fixed cost, and a run to tolerance can take thousands of
them (hours at 50,000 points). So a Sinkhorn contender (subjax ``sinkhorn``,
ott-jax ``Sinkhorn``) whose run to tolerance exceeds ``DIRECT_ENTRIES`` cost
entries is timed over a fixed number ``K`` of sweeps, interleaved with the other
contenders, and reported as per-sweep time x the sweeps to tolerance, counted
once in an untimed run (a :class:`~experiments.bench.Scale`; the table says so).
Counts are capped at ``SWEEP_ENTRIES / (n m)`` sweeps (default 2e11 cost
entries, at least 20 sweeps); a count that hits its cap makes that time a lower
bound and the ratio a bound. Its accuracy column is the error of the counted run.
Counts do not depend on the machine's load: they are cached in
``results/bench/cache/ot_sweeps.json`` (keyed by problem, tolerance, cap, solver and
the subjax source / ott-jax version), so a rerun times only.

    python -m experiments.bench ot --quick     # about five minutes on 2 cores
    python -m experiments.bench ot             # n in {500, 1000, 2000} dense and
                                               # n in {10,000, 50,000} online: hours
    SUBJAX_BENCH_OT_ONLY=1000,0.01,float64 python -m experiments.bench ot    # one dense case
    SUBJAX_BENCH_OT_ONLINE=10000,2,0.001 python -m experiments.bench ot      # one online case
    SUBJAX_BENCH_OT_SKIP=newton,ott python -m experiments.bench ot           # drop contenders
    SUBJAX_BENCH_OT_SWEEP_ENTRIES=5e10 ...                                   # smaller caps
    SUBJAX_BENCH_OT_SWEEPS=path ...            # count cache (results/bench/cache/ot_sweeps.json)
    SUBJAX_BENCH_OT_ANY_VERSION=1 ...          # reuse counts taken with other subjax sources
    SUBJAX_BENCH_OT_COUNT_SECONDS=60 ...       # cap each online count at ~60 s of sweeps
    SUBJAX_BENCH_OT_BLOCK=2048 ...             # online block_size (default 256)
    SUBJAX_BENCH_OT_MAX_TEMP_GIB=100 ...       # memory budget of a contender (default 4)
    python -m experiments.bench.bench_ot --counts [--only "dense 2000"]       # counts only
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import Case, Contender, Scale
from experiments.harness import DEFAULT_RESULTS
from subjax import ot

TOL = 1e-6
ONLINE_TOL = 1e-3
BLOCK = int(os.environ.get("SUBJAX_BENCH_OT_BLOCK", 256))  # online block_size
# a contender whose compiled temporaries exceed this is not run
MAX_TEMP_BYTES = int(float(os.environ.get("SUBJAX_BENCH_OT_MAX_TEMP_GIB", 4)) * 2**30)
DIRECT_ENTRIES = 2e9  # a Sinkhorn run to tolerance over fewer cost entries is timed whole
TIMED_ENTRIES = 5e7  # about this many cost entries per timed call of K sweeps
SWEEP_ENTRIES = 2e11  # default cap of an untimed count, in cost entries
SUBJAX_SOURCES = ("_sinkhorn.py", "_geometry.py", "_common.py", "_costs.py")


def _x64(fn, enable):
    def run():
        with jax.enable_x64(enable):
            return fn()
    return run


def _skipped(name):
    skip = [s for s in os.environ.get("SUBJAX_BENCH_OT_SKIP", "").split(",") if s]
    return any(s in name for s in skip)


def _sweeps_timed(n, m):
    """K: sweeps per timed call, a multiple of 10 (ott-jax checks every 10)."""
    return 10 * max(1, round(TIMED_ENTRIES / (10 * n * m)))


def _sweep_cap(n, m, default):
    budget = float(os.environ.get("SUBJAX_BENCH_OT_SWEEP_ENTRIES", SWEEP_ENTRIES))
    return int(min(default, max(20, budget // (n * m))))


# --- untimed sweep counts, cached --------------------------------------------

def _cache_path():
    return pathlib.Path(os.environ.get("SUBJAX_BENCH_OT_SWEEPS",
                                       DEFAULT_RESULTS / "bench" / "cache" / "ot_sweeps.json"))


def _solver_version(solver):
    if solver.startswith("ott"):
        import ott

        return "ott-jax " + ott.__version__
    src = pathlib.Path(ot.__file__).parent
    digest = hashlib.sha256(b"".join((src / f).read_bytes() for f in SUBJAX_SOURCES))
    return "subjax.ot " + digest.hexdigest()[:12]


def counted(solver, problem, tol, cap, run, log=print):
    """``{"sweeps", "converged", "error", "seconds"}`` of ``run()`` (untimed), cached."""
    key = json.dumps({"solver": solver, "problem": problem, "tol": tol, "cap": cap,
                      "version": _solver_version(solver)}, sort_keys=True)
    path = _cache_path()
    cache = json.loads(path.read_text()) if path.exists() else {}
    # SUBJAX_BENCH_OT_ANY_VERSION=1: counts taken with other subjax sources hold too
    any_version = os.environ.get("SUBJAX_BENCH_OT_ANY_VERSION") == "1"
    drop = ("cap", "version") if any_version else ("cap",)
    want = {k: v for k, v in json.loads(key).items() if k not in drop}
    for other, got in cache.items():  # a count under another cap holds if it converged
        k = json.loads(other)
        same = {a: v for a, v in k.items() if a not in drop} == want
        if same and (k["cap"] == cap or (got["converged"] and got["sweeps"] <= cap)):
            return got
    if key not in cache:
        log(f"    counting {solver} sweeps on {problem} (cap {cap}) ...")
        t0 = time.perf_counter()
        sweeps, converged, error = run()
        cache = json.loads(path.read_text()) if path.exists() else {}
        cache[key] = {"sweeps": int(sweeps), "converged": bool(converged),
                      "error": float(error), "seconds": time.perf_counter() - t0}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
        log(f"    -> {cache[key]}")
    return cache[key]


def _scaled(count, K):
    sweeps = count["sweeps"]
    what = (f"per-sweep time x {sweeps:,} sweeps to tolerance (counted untimed, {K} "
            f"sweeps timed)" if count["converged"] else
            f"per-sweep time x {sweeps:,} sweeps, the count's cap: NOT converged there, "
            f"a lower bound ({K} sweeps timed)")
    return Scale(sweeps / K, lower_bound=not count["converged"], what=what)


# --- dense cases ---------------------------------------------------------------

def _marginal_error(P, n, m):
    P = np.asarray(P, np.float64)
    return float(np.abs(P.sum(1) - 1 / n).sum() + np.abs(P.sum(0) - 1 / m).sum())


def _ott_solver(eps, max_iterations, threshold=TOL, min_iterations=0, geometry_of=None):
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    solver = ott_sinkhorn.Sinkhorn(threshold=threshold, max_iterations=max_iterations,
                                   min_iterations=min_iterations)
    geometry_of = geometry_of or (lambda C: geometry.Geometry(cost_matrix=C, epsilon=eps))
    return jax.jit(lambda *args: solver(linear_problem.LinearProblem(geometry_of(*args))))


def _dense_problem(n, rel, x64):
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        kx, ky = jax.random.split(jax.random.key(n))
        x = jax.random.normal(kx, (n, 2), dtype)
        y = jax.random.normal(ky, (n, 2), dtype) + 0.5
        C = ot.cost_matrix(x, y)
        return C, float(rel * jnp.mean(C))


def dense_counts(n, rel, dtype_name, cap, log=print):
    """Untimed sweep counts of subjax and ott-jax Sinkhorn on a dense case."""
    x64 = dtype_name == "float64"
    C, eps = _dense_problem(n, rel, x64)
    problem = {"kind": "dense", "n": n, "rel_epsilon": rel, "dtype": dtype_name}

    def run_subjax():
        with jax.enable_x64(x64):
            out = jax.jit(lambda C: ot.sinkhorn(C, epsilon=eps, tol=TOL, max_iters=cap))(C)
            return int(out.n_iters), bool(out.converged), _marginal_error(out.plan(), n, n)

    def run_ott():
        with jax.enable_x64(x64):
            out = _ott_solver(eps, cap)(C)
            return int(out.n_iters), bool(out.converged), _marginal_error(out.matrix, n, n)

    runs = {"subjax sinkhorn": run_subjax, "ott-jax Sinkhorn": run_ott}
    return {name: counted(name, problem, TOL, cap, run, log) for name, run in runs.items()
            if not _skipped(name)}  # a skipped contender is not counted either


def _case(n, rel, dtype_name, ott_cap, with_pot, repeats=None):
    import ot as pot

    x64 = dtype_name == "float64"
    C, eps = _dense_problem(n, rel, x64)
    cap = _sweep_cap(n, n, ott_cap)
    counts = dense_counts(n, rel, dtype_name, cap)
    K = _sweeps_timed(n, n)
    with jax.enable_x64(x64):
        newton = jax.jit(lambda C: ot.sinkhorn_newton(C, epsilon=eps, tol=TOL))
        sns = jax.jit(lambda C: ot.sparse_newton_sinkhorn(C, epsilon=eps, tol=TOL))
        sk = {True: jax.jit(lambda C: ot.sinkhorn(C, epsilon=eps, tol=TOL, max_iters=cap)),
              False: jax.jit(lambda C: ot.sinkhorn(C, epsilon=eps, tol=0.0, max_iters=K))}
        ott_fn = {True: _ott_solver(eps, cap),
                  False: _ott_solver(eps, K, threshold=0.0, min_iterations=K)}

    def acc_ours(out):
        with jax.enable_x64(x64):  # the plan in the solve's own precision
            return _marginal_error(out.plan(), n, n)

    def acc_ott(out):
        with jax.enable_x64(x64):
            return _marginal_error(out.matrix, n, n)

    contenders = [
        Contender("subjax sinkhorn_newton", _x64(lambda: newton(C), x64), acc_ours),
        Contender("subjax sns", _x64(lambda: sns(C), x64), acc_ours),
    ]
    notes = [f"eps={eps:.4g} (rel {rel} x mean cost)"]
    for name, fns, acc, note in (
            ("subjax sinkhorn", sk, acc_ours, f"max_iters={cap}"),
            ("ott-jax Sinkhorn", ott_fn, acc_ott,
             f"lse_mode, threshold={TOL}, max_iterations={cap}")):
        if name not in counts:  # skipped
            continue
        count = counts[name]
        notes.append(f"{name} {count['sweeps']:,} sweeps"
                     + ("" if count["converged"] else " (NOT converged at the cap)"))
        if count["sweeps"] * n * n <= DIRECT_ENTRIES:
            contenders.append(Contender(name, _x64(lambda f=fns[True]: f(C), x64), acc, note))
        else:
            contenders.append(Contender(
                name, _x64(lambda f=fns[False]: f(C), x64),
                lambda out, c=count: c["error"], note, scale=_scaled(count, K)))

    # iteration counts (and POT agreement) once, outside the timing
    with jax.enable_x64(x64):
        o_new, o_sns = newton(C), sns(C)
        notes.append(f"iterations: newton {int(o_new.n_iters)} (CG {int(o_new.n_linear_iters)}),"
                     f" sns {int(o_sns.n_iters)} (CG {int(o_sns.n_linear_iters)})")
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
    return Case(
        name=f"entropic OT n={n} eps={rel}*mean(C) {dtype_name}",
        params={"n": n, "rel_epsilon": rel, "epsilon": eps, "dtype": dtype_name, "tol": TOL,
                "sweeps_timed": K},
        contenders=contenders,
        reference="subjax sinkhorn_newton",
        accuracy_label="L1 marginal error of the returned plan",
        max_seconds=40.0,
        repeats=repeats,
        note="; ".join(notes),
    )


# --- online (point-cloud) cases ------------------------------------------------

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


def _ott_error(out, x, y, eps):
    log_w = eps * np.log(1 / x.shape[0])
    return _online_error(np.asarray(out.f) - log_w, np.asarray(out.g) - log_w, x, y, eps)


def _ott_pointcloud_solver(eps, max_iterations, threshold=ONLINE_TOL, min_iterations=0):
    from ott.geometry import pointcloud

    return _ott_solver(eps, max_iterations, threshold, min_iterations,
                       geometry_of=lambda x, y: pointcloud.PointCloud(x, y, epsilon=eps))


def _online_problem(n, d, rel):
    kx, ky = jax.random.split(jax.random.key(n + d))
    x = jax.random.normal(kx, (n, d), jnp.float32)
    y = jax.random.normal(ky, (n, d), jnp.float32) + 0.5
    pc = ot.PointCloud(x, y, block_size=BLOCK)
    return x, y, pc, float(rel * pc.mean_cost())


def online_counts(n, d, rel, cap, log=print):
    """Untimed sweep counts of subjax online Sinkhorn and ott-jax Sinkhorn.

    ott-jax's count runs on its ``Geometry`` of the materialised
    ``PointCloud(x, y).cost_matrix`` (the same iteration on the same costs, a third
    of the time), and only where that cost fits in ``MAX_TEMP_BYTES`` (beyond it
    ott-jax's ``PointCloud`` is not run either).
    """
    x, y, pc, eps = _online_problem(n, d, rel)
    problem = {"kind": "online", "n": n, "d": d, "rel_epsilon": rel, "dtype": "float32"}

    def run_subjax():
        out = jax.jit(lambda pc: ot.sinkhorn(pc, epsilon=eps, tol=ONLINE_TOL, max_iters=cap,
                                             record_every=100))(pc)
        return int(out.n_iters), bool(out.converged), _online_error(out.f, out.g, x, y, eps)

    def run_ott():
        from ott.geometry import geometry, pointcloud

        geom = lambda x, y: geometry.Geometry(
            cost_matrix=pointcloud.PointCloud(x, y).cost_matrix, epsilon=eps)
        out = _ott_solver(eps, cap, ONLINE_TOL, geometry_of=geom)(x, y)
        return int(out.n_iters), bool(out.converged), _ott_error(out, x, y, eps)

    out = {"subjax sinkhorn (online)": counted("subjax sinkhorn (online)", problem,
                                               ONLINE_TOL, cap, run_subjax, log)}
    # ott-jax's PointCloud forms the n x m cost in each sweep: not run past the budget
    if not _skipped("ott-jax Sinkhorn (PointCloud)") and 4 * n * n <= MAX_TEMP_BYTES:
        out["ott-jax Sinkhorn (PointCloud)"] = counted(
            "ott-jax Sinkhorn (PointCloud)", problem, ONLINE_TOL, cap, run_ott, log)
    return out


def _cap_for_seconds(pc, eps, K, seconds):
    """Sweeps (a multiple of 10, at least 20) that subjax's online Sinkhorn runs in
    about ``seconds``, from one warm timed call of ``K`` sweeps."""
    run = jax.jit(lambda pc: ot.sinkhorn(pc, epsilon=eps, tol=0.0, max_iters=K,
                                         record_every=10))
    jax.block_until_ready(run(pc))
    t0 = time.perf_counter()
    jax.block_until_ready(run(pc))
    per_sweep = (time.perf_counter() - t0) / K
    return max(20, 10 * int(seconds / per_sweep / 10))


def _online_case(n, d, rel, sinkhorn_cap=20000):
    """Point clouds of ``n`` points in ``d`` dimensions, float32, tolerance 1e-3."""
    x, y, pc, eps = _online_problem(n, d, rel)
    cap = _sweep_cap(n, n, sinkhorn_cap)
    K = _sweeps_timed(n, n)
    seconds = os.environ.get("SUBJAX_BENCH_OT_COUNT_SECONDS")
    if seconds:  # cap the counts at about this many seconds of subjax sweeps
        cap = min(cap, _cap_for_seconds(pc, eps, K, float(seconds)))
    counts = online_counts(n, d, rel, cap)
    solvers = {
        "subjax sns (online)": (lambda pc: ot.sparse_newton_sinkhorn(
            pc, epsilon=eps, tol=ONLINE_TOL), (pc,)),
        "subjax sinkhorn_newton (online)": (lambda pc: ot.sinkhorn_newton(
            pc, epsilon=eps, tol=ONLINE_TOL), (pc,)),
        "subjax sinkhorn (online)": (lambda pc: ot.sinkhorn(
            pc, epsilon=eps, tol=0.0, max_iters=K, record_every=10), (pc,)),
        "ott-jax Sinkhorn (PointCloud)": (_ott_pointcloud_solver(
            eps, K, threshold=0.0, min_iterations=K), (x, y)),
    }
    notes = [f"eps={eps:.4g} (rel {rel} x mean cost), block_size={BLOCK}; ott-jax's online "
             f"PointCloud(batch_size=...) fails on jax 0.10 (AttributeError: module "
             f"'jax.interpreters.batching' has no attribute 'is_vmappable'), its plain "
             f"PointCloud is timed"]
    for name, count in counts.items():
        notes.append(f"{name} {count['sweeps']:,} sweeps"
                     + ("" if count["converged"] else " (NOT converged at the cap)"))
    notes.append("compiled temporaries (XLA memory_analysis):")
    mems, contenders = [], []
    for name, (fn, args) in solvers.items():
        if name != "subjax sns (online)" and _skipped(name):
            continue
        compiled = jax.jit(fn).lower(*args).compile()
        mem = compiled.memory_analysis()
        temp = None if mem is None else mem.temp_size_in_bytes
        mems.append(f"{name} {temp / 2**20:.1f} MiB" if temp is not None else f"{name} ?")
        if temp is not None and temp > MAX_TEMP_BYTES:
            mems[-1] += " (not run: over the memory budget of this machine)"
            continue
        run = lambda c=compiled, a=args: c(*a)
        if name in counts:
            contenders.append(Contender(name, run, lambda out, c=counts[name]: c["error"],
                                        scale=_scaled(counts[name], K)))
            continue

        def acc(out, name=name):
            case.note += (f"; {name}: {int(out.n_iters)} iterations, "
                          f"{int(out.n_linear_iters)} CG"
                          f"{'' if bool(out.converged) else ' (NOT converged)'}")
            return _online_error(out.f, out.g, x, y, eps)
        contenders.append(Contender(name, run, acc))
    case = Case(
        name=f"online OT n={n} d={d} eps={rel}*mean(C) float32",
        params={"n": n, "d": d, "rel_epsilon": rel, "epsilon": eps, "dtype": "float32",
                "tol": ONLINE_TOL, "block_size": BLOCK, "sweeps_timed": K},
        contenders=contenders,
        reference="subjax sns (online)",
        accuracy_label="L1 marginal error (float64, blockwise)",
        max_seconds=0.0,  # one timed run each: these are long
        repeats=1,
        warmup=False,  # compiled above
        note="; ".join(notes) + " " + ", ".join(mems),
    )
    return case


# --- the suite -------------------------------------------------------------------

DENSE_GRID = [(n, rel) for n in (500, 1000, 2000) for rel in (0.1, 0.01, 0.001)]
ONLINE_GRID = [(n, d, rel) for n in (10_000, 50_000) for d in (2, 10)
               for rel in (0.05, 0.01, 0.001)]


def cases(quick: bool) -> list[Case]:
    only = os.environ.get("SUBJAX_BENCH_OT_ONLY")  # e.g. "1000,0.01,float64": one full case
    if only:
        n, rel, dt = only.split(",")
        return [_case(int(n), float(rel), dt, 20000, with_pot=False, repeats=1)]
    online = os.environ.get("SUBJAX_BENCH_OT_ONLINE")  # e.g. "10000,2,0.001": one online case
    if online:
        n, d, rel = online.split(",")
        return [_online_case(int(n), int(d), float(rel))]
    if quick:
        return [
            _case(500, 0.1, "float64", 5000, with_pot=True),
            _case(500, 0.1, "float32", 5000, with_pot=False),
            # Sinkhorn needs > 10,000 sweeps here: timed per sweep
            _case(500, 0.01, "float64", 20000, with_pot=False, repeats=1),
            # Sinkhorn needs ~3,000 sweeps here
            _online_case(2000, 2, 0.001),
        ]
    out = [_case(n, rel, "float64", 20000, with_pot=(rel == 0.1 and n <= 1000))
           for n, rel in DENSE_GRID]
    out += [_online_case(n, d, rel) for n, d, rel in ONLINE_GRID]
    return out


def main(argv=None):
    """``--counts``: only the untimed sweep counts (cached), e.g. to fill the cache."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.bench.bench_ot")
    parser.add_argument("--counts", action="store_true", required=True)
    parser.add_argument("--only", default="", help="dense / online and n, d, rel, e.g. "
                        "'dense 2000' or 'online 10000 2'")
    args = parser.parse_args(argv)
    specs = [("dense", n, None, rel) for n, rel in DENSE_GRID]
    specs += [("online", n, d, rel) for n, d, rel in ONLINE_GRID]
    for kind, n, d, rel in specs:
        label = f"{kind} {n} {d} {rel}" if d else f"{kind} {n} {rel}"
        if not label.startswith(args.only):
            continue
        if kind == "dense":
            got = dense_counts(n, rel, "float64", _sweep_cap(n, n, 20000))
        else:
            got = online_counts(n, d, rel, _sweep_cap(n, n, 20000))
        print(label, {k: v["sweeps"] if v["converged"] else f">= {v['sweeps']}"
                      for k, v in got.items()}, flush=True)


if __name__ == "__main__":
    main()
