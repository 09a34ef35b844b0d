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
# # 06 — Custom optax transforms on subjax primitives, checked with `subjax.testing`
#
# subjax's optimizers are ordinary optax `GradientTransformation`s built on the
# primitives (`subjax.linalg`, `subjax.manifolds`). This notebook builds two new ones
# from scratch, runs the same conformance checks subjax runs on its own optimizers
# (`subjax.testing`), and trains a Flax NNX model with each:
#
# 1. **subspace momentum**: heavy-ball momentum kept in the top-`r` right singular
#    subspace of each weight's gradient, the basis refreshed every `refresh_every`
#    steps by a warm-started `subjax.linalg.subspace_iteration` under `lax.cond`;
# 2. **normalized Riemannian SGD on a user-defined manifold**: the *oblique manifold*
#    (matrices with unit-norm columns), written by subclassing
#    `subjax.manifolds.Manifold`.

# %%
import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import subjax.linalg as sl
from subjax import testing
from subjax.manifolds import Manifold

# %% [markdown]
# ## 1. Subspace momentum
#
# For a matrix gradient `G` (`m x n`) keep an orthonormal basis `Q` (`n x r`) of its
# dominant right singular subspace. The momentum lives in the projected coordinates,
# `M <- beta M + G Q` (`m x r`), and the update is `-lr (M Q^T + (G - G Q Q^T))`: momentum
# along the subspace, a plain gradient step across it. Every `refresh_every` steps the
# basis is refreshed by a few steps of subspace iteration on `G^T`, started from the
# current `Q` (warm start), inside `lax.cond` so the step compiles once. The momentum
# is rotated into the new basis (`M <- M Q_old^T Q_new`).
#
# What makes it a well-behaved optax citizen: the update accepts `**extra_args`
# (`GradientTransformationExtraArgs`), `learning_rate` is typed `optax.ScalarOrSchedule`,
# numbers that fix shapes (`rank`) are plain Python ints (static under
# `inject_hyperparams`), non-matrix leaves carry `optax.MaskedNode()` instead of
# zero-size arrays (orbax cannot save those), and all arithmetic keeps the
# parameters' dtype.


# %%
class SubspaceMomentumState(NamedTuple):
    count: jax.Array
    basis: optax.Params  # (n, r) per matrix leaf, MaskedNode elsewhere
    momentum: optax.Params  # (m, r) per matrix leaf, like the param elsewhere


def subspace_momentum(
    learning_rate: optax.ScalarOrSchedule,
    beta: float = 0.9,
    rank: int = 2,
    refresh_every: int = 10,
) -> optax.GradientTransformationExtraArgs:
    def is_matrix(p):
        return jnp.ndim(p) == 2 and min(jnp.shape(p)) > rank

    def init_fn(params):
        def basis(p):
            if not is_matrix(p):
                return optax.MaskedNode()
            return jnp.eye(p.shape[1], rank, dtype=jnp.float32)

        def mom(p):
            return jnp.zeros((p.shape[0], rank), p.dtype) if is_matrix(p) else jnp.zeros_like(p)

        return SubspaceMomentumState(jnp.zeros([], jnp.int32), jax.tree.map(basis, params),
                                     jax.tree.map(mom, params))

    def update_fn(updates, state, params=None, **extra_args):
        del params, extra_args
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        refresh = state.count % refresh_every == 0

        def leaf(g, q, m):
            if isinstance(q, optax.MaskedNode):  # not a matrix: heavy ball
                m = (beta * m + g).astype(g.dtype)
                return (-lr * m).astype(g.dtype), q, m
            g32 = g.astype(jnp.float32)

            def new_basis(q):  # warm-started subspace iteration on G^T
                q_new = sl.subspace_iteration(g32.T, q, max_iters=3).u
                return q_new, q.T @ q_new

            q, rot = jax.lax.cond(refresh, new_basis,
                                  lambda q: (q, jnp.eye(rank, dtype=q.dtype)), q)
            m = beta * (m.astype(jnp.float32) @ rot) + g32 @ q
            u = m @ q.T + (g32 - (g32 @ q) @ q.T)
            return (-lr * u).astype(g.dtype), q, m.astype(g.dtype)

        gl, tdef = jax.tree.flatten(updates)
        ql = tdef.flatten_up_to(state.basis)
        ml = tdef.flatten_up_to(state.momentum)
        out = [leaf(g, q, m) for g, q, m in zip(gl, ql, ml)]
        new = [jax.tree.unflatten(tdef, [o[i] for o in out]) for i in range(3)]
        return new[0], SubspaceMomentumState(optax.safe_int32_increment(state.count),
                                             new[1], new[2])

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# %% [markdown]
# The conformance checks, on the default problem of `subjax.testing` (a `(6, 4)` weight
# and a bias fitted by least squares). Each check raises an `AssertionError` naming what
# broke; `check_all` runs them all (the orbax and `nnx.Optimizer` checks included).

