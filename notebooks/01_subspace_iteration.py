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
# # Subspace iteration, block Krylov and randomized SVD with `subjax.linalg`
#
# What the primitives do, on small matrices with a known spectrum: the dominant singular subspace from a few block products, why keeping every Krylov block beats plain power iteration for the same number of products, and how a warm start (the previous basis, as in periodic GaLore-style refreshes) cuts the iterations of `subspace_iteration`.

# %%
import jax, jax.numpy as jnp, numpy as np
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import subjax.linalg as sl

rng = np.random.default_rng(0)
n = 400
u, _ = np.linalg.qr(rng.standard_normal((n, n)))
v, _ = np.linalg.qr(rng.standard_normal((n, n)))
sigma = 1.0 / np.arange(1, n + 1)          # slowly decaying spectrum
a = jnp.asarray((u * sigma) @ v.T, jnp.float32)

# %% [markdown]
# ## Randomized SVD: block Krylov vs power iteration
#
# Both use `2q + 2` products with `A` (here `q = n_steps`). Power iteration keeps only the last block; block Krylov keeps all of them (`(q+1) l` columns) and does Rayleigh–Ritz on the whole space.

# %%
rank = 16
errs = {'block_krylov': [], 'subspace': []}
iters = [0, 1, 2, 4]
for q in iters:
    for method in errs:
        res = sl.randomized_svd(a, rank, key=jax.random.key(1), n_steps=q, method=method)
        errs[method].append(float(np.max(np.abs(np.asarray(res.s) / sigma[:rank] - 1))))
fig, ax = plt.subplots(figsize=(5, 3.2))
for method, e in errs.items():
    ax.semilogy(iters, e, marker='o', label=method)
ax.set_xlabel('n_steps q (products = 2q + 2)'); ax.set_ylabel('max rel. error, top-16 sigma')
ax.legend(); plt.show()
errs

# %% [markdown]
# The computed bases are orthonormal and their principal angles to the true singular subspace are tiny:

# %%
res = sl.randomized_svd(a, rank, key=jax.random.key(1))
print('orthonormality error:', float(jnp.max(jnp.abs(res.u.T @ res.u - jnp.eye(rank)))))
ang = sl.principal_angles(res.u[:, :8], jnp.asarray(u[:, :8], jnp.float32))
print('largest principal angle to the top-8 subspace (rad):', float(ang[-1]))

# %% [markdown]
# ## Warm-started subspace iteration
#
# A matrix that drifts slightly between refreshes: starting from the previous basis converges in far fewer steps than a random start. `errors` is the per-step subspace change, padded with -1.

# %%
k = 8
s2 = np.concatenate([np.linspace(2.0, 1.6, k), 0.85 ** np.arange(1, n - k + 1)])
b = jnp.asarray((u * s2) @ v.T, jnp.float32)
b_next = b + 1e-3 * jnp.asarray(rng.standard_normal((n, n)), jnp.float32) / np.sqrt(n)
cold = sl.subspace_iteration(b, jnp.asarray(rng.standard_normal((n, k)), jnp.float32),
                             max_iters=60, tol=1e-5)
warm = sl.subspace_iteration(b_next, cold.u, max_iters=60, tol=1e-5)
cold2 = sl.subspace_iteration(b_next, jnp.asarray(rng.standard_normal((n, k)), jnp.float32),
                              max_iters=60, tol=1e-5)
fig, ax = plt.subplots(figsize=(5, 3.2))
for name, r in [('cold start', cold2), ('warm start', warm)]:
    e = np.asarray(r.errors); e = e[e >= 0]
    ax.semilogy(np.arange(1, len(e) + 1), e, marker='.', label=f'{name}: {int(r.n_iters)} steps')
ax.axhline(1e-5, color='gray', ls='--'); ax.set_xlabel('step'); ax.set_ylabel('subspace change')
ax.legend(); plt.show()
int(cold2.n_iters), int(warm.n_iters), bool(warm.converged)

# %% [markdown]
# ## Rank selection
#
# How many directions carry signal? Three rules on the same spectrum of a planted rank-5 matrix plus noise.

# %%
m_, n_ = 300, 200
sig = (rng.standard_normal((m_, 5)) * np.array([30.0, 25, 20, 15, 12])) @ rng.standard_normal((5, n_)) / np.sqrt(n_)
y = jnp.asarray(sig + rng.standard_normal((m_, n_)), jnp.float32)
s = jnp.linalg.svd(y, compute_uv=False)
print('Marchenko-Pastur edge:', int(sl.marchenko_pastur_rank(s, (m_, n_))))
print('energy 90%:', int(sl.energy_rank(s, 0.9)))
print('s_i / s_1 >= 0.3:', int(sl.normalized_spectrum_rank(s, 0.3)))
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.semilogy(np.asarray(s), '.')
ax.axhline(np.sqrt(m_) + np.sqrt(n_), color='r', ls='--', label='MP edge (sigma=1)')
ax.set_xlabel('i'); ax.set_ylabel('singular value'); ax.legend(); plt.show()
