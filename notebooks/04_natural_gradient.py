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
# # 04 — Fisher information and natural-gradient optimizers
#
# `subjax.fisher` gives the curvature of a model as pure functions over
# `apply_fn(params, inputs) -> outputs` and a batch: diagonal Fishers,
# matrix-free Fisher / Gauss-Newton vector products, low-rank Fishers, EWC
# penalties and Fisher merging. `subjax.optim` turns it into optax transforms:
# `natural_gradient` (CG solve per step), `kfac` and `fismo`.

# %%
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from flax import nnx
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits
from subjax import fisher, optim

digits = load_digits()
X = jnp.asarray(digits.data / 16.0, jnp.float32)
Y = jnp.asarray(digits.target, jnp.int32)


# %% [markdown]
# ## Fisher-vector products are the dense Fisher, without forming it
#
# For a softmax classifier the true Fisher equals the Gauss-Newton matrix
# `(1/N) sum_i J_i^T (diag p_i - p_i p_i^T) J_i`. `fisher.fvp` applies it with one
# `jvp` and one `vjp`; here it is checked against the dense matrix built with
# `jax.jacobian` on a tiny MLP.

# %%
def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

k1, k2 = jax.random.split(jax.random.key(0))
p = {"w1": jax.random.normal(k1, (64, 6)) / 8, "b1": jnp.zeros(6),
     "w2": jax.random.normal(k2, (6, 10)) / 3, "b2": jnp.zeros(10)}
x = X[:50]
flat, unravel = ravel_pytree(p)
jac = jax.jacobian(lambda f: mlp(unravel(f), x))(flat)           # (N, 10, P)
probs = jax.nn.softmax(mlp(p, x))
H = jax.vmap(lambda q: jnp.diag(q) - jnp.outer(q, q))(probs)
F = jnp.einsum("nop,noq,nqr->pr", jac, H, jac) / x.shape[0]
v = jax.random.normal(jax.random.key(1), flat.shape)
fv = ravel_pytree(fisher.fvp(mlp, p, x, unravel(v)))[0]
print("parameters:", flat.size, " relative error of F v:",
      float(jnp.linalg.norm(fv - F @ v) / jnp.linalg.norm(F @ v)))
eig = jnp.linalg.eigvalsh(F)[::-1]
lr = fisher.low_rank(mlp, p, x, 5, key=jax.random.key(2))
print("top-5 eigenvalues, dense:   ", np.round(np.asarray(eig[:5]), 5))
print("top-5 eigenvalues, low_rank:", np.round(np.asarray(lr.eigenvalues), 5))
fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogy(np.maximum(np.asarray(eig), 1e-12), ".")
ax.set_xlabel("index"); ax.set_ylabel("eigenvalue of F"); ax.set_title("Fisher spectrum")
plt.show()

# %% [markdown]
# ## Natural gradient vs gradient descent on logistic regression (digit 3 vs 8)
#
# `optim.natural_gradient` solves `(F + lambda I) d = g` by conjugate gradients each
# step; the model comes in through `update`'s extra arguments.

# %%
m = (Y == 3) | (Y == 8)
xb, yb = X[m], (Y[m] == 8).astype(jnp.float32)[:, None]
lin = lambda p, x: x @ p["w"] + p["b"]
loss = lambda p: jnp.mean(jax.nn.softplus(lin(p, xb)) - yb * lin(p, xb))
p0 = {"w": jnp.zeros((64, 1)), "b": jnp.zeros((1,))}

def train(opt, steps=30, **extra):
    p, s, out = p0, opt.init(p0), []
    step = jax.jit(lambda p, s: opt.update(jax.grad(loss)(p), s, p, **extra))
    for _ in range(steps):
        out.append(float(loss(p)))
        u, s = step(p, s)
        p = optax.apply_updates(p, u)
    return out

gd = train(optax.sgd(1.0))
ng = train(optim.natural_gradient(1.0, damping=1e-3, likelihood="bernoulli", max_iters=30),
           apply_fn=lin, inputs=xb)
fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogy(gd, label="gradient descent (lr 1)"); ax.semilogy(ng, label="natural gradient")
ax.set_xlabel("step"); ax.set_ylabel("loss"); ax.legend(); plt.show()
print(f"after 30 steps: GD {gd[-1]:.4f}, natural gradient {ng[-1]:.4f}")


# %% [markdown]
# ## K-FAC on a Flax NNX model
#
# Nothing to register: `fisher.kfac_grads_and_stats` finds the dense layers in the
# trace of `apply_fn` (every `nnx.Linear`, named by its path: `"l1"`, `"l2"`),
# returns loss, gradient and the Kronecker factors in one pass, and `optim.kfac`
# takes them as the extra argument `kfac_stats`.

# %%
class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(64, 64, rngs=rngs)
        self.l2 = nnx.Linear(64, 10, rngs=rngs)
    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))

def run(opt, use_kfac, steps=60):
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    apply = lambda p, x: nnx.merge(graphdef, p)(x)
    state = opt.init(params)

    @jax.jit
    def step(params, state, key):
        if use_kfac:
            loss, grads, stats = fisher.kfac_grads_and_stats(apply, params, X, Y, key=key)
            u, state = opt.update(grads, state, params, kfac_stats=stats)
        else:
            ce = optax.softmax_cross_entropy_with_integer_labels
            loss, grads = jax.value_and_grad(lambda p: jnp.mean(ce(apply(p, X), Y)))(params)
            u, state = opt.update(grads, state, params)
        return optax.apply_updates(params, u), state, loss

    losses = []
    for i in range(steps):
        params, state, loss = step(params, state, jax.random.key(i))
        losses.append(float(loss))
    return losses

k = run(optim.kfac(0.3, damping=1e-2, norm_constraint=1e-2), True)
a = run(optax.adam(1e-2), False)
fig, ax = plt.subplots(figsize=(5, 3))
ax.semilogy(a, label="Adam 1e-2"); ax.semilogy(k, label="K-FAC")
ax.set_xlabel("full-batch step"); ax.set_ylabel("training loss"); ax.legend(); plt.show()

# %% [markdown]
# ## Fisher merging and EWC in three lines
#
# `fisher.fisher_merge` weights each parameter by its diagonal Fisher;
# `fisher.ewc_penalty` accepts a diagonal, a low-rank / rank-1 Fisher or an FVP.

# %%
d_true = fisher.diag_true(mlp, p, x)
q = jax.tree.map(lambda a: a + 0.1, p)
merged = fisher.fisher_merge([p, q], [d_true, jax.tree.map(jnp.ones_like, d_true)])
same = fisher.fisher_merge([p, p], [d_true, d_true])
print("merge of identical models is the model:",
      all(bool(jnp.allclose(a, b)) for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(p))))
r1 = fisher.rank_one(mlp, p, x, labels=Y[:50])
fishers = [("diagonal", d_true), ("rank-1", r1), ("low-rank", lr),
           ("exact FVP", fisher.make_fvp(mlp, p, x))]
for name, F_ in fishers:
    print(f"EWC penalty with {name:9s} Fisher: {float(fisher.ewc_penalty(q, p, F_, 1.0)):.5f}")