# %%
case = testing.TransformCase(
    "subspace_momentum", subspace_momentum,
    {"learning_rate": 0.02, "rank": 2, "refresh_every": 5}, static_args=("rank",))
testing.check_all(case)
print("subspace_momentum passes:", ", ".join(testing.CHECKS), "and dtype")

# %% [markdown]
# ## 2. A user-defined manifold and a Riemannian optimizer on it
#
# The oblique manifold `OB(n, p)`: `n x p` matrices whose columns have unit norm (a
# product of `p` spheres; used for normalized embeddings and dictionary atoms).
# Subclassing `Manifold` needs the point shape, the tangent projection, a retraction,
# a constraint error (`check`) and `project_point`; every operation then validates its
# arguments (dtype, shape, named in the error) like the built-in manifolds.


# %%
@dataclasses.dataclass(frozen=True)
class Oblique(Manifold):
    n: int
    p: int
    retractions = ("normalize",)

    @property
    def point_shape(self):
        return (self.n, self.p)

    @property
    def dim(self):
        return (self.n - 1) * self.p

    def proj(self, x, u):  # remove each column's component along its point
        return u - jnp.sum(x * u, axis=-2, keepdims=True) * x

    def retract(self, x, u, method=None):
        y = x + u
        return y / jnp.linalg.norm(y, axis=-2, keepdims=True)

    def project_point(self, x):
        return x / jnp.linalg.norm(x, axis=-2, keepdims=True)

    def check(self, x):
        return jnp.max(jnp.abs(jnp.linalg.norm(x, axis=-2) - 1), axis=-1)

    def random_point(self, key, batch_shape=(), dtype=jnp.float32):
        shape = tuple(batch_shape) + (self.n, self.p)
        return self.project_point(jax.random.normal(key, shape, dtype))


ob = Oblique(6, 4)
x = ob.random_point(jax.random.key(0))
print("constraint error of a random point:", float(ob.check(x)))
try:
    ob.proj(x, jnp.ones((5, 4)))
except ValueError as e:
    print("ValueError:", e)


# %% [markdown]
# **Normalized Riemannian SGD**: the Riemannian gradient `r = P_x(g)` is scaled to unit
# Frobenius norm per leaf (a step of fixed length `lr`, robust to the gradient's scale),
# momentum is transported by projection, and the point moves by the manifold's
# retraction. Leaves without a manifold take the same normalized step in flat space.


# %%
class NormalizedRSGDState(NamedTuple):
    count: jax.Array
    momentum: optax.Params


