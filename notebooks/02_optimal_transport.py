# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Optimal transport with `subjax.ot`
#
# Entropic optimal transport between weights `a` and `b` with cost `C`:
# minimise `<C, P> + eps KL(P | a b^T)` over plans `P >= 0` with `P 1 = a`, `P^T 1 = b`.
# The dual is maximised over potentials `f, g`, and the plan is
# `P_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)`.
#
# `subjax.ot` has three solvers with one result type (`OTResult`):
#
# * `sinkhorn` — log-domain alternating maximisation (optionally with epsilon scaling, or
#   KL-relaxed marginals for unbalanced OT);
# * `sinkhorn_newton` — Newton steps on the dual, solved matrix-free with CG;
# * `sparse_newton_sinkhorn` (SNS) — Newton with a sparsified Hessian.
#
# At small `eps` Sinkhorn needs thousands of iterations; the Newton solvers need tens.

# %%
import os
import time
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
from subjax import ot

jax.config.update("jax_enable_x64", True)
kx, ky = jax.random.split(jax.random.key(0))
x = jax.random.normal(kx, (150, 2))
y = jax.random.normal(ky, (120, 2)) * 0.6 + jnp.array([2.0, 1.0])
C = ot.cost_matrix(x, y)              # squared Euclidean; also "euclidean", "l1", a callable
out = ot.sinkhorn(C, epsilon=0.1, tol=1e-8)
print("converged", bool(out.converged), "in", int(out.n_iters), "iterations")
print("marginal errors", [float(e) for e in out.marginal_errors()])
print("regularised cost", float(out.reg_ot_cost))
print("transport cost <C,P>", float(out.transport_cost))

# %% [markdown]
# ## The plan
# Each source point is linked to where its mass goes (the heaviest entries of `P`).

# %%
P = out.plan()
fig, ax = plt.subplots(figsize=(5, 4))
i, j = jnp.nonzero(P > 0.2 * P.max(), size=400, fill_value=0)
for ii, jj in zip(i.tolist(), j.tolist()):
    ax.plot([x[ii, 0], y[jj, 0]], [x[ii, 1], y[jj, 1]], "k-", lw=0.3, alpha=0.4)
ax.scatter(*x.T, s=8, label="x (a)")
ax.scatter(*y.T, s=8, label="y (b)")
ax.legend(); ax.set_title("entropic plan, eps = 0.1")
plt.show()

# %% [markdown]
# ## Small epsilon: Sinkhorn vs Newton
#
# Same problem with `eps = 0.003 * mean(C)`. The error history (`errors`, -1 padded) is
# recorded every 10 sweeps for Sinkhorn and every outer step for the Newton solvers.

# %%
eps = 0.003 * float(C.mean())
solvers = {
    "sinkhorn": jax.jit(lambda C: ot.sinkhorn(C, epsilon=eps, tol=1e-8, max_iters=20000)),
    "sinkhorn_newton": jax.jit(lambda C: ot.sinkhorn_newton(C, epsilon=eps, tol=1e-8)),
    "sns": jax.jit(lambda C: ot.sparse_newton_sinkhorn(C, epsilon=eps, tol=1e-8)),
}
fig, ax = plt.subplots(figsize=(5, 3.5))
for name, fn in solvers.items():
    res = jax.block_until_ready(fn(C))           # compile
    t0 = time.perf_counter(); res = jax.block_until_ready(fn(C)); dt = time.perf_counter() - t0
    e = res.errors[res.errors >= 0]
    stride = 10 if name == "sinkhorn" else 1
    ax.loglog(1 + stride * jnp.arange(e.shape[0]), e, label=name)
    print(f"{name:16s} iterations {int(res.n_iters):6d}  converged {bool(res.converged)}  "
          f"{dt:.3f} s  cost {float(res.reg_ot_cost):.8f}")
ax.axhline(1e-8, color="gray", lw=0.5); ax.set_xlabel("outer iteration")
ax.set_ylabel("marginal error"); ax.legend(); plt.show()

# %% [markdown]
# ## Gradients
#
# `reg_ot_cost` is differentiable by the envelope theorem (`d/dC = P`), the potentials by
# implicit differentiation — nothing is unrolled. Here the source cloud flows along
# `-grad_x OT_eps(x, y)` towards the target.

# %%
loss = jax.jit(jax.value_and_grad(
    lambda x: ot.sinkhorn_newton(ot.cost_matrix(x, y), epsilon=0.05, tol=1e-8).reg_ot_cost))
xs, vals = x, []
for _ in range(30):
    v, g = loss(xs)
    xs = xs - 0.5 * g / (1 / xs.shape[0])   # step on the per-point gradient
    vals.append(float(v))
fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
a1.plot(vals); a1.set_xlabel("step"); a1.set_ylabel("reg. OT cost")
a2.scatter(*x.T, s=5, alpha=0.3, label="start"); a2.scatter(*xs.T, s=5, label="after 30 steps")
a2.scatter(*y.T, s=5, label="target"); a2.legend(); plt.show()

