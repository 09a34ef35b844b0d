"""LoRA utilities on Flax's own ``nnx.LoRA`` / ``nnx.LoRALinear``.

Flax ships the layers and the ``nnx.LoRAParam`` variable type; this module adds
what the low-rank papers need on top of them: PiSSA and SC-LoRA initialisation,
merge / unmerge of the adapter into the base kernel, and an optimizer that
updates only the adapter.

Convention (Flax's): the base kernel ``W`` is ``(in, out)``, ``lora_a`` is
``(in, r)``, ``lora_b`` is ``(r, out)`` and the layer computes
``x W + b + x A B``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from subjax._core import as_compute


def _parts(layer, name: str = "layer"):
    """``(kernel variable, lora_a variable, lora_b variable, base linear)`` of a LoRA layer."""
    if isinstance(layer, nnx.LoRALinear):
        return layer.kernel, layer.lora.lora_a, layer.lora.lora_b, layer
    if isinstance(layer, nnx.LoRA):
        base = layer.base_module
        if base is None or not hasattr(base, "kernel"):
            raise TypeError(
                f"`{name}` is an nnx.LoRA without a base module that has a `kernel`; "
                "PiSSA / SC-LoRA / merge need the base weight"
            )
        return base.kernel, layer.lora_a, layer.lora_b, base
    raise TypeError(
        f"`{name}` must be an nnx.LoRALinear or an nnx.LoRA wrapping an nnx.Linear, "
        f"got {type(layer).__name__}"
    )


def _set(var, value) -> None:
    var[...] = jnp.asarray(value).astype(var[...].dtype)


def lora_rank(layer) -> int:
    """The adapter rank ``r`` of an ``nnx.LoRALinear`` / ``nnx.LoRA``."""
    return int(_parts(layer)[1][...].shape[1])


def pissa_init(layer):
    r"""Initialise a LoRA adapter the PiSSA way, in place; returns ``layer``.

    With the base kernel :math:`W = U \Sigma V^\top`, the adapter takes the top
    ``r`` singular directions, :math:`A = U_r \Sigma_r^{1/2}`,
    :math:`B = \Sigma_r^{1/2} V_r^\top`, and the base keeps the residual
    :math:`W - A B`; the layer's function is unchanged.

    Args:
      layer: ``nnx.LoRALinear``, or ``nnx.LoRA`` whose ``base_module`` has a kernel.

    Returns:
      ``layer`` (modified in place).

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, subjax.nn as snn
      >>> layer = nnx.LoRALinear(8, 6, lora_rank=2, rngs=nnx.Rngs(0))
      >>> x = jnp.ones((3, 8)); y0 = layer(x)
      >>> _ = snn.pissa_init(layer)
      >>> bool(jnp.allclose(layer(x), y0, atol=1e-5))
      True

    References:
      Meng, Wang, Zhang, PiSSA: Principal Singular Values and Singular Vectors
      Adaptation of Large Language Models, NeurIPS 2024.
    """
    kernel, a_var, b_var, _ = _parts(layer)
    w = as_compute(kernel[...])
    r = a_var[...].shape[1]
    u, s, vt = jnp.linalg.svd(w, full_matrices=False)
    root = jnp.sqrt(s[:r])
    a = u[:, :r] * root[None, :]
    b = root[:, None] * vt[:r]
    _set(a_var, a)
    _set(b_var, b)
    _set(kernel, w - a @ b)
    return layer


class SCLoRASubspace(NamedTuple):
    """Result of :func:`sclora_subspace`.

    Attributes:
      basis: ``(d, r)`` orthonormal basis of the selected output subspace.
      eigenvalues: ``(r,)`` the selected eigenvalues, descending.
      eigenvectors: ``(d, r)`` the eigenvectors as solved (Euclidean-orthonormal
        for ``"difference"``; ``C_keep``-orthonormal for ``"generalized"``).
    """

    basis: jax.Array
    eigenvalues: jax.Array
    eigenvectors: jax.Array


SCLORA_METHODS = ("difference", "generalized")


def sclora_subspace(
    c_ft: jax.Array,
    c_keep: jax.Array,
    rank: int,
    *,
    beta: float = 0.5,
    method: str = "difference",
    ridge: float = 1e-6,
) -> SCLoRASubspace:
    r"""The SC-LoRA subspace: keep fine-tuning context, drop preserved-knowledge context.

    ``"difference"`` (the paper's): the top-``r`` eigenvectors of
    :math:`(1 - \beta) C_{ft} - \beta C_{keep}`. ``"generalized"``: the top-``r``
    generalized eigenvectors of :math:`C_{ft} v = \lambda (C_{keep} + \epsilon I) v`
    (the directions with the largest ratio of fine-tuning to preserved energy),
    :math:`\epsilon` = ``ridge`` times the mean eigenvalue of :math:`C_{keep}`,
    solved through a Cholesky factor of the right-hand matrix.

    Args:
      c_ft: ``(d, d)`` symmetric PSD covariance of the fine-tuning data.
      c_keep: ``(d, d)`` covariance of the data whose knowledge is preserved.
      rank: static ``r <= d``.
      beta: trade-off in ``[0, 1]`` (``"difference"``).
      method: ``"difference"`` or ``"generalized"``.
      ridge: relative regularisation of ``C_keep`` (``"generalized"``).

    Returns:
      :class:`SCLoRASubspace`.

    References:
      Luo et al., SC-LoRA: Balancing Efficient Fine-tuning and Knowledge
      Preservation via Subspace-Constrained LoRA, 2025.
    """
    c_ft, c_keep = as_compute(c_ft), as_compute(c_keep)
    if c_ft.ndim != 2 or c_ft.shape[0] != c_ft.shape[1] or c_keep.shape != c_ft.shape:
        raise ValueError(
            f"`c_ft` and `c_keep` must be square and of the same shape, got "
            f"{c_ft.shape} and {c_keep.shape}"
        )
    d = c_ft.shape[0]
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"`rank` must be a Python int, got {type(rank).__name__}")
    if not 1 <= rank <= d:
        raise ValueError(f"`rank`={rank} must be in [1, {d}] (the covariance size)")
    if method not in SCLORA_METHODS:
        raise ValueError(f"unknown `method`={method!r}; expected one of {SCLORA_METHODS}")
    c_ft = 0.5 * (c_ft + c_ft.T)
    c_keep = 0.5 * (c_keep + c_keep.T)
    if method == "difference":
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"`beta` must be in [0, 1], got {beta}")
        evals, evecs = jnp.linalg.eigh((1.0 - beta) * c_ft - beta * c_keep)
        vals, vecs = evals[::-1][:rank], evecs[:, ::-1][:, :rank]
        return SCLoRASubspace(vecs, vals, vecs)
    eps = ridge * jnp.trace(c_keep) / d
    b = c_keep + eps * jnp.eye(d, dtype=c_keep.dtype)
    chol = jnp.linalg.cholesky(b)
    # L^{-1} C_ft L^{-T} w = lambda w,  v = L^{-T} w
    tmp = jax.scipy.linalg.solve_triangular(chol, c_ft, lower=True)
    m = jax.scipy.linalg.solve_triangular(chol, tmp.T, lower=True)
    evals, w = jnp.linalg.eigh(0.5 * (m + m.T))
    vals, w = evals[::-1][:rank], w[:, ::-1][:, :rank]
    vecs = jax.scipy.linalg.solve_triangular(chol.T, w, lower=False)
    basis, _ = jnp.linalg.qr(vecs)
    return SCLoRASubspace(basis, vals, vecs)


def sclora_init(
    layer,
    x_ft: jax.Array,
    x_keep: jax.Array,
    *,
    beta: float = 0.5,
    method: str = "difference",
    ridge: float = 1e-6,
) -> SCLoRASubspace:
    r"""Initialise a LoRA adapter the SC-LoRA way, in place.

    The covariances are those of the base layer's outputs :math:`y = x W` on
    fine-tuning inputs ``x_ft`` and on preserved-knowledge inputs ``x_keep``;
    :func:`sclora_subspace` gives an orthonormal :math:`V` (``out x r``); the
    adapter is set to :math:`A = W V`, :math:`B = V^\top` (its outputs lie in
    :math:`\mathrm{span}(V)`) and the base keeps :math:`W - A B`, so the layer's
    function is unchanged at initialisation.

    Args:
      layer: ``nnx.LoRALinear`` or ``nnx.LoRA`` with a base module.
      x_ft: ``(n_ft, in)`` inputs of the layer on the fine-tuning task.
      x_keep: ``(n_keep, in)`` inputs of the layer on the preserved task.
      beta, method, ridge: see :func:`sclora_subspace`.

    Returns:
      The :class:`SCLoRASubspace` used.
    """
    kernel, a_var, b_var, _ = _parts(layer)
    w = as_compute(kernel[...])
    if x_ft.ndim != 2 or x_ft.shape[1] != w.shape[0]:
        raise ValueError(f"`x_ft` must be (n, {w.shape[0]}), got {x_ft.shape}")
    if x_keep.ndim != 2 or x_keep.shape[1] != w.shape[0]:
        raise ValueError(f"`x_keep` must be (n, {w.shape[0]}), got {x_keep.shape}")
    y_ft = as_compute(x_ft).astype(w.dtype) @ w
    y_keep = as_compute(x_keep).astype(w.dtype) @ w
    c_ft = y_ft.T @ y_ft / x_ft.shape[0]
    c_keep = y_keep.T @ y_keep / x_keep.shape[0]
    sub = sclora_subspace(c_ft, c_keep, a_var[...].shape[1], beta=beta, method=method,
                          ridge=ridge)
    v = sub.basis.astype(w.dtype)
    a = w @ v
    b = v.T
    _set(a_var, a)
    _set(b_var, b)
    _set(kernel, w - a @ b)
    return sub


def merge_lora(layer) -> nnx.Linear:
    """A plain ``nnx.Linear`` whose kernel is ``W + A B`` (the adapter merged).

    ``layer`` is left unchanged; the returned layer computes the same function.
    :func:`unmerge_lora` inverts it given the adapter factors.

    Example:
      >>> from flax import nnx
      >>> import jax.numpy as jnp, subjax.nn as snn
      >>> layer = snn.pissa_init(nnx.LoRALinear(8, 6, lora_rank=2, rngs=nnx.Rngs(0)))
      >>> merged = snn.merge_lora(layer)
      >>> x = jnp.ones((3, 8))
      >>> bool(jnp.allclose(merged(x), layer(x), atol=1e-5))
      True
    """
    kernel, a_var, b_var, base = _parts(layer)
    w = kernel[...]
    delta = as_compute(a_var[...]) @ as_compute(b_var[...])
    out = nnx.Linear(
        w.shape[0], w.shape[1], use_bias=base.use_bias, dtype=base.dtype,
        param_dtype=base.param_dtype, precision=base.precision, rngs=nnx.Rngs(0),
    )
    _set(out.kernel, as_compute(w) + delta.astype(as_compute(w).dtype))
    if base.use_bias:
        _set(out.bias, base.bias[...])
    return out


def unmerge_lora(linear: nnx.Linear, lora_a: jax.Array, lora_b: jax.Array) -> nnx.LoRALinear:
    """An ``nnx.LoRALinear`` with kernel ``W - A B`` and adapter ``(A, B)``.

    The inverse of :func:`merge_lora`: ``unmerge_lora(merge_lora(l), a, b)`` has the
    kernel and adapter of ``l`` (equal up to one float rounding of ``W + A B``;
    bit-exact when the sums are representable).
    """
    if not isinstance(linear, nnx.Linear):
        raise TypeError(f"`linear` must be an nnx.Linear, got {type(linear).__name__}")
    w = linear.kernel[...]
    d_in, d_out = w.shape
    if lora_a.ndim != 2 or lora_a.shape[0] != d_in:
        raise ValueError(f"`lora_a` must be ({d_in}, r), got {lora_a.shape}")
    if lora_b.shape != (lora_a.shape[1], d_out):
        raise ValueError(f"`lora_b` must be ({lora_a.shape[1]}, {d_out}), got {lora_b.shape}")
    out = nnx.LoRALinear(
        d_in, d_out, lora_rank=lora_a.shape[1], use_bias=linear.use_bias, dtype=linear.dtype,
        param_dtype=linear.param_dtype, precision=linear.precision,
        lora_param_dtype=lora_a.dtype, rngs=nnx.Rngs(0),
    )
    delta = as_compute(lora_a) @ as_compute(lora_b)
    _set(out.kernel, as_compute(w) - delta.astype(as_compute(w).dtype))
    _set(out.lora.lora_a, lora_a)
    _set(out.lora.lora_b, lora_b)
    if linear.use_bias:
        _set(out.bias, linear.bias[...])
    return out


def lora_state(model) -> nnx.State:
    """The ``nnx.LoRAParam`` variables of ``model`` (what a LoRA optimizer updates)."""
    return nnx.state(model, nnx.LoRAParam)


def lora_optimizer(model, tx: optax.GradientTransformation) -> nnx.Optimizer:
    """``nnx.Optimizer`` over the ``nnx.LoRAParam`` variables only (the base is frozen).

    Differentiate with ``nnx.grad(loss, argnums=nnx.DiffState(0, nnx.LoRAParam))``
    and call ``opt.update(model, grads)``.
    """
    return nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
