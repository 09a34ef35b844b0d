"""Training in a random subspace of the parameters: ``theta = theta0 + P z``.

Li, Farkhoor, Liu & Yosinski, "Measuring the Intrinsic Dimension of Objective
Landscapes" (ICLR 2018): freeze a network's initial parameters ``theta0`` (``D``
numbers), draw a fixed random ``D x d`` projection ``P`` with unit-norm columns, and
train only ``z`` (``d`` numbers, starting at zero). The smallest ``d`` at which the
subspace-trained network reaches 90% of the fully trained network's performance is
the objective's *intrinsic dimension* ``d_int90``.

:class:`RandomSubspace` wraps any Flax NNX module whose state is all
``nnx.Param``. Two projections:

- ``"dense"``: ``P`` with i.i.d. Gaussian entries, columns normalised to unit
  length (``D * d`` stored numbers);
- ``"fastfood"``: the structured Fastfood transform
  ``P = sqrt(L) / ||g|| * (H/sqrt(L)) diag(g) Pi (H/sqrt(L)) diag(b)`` restricted
  to its first ``D`` rows and ``d`` columns (``L = 2^ceil(log2 D)``, ``H`` the
  Walsh-Hadamard matrix, ``b`` random signs, ``Pi`` a random permutation, ``g``
  Gaussian): ``O(L log L)`` time and ``O(L)`` stored numbers, columns of unit norm.
  The paper's extra diagonal scaling ``S`` (chi-distributed row norms) is omitted.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.flatten_util import ravel_pytree

from subjax._core.checks import check_key, choice, static_int

PROJECTIONS = ("dense", "fastfood")


class SubspaceOrigin(nnx.Variable):
    """The frozen initial parameters ``theta0`` (flattened; not trained)."""


class SubspaceBasis(nnx.Variable):
    """The fixed random data of the projection (dense matrix, or Fastfood's vectors)."""


def walsh_hadamard(x: jax.Array) -> jax.Array:
    """Unnormalised Walsh-Hadamard transform ``H x`` along the last axis (Sylvester order).

    The last axis must have a power-of-two length. ``H`` is symmetric with ``H H = L I``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.nn import walsh_hadamard
      >>> walsh_hadamard(jnp.array([1.0, 0.0, 0.0, 0.0])).tolist()
      [1.0, 1.0, 1.0, 1.0]
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"the last axis of `x` must have a power-of-two length, got {n}")
    lead = x.shape[:-1]
    h = 1
    while h < n:
        y = x.reshape(lead + (n // (2 * h), 2, h))
        a, b = y[..., 0, :], y[..., 1, :]
        x = jnp.stack([a + b, a - b], axis=-2).reshape(lead + (n,))
        h *= 2
    return x


def fastfood_project(z: jax.Array, signs, perm, gauss, out_dim: int) -> jax.Array:
    """``P z`` for the Fastfood projection defined by ``signs``, ``perm``, ``gauss``.

    ``z`` has ``d <= L`` entries (``L = len(signs)``, a power of two); it is
    zero-padded to ``L``, transformed, and the first ``out_dim`` entries returned.
    Every column of the implied ``P`` has unit norm.
    """
    n = signs.shape[0]
    x = jnp.zeros((n,), z.dtype).at[: z.shape[0]].set(z)
    x = walsh_hadamard(signs * x) / math.sqrt(n)
    x = gauss * x[perm]
    x = walsh_hadamard(x) / math.sqrt(n)
    return (x * (math.sqrt(n) / jnp.linalg.norm(gauss)))[:out_dim]


class RandomSubspace(nnx.Module):
    r"""Train ``module`` only within ``theta0 + P z`` (``z`` of size ``dim``, starting at 0).

    Args:
      module: an NNX module whose state is all ``nnx.Param`` (its current
        parameters become ``theta0``; the module itself is not modified).
      dim: the subspace dimension ``d`` (``1 <= d <= D``).
      projection: ``"dense"`` or ``"fastfood"`` (see the module docstring).
      key: ``jax.random`` key of the projection.

    Calling the wrapper calls the module with parameters ``theta0 + P z``. Only
    ``z`` is an ``nnx.Param``, so ``nnx.Optimizer(wrapper, tx, wrt=nnx.Param)``
    trains ``d`` numbers.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from flax import nnx
      >>> import subjax.nn as snn
      >>> net = nnx.Linear(8, 3, rngs=nnx.Rngs(0))
      >>> sub = snn.RandomSubspace(net, 5, projection="fastfood", key=jax.random.key(1))
      >>> sub.full_dim, sub.z[...].shape
      (27, (5,))
      >>> x = jnp.ones((2, 8))
      >>> bool(jnp.allclose(sub(x), net(x)))             # z = 0: the initial network
      True

    References:
      Li, Farkhoor, Liu & Yosinski, Measuring the Intrinsic Dimension of Objective
      Landscapes, ICLR 2018.
    """

    def __init__(self, module: nnx.Module, dim: int, *, projection: str = "dense", key):
        graphdef, params, rest = nnx.split(module, nnx.Param, ...)
        if jax.tree_util.tree_leaves(rest):
            raise ValueError("`module` must hold only nnx.Param state to be trained in a "
                             "random subspace (found other variables, e.g. batch statistics)")
        flat, unravel = ravel_pytree(nnx.to_pure_dict(params))
        full = int(flat.shape[0])
        dim = static_int(dim, "dim", minimum=1)
        if dim > full:
            raise ValueError(f"`dim`={dim} exceeds the number of parameters D={full}")
        self.projection = choice(projection, "projection", PROJECTIONS)
        check_key(key, "key")
        self.full_dim, self.dim = full, dim
        self._graphdef, self._unravel = graphdef, unravel
        self.theta0 = SubspaceOrigin(flat)
        self.z = nnx.Param(jnp.zeros((dim,), flat.dtype))
        if self.projection == "dense":
            p = jax.random.normal(key, (full, dim), flat.dtype)
            self.basis = SubspaceBasis(p / jnp.linalg.norm(p, axis=0, keepdims=True))
        else:
            n = 1 << max(0, (full - 1).bit_length())
            ks, kp, kg = jax.random.split(key, 3)
            self.basis = SubspaceBasis({
                "signs": jax.random.rademacher(ks, (n,), flat.dtype),
                "perm": jax.random.permutation(kp, n),
                "gauss": jax.random.normal(kg, (n,), flat.dtype)})

    def offset(self) -> jax.Array:
        """``P z`` (``D`` numbers)."""
        z = self.z[...]
        if self.projection == "dense":
            return self.basis[...] @ z
        b = self.basis.get_value()
        return fastfood_project(z, b["signs"], b["perm"], b["gauss"], self.full_dim)

    def parameters(self) -> jax.Array:
        """``theta0 + P z``, flattened."""
        return self.theta0[...] + self.offset()

    def materialize(self) -> nnx.Module:
        """A fresh module holding ``theta0 + P z`` (for evaluation or export)."""
        return nnx.merge(self._graphdef, self._unravel(self.parameters()))

    def __call__(self, *args, **kwargs):
        return self.materialize()(*args, **kwargs)
