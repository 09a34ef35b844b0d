"""Stiefel and Grassmann manifolds of orthonormal ``n x p`` frames.

Both store a point as an orthonormal ``(n, p)`` matrix (``x^T x = I``); a
``(..., n, p)`` array is a batch of points. Grassmann identifies frames with the
same span and uses the horizontal space ``{u : x^T u = 0}`` as its tangent space.

All ``p x p`` work (Grams, Cholesky, ``eigh``) is done on the small side; the
``n x p`` products use an unrolled sum over ``p`` when ``p`` is small (XLA fuses
it into one pass over memory, which is several times faster on CPU than a batched
``(n, p) @ (p, p)`` GEMM).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp
from jax.scipy.linalg import expm, solve_triangular

from subjax._core import as_compute, choice, static_int
from subjax.linalg import orthonormalize
from subjax.manifolds._base import Array, Manifold, eigh_fn, mT, randn, skew, sym

_UNROLL_MAX = 16


def mm_small(a: Array, b: Array) -> Array:
    """``a @ b`` for ``a`` of shape ``(..., n, k)`` and a small ``b`` of shape ``(..., k, q)``."""
    k = a.shape[-1]
    if k > _UNROLL_MAX:
        return a @ b
    out = a[..., 0:1] * b[..., None, 0, :]
    for i in range(1, k):
        out = out + a[..., i : i + 1] * b[..., None, i, :]
    return out


def gram(a: Array, b: Array) -> Array:
    """``a^T b`` over the long axis: ``(..., n, p), (..., n, q) -> (..., p, q)``."""
    return mT(a) @ b


def _inv_sqrt_spd(y: Array) -> Array:
    """``y^{-1/2}`` for SPD ``y``, written as ``I + U f(w) U^T`` with ``y - I = U w U^T``.

    ``f(w) = (1 + w)^{-1/2} - 1 = -w / (s (1 + s))``, ``s = sqrt(1 + w)``: for the
    near-identity Grams of a retraction the correction is computed to relative
    accuracy, so the result is orthonormal to ~eps rather than ~eps * n (plain eigh).
    """
    eye = jnp.eye(y.shape[-1], dtype=y.dtype)

    def f(w):
        s = jnp.sqrt(jnp.maximum(1 + w, jnp.finfo(w.dtype).tiny))
        return -w / (s * (1 + s))

    return eye + eigh_fn(y - eye, f)


def _chol_inv_upper(y: Array) -> Array:
    """``R^{-1}`` where ``y = R^T R`` (upper-triangular ``R`` with positive diagonal)."""
    l = jnp.linalg.cholesky(sym(y))
    eye = jnp.broadcast_to(jnp.eye(y.shape[-1], dtype=y.dtype), y.shape)
    return mT(solve_triangular(l, eye, lower=True))


def _check_np(n, p):
    static_int(n, "n", 1)
    static_int(p, "p", 1)
    if p > n:
        raise ValueError(f"argument `p`={p} exceeds `n`={n}: no {n} x {p} orthonormal frame")


@dataclasses.dataclass(frozen=True)
class Stiefel(Manifold):
    """Stiefel manifold ``St(n, p) = {x in R^{n x p} : x^T x = I_p}``, embedded metric.

    Tangent space ``{u : x^T u + u^T x = 0}``; projection
    ``P_x(u) = u - x sym(x^T u)``; Riemannian gradient = projected Euclidean
    gradient. Retractions (``retraction`` picks the default):

    - ``"polar"``: ``(x + u)((x + u)^T (x + u))^{-1/2}`` via the ``p x p`` Gram's ``eigh``;
    - ``"cholesky_qr"``: the Q factor of ``x + u`` computed as ``(x + u) R^{-1}`` with
      ``R^T R`` the Cholesky factorisation of the Gram (same map as ``"qr"``);
    - ``"qr"``: Householder QR with the sign fix ``diag(R) > 0``;
    - ``"cayley"``: Wen & Yin's Cayley transform, low-rank (``2p``) form;
    - ``"exp"``: the geodesic of the embedded metric (Edelman, Arias & Smith 1998, eq. 2.14).

    ``inverse_retract(..., "polar")`` solves the ``p x p`` Lyapunov equation; ``dist``
    is the chordal distance ``||x - y||_F`` (the geodesic distance has no closed form).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.manifolds import Stiefel
      >>> st = Stiefel(5, 2)
      >>> x = st.random_point(jax.random.key(0), (3,))
      >>> u = st.random_tangent(jax.random.key(1), x)
      >>> y = st.retract(x, 0.1 * u, "polar")
      >>> bool(jnp.all(st.check(y) < 1e-5))
      True

    References:
      Edelman, Arias, Smith, "The geometry of algorithms with orthogonality
      constraints", SIAM J. Matrix Anal. Appl., 1998. Absil, Mahony, Sepulchre,
      "Optimization Algorithms on Matrix Manifolds", 2008. Wen, Yin, "A feasible
      method for optimization with orthogonality constraints", Math. Prog., 2013.
    """

    n: int
    p: int
    retraction: str = "polar"
    retractions: ClassVar[tuple[str, ...]] = ("polar", "cholesky_qr", "qr", "cayley", "exp")
    _grassmann: ClassVar[bool] = False

    def __post_init__(self):
        _check_np(self.n, self.p)
        choice(self.retraction, "retraction", self.retractions)

    @property
    def point_shape(self):
        return (self.n, self.p)

    @property
    def dim(self):
        return self.n * self.p - self.p * (self.p + 1) // 2

    @property
    def default_retraction(self):
        return self.retraction

    # -- tangent space -------------------------------------------------------
    def _normal_coef(self, a: Array) -> Array:
        """Coefficient ``B`` with ``P_x(u) = u - x B`` given ``a = x^T u``."""
        return sym(a)

    def proj(self, x, u):
        return u - mm_small(x, self._normal_coef(gram(x, u)))

    # -- retractions -----------------------------------------------------------
    def retract(self, x, u, method=None):
        method = self._check_method(method)
        dtype = x.dtype
        x, u = as_compute(x), as_compute(u)
        y = x + u
        if method == "polar":
            out = mm_small(y, _inv_sqrt_spd(gram(y, y)))
        elif method == "cholesky_qr":
            out = mm_small(y, _chol_inv_upper(gram(y, y)))
        elif method == "qr":
            out = orthonormalize(y)
        elif method == "cayley":
            out = self._cayley(x, u)
        else:
            out = self.exp(x, u)
        return out.astype(dtype)

    def _cayley(self, x, u):
        p = self.p
        gh = u - 0.5 * mm_small(x, gram(x, u))  # (I - x x^T / 2) u
        # W = gh x^T - x gh^T = U V^T with U = [gh, x], V = [x, -gh]
        xtg, xtx, gtg = gram(x, gh), gram(x, x), gram(gh, gh)
        vtu = jnp.concatenate(
            [jnp.concatenate([xtg, xtx], -1), jnp.concatenate([-gtg, -mT(xtg)], -1)], -2
        )
        vtx = jnp.concatenate([xtx, -mT(xtg)], -2)
        eye = jnp.eye(2 * p, dtype=x.dtype)
        coef = jnp.linalg.solve(eye - 0.5 * vtu, vtx)
        return x + mm_small(gh, coef[..., :p, :]) + mm_small(x, coef[..., p:, :])

    def exp(self, x, u):
        dtype = x.dtype
        x, u = as_compute(x), as_compute(u)
        a = skew(gram(x, u))
        s = gram(u, u)
        eye = jnp.broadcast_to(jnp.eye(self.p, dtype=x.dtype), a.shape)
        big = jnp.concatenate(
            [jnp.concatenate([a, -s], -1), jnp.concatenate([eye, a], -1)], -2
        )
        e = expm(big)
        right = expm(-a)
        coef = e[..., :, : self.p] @ right  # (2p, p)
        out = mm_small(x, coef[..., : self.p, :]) + mm_small(u, coef[..., self.p :, :])
        return out.astype(dtype)

    def inverse_retract(self, x, y, method=None):
        method = self._check_method(method)
        if method != "polar":
            raise NotImplementedError(
                f"Stiefel: no inverse of the {method!r} retraction (only 'polar')"
            )
        dtype = x.dtype
        x, y = as_compute(x), as_compute(y)
        # y R = x + u with R sym; x^T u skew  =>  (x^T y) R + R (y^T x) = 2 I (Lyapunov)
        a = gram(x, y)
        p = self.p
        eye = jnp.eye(p, dtype=x.dtype)
        # vec(A R) + vec(R A^T) = (I kron A + A kron I) vec(R) (row-major vec)
        big = jnp.einsum("...ik,jl->...ijkl", a, eye) + jnp.einsum("ik,...jl->...ijkl", eye, a)
        big = big.reshape(a.shape[:-2] + (p * p, p * p))
        rhs = jnp.broadcast_to((2 * eye).reshape(p * p), a.shape[:-2] + (p * p,))
        r = jnp.linalg.solve(big, rhs[..., None])[..., 0].reshape(a.shape)
        return (mm_small(y, sym(r)) - x).astype(dtype)

    def dist(self, x, y):
        return jnp.sqrt(self._reduce((as_compute(x) - as_compute(y)) ** 2)).astype(x.dtype)

    # -- points ----------------------------------------------------------------
    def random_point(self, key, batch_shape=(), dtype=jnp.float32):
        return orthonormalize(randn(key, tuple(batch_shape) + (self.n, self.p), dtype))

    def project_point(self, x):
        """Closest frame in Frobenius norm (the polar factor, via the ``p x p`` Gram)."""
        xw = as_compute(x)
        return mm_small(xw, _inv_sqrt_spd(gram(xw, xw))).astype(x.dtype)

    def check(self, x):
        xw = as_compute(x)
        err = gram(xw, xw) - jnp.eye(self.p, dtype=xw.dtype)
        return jnp.sqrt(jnp.sum(err * err, axis=(-2, -1))).astype(x.dtype)

    # -- fused heavy-ball step ---------------------------------------------------
    def momentum_step(self, x, g, m, lr, beta, nesterov, retraction, refresh=None):
        """Heavy-ball step; fused Gram kernel for polar / (Cholesky-)QR without Nesterov.

        The fused kernel computes the Gram ``x^T x`` every step, so its output is
        orthonormal to rounding whatever the drift of ``x`` (it re-orthonormalises at
        every step; ``refresh`` is not needed and ignored). Assuming ``x^T x = I``
        instead saves one pass over ``x`` but amplifies drift by about
        ``1 + 2 lr ||x^T t||`` per step (measured: doubling per step on a PCA cost
        whose gradient lies mostly in span(x)), so it is not offered.
        """
        method = self._check_method(retraction)
        if nesterov or method not in ("polar", "cholesky_qr", "qr"):
            return super().momentum_step(x, g, m, lr, beta, nesterov, method, refresh)
        return _fused_gram_step(as_compute(x), as_compute(g), as_compute(m), lr, beta,
                                self._normal_coef, method, exact_gram=True)


def _fused_gram_step(x, g, m, lr, beta, normal_coef, method, exact_gram=True):
    """Projection + momentum + polar / Cholesky-QR retraction from ``p x p`` Grams.

    With ``t = beta m + g`` (ambient), ``a = x^T t``, ``B = normal_coef(a)``:
    ``m_new = r = P_x(t) = t - x B`` (transported momentum plus Riemannian gradient);
    ``y = x - lr r`` and its Gram ``y^T y = x^T x - lr (x^T r + r^T x) + lr^2 r^T r``
    with ``x^T r = a - (x^T x) B`` and ``r^T r = t^T t - a^T B - B^T a + B^T (x^T x) B``,
    where ``x^T x`` is computed when ``exact_gram`` (then the output is orthonormal
    even when ``x`` has drifted) and taken as ``I`` otherwise (one pass fewer over
    ``x``, but drift is then amplified, so the optimizers always pass ``True``).
    The new point is ``y S`` with ``S = (y^T y)^{-1/2}`` (polar) or ``R^{-1}``
    (Cholesky-QR); ``m_new`` and ``u = y S - x`` come out of one fused pass over
    ``x`` and ``t``. Memory passes over ``(n, p)`` arrays: 3 for ``t``, 3 for the Grams
    (+1 when exact), 4 for the outputs.
    """
    t = beta * m + g
    a = gram(x, t)
    ktt = gram(t, t)
    b = normal_coef(a)
    # y = x - lr r with r = t - x B = m_new. Its Gram in the "r form" below has no
    # large cancelling terms when t lies mostly in span(x) (in-span gradient parts).
    kxx = gram(x, x) if exact_gram else jnp.eye(x.shape[-1], dtype=x.dtype)
    xtr = a - kxx @ b  # x^T r (exactly 0 for Grassmann with kxx = I, skew for Stiefel)
    rtr = ktt - mT(a) @ b - mT(b) @ a + mT(b) @ kxx @ b  # r^T r
    yty = kxx - lr * (xtr + mT(xtr)) + (lr * lr) * rtr
    s = _inv_sqrt_spd(yty) if method == "polar" else _chol_inv_upper(yty)
    m_new = t - mm_small(x, b)
    u = mm_small(x - lr * m_new, s) - x
    return u, m_new


@dataclasses.dataclass(frozen=True)
class Grassmann(Stiefel):
    """Grassmann manifold ``Gr(n, p)`` of ``p``-dim subspaces, orthonormal-basis representation.

    A point is an orthonormal ``(n, p)`` basis ``x``; tangent (horizontal) vectors
    satisfy ``x^T u = 0``, ``P_x(u) = u - x x^T u``, metric ``tr(u^T v)``. Retractions:
    ``"polar"`` (default), ``"cholesky_qr"``, ``"qr"``, ``"cayley"`` and ``"exp"`` — the
    geodesic ``x V cos(S) V^T + U sin(S) V^T`` for ``u = U S V^T``, computed from the
    ``p x p`` eigendecomposition ``u^T u = V S^2 V^T`` (no ``n x p`` SVD).
    ``log`` / ``dist`` use principal angles; transport projects onto the horizontal space.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from subjax.manifolds import Grassmann
      >>> gr = Grassmann(6, 2)
      >>> x, y = gr.random_point(jax.random.key(0), (2,))
      >>> bool(jnp.allclose(gr.dist(y, gr.exp(x, gr.log(x, y))), 0.0, atol=1e-3))
      True

    References:
      Edelman, Arias, Smith 1998 (Theorem 2.3); Absil, Mahony, Sepulchre,
      "Riemannian geometry of Grassmann manifolds", Acta Appl. Math., 2004.
      Bendokat, Zimmermann, Absil, "A Grassmann manifold handbook", 2020.
    """

    retractions: ClassVar[tuple[str, ...]] = ("polar", "cholesky_qr", "qr", "cayley", "exp")
    _grassmann: ClassVar[bool] = True

    @property
    def dim(self):
        return self.p * (self.n - self.p)

    def _normal_coef(self, a):
        return a

    def exp(self, x, u):
        dtype = x.dtype
        x, u = as_compute(x), as_compute(u)
        w, v = jnp.linalg.eigh(sym(gram(u, u)))
        s = jnp.sqrt(jnp.maximum(w, 0))
        safe = jnp.where(s > 0, s, jnp.ones_like(s))
        sinc = jnp.where(s > 0, jnp.sin(safe) / safe, jnp.ones_like(s))
        # I + V (cos S - I) V^T with cos s - 1 = -2 sin^2(s/2): accurate for small steps
        cm1 = -2 * jnp.sin(0.5 * s) ** 2
        cos_part = jnp.eye(self.p, dtype=x.dtype) + (v * cm1[..., None, :]) @ mT(v)
        sin_part = (v * sinc[..., None, :]) @ mT(v)
        out = mm_small(x, cos_part) + mm_small(u, sin_part)
        return out.astype(dtype)

    def log(self, x, y):
        """Logarithm by principal angles, finite everywhere (at the cut locus too).

        With ``y^T x = Q diag(c) R^T`` (cosines ``c``), the aligned basis ``y Q R^T``
        of ``span(y)`` gives ``B = y Q - x R diag(c)``, whose columns have norms
        ``s = sin(theta)``; ``log_x(y) = B diag(theta / s) R^T`` with
        ``theta = atan2(s, c)``. No inverse of ``x^T y`` is formed, so orthogonal
        directions (``theta = pi / 2``) give a finite tangent along one of the minimal
        geodesics (Bendokat, Zimmermann, Absil 2020, Algorithm 5.3).
        """
        dtype = x.dtype
        x, y = as_compute(x), as_compute(y)
        q, c, rt = jnp.linalg.svd(gram(y, x))
        b = mm_small(y, q) - mm_small(x, mT(rt)) * c[..., None, :]
        s = jnp.sqrt(jnp.sum(b * b, axis=-2))
        theta = jnp.arctan2(s, c)
        safe = jnp.where(s > 0, s, jnp.ones_like(s))
        ratio = jnp.where(s > 0, theta / safe, jnp.ones_like(s))
        return mm_small(b * ratio[..., None, :], rt).astype(dtype)

    def inverse_retract(self, x, y, method=None):
        method = self._check_method(method)
        if method == "exp":
            return self.log(x, y)
        if method in ("polar", "qr", "cholesky_qr"):
            # any retraction of the form span(x + u): u = y (x^T y)^{-1} - x
            dtype = x.dtype
            xw, yw = as_compute(x), as_compute(y)
            return (mT(jnp.linalg.solve(mT(gram(xw, yw)), mT(yw))) - xw).astype(dtype)
        raise NotImplementedError(f"Grassmann: no inverse of the {method!r} retraction")

    def principal_angles(self, x, y):
        """Principal angles between ``span(x)`` and ``span(y)``, ascending, ``batch + (p,)``."""
        xw, yw = as_compute(x), as_compute(y)
        a = gram(xw, yw)
        c = jnp.linalg.svd(a, compute_uv=False)  # descending cosines
        r = yw - mm_small(xw, a)
        s2 = jnp.linalg.eigvalsh(sym(gram(r, r)))  # ascending sines^2
        return jnp.arctan2(jnp.sqrt(jnp.maximum(s2, 0)), c).astype(x.dtype)

    def dist(self, x, y):
        th = as_compute(self.principal_angles(x, y))
        return jnp.sqrt(jnp.sum(th * th, axis=-1)).astype(x.dtype)

    def project_point(self, x):
        """An orthonormal basis of ``span(x)`` (QR with sign fix)."""
        return orthonormalize(x)
