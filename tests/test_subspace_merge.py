"""Joint SVD (subjax.linalg) and Sub-MoE subspace merging (subjax.fisher)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from subjax.fisher import average, subspace_merge
from subjax.linalg import joint_svd


def _stack(seed, k=3, m=7, n=5):
    return np.random.default_rng(seed).standard_normal((k, m, n))


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_joint_svd_is_the_truncated_svd_of_the_concatenation(x64, rank):
    a = _stack(0)
    out = joint_svd(jnp.asarray(a), rank)
    wide = np.concatenate(list(a), axis=1)
    u, s, vt = np.linalg.svd(wide, full_matrices=False)
    ref = (u[:, :rank] * s[:rank]) @ vt[:rank]
    approx = np.concatenate([np.asarray((out.u * out.s) @ out.v[i].T) for i in range(3)], axis=1)
    np.testing.assert_allclose(approx, ref, atol=1e-10)
    np.testing.assert_allclose(np.asarray(out.s), s[:rank], rtol=1e-12)
    np.testing.assert_allclose(np.asarray(out.u.T @ out.u), np.eye(rank), atol=1e-12)
    v = np.asarray(out.v).reshape(-1, rank)
    np.testing.assert_allclose(v.T @ v, np.eye(rank), atol=1e-12)
    err = np.sqrt(sum(np.sum((a[i] - approx[:, 5 * i:5 * (i + 1)]) ** 2) for i in range(3)))
    np.testing.assert_allclose(float(out.error), err, atol=1e-10)
    if rank == 7:  # full rank reconstructs every matrix
        assert float(out.error) < 1e-10


def test_joint_svd_shared_basis_beats_a_random_basis(x64):
    a = _stack(1)
    out = joint_svd(jnp.asarray(a), 2)
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((7, 2)))
    err_random = np.sqrt(sum(np.sum((x - q @ q.T @ x) ** 2) for x in a))
    assert float(out.error) < err_random


def test_subspace_merge_is_projected_weighted_average(x64):
    a = _stack(3)
    w = np.array([0.5, 2.0, 1.5])
    out = joint_svd(jnp.asarray(a), 2)
    u = np.asarray(out.u)
    avg = np.tensordot(w, a, axes=1) / w.sum()
    np.testing.assert_allclose(np.asarray(subspace_merge(jnp.asarray(a), 2, w)),
                               u @ u.T @ avg, atol=1e-10)
    # full rank: exactly the weighted average (fisher.average)
    full = subspace_merge(jnp.asarray(a), 7, w)
    ref = average([jnp.asarray(x) for x in a], weights=w)
    np.testing.assert_allclose(np.asarray(full), np.asarray(ref), atol=1e-6)
    # one matrix: its truncated SVD
    u1, s1, vt1 = np.linalg.svd(a[0], full_matrices=False)
    np.testing.assert_allclose(np.asarray(subspace_merge(jnp.asarray(a[:1]), 2)),
                               (u1[:, :2] * s1[:2]) @ vt1[:2], atol=1e-10)
    # identical matrices of rank 2 are kept exactly at rank 2
    b = (u1[:, :2] * s1[:2]) @ vt1[:2]
    np.testing.assert_allclose(np.asarray(subspace_merge(jnp.asarray(np.stack([b, b])), 2)), b,
                               atol=1e-10)


def test_float32_jit_vmap_and_bad_arguments():
    a = jnp.asarray(_stack(4), jnp.float32)
    f = jax.jit(lambda x: subspace_merge(x, 3))
    out = f(a)
    assert out.shape == (7, 5) and out.dtype == jnp.float32
    vm = jax.vmap(lambda x: subspace_merge(x, 3))(jnp.stack([a, 2 * a]))
    np.testing.assert_allclose(np.asarray(vm[1]), 2 * np.asarray(out), rtol=1e-4, atol=1e-4)
    shapes = jax.eval_shape(lambda x: joint_svd(x, 2), a)
    assert shapes.u.shape == (7, 2) and shapes.v.shape == (3, 5, 2)
    with pytest.raises(ValueError, match="rank"):
        joint_svd(a, 8)
    with pytest.raises(ValueError, match="mats"):
        joint_svd(a[0], 1)
    with pytest.raises(ValueError, match="weights"):
        subspace_merge(a, 2, weights=jnp.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="weights"):
        subspace_merge(a, 2, weights=jnp.ones(2))
