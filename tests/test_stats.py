"""The reproductions' statistics standard: interval coverage, paired tests, verdicts, grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from experiments import stats


def _coverage(n, n_experiments, rng, interval):
    hits = 0
    for _ in range(n_experiments):
        x = 3.0 + 2.0 * rng.standard_normal(n)
        lo, hi = interval(x)
        hits += lo <= 3.0 <= hi
    return hits / n_experiments


@pytest.mark.parametrize("n", [3, 5, 10])
def test_t_interval_covers_the_mean_95_percent_of_the_time(n):
    rng = np.random.default_rng(n)
    cov = _coverage(n, 2000, rng, lambda x: (stats.mean_ci(x).lo, stats.mean_ci(x).hi))
    # 2000 Bernoulli(0.95) draws: sd 0.0049; allow 3 sd.
    assert abs(cov - 0.95) < 0.0147, cov


def test_coverage_simulation_detects_a_too_narrow_interval():
    """The same simulation rejects the normal-quantile interval at n = 3 (it undercovers)."""
    rng = np.random.default_rng(0)

    def z_interval(x):
        half = 1.959964 * x.std(ddof=1) / math.sqrt(x.size)
        return x.mean() - half, x.mean() + half

    assert _coverage(3, 2000, rng, z_interval) < 0.93


def test_mean_ci_matches_scipy_ttest_interval():
    x = np.array([0.91, 0.93, 0.925, 0.94, 0.905, 0.918])
    est = stats.mean_ci(x, level=0.9)
    ref = sps.ttest_1samp(x, 0.0).confidence_interval(0.9)
    np.testing.assert_allclose([est.lo, est.hi], [ref.low, ref.high], rtol=1e-12)
    assert est.mean == pytest.approx(x.mean()) and est.sd == pytest.approx(x.std(ddof=1))
    assert est.half_width == pytest.approx((ref.high - ref.low) / 2)


def test_paired_difference_matches_scipy_and_beats_unpaired_when_seeds_correlate():
    rng = np.random.default_rng(1)
    seed_effect = rng.standard_normal(8)
    a = seed_effect + 0.3 + 0.05 * rng.standard_normal(8)
    b = seed_effect + 0.05 * rng.standard_normal(8)
    d = stats.paired_difference(a, b)
    ref = sps.ttest_rel(a, b).confidence_interval(0.95)
    np.testing.assert_allclose([d.lo, d.hi], [ref.low, ref.high], rtol=1e-12)
    assert d.lo > 0  # the shared seed effect cancels ...
    unpaired = sps.ttest_ind(a, b).confidence_interval(0.95)
    assert unpaired.low < 0  # ... while an unpaired interval drowns the effect in it


def test_one_seed_gives_an_unbounded_interval_and_json_round_trip():
    one = stats.mean_ci([0.5])
    assert one.lo == -math.inf and one.hi == math.inf and one.format() == "0.500 (n=1)"
    assert stats.Estimate.from_dict(one.to_dict()) == one
    est = stats.mean_ci([1.0, 2.0, 3.0])
    assert stats.Estimate.from_dict(est.to_dict()) == est
    assert est.format(".2f") == f"2.00 ± {est.half_width:.2f}"


def _est(lo, hi, n=10):
    return stats.Estimate(0.5 * (lo + hi), lo, hi, n, 1.0)


@pytest.mark.parametrize(
    ("lo", "hi", "claim", "margin", "outcome"),
    [
        (0.01, 0.05, "greater", 0.0, stats.HELD),
        (-0.05, -0.01, "greater", 0.0, stats.NOT_HELD),
        (-0.01, 0.05, "greater", 0.0, stats.INCONCLUSIVE),
        (-0.01, 0.005, "greater", 0.01, stats.NOT_HELD),  # rules out an effect >= margin
        (-0.01, 0.02, "greater", 0.01, stats.INCONCLUSIVE),
        (-0.05, -0.01, "less", 0.0, stats.HELD),
        (0.01, 0.05, "less", 0.0, stats.NOT_HELD),
        (0.0, 0.05, "greater", 0.0, stats.INCONCLUSIVE),  # touching zero is not established
        (-math.inf, math.inf, "greater", 0.0, stats.INCONCLUSIVE),
    ],
)
def test_verdict_rule(lo, hi, claim, margin, outcome):
    v = stats.verdict(_est(lo, hi), claim=claim, margin=margin)
    assert v.outcome == outcome and not v.indicative and str(v) == outcome


def test_verdict_is_indicative_in_quick_mode_or_with_few_seeds():
    assert str(stats.verdict(_est(0.1, 0.2), quick=True)) == "held (indicative)"
    assert stats.verdict(_est(0.1, 0.2, n=4)).indicative
    assert not stats.verdict(_est(0.1, 0.2, n=5)).indicative


def test_verdict_from_simulated_seeds():
    rng = np.random.default_rng(2)
    base = rng.standard_normal(10)
    better = stats.compare(base + 1.0 + 0.1 * rng.standard_normal(10), base)
    assert better["verdict"] == stats.HELD and better["difference"]["lo"] > 0
    worse = stats.compare(base - 1.0 + 0.1 * rng.standard_normal(10), base)
    assert worse["verdict"] == stats.NOT_HELD


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"claim": "bigger"}, "`claim` must be one of"),
        ({"margin": -0.1}, "`margin` must be >= 0"),
    ],
)
def test_verdict_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        stats.verdict(_est(0.0, 1.0), **kwargs)


def test_bad_values_are_rejected_by_name():
    with pytest.raises(ValueError, match="`values` contains NaN"):
        stats.mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError, match="`values` is empty"):
        stats.mean_ci([])
    with pytest.raises(ValueError, match="one value per shared seed"):
        stats.paired_difference([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="`level` must be in"):
        stats.mean_ci([1.0, 2.0], level=1.5)


def test_grid_edge_and_extension():
    assert stats.grid_edge([1e-3, 1e-2, 1e-1], [0.1, 0.5, 0.9]) == "high"
    assert stats.grid_edge([1e-1, 1e-3, 1e-2], [0.9, 0.1, 0.5]) == "high"  # unsorted grid
    assert stats.grid_edge([1e-3, 1e-2, 1e-1], [0.1, 0.5, 0.9], maximize=False) == "low"
    assert stats.grid_edge([1, 2, 3], [0.1, 0.5, 0.2]) is None
    assert stats.extend_grid([1e-3, 1e-2, 1e-1], "high") == pytest.approx(1.0)
    assert stats.extend_grid([1e-3, 1e-2, 1e-1], "low") == pytest.approx(1e-4)
    assert stats.extend_grid([-1.0, 0.0, 1.0], "low") == -2.0
    assert stats.extend_grid([4, 8, 16], "high") == 32 and stats.extend_grid([1, 2], "low") == 0
    assert stats.extend_grid([0.25, 0.5, 1.0], "high", bounds=(0.0, 1.0)) is None


def test_tune_extends_an_edge_optimum_until_interior():
    calls = []

    def val_score(lr):  # peak at lr = 1e-1 on a log scale
        calls.append(lr)
        return -(math.log10(lr) + 1.0) ** 2

    t = stats.tune(val_score, [1e-4, 1e-3, 1e-2], budget=8)
    assert t.best == pytest.approx(1e-1) and not t.at_edge
    assert len(calls) == len(set(calls)) == 5  # 1e-1 then 1 were added, nothing twice
    assert [v for v, _ in t.tried] == sorted(calls)


def test_tune_flags_an_edge_optimum_when_the_budget_runs_out():
    t = stats.tune(lambda x: x, [1.0, 2.0, 3.0], budget=4, spacing="linear")
    assert t.best == 4.0 and t.at_edge and len(t.tried) == 4
    with pytest.raises(ValueError, match="`budget` must be >= 3"):
        stats.tune(lambda x: x, [1.0, 2.0, 3.0], budget=2)


def test_tune_methods_shares_one_budget():
    res = stats.tune_methods({"a": lambda x: x, "b": lambda x: -x},
                             {"a": [1.0, 2.0], "b": [1.0, 2.0]}, budget=3)
    assert all(len(t.tried) == 3 for t in res.values())
    assert res["a"].best == 4.0 and res["b"].best == 0.5


def test_smallest_reaching_brackets_the_target():
    calls = []

    def acc(lr):  # accuracy rises with lr: 0.77 at 1e-4, 1.0 from 1e-3 on
        calls.append(lr)
        return min(1.0, 0.5 + 0.4 * math.log10(lr / 1e-5) / math.log10(30.0))

    t = stats.smallest_reaching(acc, [1e-3, 1e-2], 0.9, budget=6)
    assert t.best == 1e-3 and not t.at_edge  # 1e-4 was added below and misses
    assert [v for v, _ in t.tried] == pytest.approx([1e-4, 1e-3, 1e-2])
    assert len(calls) == 3
    none = stats.smallest_reaching(lambda lr: 0.5, [1e-3, 1e-2], 0.9, budget=4)
    assert none.at_edge and len(none.tried) == 4  # extended upwards, never reached
    easy = stats.smallest_reaching(lambda lr: 1.0, [1e-3, 1e-2], 0.9, budget=3)
    assert easy.at_edge and easy.best == pytest.approx(1e-4)  # still reaching at the bottom
