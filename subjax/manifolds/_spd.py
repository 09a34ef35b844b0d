"""Symmetric positive-definite matrices with three metrics."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from subjax._core import as_compute, choice, is_concrete, static_int
from subjax.manifolds._base import Manifold, eigh_fn, mT, randn, sym

_METRICS = ("affine", "bures_wasserstein", "log_euclidean")


def _eig(x):
    return jnp.linalg.eigh(sym(x))


def _from_eig(w, u):
    return (u * w[..., None, :]) @ mT(u)


def _sqrt_pair(x):
    """``(x^{1/2}, x^{-1/2})`` of SPD ``x`` from one eigendecomposition."""
    w, q = _eig(x)
    r = jnp.sqrt(w)
    return _from_eig(r, q), _from_eig(1 / r, q)


def _divided_difference(w, f, df):
    """First divided differences ``(f(wi) - f(wj)) / (wi - wj)``, ``df(wi)`` on the diagonal."""
    wi, wj = w[..., :, None], w[..., None, :]
    diff = wi - wj
    close = jnp.abs(diff) <= 1e-6 * jnp.maximum(jnp.abs(wi), jnp.abs(wj))
    safe = jnp.where(close, jnp.ones_like(diff), diff)
    mean = 0.5 * (wi + wj)
    return jnp.where(close, df(mean), (f(wi) - f(wj)) / safe)


def _frechet(x_eig, e, f, df):
    """Frechet derivative ``Df(x)[e]`` of a spectral function (Daleckii-Krein)."""
    w, u = x_eig
    gamma = _divided_difference(w, f, df)
    return u @ (gamma * (mT(u) @ e @ u)) @ mT(u)


@dataclasses.dataclass(frozen=True)
class SPD(Manifold):
    """SPD(n): symmetric positive-definite ``n x n`` matrices; tangent vectors are symmetric.

    Metrics (``metric``):

    - ``"affine"``: ``<u, v>_x = tr(x^-1 u x^-1 v)``; ``exp_x(u) = x^{1/2} expm(x^{-1/2} u
      x^{-1/2}) x^{1/2}``; parallel transport ``E v E^T``, ``E = (y x^{-1})^{1/2}``;
      rgrad ``= x sym(g) x``.
    - ``"bures_wasserstein"``: ``<u, v>_x = tr(L_x[u] v) / 2`` with ``x L + L x = u``;
      ``exp_x(u) = x + u + L_x[u] x L_x[u]``; ``log_x(y) = (xy)^{1/2} + (yx)^{1/2} - 2x``;
      ``d^2 = tr x + tr y - 2 tr (x^{1/2} y x^{1/2})^{1/2}``; rgrad ``= 2 (g x + x g)``.
    - ``"log_euclidean"``: pull-back of the flat metric by ``logm``;
      ``exp_x(u) = expm(logm x + Dlogm_x[u])``; ``d = ||logm x - logm y||_F``.

    The only retraction is ``"exp"``; ``transport`` is the affine parallel transport
    for ``"affine"`` and the identity on symmetric matrices otherwise.

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.manifolds import SPD
      >>> spd = SPD(2)
      >>> float(spd.dist(jnp.eye(2), jnp.diag(jnp.array([jnp.e, 1.0])))) # doctest: +ELLIPSIS
      1.0...

    References:
      Pennec, Fillard, Ayache, "A Riemannian framework for tensor computing", 2006.
      Arsigny et al., "Log-Euclidean metrics for fast and simple calculus on diffusion
      tensors", 2006. Bhatia, Jain, Lim, "On the Bures-Wasserstein distance between
      positive definite matrices", 2019. Han et al., "On Riemannian optimization over
      positive definite matrices with the Bures-Wasserstein geometry", NeurIPS 2021.
    """

    n: int
    metric: str = "affine"
    retractions: ClassVar[tuple[str, ...]] = ("exp",)

    def __post_init__(self):
        static_int(self.n, "n", 1)
        choice(self.metric, "metric", _METRICS)

    @property
    def point_shape(self):
        return (self.n, self.n)

    @property
    def dim(self):
        return self.n * (self.n + 1) // 2

    def proj(self, x, u):
        return sym(u)

    # -- metric ----------------------------------------------------------------
    def inner(self, x, u, v):
        dtype = u.dtype
        x, u, v = as_compute(x), as_compute(u), as_compute(v)
        if self.metric == "affine":
            xi = jnp.linalg.inv(x)
            val = jnp.sum((xi @ u) * mT(xi @ v), axis=(-2, -1))
        elif self.metric == "bures_wasserstein":
            val = 0.5 * jnp.sum(self._lyap(x, u) * v, axis=(-2, -1))
        else:
            e = _eig(x)
            du = _frechet(e, u, jnp.log, lambda t: 1 / t)
            dv = _frechet(e, v, jnp.log, lambda t: 1 / t)
            val = jnp.sum(du * dv, axis=(-2, -1))
        return val.astype(dtype)

    def _lyap(self, x, u):
        """``L`` solving ``x L + L x = u`` (eigenbasis of ``x``)."""
        w, q = _eig(x)
        return q @ ((mT(q) @ u @ q) / (w[..., :, None] + w[..., None, :])) @ mT(q)

    def egrad2rgrad(self, x, g):
        dtype = g.dtype
        x, g = as_compute(x), as_compute(sym(g))
        if self.metric == "affine":
            r = x @ g @ x
        elif self.metric == "bures_wasserstein":
            r = 2 * (g @ x + x @ g)
        else:
            w, q = _eig(x)
            gamma = _divided_difference(w, jnp.log, lambda t: 1 / t)
            r = q @ ((mT(q) @ g @ q) / (gamma * gamma)) @ mT(q)
        return sym(r).astype(dtype)

    # -- maps ------------------------------------------------------------------
    def exp(self, x, u):
        dtype = x.dtype
        x, u = as_compute(x), as_compute(sym(u))
        if self.metric == "affine":
            sq, isq = _sqrt_pair(x)
            y = sq @ eigh_fn(isq @ u @ isq, jnp.exp) @ sq
        elif self.metric == "bures_wasserstein":
            l = self._lyap(x, u)
            y = x + u + l @ x @ l
        else:
            e = _eig(x)
            y = eigh_fn(_from_eig(jnp.log(e[0]), e[1]) + _frechet(e, u, jnp.log, lambda t: 1 / t),
                        jnp.exp)
        return sym(y).astype(dtype)

    def log(self, x, y):
        dtype = x.dtype
        x, y = as_compute(x), as_compute(y)
        if self.metric == "affine":
            sq, isq = _sqrt_pair(x)
            v = sq @ eigh_fn(isq @ y @ isq, jnp.log) @ sq
        elif self.metric == "bures_wasserstein":
            sq, isq = _sqrt_pair(x)
            # (x y)^{1/2} = x^{1/2} (x^{1/2} y x^{1/2})^{1/2} x^{-1/2}
            xy_half = sq @ eigh_fn(sq @ y @ sq, jnp.sqrt) @ isq
            v = xy_half + mT(xy_half) - 2 * x
        else:
            ly = eigh_fn(y, jnp.log)
            e = _eig(x)
            lx = _from_eig(jnp.log(e[0]), e[1])
            ex = _eig(lx)  # Dlog_x^{-1} = Dexp_{log x}
            v = _frechet(ex, ly - lx, jnp.exp, jnp.exp)
        return sym(v).astype(dtype)

    def retract(self, x, u, method=None):
        self._check_method(method)
        return self.exp(x, u)

    def transport(self, x, y, v):
        if self.metric != "affine":
            return sym(v)
        dtype = v.dtype
        x, y, v = as_compute(x), as_compute(y), as_compute(v)
        sq, isq = _sqrt_pair(x)
        e = sq @ eigh_fn(isq @ y @ isq, jnp.sqrt) @ isq  # (y x^{-1})^{1/2}
        return sym(e @ v @ mT(e)).astype(dtype)

    def dist(self, x, y):
        dtype = x.dtype
        x, y = as_compute(x), as_compute(y)
        if self.metric == "affine":
            w, q = _eig(x)
            isq = _from_eig(1 / jnp.sqrt(w), q)
            lam = jnp.linalg.eigvalsh(sym(isq @ y @ isq))
            d = jnp.sqrt(jnp.sum(jnp.log(lam) ** 2, axis=-1))
        elif self.metric == "bures_wasserstein":
            w, q = _eig(x)
            sq = _from_eig(jnp.sqrt(w), q)
            lam = jnp.linalg.eigvalsh(sym(sq @ y @ sq))
            tr = jnp.trace(x, axis1=-2, axis2=-1) + jnp.trace(y, axis1=-2, axis2=-1)
            d = jnp.sqrt(jnp.maximum(tr - 2 * jnp.sum(jnp.sqrt(jnp.maximum(lam, 0)), -1), 0))
        else:
            diff = eigh_fn(x, jnp.log) - eigh_fn(y, jnp.log)
            d = jnp.sqrt(jnp.sum(diff * diff, axis=(-2, -1)))
        return d.astype(dtype)

    # -- points ----------------------------------------------------------------
    def random_point(self, key, batch_shape=(), dtype=jnp.float32):
        a = as_compute(randn(key, tuple(batch_shape) + (self.n, self.n), dtype))
        return sym(eigh_fn(a + mT(a), lambda w: jnp.exp(0.5 * w / jnp.sqrt(self.n)))).astype(dtype)

    def random_tangent(self, key, x):
        return sym(randn(key, jnp.shape(x), x.dtype))

    def project_point(self, x):
        """Symmetrise and clip eigenvalues below at ``eps * max|eig|``."""
        xw = as_compute(x)
        w, q = _eig(xw)
        floor = jnp.finfo(w.dtype).eps * jnp.max(jnp.abs(w), axis=-1, keepdims=True)
        return sym(_from_eig(jnp.maximum(w, floor), q)).astype(x.dtype)

    def check(self, x):
        """``max(||x - x^T||_F, max(0, -lambda_min))`` per point (0 iff SPD up to ties at 0)."""
        xw = as_compute(x)
        asym = jnp.sqrt(jnp.sum((xw - mT(xw)) ** 2, axis=(-2, -1)))
        lmin = jnp.linalg.eigvalsh(sym(xw))[..., 0]
        return jnp.maximum(asym, jnp.maximum(-lmin, 0)).astype(x.dtype)

    def _check_point(self, x, name):
        if is_concrete(x):
            self.assert_on_manifold(x, name)

    def assert_on_manifold(self, x, name="x", tol=None):
        self.validate_shape(x, name)
        if is_concrete(x):
            with jax.ensure_compile_time_eval():  # concrete even inside an outer trace
                self._assert_spd(as_compute(jnp.asarray(x)), name, tol)

    def _assert_spd(self, xw, name, tol):
        scale = jnp.max(jnp.abs(xw)) if xw.size else 1.0
        asym = float(jnp.max(jnp.abs(xw - mT(xw)))) if xw.size else 0.0
        t = self.default_tol(xw.dtype) if tol is None else tol
        if asym > t * max(float(scale), 1.0):
            raise ValueError(
                f"argument `{name}` is not symmetric (max |x - x^T| = {asym:.3g}); "
                f"{self!r} needs symmetric positive-definite matrices"
            )
        lmin = float(jnp.min(jnp.linalg.eigvalsh(sym(xw)))) if xw.size else 1.0
        if not lmin > 0:
            raise ValueError(
                f"argument `{name}` is not positive definite (smallest eigenvalue "
                f"{lmin:.3g}); {self!r} needs symmetric positive-definite matrices"
            )
