"""subjax.linalg: randomized SVD and block Lanczos against their peers.

Cases (float32, warm, interleaved, one process):

- ``randomized_svd NxN r32``: rank 32 of an ``N x N`` matrix ``U diag(sigma) V^T``
  with random orthogonal ``U, V`` and a slowly decaying spectrum
  ``sigma_i = 1 / i`` (the hard case for power iteration). Same oversample (10)
  and power iterations (4) for every randomized method. Contenders: subjax
  (block Krylov, the default), subjax ``method="subspace"`` (the algorithm
  scikit-learn uses), scikit-learn ``randomized_svd``, ``jnp.linalg.svd`` and
  ``numpy.linalg.svd`` (full), and the *matmul floor*: the ``2 q + 2 = 10`` block
  products with ``A`` (``N x 42`` blocks) that any of these randomized methods
  must do, chained so that none can be skipped, in the fastest form XLA offers
  (``A @ X`` and ``X^T A`` as a dot_general). Accuracy: max over the top 32 of
  ``|s_i / sigma_i - 1|``, median over 5 seeds.
- ``lanczos_eigh 20000^2 sparse top-10``: the 10 largest eigenvalues of a sparse
  symmetric ``(S + S^T) / 2`` (``S`` with 5 N(0,1) entries per row, ~200k
  non-zeros; semicircle-like spectrum, top gaps ~1%) vs
  ``scipy.sparse.linalg.eigsh`` (ARPACK) at the same tolerance 1e-5, in float64
  (its usual setting) and float32, with the solvers' defaults. subjax takes the
  matrix as ``sparse_rows_operator(a, symmetric=True)`` (padded rows plus a
  row-sorted remainder). Ten chained products ``A x`` of that operator, of jax's
  BCOO and of scipy's CSR are timed too, and the products each solver made are counted: the
  Lanczos time in products is then ``10 median / matvecs median`` for each.
  Accuracy: max |lambda_i - lambda_i^ref| / |lambda_1| against ARPACK at tol=0
  in float64; subjax also in float64 ("subjax f64"). The same at tol 1e-6 on graph
  Laplacians ``D - W`` of Erdos-Renyi
  graphs (mean degree 8) and random sparse matrices of 1e4 and 1e5 rows.

- ``randomized_svd defaults MxN``: subjax's ``randomized_svd(a, 32, key=key)``
  against scikit-learn's ``randomized_svd(a, 32)``, each with its own defaults
  (subjax: block Krylov, 40-column blocks (8 oversamples), 3 steps since
  ``min(m, n) >= 1000``, i.e. 8 block products; scikit-learn: 10 oversamples,
  ``n_iter='auto'``, i.e. 7 power iterations at this rank, 16 products, LU
  normalisation), on slowly (``1/i``) and
  quickly (``exp(-(i-1)/8)``) decaying spectra and square, tall and wide shapes;
  subjax with ``n_steps=4`` (10 products) is timed alongside. Accuracy is the median
  over 10 seeds: on the quickly decaying spectrum both libraries sit at the float32
  rounding floor, where the median of 3 seeds moved by half its value from seed set
  to seed set.

Run: ``PYTHONPATH=. .venv/bin/python -m experiments.bench linalg [--quick]``.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as sla
from jax import lax
from jax.experimental import sparse as jsparse
from sklearn.utils.extmath import _randomized_eigsh as sk_randomized_eigsh
from sklearn.utils.extmath import randomized_svd as sk_randomized_svd
from threadpoolctl import ThreadpoolController

import subjax.linalg as sl
from experiments.bench import Case, Contender

RANK, OVERSAMPLE, N_STEPS = 32, 10, 4
# `make` exports OPENBLAS_NUM_THREADS=1. On a busy 2-core machine multi-threaded
# OpenBLAS suffers badly from contention (scikit-learn's
# randomized_svd 2048^2: ~70 ms with 1 thread, ~0.5-1.2 s with 2), so the peers run
# with 1 BLAS thread (their best setting there) and scikit-learn is also timed with
# every core ("all BLAS threads") for reference.
ALL_THREADS = os.cpu_count() or 1


_CONTROLLER: list = []


def _peer(fn, threads: int = 1):
    """``fn`` under a BLAS thread limit. ``threadpool_limits(...)`` rescans the loaded
    libraries on every entry (tens of ms here), which would be timed with the peer;
    one controller, built once, only sets the thread counts (well under 1 ms)."""

    def run(*args, **kwargs):
        if not _CONTROLLER:
            _CONTROLLER.append(ThreadpoolController())
        with _CONTROLLER[0].limit(limits=threads):
            return fn(*args, **kwargs)

    return run
SEEDS = range(5)
DEFAULTS_SEEDS = 10
# rounds for the cases whose calls take tens of milliseconds: over 7 rounds their
# medians moved by 10-20% from one run to the next (a peer's more than subjax's)
SHORT_REPEATS = 21


def _test_matrix(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    sigma = 1.0 / np.arange(1, n + 1)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    a = ((u * sigma) @ v.T).astype(np.float32)
    return a, sigma


def _rel_err(s, sigma):
    s = np.asarray(s, np.float64)[:RANK]
    return float(np.max(np.abs(s / sigma[:RANK] - 1.0)))


def _floor_fn(n_products: int):
    """The block products a q-step randomized SVD cannot avoid, chained."""

    @jax.jit
    def floor(a, x):
        scale = jnp.asarray(1e-3, a.dtype)
        for _ in range(n_products // 2):
            y = a @ x
            w = lax.dot_general(y, a, (((0,), (0,)), ((), ())))  # (y^T a): A^T y
            x = lax.optimization_barrier(w).T * scale
        return x

    return floor


def _svd_case(n: int, with_dense: bool) -> Case:
    a_np, sigma = _test_matrix(n)
    a = jnp.asarray(a_np)
    l = RANK + OVERSAMPLE
    keys = [jax.random.key(s) for s in SEEDS]

    bk = jax.jit(functools.partial(sl.randomized_svd, rank=RANK, oversample=OVERSAMPLE,
                                   n_steps=N_STEPS))
    ss = jax.jit(functools.partial(sl.randomized_svd, rank=RANK, oversample=OVERSAMPLE,
                                   n_steps=N_STEPS, method="subspace"))

    def acc_jax(f):
        return lambda out: float(np.median([_rel_err(f(a, key=k).s, sigma) for k in keys]))

    def sk_raw(seed=0):
        return sk_randomized_svd(a_np, RANK, n_oversamples=OVERSAMPLE, n_iter=N_STEPS,
                                 random_state=seed)

    sk = _peer(sk_raw)
    sk_all = _peer(sk_raw, ALL_THREADS)

    def acc_sk(out):
        return float(np.median([_rel_err(sk(s)[1], sigma) for s in SEEDS]))

    floor = _floor_fn(2 * N_STEPS + 2)
    x0 = jnp.asarray(np.random.default_rng(1).standard_normal((n, l)), jnp.float32)
    contenders = [
        Contender("subjax", lambda: bk(a, key=keys[0]), accuracy=acc_jax(bk),
                  note="block Krylov (default), CholeskyQR2, jit"),
        Contender("subjax subspace", lambda: ss(a, key=keys[0]), accuracy=acc_jax(ss),
                  note="method='subspace' (sklearn's algorithm)"),
        Contender("scikit-learn", sk, accuracy=acc_sk,
                  note=f"randomized_svd(n_oversamples={OVERSAMPLE}, n_iter={N_STEPS}), "
                       "1 BLAS thread"),
        Contender("scikit-learn all threads", sk_all,
                  note=f"same, {ALL_THREADS} BLAS threads"),
        Contender("matmul floor", lambda: floor(a, x0),
                  note=f"{2 * N_STEPS + 2} chained products with N x {l} blocks"),
    ]
    if with_dense:
        jsvd = jax.jit(lambda a: jnp.linalg.svd(a, compute_uv=True, full_matrices=False))
        contenders += [
            Contender("numpy svd", _peer(lambda: np.linalg.svd(a_np, full_matrices=False)),
                      accuracy=lambda out: _rel_err(out[1], sigma), note="full SVD, float32"),
            Contender("jnp.linalg.svd", lambda: jsvd(a),
                      accuracy=lambda out: _rel_err(out[1], sigma), note="full SVD, float32"),
        ]
    return Case(
        name=f"randomized_svd {n}x{n} r{RANK}",
        params={"m": n, "n": n, "rank": RANK, "oversample": OVERSAMPLE, "n_steps": N_STEPS,
                "spectrum": "sigma_i = 1/i", "dtype": "float32"},
        contenders=contenders,
        reference="subjax",
        accuracy_label="max rel. err of top-32 sigma (median of 5 seeds)",
        max_seconds=20.0,
    )


def _spectrum_matrix(m: int, n: int, decay: str, seed: int = 0):
    """``U diag(sigma) V^T`` (float32) with random orthonormal ``U, V`` and a known spectrum."""
    rng = np.random.default_rng(seed)
    k = min(m, n)
    i = np.arange(1, k + 1)
    sigma = 1.0 / i if decay == "slow" else np.exp(-(i - 1) / 8.0)
    u, _ = np.linalg.qr(rng.standard_normal((m, k)))
    v, _ = np.linalg.qr(rng.standard_normal((n, k)))
    return ((u * sigma) @ v.T).astype(np.float32), sigma


def _defaults_case(m: int, n: int, decay: str) -> Case:
    """subjax's ``randomized_svd`` defaults against scikit-learn's, at rank 32."""
    a_np, sigma = _spectrum_matrix(m, n, decay)
    a = jnp.asarray(a_np)
    keys = [jax.random.key(s) for s in range(DEFAULTS_SEEDS)]
    ours = jax.jit(functools.partial(sl.randomized_svd, rank=RANK))
    four = jax.jit(functools.partial(sl.randomized_svd, rank=RANK, n_steps=4))
    sk = _peer(lambda seed=0: sk_randomized_svd(a_np, RANK, random_state=seed))
    return Case(
        name=f"randomized_svd defaults {m}x{n} r{RANK} {decay} decay",
        params={"m": m, "n": n, "rank": RANK, "dtype": "float32",
                "spectrum": "sigma_i = 1/i" if decay == "slow" else "sigma_i = exp(-(i-1)/8)"},
        contenders=[
            Contender("subjax", lambda: ours(a, key=keys[0]),
                      accuracy=lambda out: float(np.median(
                          [_rel_err(ours(a, key=k).s, sigma) for k in keys])),
                      note="randomized_svd(a, 32, key=key): its defaults"),
            Contender("subjax n_steps=4", lambda: four(a, key=keys[0]),
                      accuracy=lambda out: float(np.median(
                          [_rel_err(four(a, key=k).s, sigma) for k in keys])),
                      note="one block-Krylov step more than the default (10 products)"),
            Contender("scikit-learn", sk,
                      accuracy=lambda out: float(np.median([_rel_err(sk(s)[1], sigma)
                                                            for s in range(DEFAULTS_SEEDS)])),
                      note="randomized_svd(a, 32): its defaults (n_iter='auto', LU "
                           "normalizer), 1 BLAS thread"),
        ],
        reference="subjax",
        accuracy_label=f"max rel. err of top-32 sigma (median of {DEFAULTS_SEEDS} seeds)",
        max_seconds=10.0,
    )


def _symmetric_spectrum_matrix(n: int, decay: str, seed: int = 0):
    """``U diag(lam) U^T`` (float32), ``|lam_i| = 1/i`` or ``exp(-(i-1)/8)`` with random
    signs (indefinite), random orthonormal ``U``."""
    rng = np.random.default_rng(seed)
    i = np.arange(1, n + 1)
    lam = (1.0 / i if decay == "slow" else np.exp(-(i - 1) / 8.0)) * rng.choice([-1.0, 1.0], n)
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return ((u * lam) @ u.T).astype(np.float32), lam


def _eig_err(vals, lam):
    """Max relative error of the ``RANK`` largest-magnitude eigenvalues (signed)."""
    ref = lam[np.argsort(-np.abs(lam))][:RANK]
    got = np.asarray(vals, np.float64)
    got = got[np.argsort(-np.abs(got))][:RANK]
    return float(np.max(np.abs(got / ref - 1.0)))


def _eigh_defaults_case(n: int, decay: str) -> Case:
    """subjax's ``randomized_eigh`` defaults against scikit-learn's ``_randomized_eigsh``
    (the solver behind ``KernelPCA(eigen_solver="randomized")``), rank 32."""
    a_np, lam = _symmetric_spectrum_matrix(n, decay)
    a = jnp.asarray(a_np)
    keys = [jax.random.key(s) for s in range(DEFAULTS_SEEDS)]
    ours = jax.jit(functools.partial(sl.randomized_eigh, rank=RANK))
    sk = _peer(lambda seed=0: sk_randomized_eigsh(a_np, RANK, random_state=seed))
    return Case(
        name=f"randomized_eigh defaults {n}x{n} r{RANK} {decay} decay",
        params={"n": n, "rank": RANK, "dtype": "float32",
                "spectrum": ("|lam_i| = 1/i" if decay == "slow" else "|lam_i| = exp(-(i-1)/8)")
                + ", random signs"},
        contenders=[
            Contender("subjax", lambda: ours(a, key=keys[0]),
                      accuracy=lambda out: float(np.median(
                          [_eig_err(ours(a, key=k).eigenvalues, lam) for k in keys])),
                      note="randomized_eigh(a, 32, key=key): its defaults (block Krylov, "
                           "5 steps, 40-column blocks)"),
            Contender("scikit-learn", sk,
                      accuracy=lambda out: float(np.median(
                          [_eig_err(sk(s)[0], lam) for s in range(DEFAULTS_SEEDS)])),
                      note="_randomized_eigsh(a, 32): its defaults (randomized_svd with "
                           "n_iter='auto', selection='module'), 1 BLAS thread"),
        ],
        reference="subjax",
        accuracy_label=f"max rel. err of the top-32 |lambda| (median of {DEFAULTS_SEEDS} seeds)",
        max_seconds=10.0,
    )


def _sparse_sym(n: int, per_row: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    # a Generator samples the positions without the n^2 permutation that a
    # RandomState seed makes scipy build (75 GB at n = 1e5)
    s = sp.random(n, n, density=per_row / n, random_state=rng, data_rvs=rng.standard_normal)
    return ((s + s.T) * 0.5).tocsr()


def _graph_laplacian(n: int, degree: int = 8, seed: int = 0):
    """``L = D - W`` of an Erdos-Renyi graph with mean degree ``degree`` (unit weights)."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, n, size=n * degree // 2)
    cols = rng.integers(0, n, size=n * degree // 2)
    w = sp.coo_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n)).tocsr()
    w = ((w + w.T) > 0).astype(np.float64)
    w.setdiag(0)
    w.eliminate_zeros()
    return (sp.diags(np.asarray(w.sum(axis=1)).ravel()) - w).tocsr()


