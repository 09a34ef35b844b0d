"""Invariants of the reproductions' data transforms and estimators (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.data import Split, digits
from experiments.fisher_merge.experiment import shift
from experiments.kster.experiment import Config as KsterConfig
from experiments.kster.experiment import _edit
from experiments.sclora.experiment import _matched
from experiments.subspacead.experiment import Config as ADConfig
from experiments.subspacead.experiment import _padim, add_defects, features


def test_shift_translates_each_image_by_one_pixel():
    split = digits(0).test
    moved = shift(split, 3)
    for a, b in zip(split.images[:50], moved.images[:50], strict=True):
        ok = False
        for step, axis in ((1, 0), (-1, 0), (1, 1), (-1, 1)):
            cand = np.roll(a, step, axis=axis)
            edge = 0 if step == 1 else -1
            if axis == 0:
                cand[edge, :] = 0.0
            else:
                cand[:, edge] = 0.0
            ok |= np.array_equal(cand, b)
        assert ok
    assert np.array_equal(moved.y, split.y)


def test_defects_change_one_2x2_block_by_enough():
    imgs = digits(0).test.images[:40]
    out, masks = add_defects(imgs, np.random.default_rng(0))
    for a, b, m in zip(imgs, out, masks, strict=True):
        assert m.sum() == 4 and np.array_equal(a[~m], b[~m])
        rows, cols = np.nonzero(m)
        assert np.ptp(rows) == 1 and np.ptp(cols) == 1
        assert np.abs(a - b).sum() >= 1.5 - 1e-6
        np.testing.assert_allclose(b[m], 1.0 - a[m])


def test_patch_features_are_local_and_padim_matches_a_dense_mahalanobis():
    cfg = ADConfig(channels=8)
    imgs = digits(0).test.images[:3].copy()
    f0 = features(cfg, imgs)
    assert f0.shape == (3, 64, 10)
    imgs[:, 0, 0] += 1.0  # a change at the corner moves only features within the window
    f1 = features(cfg, imgs)
    changed = np.nonzero(np.any(f0 != f1, axis=(0, 2)))[0]
    assert set(changed) <= {8 * i + j for i in range(3) for j in range(3)}
    rng = np.random.default_rng(0)
    train, test = rng.standard_normal((6, 64, 4)), rng.standard_normal((2, 64, 4))
    d = _padim(train, test, 0.1)
    p = 5
    cov = np.cov(train[:, p].T)
    cov = cov + 0.1 * (np.trace(cov) / 4 + 1e-3) * np.eye(4)
    diff = test[1, p] - train[:, p].mean(0)
    assert d[1, p] == pytest.approx(np.sqrt(diff @ np.linalg.solve(cov, diff)), rel=1e-6)


def test_memit_edit_lives_in_the_key_row_space_and_writes_its_residuals():
    cfg = KsterConfig(d=32, d_out=16, ranks=(2,), n_candidates=300, bystanders=10,
                      lam=1e-6)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((32, 32))
    cov = a @ a.T / 32 + np.eye(32)
    k, r = rng.standard_normal((3, 32)), rng.standard_normal((16, 3))
    dw = _edit(cfg, cov, k, r)
    np.testing.assert_allclose(dw @ k.T, r, atol=1e-4)  # lambda -> 0: the edit is exact
    basis = np.linalg.solve(cfg.lam * cov + k.T @ k, k.T)  # (32, 3) row-space directions
    coef = np.linalg.lstsq(basis, dw.T, rcond=None)[0]
    np.testing.assert_allclose(basis @ coef, dw.T, atol=1e-8 * np.abs(dw).max() + 1e-10)


def test_matched_loss_is_reached_by_every_run():
    def run(losses, keep):
        return {"keep_before": {"test": 1.0, "val": 1.0},
                "trace": [{"step": 10 * (i + 1), "loss": lo, "keep_test": kt, "keep_val": kt}
                          for i, (lo, kt) in enumerate(zip(losses, keep, strict=True))]}

    runs = {"a": run([1.0, 0.5, 0.2], [0.9, 0.8, 0.7]),
            "b": run([0.9, 0.6, 0.4], [0.95, 0.9, 0.85])}
    target, at = _matched(runs)
    assert target == 0.4  # the lowest loss both reach
    assert at["a"] == {"step": 30, "forgetting": pytest.approx(0.3)}
    assert at["b"] == {"step": 30, "forgetting": pytest.approx(0.15)}


def test_split_classes_keeps_only_the_requested_labels():
    s = Split(np.zeros((5, 64), np.float32), np.array([0, 1, 2, 1, 0], np.int32))
    assert s.classes([1]).y.tolist() == [1, 1] and len(s.classes([3])) == 0


@pytest.mark.slow
def test_sns_direct_newton_foil_solves_the_newton_system_and_converges(x64):
    import jax.numpy as jnp

    from experiments.sns.experiment import _direct_direction, _evaluate, direct_newton, problem

    C, a, b = (jnp.asarray(v) for v in problem(12, 0))
    eps, zeros = 0.05, jnp.zeros(12)
    P, r, c, _, ga, gb, _, _ = _evaluate(C, a, b, zeros, zeros, eps)
    df, dg, slope = _direct_direction(P, r, c, ga, gb, eps)
    H = jnp.block([[jnp.diag(r), P], [P.T, jnp.diag(c)]])
    rhs = eps * jnp.concatenate([ga, gb])
    np.testing.assert_allclose(H @ jnp.concatenate([df, dg]), rhs, atol=1e-12)
    assert float(slope) > 0  # an ascent direction of the dual
    f, g, err, steps, conv = direct_newton(C, a, b, eps, zeros, zeros, tol=1e-10,
                                           max_iters=60)
    assert conv and err <= 1e-10 and 0 < steps < 60
    P = np.asarray(_evaluate(C, a, b, f, g, eps)[0])  # the entropic plan: its marginals
    np.testing.assert_allclose(P.sum(1), a, atol=1e-10)
    np.testing.assert_allclose(P.sum(0), b, atol=1e-10)


def test_ewc_frechet_distance_of_gaussian_samples():
    from experiments.ewc.experiment import frechet

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    assert frechet(x, x) == pytest.approx(0.0, abs=1e-8)
    # N(mu, I) vs N(0, 4 I): |mu|^2 + 3 (1 + 4 - 2 * 2)
    y = 2.0 * rng.normal(size=(4000, 3)) + np.array([1.0, 2.0, 0.0])
    assert frechet(x, y) == pytest.approx(5.0 + 3.0, rel=0.1)


@pytest.mark.slow
def test_ewc_stacked_penalty_sums_the_active_earlier_tasks():
    import jax
    import jax.numpy as jnp

    from experiments.ewc.experiment import _penalty, _stack, init_denoiser
    from subjax import fisher

    keys = jax.random.split(jax.random.key(0), 8)
    params = init_denoiser(keys[0], 4)
    anchors = [init_denoiser(k, 4) for k in keys[1:4]]
    diags = [jax.tree.map(lambda x, k=k: jax.random.uniform(k, x.shape), params)
             for k in keys[4:7]]
    vecs = [jax.tree.map(lambda x: x[None], init_denoiser(k, 4)) for k in keys[4:7]]
    lows = [fisher.LowRankFisher(jnp.array([0.5 + k]), v) for k, v in enumerate(vecs)]
    active = jnp.array([1.0, 1.0, 0.0])  # the third task is not learnt yet
    one = jax.jit(lambda a, f: fisher.ewc_penalty(params, a, f, 3.0))
    stacked = jax.jit(lambda a, f: _penalty(params, a, f, active, 3.0))
    for fishers in (diags, lows):
        want = sum(one(anchors[k], fishers[k]) for k in (0, 1))
        got = stacked(_stack(anchors), _stack(fishers))
        np.testing.assert_allclose(got, want, rtol=1e-5)
        assert float(want) > 0


def test_kfac_settings_precondition_every_dense_and_convolution_layer():
    """The kfac reproduction's CNN and transformer: every conv / dense layer gets Kronecker
    factors of the dense size on its patches (CNN) or on every position (transformer)."""
    import jax

    from experiments.kfac import settings as S
    from subjax import fisher

    for setting, dims in (("cnn", {"conv1": (10, 8), "conv2": (73, 16), "head": (257, 10)}),
                          ("transformer", {**{w: (33, 32) for w in ("wq", "wk", "wv", "wo")},
                                           "w1": (33, 64), "w2": (65, 32), "out": (33, 16)})):
        x, y = S.load(setting, 0).train
        _, _, stats = jax.eval_shape(lambda p, x, y: fisher.kfac_grads_and_stats(  # noqa: B023
            S.model_fn(setting), p, x, y, likelihood=S.likelihood(setting),  # noqa: B023
            key=jax.random.key(0)), S.params(setting, 0), x[:4], y[:4])
        assert {k: (v.a.shape[0], v.g.shape[0]) for k, v in stats.items()} == dims
