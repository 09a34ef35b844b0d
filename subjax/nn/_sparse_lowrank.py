"""LOST's linear layer: an SVD-initialised low-rank part plus a channel-wise sparse part.

LOST (Li et al., "LOST: Low-rank and Sparse Pre-training for Large Language Models",
2025) trains every weight ``W`` (``in x out``, ``y = x W``) as ``W = A B + S`` from
the start of pre-training:

- the singular value decomposition of a freshly initialised dense kernel
  ``W0 = U diag(s) V^T`` gives the low-rank factors of its ``r`` dominant
  components, ``A = U_r diag(sqrt(s_r))`` and ``B = diag(sqrt(s_r)) V_r^T``;
- the remaining components, ``R = W0 - A B``, seed the sparse part: the ``k``
  output channels (columns) of ``R`` with the largest norms are kept, at fixed
  positions, and their values trained; every other column of ``S`` is zero.

At initialisation ``W`` therefore equals ``W0`` on the ``k`` kept channels and its
best rank-``r`` approximation on the others. The layer stores ``r (in + out) + k in``
trained numbers instead of ``in * out``, and its forward pass never forms ``S``:
``y = (x A) B`` with ``x S_k`` added to the kept columns.

SLTrain's unstructured variant (a random support of single entries) is
:class:`subjax.nn.LowRankSparseLinear`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from subjax._core.checks import floating_array, static_int
from subjax._core.dtypes import compute_dtype


class SparseChannels(nnx.Variable):
    """Fixed (non-trainable) indices of the output channels a sparse part occupies."""


class LostFactors(NamedTuple):
    """The split of a dense kernel ``W`` into LOST's parts: ``W = a @ b + S``.

    ``S`` is zero except in the columns ``channels``, where it equals ``values``.
    """

    a: jax.Array  # (in, rank)
    b: jax.Array  # (rank, out)
    channels: jax.Array  # (k,) int32, increasing
    values: jax.Array  # (in, k)


def lost_factors(kernel: jax.Array, rank: int, channels: int) -> LostFactors:
    """Split ``kernel`` (``in x out``) into its top-``rank`` SVD part and ``channels`` columns.

    ``a @ b`` is the best rank-``rank`` approximation of ``kernel`` (balanced
    factors, ``sqrt`` of the singular values on each side); ``values`` are the
    ``channels`` columns of the residual ``kernel - a @ b`` with the largest norms,
    ``channels`` their indices in increasing order. With ``channels = 0`` the
    sparse part is empty.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import subjax.nn as snn
      >>> w = jax.random.normal(jax.random.key(0), (6, 4))
      >>> f = snn.lost_factors(w, rank=2, channels=1)
      >>> f.a.shape, f.b.shape, f.channels.shape, f.values.shape
      ((6, 2), (2, 4), (1,), (6, 1))
      >>> dense = (f.a @ f.b).at[:, f.channels].add(f.values)
      >>> bool(jnp.allclose(dense[:, f.channels], w[:, f.channels], atol=1e-5))
      True
    """
    kernel = floating_array(kernel, "kernel", ndim=2)
    rank, channels = _check_sizes(*kernel.shape, rank, channels)
    return _split(kernel, rank, channels)


def _check_sizes(n_in, n_out, rank, channels):
    rank = static_int(rank, "rank", minimum=1)
    if rank > min(n_in, n_out):
        raise ValueError(f"`rank`={rank} exceeds min(in, out)={min(n_in, n_out)}")
    channels = static_int(channels, "channels", minimum=0)
    if channels > n_out:
        raise ValueError(f"`channels`={channels} exceeds the {n_out} output channels")
    return rank, channels


@functools.partial(jax.jit, static_argnums=(1, 2))
def _split(kernel, rank, channels):
    w = kernel.astype(compute_dtype(kernel.dtype))
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:rank])
    a = u[:, :rank] * root
    b = root[:, None] * vt[:rank]
    residual = w - a @ b
    _, top = jax.lax.top_k(jnp.sum(residual * residual, axis=0), channels)
    idx = jnp.sort(top).astype(jnp.int32)
    dtype = kernel.dtype
    return LostFactors(a.astype(dtype), b.astype(dtype), idx, residual[:, idx].astype(dtype))


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5))
def _init(key, n_in, n_out, rank, channels, dtype):
    return _split(jax.random.normal(key, (n_in, n_out), dtype) / math.sqrt(n_in), rank,
                  channels)


class ChannelSparseLowRankLinear(nnx.Module):
    r"""LOST linear layer: ``y = x (A B + S) + bias``, ``S`` non-zero in ``channels`` columns.

    A dense kernel is drawn (variance ``1 / in``, as a fan-in scaled dense layer)
    and split by :func:`lost_factors`: ``A`` (``in x rank``) and ``B``
    (``rank x out``) are its dominant SVD part, ``S`` the ``channels`` residual
    columns of largest norm (positions fixed in :class:`SparseChannels`, values
    trained). Trained numbers: ``rank (in + out) + channels * in`` (plus the bias).

    Args:
      in_features, out_features: sizes.
      rank: rank of the low-rank part, ``1 <= rank <= min(in, out)``.
      channels: number of output channels of the sparse part, ``0 <= channels <= out``.
      use_bias: add a bias (zero at initialisation).
      param_dtype: dtype of the parameters.
      rngs: ``nnx.Rngs`` (``params`` stream).

    Example:
      >>> import jax.numpy as jnp, subjax.nn as snn
      >>> from flax import nnx
      >>> layer = snn.ChannelSparseLowRankLinear(32, 16, rank=4, channels=2,
      ...                                        rngs=nnx.Rngs(0))
      >>> x = jnp.ones((3, 32))
      >>> layer(x).shape, layer.values[...].shape
      ((3, 16), (32, 2))
      >>> bool(jnp.allclose(layer(x), x @ layer.kernel() + layer.bias[...], atol=1e-5))
      True

    References:
      Li et al., LOST: Low-rank and Sparse Pre-training for Large Language
      Models, 2025.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        channels: int,
        use_bias: bool = True,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_features = static_int(in_features, "in_features", minimum=1)
        out_features = static_int(out_features, "out_features", minimum=1)
        self.in_features, self.out_features = in_features, out_features
        rank, channels = _check_sizes(in_features, out_features, rank, channels)
        f = _init(rngs.params(), in_features, out_features, rank, channels,
                  jnp.dtype(param_dtype))
        self.rank, self.channels = f.a.shape[1], f.channels.shape[0]
        self.a = nnx.Param(f.a)
        self.b = nnx.Param(f.b)
        self.support = SparseChannels(f.channels)
        self.values = nnx.Param(f.values)
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None

    def sparse_kernel(self) -> jax.Array:
        """The dense ``(in, out)`` array of ``S``."""
        v = self.values[...]
        return jnp.zeros((self.in_features, self.out_features), v.dtype).at[
            :, self.support[...]].set(v)

    def kernel(self) -> jax.Array:
        """The effective dense kernel ``A B + S``."""
        return self.a[...] @ self.b[...] + self.sparse_kernel()

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.a[...].dtype)
        y = (x @ self.a[...]) @ self.b[...]
        if self.channels:
            y = y.at[..., self.support[...]].add(x @ self.values[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y
