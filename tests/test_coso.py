"""CoSO: orthogonal-subspace continual-learning optimizer (subjax.optim.coso)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from subjax.linalg import principal_angles
from subjax.optim import coso, coso_consolidate

pytestmark = pytest.mark.standard_promotion  # optax.scale_by_adam is not strict-clean


def _grads(seed, m=6, n=5):
    rng = np.random.default_rng(seed)
    return {"w": jnp.asarray(rng.standard_normal((m, n))), "b": jnp.asarray(rng.standard_normal(n))}


def test_without_memory_and_rank_is_adam(x64):
    params = jax.tree.map(jnp.zeros_like, _grads(0))
    opt, ref = coso(1e-2, rank=None), optax.adam(1e-2)
    s, r = opt.init(params), ref.init(params)
    for i in range(4):
        g = _grads(i)
        u, s = opt.update(g, s)
        v, r = ref.update(g, r)
        for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-15)


def test_basis_is_the_dominant_gradient_subspace_and_step_lies_in_it(x64):
    rng = np.random.default_rng(1)
    u0, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    v0, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    g = jnp.asarray((u0[:, :5] * np.array([10.0, 5.0, 1.0, 0.1, 0.01])) @ v0.T)
    opt = coso(1e-2, rank=2, init_steps=30)
    state = opt.init({"w": jnp.zeros((8, 5))})
    u, state = opt.update({"w": g}, state)
    q = state.basis["w"]
    assert float(jnp.max(principal_angles(q, jnp.asarray(u0[:, :2])))) < 1e-6
    # the step lies in span(q): (I - q q^T) u = 0
    res = u["w"] - q @ (q.T @ u["w"])
    assert float(jnp.max(jnp.abs(res))) < 1e-12


def test_consolidate_energy_rule_and_memory_growth(x64):
    m = 6
    opt = coso(1e-2, rank=None)
    state = opt.init({"w": jnp.zeros((m, 3))})
    sk = {"w": jnp.diag(jnp.array([4.0, 3.0, 2.0, 1.0, 0.0, 0.0]))}
    state = coso_consolidate(state, 0.7, sketch=sk)  # 4 + 3 = 70% of the trace: two columns
    mem = np.asarray(state.memory["w"])
    np.testing.assert_allclose(np.abs(mem[:, :2]), np.eye(m)[:, :2], atol=1e-12)
    assert np.allclose(mem[:, 2:], 0.0)
    # a second task adds its directions after the first task's, orthonormal to them
    rng = np.random.default_rng(2)
    x = rng.standard_normal((m, 2))
    state = coso_consolidate(state, 1.0, sketch={"w": jnp.asarray(x @ x.T)})
    mem = np.asarray(state.memory["w"])
    used = mem[:, np.linalg.norm(mem, axis=0) > 0.5]
    assert used.shape[1] == 4  # rank-2 covariance, the projected part is rank 2 as well
    np.testing.assert_allclose(used.T @ used, np.eye(4), atol=1e-10)
    np.testing.assert_allclose(np.abs(mem[:, :2]), np.eye(m)[:, :2], atol=1e-12)
    # the memory never grows past the whole space
    state = coso_consolidate(state, 1.0, sketch={"w": jnp.eye(m)})
    mem = np.asarray(state.memory["w"])
    np.testing.assert_allclose(mem.T @ mem, np.eye(m), atol=1e-10)


@pytest.mark.parametrize("rank", [None, 2])
def test_steps_after_a_task_are_orthogonal_to_its_subspace(x64, rank):
    rng = np.random.default_rng(3)
    basis, _ = np.linalg.qr(rng.standard_normal((8, 3)))
    opt = coso(5e-2, rank=rank, refresh_every=3)
    params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros(4)}
    state = opt.init(params)
    for _ in range(5):  # task 1: gradients live in span(basis)
        g = {"w": jnp.asarray(basis @ rng.standard_normal((3, 4))), "b": jnp.ones(4)}
        _, state = opt.update(g, state)
    state = coso_consolidate(state, 0.999)
    mem = np.asarray(state.memory["w"])
    used = mem[:, np.linalg.norm(mem, axis=0) > 0.5]
    assert float(np.max(principal_angles(jnp.asarray(used), jnp.asarray(basis)))) < 1e-6
    update = jax.jit(opt.update)
    for i in range(5):  # task 2: arbitrary gradients never move the task-1 subspace
        g = {"w": jnp.asarray(rng.standard_normal((8, 4))), "b": jnp.ones(4)}
        u, state = update(g, state)
        assert float(jnp.max(jnp.abs(jnp.asarray(basis).T @ u["w"]))) < 1e-10
        assert int(state.count) == i + 1


def test_sketch_accumulates_projected_gradients(x64):
    opt = coso(1e-2, rank=2)
    state = opt.init({"w": jnp.zeros((5, 3))})
    gs = [_grads(i, 5, 3)["w"] for i in range(3)]
    for g in gs:
        _, state = opt.update({"w": g}, state)
    np.testing.assert_allclose(np.asarray(state.sketch["w"]),
                               sum(np.asarray(g) @ np.asarray(g).T for g in gs), rtol=1e-12)
    state = coso_consolidate(state, 0.9)
    assert float(jnp.max(jnp.abs(state.sketch["w"]))) == 0.0 and int(state.count) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="rank"):
        coso(1e-2, rank=0)
    with pytest.raises(ValueError, match="refresh_every"):
        coso(1e-2, refresh_every=0)
    opt = coso(1e-2)
    state = opt.init({"w": jnp.zeros((4, 3))})
    with pytest.raises(ValueError, match="threshold"):
        coso_consolidate(state, 1.5)
    with pytest.raises(ValueError, match="sketch"):
        coso_consolidate(state, 0.9, sketch={"w": jnp.eye(3)})
