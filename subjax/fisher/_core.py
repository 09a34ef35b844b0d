"""Fisher information estimators over a model function and a batch.

Every function here takes ``apply_fn(params, inputs) -> outputs`` (outputs with a
leading batch axis: logits or a mean) and a ``likelihood`` (see
:mod:`subjax.fisher._likelihood`). The Fisher of the *mean* per-example NLL is
used throughout::

    F = (1/N) sum_i E_{y ~ p(y|x_i)} [ g_i(y) g_i(y)^T ],   g_i(y) = grad log p(y | x_i)

(the "true" Fisher), or with ``y`` the observed label (the "empirical" Fisher).
For the likelihoods offered the true Fisher equals the Gauss-Newton matrix
``(1/N) sum_i J_i^T H_i J_i`` with ``H_i`` the Hessian of the NLL in the outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from subjax._core import compute_dtype, static_int
from subjax.fisher import _likelihood as lk

Params = Any


def _batch_size(inputs) -> int:
    leaves = jax.tree.leaves(inputs)
    if not leaves or jnp.ndim(leaves[0]) < 1:
        raise ValueError("`inputs` must be an array (or pytree) with a leading batch axis")
    n = leaves[0].shape[0]
    for leaf in leaves:
        if jnp.ndim(leaf) < 1 or leaf.shape[0] != n:
            raise ValueError("every leaf of `inputs` must share the leading batch axis")
    return int(n)


def _one(tree):
    """Add back a batch axis of one to an example (vmapped over the batch)."""
    return jax.tree.map(lambda x: x[None], tree)


def _outputs(apply_fn, params, inputs, likelihood):
    out = apply_fn(params, inputs)
    lk.check_outputs(likelihood, out)
    return out


def per_example_grads(loss_fn: Callable, params: Params, *batch) -> Params:
    """Per-example gradients ``grad loss_fn(params, example_i)`` stacked on axis 0.

    ``loss_fn(params, *batch)`` is the user's batch loss; it is evaluated on
    batches of one example (each leaf of ``batch`` sliced along its leading axis
    and given back a batch axis of size one), under ``jax.vmap``.

    Args:
      loss_fn: ``(params, *batch) -> scalar``.
      params: pytree of parameters.
      *batch: arrays / pytrees with a common leading batch axis ``N``.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis ``N``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax import fisher
      >>> loss = lambda w, x, y: jnp.mean((x @ w - y) ** 2)
      >>> g = fisher.per_example_grads(loss, jnp.ones(2), jnp.eye(2), jnp.zeros(2))
      >>> g.tolist()
      [[2.0, 0.0], [0.0, 2.0]]
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}")
    if not batch:
        raise ValueError("`batch` is empty: pass the arrays the loss needs after `params`")
    _batch_size(batch)

    def one(*example):
        return jax.grad(loss_fn)(params, *_one(example))

    return jax.vmap(one)(*batch)


def _per_example_nll_fn(apply_fn, likelihood):
    def per_example(params, inputs, labels):
        return lk.nll(likelihood, apply_fn(params, inputs), labels)

    return per_example


def _sq_mean(g):
    return jax.tree.map(lambda x: jnp.mean(jnp.square(x), axis=0), g)


def diag_empirical(
    apply_fn: Callable, params: Params, inputs, labels, *, likelihood: str = "categorical"
) -> Params:
    """Diagonal of the empirical Fisher ``(1/N) sum_i g_i(y_i)^2`` (observed labels).

    Args:
      apply_fn: ``(params, inputs) -> outputs`` with a leading batch axis.
      params: parameters (pytree).
      inputs: model inputs, leading batch axis ``N``.
      labels: observed targets (class ids for ``"categorical"``, same shape as the
        outputs otherwise). Required: use :func:`diag_true` for a label-free Fisher.
      likelihood: ``"categorical" | "bernoulli" | "gaussian"``.

    Returns:
      A pytree like ``params`` (the Fisher diagonal, non-negative).

    References:
      Kunstner, Balles, Hennig, "Limitations of the empirical Fisher approximation
      for natural gradient descent", NeurIPS 2019.
    """
    lk.check_likelihood(likelihood)
    if labels is None:
        raise ValueError(
            "`labels` is None: the empirical Fisher needs observed labels; use "
            "`diag_true(...)` for the label-free (true) Fisher"
        )
    out = jax.eval_shape(lambda p: _outputs(apply_fn, p, inputs, likelihood), params)
    lk.check_labels(likelihood, out, labels)
    nll = _per_example_nll_fn(apply_fn, likelihood)
    g = per_example_grads(lambda p, x, y: jnp.sum(nll(p, x, y)), params, inputs, labels)
    return jax.tree.map(lambda d, p: d.astype(p.dtype), _sq_mean(g), params)


