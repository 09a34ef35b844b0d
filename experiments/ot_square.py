"""The square online problem of ``notebooks/02_optimal_transport.py``, with its passes
counted: N points of a 2-D Gaussian mixture onto N uniform points, float32,
``PointCloud(block_size=1024)``, ``ot.solve`` (SNS online), tol 1e-3.

    PYTHONPATH=. python -m experiments.ot_square [N] [REL]     # default 50000 0.05

Prints the compiled temporaries, the outer and CG iterations, the passes over the
costs (a host callback in every blockwise pass), CPU and wall time.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp

from subjax import ot
from subjax.ot import _geometry


def main(argv):
    n = int(argv[0]) if argv else 50_000
    rel = float(argv[1]) if len(argv) > 1 else 0.05
    passes = [0]
    plain = _geometry.PointCloud.map_blocks

    def counted(self, fn, accurate=False):
        out = plain(self, fn, accurate)
        if self.is_online:
            jax.debug.callback(lambda: passes.__setitem__(0, passes[0] + 1))
        return out

    _geometry.PointCloud.map_blocks = counted
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    centers = jnp.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
    labels = jax.random.randint(k2, (n,), 0, 3)
    xs = (jax.random.normal(k1, (n, 2)) * 0.7 + centers[labels]).astype(jnp.float32)
    ys = jax.random.uniform(k3, (n, 2), minval=-3.5, maxval=3.5).astype(jnp.float32)
    geom = ot.PointCloud(xs, ys, block_size=1024)
    eps = rel * float(geom.mean_cost())
    solve = jax.jit(lambda g: ot.solve(g, epsilon=eps, tol=1e-3)).lower(geom).compile()
    temp = solve.memory_analysis().temp_size_in_bytes / 2**20
    passes[0] = 0
    t0, c0 = time.perf_counter(), time.process_time()
    res = jax.block_until_ready(solve(geom))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"N {n} rel {rel} eps {eps:.4g}: converged {bool(res.converged)}, error "
          f"{float(res.error):.3e}, {int(res.n_iters)} outer iterations, "
          f"{int(res.n_linear_iters)} CG, {passes[0]} passes, compiled temporaries "
          f"{temp:.0f} MiB, CPU {cpu:.0f} s, wall {wall:.0f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
