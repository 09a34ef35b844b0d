"""Truthful float32 ``converged``: the OT solvers' iteration counts and reported errors
against the marginal error of the same potentials recomputed in float64.

    PYTHONPATH=. python -m experiments.ot_float32 online 2000 2 0.001
    PYTHONPATH=. python -m experiments.ot_float32 online 1000 10 0.001
    PYTHONPATH=. python -m experiments.ot_float32 dense     # n = 500, rel 0.01, float64

Online: the bench's float32 point clouds (``PointCloud(block_size=256)``, epsilon =
rel x mean cost, tol 1e-3); dense: the bench's float64 problem (tol 1e-6).
"""

from __future__ import annotations

import sys

import jax
import numpy as np

from experiments.bench.bench_ot import _dense_problem, _online_error, _online_problem
from subjax import ot


def main(argv):
    if argv[0] == "dense":
        with jax.enable_x64(True):
            C, eps = _dense_problem(500, 0.01, True)
            for name, fn in [("newton", ot.sinkhorn_newton), ("sns", ot.sparse_newton_sinkhorn)]:
                out = jax.jit(lambda C, fn=fn: fn(C, epsilon=eps, tol=1e-6))(C)
                P = np.asarray(out.plan())
                err = np.abs(P.sum(1) - 1 / 500).sum() + np.abs(P.sum(0) - 1 / 500).sum()
                print(f"dense n 500 rel 0.01 float64 {name}: {int(out.n_iters)} outer "
                      f"iterations, {int(out.n_linear_iters)} CG, converged "
                      f"{bool(out.converged)}, error {float(out.error):.4e}, float64 {err:.4e}")
        return
    n, d, rel = int(argv[1]), int(argv[2]), float(argv[3])
    x, y, pc, eps = _online_problem(n, d, rel)
    solvers = [
        ("sinkhorn", lambda pc: ot.sinkhorn(pc, epsilon=eps, tol=1e-3, max_iters=20_000)),
        ("newton", lambda pc: ot.sinkhorn_newton(pc, epsilon=eps, tol=1e-3)),
        ("sns", lambda pc: ot.sparse_newton_sinkhorn(pc, epsilon=eps, tol=1e-3)),
    ]
    for name, fn in solvers:
        out = jax.jit(fn)(pc)
        print(f"online n {n} d {d} rel {rel} float32 {name}: {int(out.n_iters)} outer "
              f"iterations, converged {bool(out.converged)}, error {float(out.error):.4e}, "
              f"float64 {_online_error(out.f, out.g, x, y, eps):.4e}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
