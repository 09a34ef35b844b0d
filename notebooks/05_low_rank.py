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
# # Low-rank training and adaptation with subjax
#
# What the low-rank primitives do, on problems small enough to run in seconds:
#
# 1. the four GaLore projectors (exact SVD, warm subspace iteration, DCT, random),
# 2. a warm-started projector following a rotating gradient subspace,
# 3. `subjax.optim.galore` vs Adam: loss and optimizer-state bytes,
# 4. LoRA on Flax's `nnx.LoRALinear`: PiSSA / SC-LoRA init, merge / unmerge,
# 5. spectral tools: stable rank, WeLore ranks, intruder dimensions.

# %%
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib.pyplot as plt
from flax import nnx
import subjax.optim as so, subjax.nn as snn
from subjax.linalg import principal_angles
key = jax.random.key(0)

# %% [markdown]
# ## 1. Projectors
#
# A gradient `G` (200 x 60) with 8 dominant singular values. Each projector returns an orthonormal `Q` (60 x 8) on the smaller side; we measure the largest principal angle to the true top-8 right singular subspace. The subspace projector's first refresh runs `init_steps` steps from a random start.

# %%
k1, k2 = jax.random.split(key)
u, _ = jnp.linalg.qr(jax.random.normal(k1, (200, 60)))
v, _ = jnp.linalg.qr(jax.random.normal(k2, (60, 60)))
s = jnp.concatenate([jnp.linspace(10, 5, 8), jnp.linspace(1, 0.05, 52)])
g = (u * s) @ v.T
angles = {}
for name in ['svd', 'subspace', 'dct', 'random']:
    p = so.make_projector(name)
    st = p.refresh(g, p.init(60, 8), jax.random.key(1), jnp.asarray(True))
    q = p.basis(st, jax.random.key(1), 60, 8)
    assert np.allclose(q.T @ q, np.eye(8), atol=1e-5)
    angles[name] = float(jnp.max(principal_angles(q, v[:, :8])))
print({k: round(a, 4) for k, a in angles.items()})
plt.figure(figsize=(4, 2.5)); plt.bar(list(angles), list(angles.values()))
plt.ylabel('max principal angle (rad)'); plt.title('basis vs top-8 subspace'); plt.show()

# %% [markdown]
# ## 2. Warm start tracks a rotating subspace
#
# The gradient's right singular vectors rotate by about 0.02 rad per step. With `refresh_every=1` and one subspace-iteration step per refresh, started from the previous basis, the error stays small.

# %%
a = jax.random.normal(jax.random.key(3), (60, 60)); skew = a - a.T
rot = jax.scipy.linalg.expm(0.02 * skew / jnp.linalg.norm(skew, 2))
opt = so.projected(optax.identity(), rank=8, refresh_every=1, projector='subspace')
st = opt.init({'w': g}); step = jax.jit(opt.update); vt = v; err = []
for t in range(60):
    _, st = step({'w': (u * s) @ vt.T}, st)
    err.append(float(jnp.max(principal_angles(st.projector_state['w'], vt[:, :8]))))
    vt = rot @ vt
print('max angle after step 5:', max(err[5:]))
plt.figure(figsize=(4, 2.5)); plt.semilogy(err); plt.xlabel('step')
plt.ylabel('max principal angle'); plt.show()

# %% [markdown]
# ## 3. GaLore vs Adam
#
# Least squares with a rank-6 target, `W` 96 x 64, rank 8, refresh every 20 steps. State bytes: Adam keeps two 96 x 64 moments; GaLore a 64 x 8 basis (for `svd` / `subspace`) and two 96 x 8 moments.

# %%
kx, kw = jax.random.split(jax.random.key(4))
x = jax.random.normal(kx, (256, 96))
y = x @ (jax.random.normal(kw, (96, 6)) @ jax.random.normal(kx, (6, 64)))
loss = lambda p: 0.5 * jnp.mean(jnp.sum((x @ p['w'] - y) ** 2, -1))
def run(opt, steps=300):
    def body(c, _):
        p, s = c; l, gr = jax.value_and_grad(loss)(p); up, s = opt.update(gr, s, p)
        return (optax.apply_updates(p, up), s), l
    p0 = {'w': jnp.zeros((96, 64))}; s0 = opt.init(p0)
    nbytes = sum(np.asarray(l).nbytes for l in jax.tree.leaves(s0))
    scan = lambda p, s: jax.lax.scan(body, (p, s), None, length=steps)
    (_, _), ls = jax.jit(scan)(p0, s0)
    return np.asarray(ls), nbytes
