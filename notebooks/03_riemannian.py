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
# # 03 — Riemannian optimization with `subjax.manifolds` and `subjax.optim`
#
# Points on a manifold are plain arrays (a `(C, n, p)` stack is `C` points); a manifold
# object (`Sphere`, `Stiefel`, `Grassmann`, `SPD`) holds only static sizes and gives
# projection, Riemannian gradient, retractions, exp / log, transport, distance.
# `riemannian_sgd` / `riemannian_adam` are optax transforms whose update is
# `R_x(step) - x`, so `optax.apply_updates` stays on the manifold.

# %%
import jax, jax.numpy as jnp, numpy as np, optax
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from flax import nnx
from subjax.manifolds import Sphere, Stiefel, Grassmann, SPD
from subjax.optim import riemannian_sgd, manifold_labels
from subjax.nn import GrassmannClassifier, manifolds_of
jax.config.update("jax_enable_x64", True)

# %% [markdown]
# ## Retractions agree with the exponential map to first order
#
# For a tangent vector `u`, `||R_x(t u) - exp_x(t u)||` shrinks like `t^2` (polar is
# second order: `t^3`). Grassmann(20, 4), float64.

# %%
gr = Grassmann(20, 4)
x = gr.random_point(jax.random.key(0), (), jnp.float64)
u = gr.random_tangent(jax.random.key(1), x); u = u / gr.norm(x, u)
ts = np.logspace(-4, 0, 9)
fig, ax = plt.subplots(figsize=(5, 3.5))
for method in ["polar", "cholesky_qr", "qr", "cayley"]:
    err = [float(jnp.linalg.norm(gr.retract(x, t * u, method) - gr.exp(x, t * u))) for t in ts]
    ax.loglog(ts, err, marker="o", label=method)
ax.loglog(ts, ts**2, "k--", label="t^2"); ax.loglog(ts, ts**3, "k:", label="t^3")
ax.set_xlabel("t"); ax.set_ylabel("||R_x(tu) - exp_x(tu)||"); ax.legend(fontsize=7)
plt.show()

# %% [markdown]
# ## Grassmann PCA with Riemannian SGD
#
# Minimise `-||X V||^2` over `V` in Grassmann(n, p): the principal angles between the
# iterate and the top-p eigenvectors go to 0.

# %%
n, p = 30, 3
key = jax.random.key(2)
scales = jnp.concatenate([jnp.array([4.0, 3.0, 2.0]), 0.5 * jnp.ones(n - p)])
rot = Stiefel(n, n).random_point(jax.random.key(3), (), jnp.float64)
data = (jax.random.normal(key, (2000, n), jnp.float64) * scales) @ rot.T
cov = data.T @ data / 2000
gr = Grassmann(n, p)
top = jnp.linalg.eigh(cov)[1][:, ::-1][:, :p]
opt = riemannian_sgd(0.05, momentum=0.9, manifolds=gr)
v = gr.random_point(jax.random.key(4), (), jnp.float64)
state = opt.init(v)
loss = lambda v: -jnp.sum((data @ v) ** 2) / 2000

@jax.jit
def step(v, state):
    u, state = opt.update(jax.grad(loss)(v), state, v)
    return optax.apply_updates(v, u), state

angles = []
for i in range(150):
    v, state = step(v, state)
    angles.append(np.asarray(gr.principal_angles(v, top)))
angles = np.array(angles)
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.semilogy(angles + 1e-16); ax.set_xlabel("step"); ax.set_ylabel("principal angles (rad)")
plt.show()
print("final angles", angles[-1], "orthonormality error", float(gr.check(v)))

# %% [markdown]
# ## A Grassmann class head in an NNX model, mixed optimizers
#
# `manifolds_of(model)` returns the manifold pytree; `manifold_labels` turns it into
# labels for `optax.partition`: the head's subspaces get Riemannian SGD, the body AdamW.

# %%
jax.config.update("jax_enable_x64", False)

class Net(nnx.Module):
    def __init__(self, rngs):
        self.body = nnx.Linear(10, 16, rngs=rngs)
        self.head = GrassmannClassifier(16, 5, subspace_dim=2, scale=8.0, rngs=rngs)
    def __call__(self, x):
        return self.head(nnx.tanh(self.body(x)))

k1, k2 = jax.random.split(jax.random.key(5))
centers = 3.0 * jax.random.normal(k1, (5, 10))
y = jnp.arange(500) % 5
xs = centers[y] + jax.random.normal(k2, (500, 10))
model = Net(nnx.Rngs(0))
mans = manifolds_of(model)
tx = optax.partition({"riemannian": riemannian_sgd(0.1, 0.9, manifolds=mans),
                      "euclidean": optax.adamw(1e-2)}, manifold_labels(mans))
opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

@nnx.jit
def train_step(model, opt):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(xs), y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss

losses = [float(train_step(model, opt)) for _ in range(100)]
w = model.head.weight[...]
print("accuracy", float(jnp.mean(jnp.argmax(model(xs), -1) == y)),
      "max orthonormality error", float(jnp.max(mans["head"]["weight"].check(w))))
fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(losses); ax.set_xlabel("step"); ax.set_ylabel("loss")
plt.show()

# %% [markdown]
# ## SPD geodesics under three metrics
#
# Between two 2x2 SPD matrices, the determinant along the geodesic: affine-invariant and
# log-Euclidean interpolate `log det` linearly; Bures–Wasserstein does not
# (the "swelling" behaviour differs).

# %%
a = jnp.diag(jnp.array([4.0, 0.25])); b = jnp.array([[1.0, 0.9], [0.9, 1.0]])
ts = np.linspace(0, 1, 21)
fig, ax = plt.subplots(figsize=(5, 3.5))
for metric in ["affine", "log_euclidean", "bures_wasserstein"]:
    spd = SPD(2, metric)
    v = spd.log(a, b)
    dets = [float(jnp.linalg.det(spd.exp(a, t * v))) for t in ts]
    ax.plot(ts, dets, label=metric)
ax.set_xlabel("t"); ax.set_ylabel("det(gamma(t))"); ax.legend(); plt.show()