MATVECS = 10  # chained products per timed call of the product contenders


def _chained(matmat, x):
    """``MATVECS`` products ``A x``, each normalised by its largest entry."""
    for _ in range(MATVECS):
        x = matmat(x)
        x = x / jnp.max(jnp.abs(x))
    return x


def _lanczos_matvecs(a, k: int, tol: float, x64: bool) -> tuple[int, bool]:
    """Products with ``A`` (columns) a default ``lanczos_eigh`` run made, and its ``converged``.

    Counted in the compiled solver by a host callback in the operator (this run is
    untimed), so the count includes the scale estimate and the final residual check.
    """
    count = [0]

    def add(cols):
        def cb(_):
            count[0] += cols

        return cb

    with jax.enable_x64(x64):
        rows = sl.sparse_rows_operator(a, symmetric=True)

        def counted(x):
            jax.debug.callback(add(x.shape[1]), x[0, 0])
            return rows.matmat(x)

        op = sl.LinearOperator(a.shape, rows.dtype, matmat=counted, symmetric=True)
        res = jax.jit(lambda key: sl.lanczos_eigh(op, k, key=key, tol=tol))(jax.random.key(0))
        converged = bool(res.converged)
        jax.effects_barrier()
    return count[0], converged


def _eigsh_matvecs(a, k: int, tol: float, v0) -> int:
    """Products with ``A`` ``scipy.sparse.linalg.eigsh`` made (through a LinearOperator)."""
    count = [0]

    def counting(x):
        count[0] += 1
        return a @ x

    sla.eigsh(sla.LinearOperator(a.shape, matvec=counting, dtype=a.dtype), k=k, which="LA",
              tol=tol, v0=v0.astype(a.dtype))
    return count[0]