def diag_true(
    apply_fn: Callable,
    params: Params,
    inputs,
    *,
    likelihood: str = "categorical",
    key: jax.Array | None = None,
    num_samples: int = 1,
    exact: bool | None = None,
) -> Params:
    """Diagonal of the true Fisher ``(1/N) sum_i E_{y~p(y|x_i)} g_i(y)^2``.

    For ``"categorical"`` the expectation over the predictive classes is exact by
    default: ``sum_c p_c g_i(c)^2`` (one backward pass per class, vmapped). For
    the other likelihoods (or ``exact=False``) it is a Monte Carlo average over
    ``num_samples`` targets drawn from the model (``key`` required).

    Args:
      apply_fn: ``(params, inputs) -> outputs``.
      params: parameters.
      inputs: model inputs with a leading batch axis.
      likelihood: ``"categorical" | "bernoulli" | "gaussian"``.
      key: PRNG key for the sampled estimate.
      num_samples: targets drawn per example for the sampled estimate.
      exact: force the exact class expectation (only ``"categorical"``).

    Returns:
      A pytree like ``params``.

    References:
      Matena, Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022.
    """
    lk.check_likelihood(likelihood)
    if exact is None:
        exact = likelihood == "categorical"
    if exact and likelihood != "categorical":
        raise ValueError(f"`exact`=True needs likelihood='categorical', got {likelihood!r}")
    out = jax.eval_shape(lambda p: _outputs(apply_fn, p, inputs, likelihood), params)
    nll = _per_example_nll_fn(apply_fn, likelihood)

    if exact:
        if out.ndim != 2:
            raise ValueError(
                "the exact true Fisher needs logits of shape (N, C); got "
                f"{out.shape} — use exact=False (sampled) for structured outputs"
            )
        n_classes = out.shape[-1]

        def one(x):
            x1 = _one(x)
            logits, vjp = jax.vjp(lambda p: apply_fn(p, x1), params)
            logp = jax.nn.log_softmax(logits[0].astype(compute_dtype(logits.dtype)))
            w = jnp.sqrt(jnp.exp(logp))  # sqrt p_c

            def per_class(c):
                # d(-log p_c)/dz = softmax - e_c; weight by sqrt(p_c) and square.
                cot = (jnp.exp(logp) - jax.nn.one_hot(c, n_classes, dtype=logp.dtype)) * w[c]
                (gp,) = vjp(cot[None].astype(logits.dtype))
                return jax.tree.map(jnp.square, gp)

            sq = jax.vmap(per_class)(jnp.arange(n_classes))
            return jax.tree.map(lambda s: jnp.sum(s, axis=0), sq)

        d = jax.tree.map(lambda s: jnp.mean(s, axis=0), jax.vmap(one)(inputs))
    else:
        if key is None:
            raise ValueError(
                f"`key` is required for the sampled true Fisher (likelihood={likelihood!r})"
            )
        num_samples = static_int(num_samples, "num_samples", minimum=1)
        outputs = apply_fn(params, inputs)
        keys = jax.random.split(key, num_samples)
        ys = jax.vmap(lambda k: lk.sample(likelihood, k, outputs))(keys)

        def for_sample(y):
            g = per_example_grads(lambda p, x, t: jnp.sum(nll(p, x, t)), params, inputs, y)
            return _sq_mean(g)

        d = jax.tree.map(lambda s: jnp.mean(s, axis=0), jax.vmap(for_sample)(ys))
    return jax.tree.map(lambda di, p: di.astype(p.dtype), d, params)


def make_fvp(
    apply_fn: Callable, params: Params, inputs, *, likelihood: str = "categorical"
) -> Callable[[Params], Params]:
    """Return ``v -> F v`` for the true Fisher (= Gauss-Newton) of the mean NLL.

    The model is linearised once (``jax.linearize`` + ``jax.vjp``); each product
    then costs one forward-mode and one reverse-mode pass through the linearised
    model: ``F v = (1/N) J^T F_z (J v)``.
    """
    lk.check_likelihood(likelihood)
    n = _batch_size(inputs)
    f = lambda p: apply_fn(p, inputs)
    outputs, jvp_fn = jax.linearize(f, params)
    lk.check_outputs(likelihood, outputs)
    _, vjp_fn = jax.vjp(f, params)

    def fvp(v):
        jv = jvp_fn(v)
        hv = lk.output_fisher_product(likelihood, outputs, jv)
        (out,) = vjp_fn((hv / n).astype(outputs.dtype))
        return out

    return fvp


