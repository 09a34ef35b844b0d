"""Manifold-valued Flax NNX layers: the Grassmann class head (GCR) and OrthogonalLinear."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from subjax.manifolds import Grassmann, Manifold, Stiefel


class ManifoldParam(nnx.Param):
    """An ``nnx.Param`` whose value lives on a manifold (metadata ``manifold``).

    :func:`manifolds_of` reads the ``manifold`` metadata to build the pytree that
    :func:`subjax.optim.riemannian_sgd` / ``riemannian_adam`` take as ``manifolds``.
    """


def _safe_norm(z: jax.Array, axis: int) -> jax.Array:
    """``||z||`` along ``axis`` with a zero (not NaN) gradient at ``z = 0``."""
    s = jnp.sum(z * z, axis=axis)
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, jnp.ones_like(s))), jnp.zeros_like(s))


class GrassmannClassifier(nnx.Module):
    r"""Grassmann class representation head (GCR; Wang, Li & Zhang, ICCV 2023).

    Class ``c`` is a ``p``-dimensional subspace with orthonormal basis
    ``W_c`` (``features x p``), a point of ``Grassmann(features, p)``; the weight is the
    stack ``W`` of shape ``(classes, features, p)``. The logit is

    .. math:: \ell_c(x) = s \, \| W_c^T \, x / \|x\| \|,

    the scaled norm of the projection of the normalised feature onto the class
    subspace (in ``[0, s]``). Train ``W`` with :func:`subjax.optim.riemannian_sgd`
    (``manifolds_of(model)`` gives the manifold pytree) and the rest of the network
    with any optax optimizer. Norms use a safe square root, so gradients are finite
    for ``subspace_dim = 1`` and for zero features.

    Args:
      features: input feature size ``n``.
      classes: number of classes ``C``.
      subspace_dim: ``p`` (``1 <= p <= features``).
      scale: the logit scale ``s`` (fixed).
      rngs: ``nnx.Rngs``; the init is a per-class QR of a Gaussian matrix.
      dtype / param_dtype: computation and parameter dtypes.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from subjax.nn import GrassmannClassifier
      >>> head = GrassmannClassifier(16, 10, 4, scale=5.0, rngs=nnx.Rngs(0))
      >>> head(jnp.ones((2, 16))).shape
      (2, 10)

    References:
      Wang, Li, Zhang, "Get the Best of Both Worlds: Improving Accuracy and
      Transferability by Grassmann Class Representation", ICCV 2023.
    """

    def __init__(
        self,
        features: int,
        classes: int,
        subspace_dim: int,
        scale: float = 10.0,
        *,
        rngs: nnx.Rngs,
        dtype=None,
        param_dtype=jnp.float32,
    ):
        for name, v in (("features", features), ("classes", classes),
                        ("subspace_dim", subspace_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"argument `{name}` must be a positive int, got {v!r}")
        if subspace_dim > features:
            raise ValueError(
                f"argument `subspace_dim`={subspace_dim} exceeds `features`={features}"
            )
        if not scale > 0:
            raise ValueError(f"argument `scale` must be positive, got {scale!r}")
        self.features, self.classes, self.subspace_dim = features, classes, subspace_dim
        self.scale = float(scale)
        self.dtype = dtype
        manifold = Grassmann(features, subspace_dim)
        w = manifold.random_point(rngs.params(), (classes,), param_dtype)
        self.weight = ManifoldParam(w, manifold=manifold)

    def project(self, x: jax.Array) -> jax.Array:
        """Coordinates ``W_c^T normalize(x)``, shape ``batch + (classes, subspace_dim)``."""
        w = self.weight[...]
        dtype = self.dtype or jnp.result_type(x.dtype, w.dtype)
        x = x.astype(dtype)
        xn = x / jnp.maximum(_safe_norm(x, -1), jnp.asarray(1e-12, dtype))[..., None]
        return jnp.einsum("...n,cnp->...cp", xn, w.astype(dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.shape[-1] != self.features:
            raise ValueError(
                f"argument `x` has {x.shape[-1]} features; the head expects {self.features}"
            )
        z = self.project(x)
        return jnp.asarray(self.scale, z.dtype) * _safe_norm(z, -1)


class OrthogonalLinear(nnx.Module):
    """Linear layer ``y = x W (+ b)`` with ``W`` on a Stiefel manifold.

    ``W`` has orthonormal columns when ``out_features <= in_features`` (a point of
    ``Stiefel(in, out)``), else orthonormal rows (stored transposed, a point of
    ``Stiefel(out, in)``), so ``||x W|| <= ||x||`` or ``= ||x||`` respectively.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from subjax.nn import OrthogonalLinear
      >>> OrthogonalLinear(8, 4, rngs=nnx.Rngs(0))(jnp.ones((3, 8))).shape
      (3, 4)
    """

    def __init__(self, in_features: int, out_features: int, *, use_bias: bool = True,
                 rngs: nnx.Rngs, param_dtype=jnp.float32):
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"argument `{name}` must be a positive int, got {v!r}")
        self.in_features, self.out_features = in_features, out_features
        self.transposed = out_features > in_features
        n, p = (out_features, in_features) if self.transposed else (in_features, out_features)
        manifold = Stiefel(n, p)
        self.kernel = ManifoldParam(manifold.random_point(rngs.params(), (), param_dtype),
                                    manifold=manifold)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...]
        y = x @ (k.T if self.transposed else k)
        return y + self.bias[...] if self.bias is not None else y


def manifolds_of(model: nnx.Module, wrt=nnx.Param):
    """The manifold pytree of ``model``: its ``nnx.state(model, wrt)`` with each
    :class:`ManifoldParam` replaced by its manifold and every other variable by ``None``.

    Pass it as ``manifolds=`` to the Riemannian optimizers, or to
    :func:`subjax.optim.manifold_labels` for ``optax.partition``.

    Example:
      >>> from flax import nnx
      >>> from subjax.nn import GrassmannClassifier, manifolds_of
      >>> head = GrassmannClassifier(6, 3, 2, rngs=nnx.Rngs(0))
      >>> manifolds_of(head)["weight"]
      Grassmann(n=6, p=2, retraction='polar')
    """
    state = nnx.state(model, wrt)

    def label(v):
        m = v.get_metadata().get("manifold") if isinstance(v, nnx.Variable) else None
        return m if isinstance(m, Manifold) else None

    return jax.tree.map(label, state, is_leaf=lambda v: isinstance(v, nnx.Variable))