def normalized_rsgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    manifolds: dict | None = None,
) -> optax.GradientTransformationExtraArgs:
    manifolds = manifolds or {}

    def init_fn(params):
        return NormalizedRSGDState(jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        flat, gdef = jax.tree_util.tree_flatten_with_path(updates)
        moms, mdef = jax.tree.flatten(state.momentum)
        out, new_m = [], []
        for (path, g), x, m in zip(flat, jax.tree.leaves(params), moms):
            top = path[0]  # the label is looked up by the leaf's top-level key name
            man = manifolds.get(getattr(top, "key", getattr(top, "name", None)))
            g32, x32, m32 = (a.astype(jnp.float32) for a in (g, x, m))
            r = man.egrad2rgrad(x32, g32) if man is not None else g32
            r = r / jnp.maximum(jnp.linalg.norm(r), 1e-12)
            d = momentum * (man.proj(x32, m32) if man is not None else m32) + r
            y = man.retract(x32, -lr * d) if man is not None else x32 - lr * d
            out.append(jnp.where(lr == 0, 0.0, y - x32).astype(x.dtype))
            new_m.append(d.astype(m.dtype))
        return jax.tree.unflatten(gdef, out), NormalizedRSGDState(
            optax.safe_int32_increment(state.count), jax.tree.unflatten(mdef, new_m))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# %% [markdown]
# Checked on the default problem with the weight on `OB(6, 4)` (its columns are
# constrained, so the regression cannot reach zero loss; the convergence check only
# asks that the loss halves). Each check is run separately here to show its verdict.


# %%
def ob_params(key, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {"w": ob.random_point(k1, (), jnp.float32).astype(dtype),
            "b": (0.1 * jax.random.normal(k2, (4,))).astype(dtype)}


case2 = testing.TransformCase(
    "normalized_rsgd", normalized_rsgd,
    {"learning_rate": 0.05, "manifolds": {"w": ob}}, init_params=ob_params)
for name, check in testing.CHECKS.items():
    try:
        check(case2)
        print(f"{name:18s} ok")
    except AssertionError as e:
        print(f"{name:18s} FAILED: {e}")

# %% [markdown]
# The complex check fails, and rightly: the `float32` casts drop the imaginary part, so
# a complex parameter would be optimised wrongly. The fix is one line in `init` —
# refuse complex leaves with a clear message — after which every check passes:


# %%
def normalized_rsgd_real(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, *,
                         manifolds: dict | None = None):
    inner = normalized_rsgd(learning_rate, momentum, manifolds=manifolds)

    def init_fn(params):
        for leaf in jax.tree.leaves(params):
            if jnp.iscomplexobj(leaf):
                raise TypeError("normalized_rsgd supports real parameters only, got complex")
        return inner.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, inner.update)


case2 = testing.TransformCase(
    "normalized_rsgd_real", normalized_rsgd_real,
    {"learning_rate": 0.05, "manifolds": {"w": ob}}, init_params=ob_params)
testing.check_all(case2)
print("normalized_rsgd_real passes every check")


# %% [markdown]
# ## Training a Flax NNX model with each
#
# A two-layer network on a synthetic regression task. With `nnx.Optimizer` the
# gradients arrive as an `nnx.State`; both transforms take any pytree (the second
# matches its manifold labels by key name, so `{"w": ob}` refers to the module's
# attribute `w`).


# %%
class Net(nnx.Module):
    def __init__(self, rngs):
        self.w = nnx.Param(ob.random_point(rngs.params(), (), jnp.float32))
        self.out = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(x @ self.w[...]))


kx, kt = jax.random.split(jax.random.key(1))
xs = jax.random.normal(kx, (256, 6))
ys = jnp.sin(xs @ jax.random.normal(kt, (6, 3)))


def mse(model):
    return jnp.mean((model(xs) - ys) ** 2)


def train(tx, steps=300):
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, opt):
        loss, grads = nnx.value_and_grad(mse)(model)
        opt.update(model, grads, value=loss)  # an extra argument: both accept it
        return loss

    losses = [float(step(model, opt)) for _ in range(steps)]
    return model, losses


def labels(state):  # "ob" for the module's attribute `w`, "adam" for the rest
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "ob" if getattr(path[0], "key", None) == "w" else "adam", state)


m1, l1 = train(subspace_momentum(0.05, rank=2, refresh_every=10))
print(f"subspace momentum: loss {l1[0]:.4f} -> {l1[-1]:.4f}")
m2, l2 = train(optax.partition(
    {"ob": normalized_rsgd_real(0.05, manifolds={"w": ob}), "adam": optax.adam(1e-2)},
    labels))
print(f"normalized RSGD on OB(6, 4) + Adam: loss {l2[0]:.4f} -> {l2[-1]:.4f}, "
      f"column-norm error {float(ob.check(m2.w[...])):.1e}")
