"""The Newton system of the OT solvers: the Schur-complement CG and its preconditioner."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subjax import ot
from subjax.ot import _common as cm


def _plan(n=60, m=60, rel=0.003, seed=0):
    """A plan near a small-epsilon optimum (a loose Sinkhorn solve): each row's mass
    sits on few columns."""
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (n, 2), jnp.float64)
    y = jax.random.normal(ky, (m, 2), jnp.float64) + 0.5
    C = ot.cost_matrix(x, y)
    return ot.sinkhorn(C, epsilon=rel * float(jnp.mean(C)), tol=1e-3, max_iters=5000).plan()


@pytest.mark.parametrize("with_sq", [False, True])
def test_newton_solve_matches_dense_solve(x64, with_sq):
    """Both preconditioners solve the same system: the (x, y) of the Schur CG
    satisfies the full block system to the CG tolerance."""
    P = _plan()
    n, m = P.shape
    geom = ot.Dense(P)
    op = cm.dense_operator(geom, P)
    dr, dc = op.rows, op.cols
    rng = np.random.default_rng(1)
    rf, rg = jnp.asarray(rng.standard_normal(n)), jnp.asarray(rng.standard_normal(m))
    # the block matrix's null vector is (1, -1): a right side in its range has
    # sum(rf) = sum(rg)
    rg = rg + (rf.sum() - rg.sum()) / m
    x, y, k = cm.newton_solve(geom, op.matvec, op.rmatvec, dr, dc, rf, rg, 1e-12, 2000, True,
                              op.sq_matvec if with_sq else None)
    H = jnp.block([[jnp.diag(dr), P], [P.T, jnp.diag(dc)]])
    res = H @ jnp.concatenate([x, y]) - jnp.concatenate([rf, rg])
    assert float(jnp.linalg.norm(res)) <= 1e-9 * float(jnp.linalg.norm(jnp.concatenate([rf, rg])))
    assert 0 < int(k) < 2000


def test_schur_diagonal_preconditioner(x64):
    """With ``Psq`` the preconditioner is the Schur matrix's diagonal, computed from
    ``(P * P) (1 / dc)``; on a small-epsilon plan it needs fewer CG iterations than
    ``dr`` alone for the same tolerance."""
    P = _plan()
    geom = ot.Dense(P)
    op = cm.dense_operator(geom, P)
    dr, dc = op.rows, op.cols
    S = jnp.diag(dr) - P @ jnp.diag(1 / dc) @ P.T
    np.testing.assert_allclose(dr - op.sq_matvec(1 / dc), jnp.diag(S), rtol=1e-12, atol=1e-18)
    assert float(jnp.min(jnp.diag(S) / dr)) < 0.5  # far from dr: the case it is for
    rng = np.random.default_rng(2)
    rf = jnp.asarray(rng.standard_normal(P.shape[0]))
    rg = jnp.asarray(rng.standard_normal(P.shape[1]))
    rg = rg + (rf.sum() - rg.sum()) / P.shape[1]
    k = {sq: int(cm.newton_solve(geom, op.matvec, op.rmatvec, dr, dc, rf, rg, 1e-10, 2000, True,
                                 op.sq_matvec if sq else None)[2]) for sq in (False, True)}
    assert k[True] < k[False]