# %% [markdown]
# ## Batches, point clouds, unbalanced
#
# `jax.vmap` solves a batch of problems of one shape. A `PointCloud` with `block_size` never
# holds the `n x m` cost: every solver then runs blockwise. `rho_a, rho_b` relax the
# marginals (unbalanced OT).

# %%
batch = jax.vmap(lambda s: ot.cost_matrix(x * s, y))(jnp.array([0.5, 1.0, 1.5]))
res = jax.jit(jax.vmap(lambda C: ot.sinkhorn_newton(C, epsilon=0.1, tol=1e-8)))(batch)
# methods / properties of a batched result are per-problem: map them with vmap too
print("batched costs", jax.vmap(lambda r: r.reg_ot_cost)(res), "converged", res.converged)

pc = ot.PointCloud(x, y, cost="euclidean", block_size=32)
print("blockwise euclidean:", float(ot.sinkhorn(pc, epsilon=0.1, tol=1e-8).reg_ot_cost))

a = jnp.full((150,), 2.0 / 150)          # twice the mass of b: only possible unbalanced
ub = ot.sinkhorn(C, a=a, epsilon=0.1, rho_a=1.0, rho_b=1.0, tol=1e-8)
print("unbalanced: transported mass", float(ub.plan().sum()), "of", float(a.sum()), "vs", 1.0)

# %% [markdown]
# ## 50,000 x 50,000 points, online
#
# 50,000 samples of a 2-D mixture transported onto 50,000 points spread over a square,
# float32, `eps = 0.05 * mean(C)`. The cost has 2.5 billion entries (10 GB as a dense
# float32 matrix); as a `PointCloud` with `block_size` it is never formed: `ot.solve`
# picks the sparse Newton solver (SNS) for an online geometry, and every pass over the
# plan (Sinkhorn warm-up, marginals, line search, the top-`k` selection of its sparse
# Hessian) runs 1,024 rows at a time. XLA's `memory_analysis` of the compiled solve gives
# its temporary memory.
#
# The number of points comes from the environment variable `SUBJAX_NOTEBOOK_N` (default
# 50,000); the notebook test (`tests/test_notebooks.py`) runs the same code with 2,000.
# At full size, on a 2-core CPU, the solve converged (marginal error 4.0e-5) in 18 outer
# iterations (8 Sinkhorn warm-up sweeps, 10 Newton steps) and 69 passes over the 2.5
# billion costs: 965 s of CPU time (16 minutes), with 1,025 MiB of compiled temporaries.
# `PYTHONPATH=. python -m experiments.ot_square` runs it alone and counts the passes.

# %%
N = int(os.environ.get("SUBJAX_NOTEBOOK_N", 50_000))
k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
centers = jnp.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]])
labels = jax.random.randint(k2, (N,), 0, 3)
xs = (jax.random.normal(k1, (N, 2)) * 0.7 + centers[labels]).astype(jnp.float32)
ys = jax.random.uniform(k3, (N, 2), minval=-3.5, maxval=3.5).astype(jnp.float32)
big = ot.PointCloud(xs, ys, block_size=1024)
eps_big = 0.05 * float(big.mean_cost())
solve_big = jax.jit(lambda geom: ot.solve(geom, epsilon=eps_big, tol=1e-3)).lower(big).compile()
t0 = time.perf_counter()
res = jax.block_until_ready(solve_big(big))
dt = time.perf_counter() - t0
print(f"{N:,} x {N:,} = {N * N:,} cost entries ({N * N * 4 / 1e9:.3g} GB as a dense float32 "
      f"matrix); compiled temporaries "
      f"{solve_big.memory_analysis().temp_size_in_bytes / 2**20:.0f} MiB")
print(f"eps = {eps_big:.4g}: converged {bool(res.converged)}, marginal error "
      f"{float(res.error):.1e} (tol 1e-3), {int(res.n_iters)} outer iterations "
      f"(Sinkhorn warm-up and Newton steps), {int(res.n_linear_iters)} CG iterations, "
      f"{dt:.1f} s")
# where the mass of each source point goes: the barycentric map (P @ y) / a, blockwise
to = res.apply_plan(ys) * N
sub = slice(None, None, max(1, N // 500))
fig, ax = plt.subplots(figsize=(5, 4))
ax.scatter(*ys[sub].T, s=2, c="C1", alpha=0.4, label="y")
ax.scatter(*xs[sub].T, s=2, c="C0", label="x")
ax.quiver(*xs[sub].T, *(to[sub] - xs[sub]).T, angles="xy", scale_units="xy", scale=1,
          width=0.002, alpha=0.5)
ax.legend(loc="lower left"); ax.set_title(f"{N:,} points onto {N:,}, online"); plt.show()
