"""Matrix-free linear operators.

A :class:`LinearOperator` is a pytree: its array operands are leaves (so it can be
passed through ``jax.jit`` / ``jax.vmap`` and differentiated), its callables, shape
and dtype are static. Dense arrays and ``jax.experimental.sparse.BCOO`` matrices
are wrapped by :func:`aslinearoperator`; every function of :mod:`subjax.linalg`
that takes a matrix accepts any of the three.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse

__all__ = ["LinearOperator", "aslinearoperator", "sparse_rows_operator"]


def _dense_matmat(ops, x):
    (a,) = ops
    return a @ x


def _dense_rmatmat(ops, x):
    # ``a.T @ x`` with a narrow ``x`` hits a slow GEMM path on XLA:CPU (~3x slower
    # than ``a @ x``). Computing ``x^T a`` as a dot_general contracting dim 0 of both
    # is as fast as ``a @ x``; the barrier stops XLA from folding the final
    # (cheap, thin) transpose back into the dot and picking the slow path again.
    (a,) = ops
    xta = jax.lax.dot_general(x, a, (((0,), (0,)), ((), ())))
    return jax.lax.optimization_barrier(xta).T


def _dense_t_matmat(ops, x):
    # operand holds (a, a.T materialised): both products are plain row-major GEMMs.
    return ops[0] @ x


def _dense_t_rmatmat(ops, x):
    return ops[1] @ x


def _sparse_matmat(ops, x):
    (a,) = ops
    return a @ x


def _sparse_rmatmat(ops, x):
    (a,) = ops
    return a.T @ x


class _Closure:
    """``(operands, x) -> f(x)``; hashed by ``f`` so that jit caches hit when the same
    user function is wrapped again (the operator's callables are static pytree data)."""

    __slots__ = ("f", "vmapped")

    def __init__(self, f, vmapped=False):
        self.f = f
        self.vmapped = vmapped

    def __call__(self, ops, x):
        del ops
        if self.vmapped:
            return jax.vmap(self.f, in_axes=1, out_axes=1)(x)
        return self.f(x)

    def __eq__(self, other):
        return type(other) is _Closure and other.f is self.f and other.vmapped == self.vmapped

    def __hash__(self):
        return hash((id(self.f), self.vmapped))


def _wrap_closure(f, vmapped=False):
    return None if f is None else _Closure(f, vmapped)


@jax.tree_util.register_pytree_node_class
class LinearOperator:
    """A matrix-free linear map ``x -> A x`` with known shape and dtype.

    Products are defined column-wise: ``matvec(x)`` for ``x`` of shape ``(n,)``,
    ``matmat(x)`` for ``x`` of shape ``(n, k)``, and the transposes ``rmatvec`` /
    ``rmatmat`` (``A^T x``). Give at least ``matvec`` or ``matmat``; the missing
    block product is derived with ``jax.vmap`` and the missing transpose with
    ``jax.linear_transpose`` (exact, since the map is linear).

    Args:
      shape: ``(m, n)``.
      dtype: dtype of the products.
      matvec, rmatvec, matmat, rmatmat: callables of one array argument.
      symmetric: declare ``A == A^T`` (then ``rmatmat`` defaults to ``matmat``).

    Example:
      >>> import jax.numpy as jnp
      >>> from subjax.linalg import LinearOperator
      >>> d = jnp.arange(1.0, 4.0)
      >>> op = LinearOperator((3, 3), d.dtype, matvec=lambda x: d * x, symmetric=True)
      >>> op.matvec(jnp.ones(3)).tolist()
      [1.0, 2.0, 3.0]
    """

    def __init__(
        self,
        shape: tuple[int, int],
        dtype: Any,
        *,
        matvec: Callable | None = None,
        rmatvec: Callable | None = None,
        matmat: Callable | None = None,
        rmatmat: Callable | None = None,
        symmetric: bool = False,
    ):
        shape = tuple(int(s) for s in shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(f"`shape` must be (m, n) with m, n >= 1, got {shape}")
        if matvec is None and matmat is None:
            raise TypeError("LinearOperator needs `matvec` or `matmat`")
        for name, f in (
            ("matvec", matvec),
            ("rmatvec", rmatvec),
            ("matmat", matmat),
            ("rmatmat", rmatmat),
        ):
            if f is not None and not callable(f):
                raise TypeError(f"`{name}` must be callable, got {type(f).__name__}")
        mm = _wrap_closure(matmat)
        if mm is None:
            mm = _wrap_closure(matvec, vmapped=True)
        rmm = _wrap_closure(rmatmat)
        if rmm is None and rmatvec is not None:
            rmm = _wrap_closure(rmatvec, vmapped=True)
        self._init(
            (),
            shape,
            jnp.dtype(dtype),
            mm,
            rmm,
            bool(symmetric),
            _wrap_closure(matvec),
            _wrap_closure(rmatvec),
        )

    def _init(self, operands, shape, dtype, mm, rmm, symmetric, mv=None, rmv=None):
        self.operands = tuple(operands)
        self.shape = tuple(shape)
        self.dtype = jnp.dtype(dtype)
        self._mm = mm
        self._rmm = rmm
        self._mv = mv
        self._rmv = rmv
        self.symmetric = symmetric

    @classmethod
    def _from_operands(cls, operands, shape, dtype, mm, rmm, symmetric=False):
        obj = object.__new__(cls)
        obj._init(operands, shape, dtype, mm, rmm, symmetric)
        return obj

    # -- pytree -------------------------------------------------------------
    def tree_flatten(self):
        aux = (self.shape, self.dtype, self._mm, self._rmm, self.symmetric, self._mv, self._rmv)
        return self.operands, aux

    @classmethod
    def tree_unflatten(cls, aux, children):
        shape, dtype, mm, rmm, symmetric, mv, rmv = aux
        obj = object.__new__(cls)
        obj._init(children, shape, dtype, mm, rmm, symmetric, mv, rmv)
        return obj

    # -- products -------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return 2

    @property
    def T(self) -> LinearOperator:  # noqa: N802
        """The transposed operator ``A^T``."""
        m, n = self.shape
        t = object.__new__(LinearOperator)
        rmm = self._rmm
        if rmm is None:
            rmm = _transpose_via_autodiff(self)
        t._init(self.operands, (n, m), self.dtype, rmm, self._mm, self.symmetric)
        return t

    def matmat(self, x: jax.Array) -> jax.Array:
        """``A @ x`` for ``x`` of shape ``(n, k)``."""
        _check_operand(x, self.shape[1], 2, "x")
        return self._checked(self._mm(self.operands, x), (self.shape[0], x.shape[1]), "matmat")

    def rmatmat(self, x: jax.Array) -> jax.Array:
        """``A^T @ x`` for ``x`` of shape ``(m, k)``."""
        _check_operand(x, self.shape[0], 2, "x")
        want = (self.shape[1], x.shape[1])
        if self._rmm is None:
            if self.symmetric:
                return self._checked(self._mm(self.operands, x), want, "matmat")
            return _transpose_via_autodiff(self)(self.operands, x)
        return self._checked(self._rmm(self.operands, x), want, "rmatmat")

    def matvec(self, x: jax.Array) -> jax.Array:
        """``A @ x`` for ``x`` of shape ``(n,)``."""
        _check_operand(x, self.shape[1], 1, "x")
        if self._mv is not None:
            return self._checked(self._mv(self.operands, x), (self.shape[0],), "matvec")
        return self.matmat(x[:, None])[:, 0]

    def rmatvec(self, x: jax.Array) -> jax.Array:
        """``A^T @ x`` for ``x`` of shape ``(m,)``."""
        _check_operand(x, self.shape[0], 1, "x")
        if self._rmv is not None:
            return self._checked(self._rmv(self.operands, x), (self.shape[1],), "rmatvec")
        return self.rmatmat(x[:, None])[:, 0]

    def _checked(self, y, want, what):
        """``y`` if it has shape ``want``; else an error naming the operator's callable."""
        shape = getattr(y, "shape", None)
        if shape != want:
            fn = self._mm if what == "matmat" else self._rmm if what == "rmatmat" else None
            if isinstance(fn, _Closure) and fn.vmapped:  # the user gave a vector product
                what = "matvec" if what == "matmat" else "rmatvec"
            raise ValueError(
                f"`{what}` of the LinearOperator of shape {self.shape} returned an array of "
                f"shape {shape}; expected {want}"
            )
        return y

    def __matmul__(self, x):
        x = jnp.asarray(x)
        return self.matvec(x) if x.ndim == 1 else self.matmat(x)

    def todense(self) -> jax.Array:
        """Materialise the operator (``n`` products with unit vectors)."""
        return self.matmat(jnp.eye(self.shape[1], dtype=self.dtype))

    def __repr__(self):
        return f"LinearOperator(shape={self.shape}, dtype={self.dtype.name})"


class _AutodiffTranspose:
    """``(operands, y) -> A^T y`` by ``jax.linear_transpose`` of the forward product."""

    __slots__ = ("mm", "shape", "dtype", "sym")

    def __init__(self, mm, shape, dtype, sym):
        self.mm, self.shape, self.dtype, self.sym = mm, shape, dtype, sym

    def _key(self):
        return (self.mm, self.shape, self.dtype, self.sym)

    def __eq__(self, other):
        return type(other) is _AutodiffTranspose and other._key() == self._key()

    def __hash__(self):
        return hash(self._key())

    def __call__(self, ops, y):
        if self.sym:
            return self.mm(ops, y)
        x0 = jax.ShapeDtypeStruct((self.shape[1], y.shape[1]), self.dtype)
        (xt,) = jax.linear_transpose(lambda x: self.mm(ops, x), x0)(y)
        return xt


def _transpose_via_autodiff(op: LinearOperator):
    return _AutodiffTranspose(op._mm, op.shape, op.dtype, op.symmetric)


def _check_operand(x, size, ndim, name):
    if getattr(x, "ndim", None) != ndim or x.shape[0] != size:
        want = f"({size},)" if ndim == 1 else f"({size}, k)"
        raise ValueError(f"`{name}` must have shape {want}, got {getattr(x, 'shape', None)}")


def aslinearoperator(a: Any, *, transpose_once: bool = False, name: str = "a") -> LinearOperator:
    """Wrap a dense array, a BCOO sparse matrix or a ``LinearOperator``.

    Args:
      a: ``(m, n)`` array (jax or numpy), ``jax.experimental.sparse.BCOO`` /
        ``BCSR`` matrix, or :class:`LinearOperator` (returned as is).
      transpose_once: for a dense array, materialise ``a.T`` once so that every
        transposed product is a plain row-major GEMM. On XLA:CPU ``a.T @ x`` with a
        narrow ``x`` is ~3x slower than ``a @ x``; this pays as soon as two
        transposed products are made. Doubles the memory.
      name: argument name used in error messages.

    Returns:
      A :class:`LinearOperator`.
    """
    if isinstance(a, LinearOperator):
        return a
    if isinstance(a, (jsparse.BCOO, jsparse.BCSR)):
        if a.ndim != 2 or a.n_batch != 0:
            raise ValueError(f"`{name}` must be a 2-D sparse matrix, got shape {a.shape}")
        return LinearOperator._from_operands(
            (a,), a.shape, a.dtype, _sparse_matmat, _sparse_rmatmat
        )
    if callable(a) and not hasattr(a, "shape"):
        raise TypeError(
            f"`{name}` is a callable; wrap it as LinearOperator(shape, dtype, matvec=...)"
        )
    if not hasattr(a, "shape"):
        raise TypeError(
            f"`{name}` must be an array, a BCOO matrix or a LinearOperator, got {type(a).__name__}"
        )
    a = jnp.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"`{name}` must be 2-D (m, n), got shape {a.shape}")
    if not jnp.issubdtype(a.dtype, jnp.inexact):
        raise TypeError(f"`{name}` must have a floating dtype, got {a.dtype}")
    if transpose_once:
        at = jax.lax.optimization_barrier(a.T)
        return LinearOperator._from_operands(
            (a, at), a.shape, a.dtype, _dense_t_matmat, _dense_t_rmatmat
        )
    return LinearOperator._from_operands((a,), a.shape, a.dtype, _dense_matmat, _dense_rmatmat)


def _rows_product(cols, vals, rrow, rcol, rval, x):
    """``A x`` from the padded rows ``(cols, vals)`` (``(w, m)``) and the row-sorted rest."""
    y = vals[0][:, None] * x[cols[0]]
    for i in range(1, cols.shape[0]):  # w gathers of one entry per row, no scatter
        y = y + vals[i][:, None] * x[cols[i]]
    if rrow.shape[0]:
        y = y.at[rrow].add(rval[:, None] * x[rcol], indices_are_sorted=True)
    return y


def _rows_matmat(ops, x):
    return _rows_product(*ops[:5], x)


def _rows_rmatmat(ops, x):
    return _rows_product(*ops[5:], x)


def _padded_rows(csr, width, dtype):
    """``(cols, vals, rest_rows, rest_cols, rest_vals)`` of a scipy CSR matrix (numpy)."""
    import numpy as np

    m = csr.shape[0]
    counts = np.diff(csr.indptr)
    row = np.repeat(np.arange(m, dtype=np.int32), counts)
    pos = np.arange(csr.nnz) - np.repeat(csr.indptr[:-1], counts)
    head = pos < width
    cols = np.zeros((width, m), np.int32)
    vals = np.zeros((width, m), dtype)
    cols[pos[head], row[head]] = csr.indices[head]
    vals[pos[head], row[head]] = csr.data[head]
    rest = ~head
    return (jnp.asarray(cols), jnp.asarray(vals), jnp.asarray(row[rest]),
            jnp.asarray(csr.indices[rest].astype(np.int32)), jnp.asarray(csr.data[rest]))


def sparse_rows_operator(a: Any, *, width: int | None = None, symmetric: bool = False,
                         name: str = "a") -> LinearOperator:
    """A concrete sparse matrix as a :class:`LinearOperator` with a fast product on CPU.

    The first ``width`` entries of every row are stored as ``width`` padded columns
    (``A x`` is then ``width`` gathers of one entry per row and fused multiply-adds)
    and the entries beyond them as a row-sorted COO remainder added by one
    scatter. On XLA:CPU, where BCOO's product scatters every entry, this took
    0.36-0.53x as long as a BCOO single-vector product on the five benchmark
    matrices of docs/linalg.md (random sparse and graph Laplacians, 1e4 to 1e5 rows;
    0.45-0.7x on four and parity on the fifth in an earlier run). Built once on the
    host; its arrays are the operator's operands.

    Args:
      a: ``(m, n)`` scipy sparse matrix (any format) or a concrete BCOO matrix.
      width: padded entries per row; default the mean number of entries per row,
        rounded (most rows fit, little padding).
      symmetric: declare ``A == A^T``: the transposed product reuses the forward
        one; otherwise the transpose is stored as well.
      name: argument name used in error messages.

    Returns:
      A :class:`LinearOperator` of ``a``'s shape and floating dtype.

    Example:
      >>> import numpy as np, scipy.sparse as sp
      >>> from subjax.linalg import sparse_rows_operator
      >>> a = sp.diags([1.0, 2.0, 3.0]).tocsr()
      >>> sparse_rows_operator(a, symmetric=True).matvec(np.ones(3)).tolist()
      [1.0, 2.0, 3.0]
    """
    import numpy as np
    import scipy.sparse as sps

    if isinstance(a, jsparse.BCOO):
        if a.ndim != 2 or a.n_batch or a.n_dense:
            raise ValueError(f"`{name}` must be a 2-D BCOO matrix, got shape {a.shape}")
        idx = np.asarray(a.indices)
        a = sps.coo_matrix((np.asarray(a.data), (idx[:, 0], idx[:, 1])), shape=a.shape)
    if not sps.issparse(a):
        raise TypeError(f"`{name}` must be a scipy sparse or BCOO matrix, got {type(a).__name__}")
    if a.ndim != 2 or min(a.shape) < 1:
        raise ValueError(f"`{name}` must be a 2-D sparse matrix with m, n >= 1, got {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise TypeError(f"`{name}` must have a floating dtype, got {a.dtype}")
    if symmetric and a.shape[0] != a.shape[1]:
        raise ValueError(f"`symmetric=True` needs a square `{name}`, got shape {a.shape}")
    csr = sps.csr_matrix(a)
    csr.sum_duplicates()
    if width is None:
        width = max(1, round(csr.nnz / csr.shape[0]))
    elif not isinstance(width, (int, np.integer)) or isinstance(width, bool) or width < 1:
        raise ValueError(f"`width` must be an int >= 1, got {width!r}")
    dtype = jax.dtypes.canonicalize_dtype(csr.dtype)  # float64 only where jax has x64
    ops = _padded_rows(csr, int(width), dtype)
    rmm = None
    if not symmetric:
        ops = ops + _padded_rows(sps.csr_matrix(csr.T), int(width), dtype)
        rmm = _rows_rmatmat
    return LinearOperator._from_operands(ops, csr.shape, dtype, _rows_matmat, rmm,
                                         symmetric=symmetric)


def is_dense(a) -> bool:
    """True for a dense array (not an operator or a sparse matrix)."""
    return not isinstance(a, (LinearOperator, jsparse.BCOO, jsparse.BCSR)) and hasattr(a, "shape")

