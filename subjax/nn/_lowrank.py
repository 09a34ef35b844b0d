"""Low-rank layers Flax does not ship: SLTrain's low-rank + sparse linear, Maestro's
ordered-dropout factorized linear."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


class SparseSupport(nnx.Variable):
    """Fixed (non-trainable) flat indices of a sparse weight's support."""


def _check_dims(in_features, out_features, rank):
    for name, v in (("in_features", in_features), ("out_features", out_features),
                    ("rank", rank)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive int, got {v!r}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"`rank`={rank} exceeds min(in_features, out_features)="
            f"{min(in_features, out_features)}"
        )


class LowRankSparseLinear(nnx.Module):
    r"""SLTrain linear layer: ``W = scale * A B + S`` with a fixed random sparse support.

    ``A`` (``in x r``) and ``B`` (``r x out``) are trained; ``S`` has
    ``round(density * in * out)`` non-zeros at positions drawn once (uniformly,
    without replacement) at construction and kept fixed (:class:`SparseSupport`);
    only their values are trained. Parameters: ``r (in + out) + nnz`` instead of
    ``in * out``.

    Args:
      in_features, out_features: sizes.
      rank: rank of the low-rank part.
      density: fraction of non-zeros in ``S``, in ``[0, 1)``.
      scale: factor on the low-rank part (SLTrain's ``alpha / r``; default ``1``).
      use_bias: add a bias.
      rngs: ``nnx.Rngs`` (``params`` stream).

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, subjax.nn as snn
      >>> layer = snn.LowRankSparseLinear(32, 16, rank=4, density=0.05, rngs=nnx.Rngs(0))
      >>> layer(jnp.ones((2, 32))).shape, int(layer.support[...].shape[0])
      ((2, 16), 26)

    References:
      Han et al., SLTrain: a sparse plus low-rank approach for parameter and
      memory efficient pretraining, NeurIPS 2024.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        density: float = 0.03,
        scale: float = 1.0,
        use_bias: bool = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_dims(in_features, out_features, rank)
        if not 0.0 <= density < 1.0:
            raise ValueError(f"`density` must be in [0, 1), got {density}")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.scale = scale
        nnz = int(round(density * in_features * out_features))
        ka, kb, ks, kv = (rngs.params() for _ in range(4))
        # A B has the variance of a fan-in-scaled dense kernel at initialisation
        self.a = nnx.Param(jax.random.normal(ka, (in_features, rank), param_dtype)
                           / math.sqrt(in_features))
        self.b = nnx.Param(jax.random.normal(kb, (rank, out_features), param_dtype)
                           / math.sqrt(rank))
        idx = jax.random.choice(ks, in_features * out_features, (nnz,), replace=False)
        self.support = SparseSupport(jnp.sort(idx).astype(jnp.int32))
        bound = 1.0 / math.sqrt(in_features)
        self.values = nnx.Param(jax.random.uniform(kv, (nnz,), param_dtype, -bound, bound))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def sparse_kernel(self) -> jax.Array:
        """The dense ``(in, out)`` array of ``S``."""
        flat = jnp.zeros((self.in_features * self.out_features,), self.values[...].dtype)
        flat = flat.at[self.support[...]].set(self.values[...])
        return flat.reshape(self.in_features, self.out_features)

    def kernel(self) -> jax.Array:
        """The effective dense kernel ``scale * A B + S``."""
        return self.scale * (self.a[...] @ self.b[...]) + self.sparse_kernel()

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.a[...].dtype)
        y = self.scale * ((x @ self.a[...]) @ self.b[...]) + x @ self.sparse_kernel()
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class OrderedDropoutLinear(nnx.Module):
    r"""Maestro's factorized linear layer ``x U V`` trained with ordered dropout.

    With ``U`` (``in x r``) and ``V`` (``r x out``), a forward pass may keep only
    the first ``k`` rank-one components, :math:`x U_{:, :k} V_{:k, :}`. Training
    with ``k`` drawn uniformly from ``{k_min, ..., r}`` at each step (pass
    ``rngs``) makes the leading components carry the most information, so the
    trained factors are ordered like an SVD and can be truncated afterwards
    (``keep=k``).

    Args:
      in_features, out_features: sizes.
      rank: number of components ``r``.
      k_min: smallest number of components kept by ordered dropout.
      use_bias: add a bias.
      rngs: ``nnx.Rngs`` for the initialisation.

    Call:
      ``layer(x, keep=k)`` keeps the first ``k`` components (``k`` may be traced);
      ``layer(x, rngs=nnx.Rngs(dropout=i))`` samples ``k`` (ordered dropout);
      ``layer(x)`` uses all ``r``.

    References:
      Horváth et al., Maestro: Uncovering Low-Rank Structures via Trainable
      Decomposition, ICML 2024.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        k_min: int = 1,
        use_bias: bool = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        _check_dims(in_features, out_features, rank)
        if not 1 <= k_min <= rank:
            raise ValueError(f"`k_min` must be in [1, rank={rank}], got {k_min}")
        self.in_features, self.out_features, self.rank, self.k_min = (
            in_features, out_features, rank, k_min)
        ku, kv = rngs.params(), rngs.params()
        self.u = nnx.Param(jax.random.normal(ku, (in_features, rank), param_dtype)
                           / math.sqrt(in_features))
        self.v = nnx.Param(jax.random.normal(kv, (rank, out_features), param_dtype)
                           / math.sqrt(rank))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def sample_keep(self, rngs: nnx.Rngs) -> jax.Array:
        """Draw ``k`` uniformly from ``{k_min, ..., rank}`` (``dropout`` stream)."""
        return jax.random.randint(rngs.dropout(), (), self.k_min, self.rank + 1)

    def __call__(self, x: jax.Array, *, keep=None, rngs: nnx.Rngs | None = None) -> jax.Array:
        if keep is None and rngs is not None:
            keep = self.sample_keep(rngs)
        h = x.astype(self.u[...].dtype) @ self.u[...]
        if keep is not None:
            mask = jnp.arange(self.rank) < keep
            h = jnp.where(mask, h, jnp.zeros((), h.dtype))
        y = h @ self.v[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y

    def kernel(self, keep: int | None = None) -> jax.Array:
        """The dense ``(in, out)`` kernel of the first ``keep`` components (all by default)."""
        k = self.rank if keep is None else keep
        return self.u[...][:, :k] @ self.v[...][:k]
