"""Manifold base class and small shared helpers (symmetric parts, matrix functions).

Every manifold is a frozen, hashable dataclass holding only static configuration
(sizes, metric, default retraction). Points and tangent vectors are plain arrays
whose trailing axes are the point shape (``(n,)`` for the sphere, ``(n, p)`` for
Stiefel / Grassmann, ``(n, n)`` for SPD); any leading axes are a batch of
independent points (a ``(C, n, p)`` stack is ``C`` points). Reductions such as
``inner`` / ``norm`` / ``dist`` / ``check`` return one value per point, shape
``batch``. Because a manifold is static, it can be closed over by ``jax.jit`` and
used as a leaf of a "which parameter lives where" pytree.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import ClassVar

import jax
import jax.numpy as jnp

from subjax._core import as_compute, compute_dtype, floating_array, full_precision, is_concrete

Array = jax.Array


def sym(a: Array) -> Array:
    """Symmetric part ``(a + a^T) / 2`` of the trailing square matrices."""
    return 0.5 * (a + jnp.swapaxes(a, -1, -2))


def skew(a: Array) -> Array:
    """Skew-symmetric part ``(a - a^T) / 2``."""
    return 0.5 * (a - jnp.swapaxes(a, -1, -2))


def mT(a: Array) -> Array:
    return jnp.swapaxes(a, -1, -2)


def eigh_fn(x: Array, fn) -> Array:
    """``U fn(lambda) U^T`` for symmetric ``x`` (batched), computed in >= float32."""
    w, u = jnp.linalg.eigh(sym(x))
    return (u * fn(w)[..., None, :]) @ mT(u)


def randn(key: Array, shape, dtype) -> Array:
    return jax.random.normal(key, shape, dtype=compute_dtype(dtype)).astype(dtype)


# What each public operation takes, after ``self``: "p" a point (SPD-ness is checked
# when concrete), "a" an array of the point shape that may be off the manifold, "t" a
# tangent or ambient vector at the first point (its batch must broadcast with it).
_ARG_KINDS = {
    "inner": "ptt",
    "norm": "pt",
    "proj": "pt",
    "egrad2rgrad": "pt",
    "exp": "pt",
    "log": "pp",
    "retract": "pt",
    "inverse_retract": "pp",
    "transport": "ppt",
    "dist": "pp",
    "project_point": "a",
    "check": "a",
}


def _validating(fn, kinds: str):
    """Wrap a manifold operation: each array argument must be a real floating array
    with the point shape (named in the error), tangents must broadcast with the point."""
    names = list(inspect.signature(fn).parameters)[1:1 + len(kinds)]

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        args = list(args)
        ref = None
        for i, (name, kind) in enumerate(zip(names, kinds, strict=True)):
            if i < len(args):
                val = args[i]
            elif name in kwargs:
                val = kwargs[name]
            else:
                continue
            val = floating_array(val, name)
            self.validate_shape(val, name)
            if kind == "p":
                self._check_point(val, name)
            if ref is not None and kind == "t":
                try:
                    jnp.broadcast_shapes(ref[1].shape, val.shape)
                except ValueError:
                    raise ValueError(
                        f"argument `{name}` has shape {val.shape}, which does not broadcast "
                        f"with the point `{ref[0]}` of shape {ref[1].shape} ({self!r})"
                    ) from None
            if ref is None:
                ref = (name, val)
            if i < len(args):
                args[i] = val
            else:
                kwargs[name] = val
        return fn(self, *args, **kwargs)

    wrapper._validated = True
    return wrapper


def _wrap_operations(cls) -> None:
    """Validate the array arguments of the operations a class defines, and run every
    public method at full matrix-product precision."""
    for meth, fn in list(cls.__dict__.items()):
        if meth.startswith("_") or not isinstance(fn, types.FunctionType):
            continue
        if meth in _ARG_KINDS and not getattr(fn, "_validated", False):
            fn = _validating(fn, _ARG_KINDS[meth])
        setattr(cls, meth, full_precision(fn))


@dataclasses.dataclass(frozen=True)
class Manifold:
    """Base class: a Riemannian manifold embedded in a space of arrays.

    Subclasses define ``point_shape`` and the geometric operations. Methods take
    arrays with shape ``batch + point_shape``; the batch may be empty. Every
    operation (``inner``, ``proj``, ``exp``, ``log``, ``retract``, ``transport``,
    ``dist``, ...) checks its array arguments first — a real floating dtype, the
    point shape, a tangent that broadcasts with its point — and raises
    ``TypeError`` / ``ValueError`` naming the argument; subclasses get this for the
    operations they override.
    """

    #: names accepted by :meth:`retract` (first is the default unless overridden)
    retractions: ClassVar[tuple[str, ...]] = ("exp",)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _wrap_operations(cls)

    def _check_point(self, x, name: str) -> None:
        """Validate a point beyond its shape and dtype (SPD: positive definite when concrete)."""

    # -- static description -------------------------------------------------
    @property
    def point_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        """Intrinsic dimension."""
        raise NotImplementedError

    @property
    def default_retraction(self) -> str:
        return self.retractions[0]

    # -- validation ----------------------------------------------------------
    def validate_shape(self, x, name: str = "x") -> None:
        """Raise ``ValueError`` naming ``name`` if the trailing axes do not fit."""
        shape = tuple(jnp.shape(x))
        k = len(self.point_shape)
        if len(shape) < k or shape[len(shape) - k:] != self.point_shape:
            raise ValueError(
                f"argument `{name}` has shape {shape}; {self!r} expects trailing axes "
                f"{self.point_shape} (any leading axes are a batch of points)"
            )

    def batch_shape(self, x) -> tuple[int, ...]:
        shape = tuple(jnp.shape(x))
        return shape[: len(shape) - len(self.point_shape)]

    def _reduce(self, a: Array) -> Array:
        """Sum over the point axes, keeping the batch axes."""
        k = len(self.point_shape)
        return jnp.sum(a, axis=tuple(range(a.ndim - k, a.ndim))) if k else a

    # -- metric ----------------------------------------------------------------
    def inner(self, x: Array, u: Array, v: Array) -> Array:
        """Riemannian inner product ``<u, v>_x``, one value per point."""
        return self._reduce(u * v)

    def norm(self, x: Array, u: Array) -> Array:
        return jnp.sqrt(jnp.maximum(self.inner(x, u, u), 0))

    def proj(self, x: Array, u: Array) -> Array:
        """Orthogonal projection of an ambient vector onto ``T_x M``."""
        raise NotImplementedError

    def egrad2rgrad(self, x: Array, g: Array) -> Array:
        """Riemannian gradient from the Euclidean gradient ``g`` of the ambient extension."""
        return self.proj(x, g)

    # -- maps ------------------------------------------------------------------
    def exp(self, x: Array, u: Array) -> Array:
        raise NotImplementedError(f"{type(self).__name__} has no closed-form exponential map")

    def log(self, x: Array, y: Array) -> Array:
        raise NotImplementedError(f"{type(self).__name__} has no closed-form logarithm")

    def retract(self, x: Array, u: Array, method: str | None = None) -> Array:
        """Retraction ``R_x(u)``; ``method`` is one of :attr:`retractions`."""
        method = self._check_method(method)
        if method == "exp":
            return self.exp(x, u)
        raise NotImplementedError(method)

    def inverse_retract(self, x: Array, y: Array, method: str | None = None) -> Array:
        method = self._check_method(method)
        if method == "exp":
            return self.log(x, y)
        raise NotImplementedError(
            f"{type(self).__name__}: no inverse of the {method!r} retraction"
        )

    def transport(self, x: Array, y: Array, v: Array) -> Array:
        """Vector transport of ``v`` in ``T_x M`` to ``T_y M`` (projection by default)."""
        return self.proj(y, v)

    def dist(self, x: Array, y: Array) -> Array:
        raise NotImplementedError

    # -- points ----------------------------------------------------------------
    def random_point(self, key: Array, batch_shape=(), dtype=jnp.float32) -> Array:
        raise NotImplementedError

    def random_tangent(self, key: Array, x: Array) -> Array:
        """A standard-normal ambient vector projected onto ``T_x M``."""
        return self.proj(x, randn(key, jnp.shape(x), x.dtype))

    def project_point(self, x: Array) -> Array:
        """The closest point (or a canonical nearby point) on the manifold."""
        raise NotImplementedError

    def check(self, x: Array) -> Array:
        """Constraint error of ``x``, one non-negative value per point (0 on the manifold)."""
        raise NotImplementedError

    def default_tol(self, dtype) -> float:
        """Tolerance for :meth:`check` used by the optimizers' init validation."""
        eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
        return max(eps ** 0.5, 1e-12)

    def assert_on_manifold(self, x, name: str = "x", tol: float | None = None) -> None:
        """Raise ``ValueError`` (naming ``name``) if a concrete ``x`` is off the manifold.

        Traced values (inside ``jit`` / ``eval_shape``) are only shape-checked; a
        concrete value closed over by a traced function is checked eagerly.
        """
        self.validate_shape(x, name)
        if not is_concrete(x):
            return
        tol = self.default_tol(jnp.result_type(x)) if tol is None else tol
        with jax.ensure_compile_time_eval():  # concrete even inside an outer trace
            err = float(jnp.max(self.check(jnp.asarray(x)))) if jnp.size(x) else 0.0
        if not err <= tol:
            raise ValueError(
                f"argument `{name}` is not on {self!r}: constraint error {err:.3g} > "
                f"tolerance {tol:.3g} (use `{type(self).__name__}.project_point` or "
                f"`random_point` to obtain a valid point)"
            )

    # -- fused optimizer kernels -------------------------------------------
    def momentum_step(
        self, x: Array, g: Array, m: Array, lr: Array, beta: Array,
        nesterov: bool, retraction: str | None, refresh: Array | None = None,
    ) -> tuple[Array, Array]:
        """One Riemannian heavy-ball step; returns ``(R_x(-lr d) - x, m_new)``.

        ``m`` is the momentum, a tangent vector at ``x`` (the previous step
        transported it here); ``m_new = beta * P_x(m) + grad f(x)`` (the projection
        only removes rounding) and ``d = m_new`` (or ``grad f(x) + beta * m_new`` with
        Nesterov). The returned momentum is :meth:`transport` of ``m_new`` to the new
        point, so that a manifold whose transport is not a projection (parallel
        transport on affine SPD) moves it correctly (a fused kernel whose transport is
        the projection may return ``m_new`` as it is: the next step's ``P_x(m)`` is
        that transport).
        ``refresh`` (a traced bool, optional): when true the new point is also mapped
        back with :meth:`project_point` (periodic re-orthonormalisation).
        Computed in the working dtype; subclasses override with fused kernels.
        """
        xw, gw, mw = as_compute(x), as_compute(g), as_compute(m)
        rg = self.egrad2rgrad(xw, gw)
        m_new = self.proj(xw, beta * mw) + rg
        d = rg + beta * m_new if nesterov else m_new
        u = self.retract(xw, -lr * d, retraction) - xw
        if refresh is not None:
            u = jax.lax.cond(refresh, lambda u: self.project_point(xw + u) - xw, lambda u: u, u)
        return u, self.transport(xw, xw + u, m_new)

    def _check_method(self, method: str | None) -> str:
        method = self.default_retraction if method is None else method
        if method not in self.retractions:
            raise ValueError(
                f"argument `method`={method!r} is not a retraction of {type(self).__name__}; "
                f"expected one of {self.retractions}"
            )
        return method


_wrap_operations(Manifold)


def is_manifold(x) -> bool:
    return isinstance(x, Manifold)
