"""SNN / Mixed SNN entry-wise completion against dense references (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import subjax.linalg as sl


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _low_rank(rng, m, n, r):
    return rng.standard_normal((m, r)) @ rng.standard_normal((r, n))


def _mnar_mask(rng, a, frac=0.35):
    """Entries above a row-dependent threshold go missing more often (not at random)."""
    p_miss = frac * (1 + np.tanh(a - a.mean(1, keepdims=True)))
    return rng.random(a.shape) > p_miss


def test_anchor_is_fully_observed_and_linked_to_the_entry():
    rng = np.random.default_rng(0)
    a = _low_rank(rng, 30, 25, 3)
    mask = _mnar_mask(rng, a)
    mask[4, 7] = False
    rows, cols = map(np.asarray, sl.anchor_submatrix(jnp.asarray(mask), 4, 7))
    assert rows.sum() > 0 and cols.sum() > 0
    assert mask[np.ix_(rows, cols)].all()
    assert mask[rows, 7].all() and mask[4, cols].all()
    assert not rows[4] and not cols[7]


def test_snn_matches_truncated_pcr_on_the_dense_anchor_submatrix():
    rng = np.random.default_rng(1)
    a = _low_rank(rng, 40, 30, 4) + 0.1 * rng.standard_normal((40, 30))
    mask = _mnar_mask(rng, a, 0.25)
    mask[3, 5] = False
    res = sl.snn_impute(jnp.asarray(a), jnp.asarray(mask), 3, 5, rank=4)
    rows, cols = np.asarray(res.rows), np.asarray(res.cols)
    s = a[np.ix_(rows, cols)]
    u, sv, vt = np.linalg.svd(s.T, full_matrices=False)      # S^T = U diag(sv) V^T
    beta = vt[:4].T @ ((u[:, :4].T @ a[3, cols]) / sv[:4])
    np.testing.assert_allclose(float(res.estimate), beta @ a[rows, 5], rtol=1e-9)
    resid = a[3, cols] - s.T @ beta
    sigma2 = resid @ resid / (cols.sum() - 4)
    np.testing.assert_allclose(float(res.std_err), np.sqrt(sigma2 * beta @ beta), rtol=1e-9)
    assert int(res.rank) == 4 and bool(res.feasible)


def test_snn_is_exact_on_a_noiseless_low_rank_matrix_under_mnar():
    rng = np.random.default_rng(2)
    a = _low_rank(rng, 50, 40, 3)
    mask = _mnar_mask(rng, a)
    missing = np.argwhere(~mask)[:20]
    est = jax.vmap(lambda i, j: sl.snn_impute(jnp.asarray(a), jnp.asarray(mask), i, j,
                                              rank=3).estimate)(*missing.T)
    np.testing.assert_allclose(np.asarray(est), a[missing[:, 0], missing[:, 1]], atol=1e-8)


def test_msnn_pools_levels_where_per_level_snn_has_no_anchor():
    rng = np.random.default_rng(3)
    units, times, levels, r = 30, 8, 3, 2
    u = rng.standard_normal((units, r))
    v = rng.standard_normal((times, levels, r))
    y = np.einsum("ir,tdr->itd", u, v)
    mask = np.zeros(y.shape, bool)
    mask[:, :, 0] = True                 # control observed throughout
    mask[:6, 7, 2] = True                # level 2 seen once, by six units
    res = sl.msnn_impute(jnp.asarray(y), jnp.asarray(mask), 20, 7, 2, rank=r)
    np.testing.assert_allclose(float(res.estimate), y[20, 7, 2], atol=1e-8)
    # per level (the level-2 slice alone): the target unit observes nothing under level 2
    per_level = sl.snn_impute(jnp.asarray(y[:, :, 2]), jnp.asarray(mask[:, :, 2]), 20, 7,
                              rank=r)
    assert not bool(per_level.feasible) and np.isnan(float(per_level.estimate))
    # MSNN is SNN on the flattened unit x (time, level) matrix
    flat = sl.snn_impute(jnp.asarray(y.reshape(units, -1)),
                         jnp.asarray(mask.reshape(units, -1)), 20, 7 * levels + 2, rank=r)
    assert float(flat.estimate) == float(res.estimate)


def test_standard_error_matches_its_formula():
    rng = np.random.default_rng(6)
    a = _low_rank(rng, 30, 40, 3) + 0.1 * rng.standard_normal((30, 40))
    mask = _mnar_mask(rng, a, 0.2)
    mask[2, 9] = False
    res = sl.snn_impute(jnp.asarray(a), jnp.asarray(mask), 2, 9, rank=3)
    rows, cols = np.asarray(res.rows), np.asarray(res.cols)
    s = a[np.ix_(rows, cols)]
    u, sv, vt = np.linalg.svd(s, full_matrices=False)
    p_k = vt[:3].T @ np.diag(1 / sv[:3]) @ u[:, :3].T         # pinv_3(S): (|C|, |R|)
    beta = p_k.T @ a[2, cols]
    resid = a[2, cols] - s.T @ beta
    sigma2 = resid @ resid / (cols.sum() - 3)
    gamma = p_k @ a[rows, 9]
    np.testing.assert_allclose(float(res.std_err_regression), np.sqrt(sigma2 * gamma @ gamma),
                               rtol=1e-9)
    assert int(res.rank) == 3


def test_standard_error_is_nan_without_residual_degrees_of_freedom():
    rng = np.random.default_rng(7)
    a = _low_rank(rng, 10, 4, 2) + 0.1 * rng.standard_normal((10, 4))
    mask = np.ones(a.shape, bool)
    mask[0, 3] = False
    res = sl.snn_impute(jnp.asarray(a), jnp.asarray(mask), 0, 3, rank=3)   # |C| = 3 = rank
    assert int(res.n_cols) == 3 and int(res.rank) == 3
    assert np.isfinite(float(res.estimate))
    assert np.isnan(float(res.std_err)) and np.isnan(float(res.std_err_regression))


def _coverage(m, n, r, sigma, block, se, draws=80, seed=4):
    rng = np.random.default_rng(seed)
    truth = _low_rank(rng, m, n, r)
    mask = np.ones((m, n), bool)
    mask[:block[0], block[1]:] = False   # a missing block (synthetic-control pattern)
    noisy = truth[None] + sigma * rng.standard_normal((draws, m, n))
    res = jax.vmap(lambda v: sl.snn_impute(v, jnp.asarray(mask), 0, n - 1, rank=r))(
        jnp.asarray(noisy))
    err = np.abs(np.asarray(res.estimate) - truth[0, n - 1])
    return float(np.mean(err <= 1.96 * se(res)))


def test_snn_interval_covers_when_anchor_columns_dominate():
    """SNN's asymptotic regime: many anchor columns, few anchor rows."""
    cover = _coverage(12, 200, 2, 0.1, (2, 190), lambda r: np.asarray(r.std_err))
    # 95% nominal over 80 draws: below 0.85 has probability < 1e-3 at true coverage 0.95
    assert cover >= 0.85