def fvp(apply_fn: Callable, params: Params, inputs, v: Params, *, likelihood="categorical"):
    """Fisher-vector product ``F v`` (true Fisher = Gauss-Newton of the mean NLL).

    Matrix-free: ``(1/N) J^T F_z J v`` with one ``jax.jvp`` and one ``jax.vjp``.

    Args:
      apply_fn: ``(params, inputs) -> outputs``.
      params: where the Fisher is taken.
      inputs: batch of inputs.
      v: a pytree like ``params``.
      likelihood: ``"categorical" | "bernoulli" | "gaussian"``.

    Returns:
      ``F v``, a pytree like ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax import fisher
      >>> apply = lambda w, x: x @ w            # linear-Gaussian: F = X^T X / N
      >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
      >>> fisher.fvp(apply, jnp.zeros((2, 1)), x, jnp.ones((2, 1)),
      ...            likelihood="gaussian").ravel().tolist()
      [0.5, 2.0]
    """
    _check_like(v, params, "v")
    return make_fvp(apply_fn, params, inputs, likelihood=likelihood)(v)


def _check_like(v, params, name):
    if jax.tree.structure(v) != jax.tree.structure(params):
        raise ValueError(f"`{name}` must have the structure of `params`")
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(params), strict=True):
        if jnp.shape(a) != jnp.shape(b):
            raise ValueError(
                f"`{name}` leaf shape {jnp.shape(a)} differs from the parameter's {jnp.shape(b)}"
            )


def ggn_vp(
    apply_fn: Callable,
    loss_fn: Callable,
    params: Params,
    inputs,
    labels,
    v: Params,
) -> Params:
    """Generalised Gauss-Newton vector product ``J^T H_z J v`` for any output loss.

    ``H_z`` is the Hessian of ``loss_fn(outputs, labels)`` (a scalar, e.g. the
    batch mean) with respect to the outputs, applied by forward-over-reverse
    differentiation; ``J`` the Jacobian of ``apply_fn`` in the parameters.

    Args:
      apply_fn: ``(params, inputs) -> outputs``.
      loss_fn: ``(outputs, labels) -> scalar``.
      params, inputs, labels: where the GGN is taken.
      v: a pytree like ``params``.

    Returns:
      ``G v``, a pytree like ``params``.

    References:
      Schraudolph, "Fast curvature matrix-vector products for second-order gradient
      descent", Neural Computation 2002.
    """
    _check_like(v, params, "v")
    f = lambda p: apply_fn(p, inputs)
    outputs, jv = jax.jvp(f, (params,), (v,))
    grad_out = jax.grad(lambda z: loss_fn(z, labels))
    _, hjv = jax.jvp(grad_out, (outputs,), (jv,))
    _, vjp_fn = jax.vjp(f, params)
    (out,) = vjp_fn(hjv.astype(outputs.dtype))
    return out


def make_empirical_fvp(
    apply_fn: Callable, params: Params, inputs, labels, *, likelihood="categorical"
) -> Callable[[Params], Params]:
    """Return ``v -> F_emp v`` with ``F_emp = (1/N) sum_i g_i g_i^T`` (observed labels).

    Matrix-free: ``u = (g_i . v)_i`` by one ``jvp`` of the per-example losses,
    then ``(1/N) sum_i u_i g_i`` by one ``vjp`` of the same map.
    """
    lk.check_likelihood(likelihood)
    if labels is None:
        raise ValueError("`labels` is None: the empirical Fisher needs observed labels")
    n = _batch_size(inputs)
    losses = lambda p: lk.nll(likelihood, apply_fn(p, inputs), labels)
    values, jvp_fn = jax.linearize(losses, params)
    _, vjp_fn = jax.vjp(losses, params)

    def fvp(v):
        u = jvp_fn(v)
        (out,) = vjp_fn((u / n).astype(values.dtype))
        return out

    return fvp


def empirical_fvp(apply_fn, params, inputs, labels, v, *, likelihood="categorical"):
    """Empirical-Fisher vector product ``(1/N) sum_i g_i (g_i . v)``."""
    _check_like(v, params, "v")
    return make_empirical_fvp(apply_fn, params, inputs, labels, likelihood=likelihood)(v)


class LowRankFisher(NamedTuple):
    """A rank-``k`` Fisher ``sum_j eigenvalues[j] u_j u_j^T``.

    Attributes:
      eigenvalues: ``(k,)`` non-negative, descending.
      eigenvectors: pytree like ``params`` whose leaves carry a leading axis ``k``
        (``u_j`` = the ``j``-th slice of every leaf), orthonormal as flat vectors.
    """

    eigenvalues: jax.Array
    eigenvectors: Any


def low_rank_fvp(lr: LowRankFisher, v: Params) -> Params:
    """``(U diag(lambda) U^T) v`` for a :class:`LowRankFisher`."""
    coeffs = sum(
        jnp.tensordot(u.reshape(u.shape[0], -1), x.reshape(-1), axes=1)
        for u, x in zip(jax.tree.leaves(lr.eigenvectors), jax.tree.leaves(v), strict=True)
    )
    c = coeffs * lr.eigenvalues
    return jax.tree.map(lambda u: jnp.tensordot(c, u, axes=1), lr.eigenvectors)