curves = {'adam': run(optax.adam(3e-2))}
for name in ['svd', 'subspace', 'dct', 'random']:
    curves[name] = run(so.galore(3e-2, rank=8, update_proj_gap=20, projector=name))
plt.figure(figsize=(5, 3))
for name, (ls, nb) in curves.items():
    plt.semilogy(ls, label=f'{name} ({nb} B state)')
    print(f'{name:9s} final loss {ls[-1]:.4g}  state {nb} bytes')
plt.legend(fontsize=7); plt.xlabel('step'); plt.ylabel('loss'); plt.show()

# %% [markdown]
# ## 4. LoRA on `nnx.LoRALinear`
#
# PiSSA moves the top-`r` singular directions of the kernel into the adapter and leaves the residual in the base; SC-LoRA picks the adapter's output subspace from fine-tuning vs preserved-data output covariances. Both leave the layer's function unchanged. `merge_lora` / `unmerge_lora` convert to and from a plain `nnx.Linear`.

# %%
layer = nnx.LoRALinear(32, 16, lora_rank=4, rngs=nnx.Rngs(0))
xs = jax.random.normal(jax.random.key(5), (8, 32)); y0 = layer(xs)
snn.pissa_init(layer)
print('PiSSA keeps the function:', bool(jnp.allclose(layer(xs), y0, atol=1e-5)))
sv = jnp.linalg.svd(layer.lora.lora_a[...] @ layer.lora.lora_b[...], compute_uv=False)
print('adapter singular values:', np.round(np.asarray(sv[:4]), 3))
merged = snn.merge_lora(layer)
back = snn.unmerge_lora(merged, layer.lora.lora_a[...], layer.lora.lora_b[...])
dw = jnp.max(jnp.abs(back.kernel[...] - layer.kernel[...]))
print('round trip max |dW|:', float(dw))
layer2 = nnx.LoRALinear(32, 16, lora_rank=4, rngs=nnx.Rngs(1))
x_ft = jax.random.normal(jax.random.key(6), (256, 32))
x_keep = jax.random.normal(jax.random.key(7), (256, 32)) * jnp.linspace(2, 0, 32)
sub = snn.sclora_init(layer2, x_ft, x_keep, beta=0.5)
print('SC-LoRA eigenvalues:', np.round(np.asarray(sub.eigenvalues), 3))

# %% [markdown]
# ## 5. Spectral tools
#
# Stable rank and WeLore ranks of low-rank vs flat matrices; an intruder dimension created by a large rank-one update.

# %%
low = (jax.random.normal(jax.random.key(8), (64, 3))
       @ jax.random.normal(jax.random.key(9), (3, 48)))
flat = jax.random.normal(jax.random.key(10), (64, 48))
print('stable rank  low:', float(snn.stable_rank(low)),
      ' flat:', float(snn.stable_rank(flat)))
print('WeLore ranks:', snn.welore_ranks({'low': low, 'flat': flat}, threshold=0.1))
w0 = flat / 8
uvec = jax.random.normal(jax.random.key(11), (64,)); uvec = uvec / jnp.linalg.norm(uvec)
w1 = w0 + 5 * jnp.outer(uvec, jax.random.normal(jax.random.key(12), (48,)) / 7)
res = snn.intruder_dimensions(w0, w1, top_k=5)
print('intruders:', int(res.count),
      ' max similarity:', np.round(np.asarray(res.max_similarity), 2))
plt.figure(figsize=(4, 2.5)); plt.bar(range(5), np.asarray(res.max_similarity))
plt.axhline(0.5, color='k', ls='--'); plt.xlabel('top singular vector of W_ft')
plt.ylabel('max |cos| with W_0'); plt.show()