def test_first_order_interval_covers_with_few_anchor_columns():
    def both(r):
        return np.hypot(np.asarray(r.std_err), np.asarray(r.std_err_regression))

    cover = _coverage(80, 40, 2, 0.1, (10, 25), both)
    assert cover >= 0.85
    # and SNN's interval alone undercovers there (the regression noise dominates)
    assert _coverage(80, 40, 2, 0.1, (10, 25), lambda r: np.asarray(r.std_err)) < 0.85


def test_jit_and_float32():
    rng = np.random.default_rng(5)
    a = _low_rank(rng, 20, 15, 2).astype(np.float32)
    mask = np.ones(a.shape, bool)
    mask[0, 0] = False
    f = jax.jit(lambda v, msk, i, j: sl.snn_impute(v, msk, i, j, rank=2))
    res = f(jnp.asarray(a), jnp.asarray(mask), 0, 0)
    assert res.estimate.dtype == jnp.float32
    np.testing.assert_allclose(float(res.estimate), a[0, 0], rtol=1e-3, atol=1e-3)


def test_bad_input_is_named():
    a = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="mask"):
        sl.snn_impute(a, jnp.ones((3, 3), bool), 0, 0, rank=1)
    with pytest.raises(TypeError, match="mask"):
        sl.snn_impute(a, jnp.ones((4, 3)), 0, 0, rank=1)
    with pytest.raises(ValueError, match="rank"):
        sl.snn_impute(a, jnp.ones((4, 3), bool), 0, 0, rank=0)
    with pytest.raises(ValueError, match="`j`"):
        sl.snn_impute(a, jnp.ones((4, 3), bool), 0, 3, rank=1)
    with pytest.raises(ValueError, match="`level`"):
        sl.msnn_impute(jnp.ones((4, 3, 2)), jnp.ones((4, 3, 2), bool), 0, 0, 2, rank=1)
    with pytest.raises(TypeError, match="values"):
        sl.snn_impute(jnp.ones((4, 3), int), jnp.ones((4, 3), bool), 0, 0, rank=1)