def _lanczos_case(n: int, k: int = 10, tol: float = 1e-5, kind: str = "random") -> Case:
    a64 = _sparse_sym(n) if kind == "random" else _graph_laplacian(n)
    a32 = a64.astype(np.float32)
    ref = np.sort(sla.eigsh(a64, k=k, which="LA", tol=0)[0])[::-1]
    scale = abs(ref[0])
    # sparse_rows_operator: padded rows plus a small scatter, about twice as fast on
    # XLA:CPU as a BCOO product (itself several times faster than BCSR's)
    op = sl.sparse_rows_operator(a32, symmetric=True)
    f = jax.jit(lambda key: sl.lanczos_eigh(op, k, key=key, tol=tol))
    key = jax.random.key(0)

    def acc(w):
        return float(np.max(np.abs(np.sort(np.asarray(w, np.float64))[::-1] - ref)) / scale)

    with jax.enable_x64(True):  # float64 operator and solver, as ARPACK's f64 run
        bcoo64 = jsparse.BCOO.from_scipy_sparse(a64)
        op64 = sl.sparse_rows_operator(a64, symmetric=True)
        f64 = jax.jit(lambda key: sl.lanczos_eigh(op64, k, key=key, tol=tol))
        mv64 = jax.jit(functools.partial(_chained, op64.matmat))
        bcoo_mv64 = jax.jit(functools.partial(_chained, lambda x: bcoo64 @ x))
        x64 = jnp.asarray(np.random.default_rng(2).standard_normal((n, 1)))

    def run64():
        with jax.enable_x64(True):
            return f64(jax.random.key(0))

    def matvec64():
        with jax.enable_x64(True):
            return mv64(x64)

    def bcoo_matvec64():
        with jax.enable_x64(True):
            return bcoo_mv64(x64)

    v0 = np.random.default_rng(0).standard_normal(n)
    # products with A each solver made (the runs below are untimed)
    ours64, conv64 = _lanczos_matvecs(a64, k, tol, True)
    ours32, conv32 = _lanczos_matvecs(a32, k, tol, False)
    theirs64 = _eigsh_matvecs(a64, k, tol, v0)
    theirs32 = _eigsh_matvecs(a32, k, tol, v0)
    x1 = np.random.default_rng(2).standard_normal(n)

    def csr_matvecs():
        y = x1
        for _ in range(MATVECS):
            y = a64 @ y
            y = y / np.max(np.abs(y))
        return y
    return Case(
        name=f"lanczos_eigh {n}x{n} {'sparse' if kind == 'random' else 'graph Laplacian'} "
             f"top-{k} tol {tol:g}",
        params={"n": n, "nnz": int(a64.nnz), "k": k, "tol": tol, "which": "LA", "matrix": kind,
                "matvecs subjax f64": ours64, "matvecs subjax f32": ours32,
                "matvecs scipy eigsh f64": theirs64, "matvecs scipy eigsh f32": theirs32,
                "converged subjax f64": conv64, "converged subjax f32": conv32},
        contenders=[
            Contender("subjax", lambda: f(key), accuracy=lambda r: acc(r.eigenvalues),
                      note=f"defaults (single-vector thick restart), sparse_rows_operator, "
                           f"float32; {ours32} products with A, converged={conv32}"),
            Contender("subjax f64", run64, accuracy=lambda r: acc(r.eigenvalues),
                      note=f"the same in float64; {ours64} products with A, "
                           f"converged={conv64}"),
            Contender("scipy eigsh f64", _peer(lambda: sla.eigsh(a64, k=k, which="LA", tol=tol,
                                                                 v0=v0)),
                      accuracy=lambda r: acc(r[0]),
                      note=f"ARPACK, CSR float64; {theirs64} products with A"),
            Contender("scipy eigsh f32", _peer(lambda: sla.eigsh(a32, k=k, which="LA", tol=tol,
                                                                 v0=v0.astype(np.float32))),
                      accuracy=lambda r: acc(r[0]),
                      note=f"ARPACK, CSR float32; {theirs32} products with A"),
            Contender(f"subjax {MATVECS} matvecs f64", matvec64,
                      note=f"{MATVECS} chained products A x of sparse_rows_operator in one "
                           "jitted call (the floor of as many steps)"),
            Contender(f"jax BCOO {MATVECS} matvecs f64", bcoo_matvec64,
                      note="the same with a BCOO product"),
            Contender(f"scipy CSR {MATVECS} matvecs f64", csr_matvecs,
                      note="the same with scipy's CSR product (no BLAS: no thread limit)"),
        ],
        reference="subjax",
        accuracy_label="max |lambda - lambda_ref| / |lambda_1|",
        # the 1e5-row cases: a few rounds of seconds-long solves keep the suite short
        max_seconds=30.0 if n < 100000 else 20.0,
    )


def cases(quick: bool) -> list[Case]:
    if quick:
        return [_svd_case(2048, with_dense=False), _defaults_case(2048, 1024, "slow"),
                _eigh_defaults_case(2048, "slow"),
                _lanczos_case(20000), _lanczos_case(10000, tol=1e-6, kind="laplacian")]
    defaults = [_defaults_case(m, n, decay)
                for m, n in ((2048, 1024), (2048, 2048), (4096, 1024), (1024, 4096))
                for decay in ("slow", "fast")]
    eigh_defaults = [_eigh_defaults_case(n, decay) for n in (1024, 2048, 4096)
                     for decay in ("slow", "fast")]
    short = [*defaults, *eigh_defaults, _lanczos_case(20000),
             *(_lanczos_case(10000, tol=1e-6, kind=kind) for kind in ("random", "laplacian"))]
    return [_svd_case(2048, with_dense=True), _svd_case(4096, with_dense=False),
            *(dataclasses.replace(c, repeats=SHORT_REPEATS) for c in short),
            *(_lanczos_case(100000, tol=1e-6, kind=kind) for kind in ("random", "laplacian"))]
