"""The benchmark harness times warm runs, reports ratios and accuracy, survives failures."""

import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from experiments import bench


def test_run_case_ratio_accuracy_and_failure():
    x = jnp.ones((64, 64))
    f = jax.jit(lambda x: x @ x)
    calls = {"slow": 0}

    def slow():
        calls["slow"] += 1
        time.sleep(0.02)
        return np.ones(3)

    def broken():
        raise RuntimeError("peer exploded")

    case = bench.Case(
        name="toy",
        contenders=[
            bench.Contender("subjax", lambda: f(x), accuracy=lambda out: float(out[0, 0] - 64)),
            bench.Contender("sleepy", slow, accuracy=lambda out: 1.0),
            bench.Contender("broken", broken),
        ],
        params={"n": 64},
    )
    rec = bench.run_case(case, repeats=4, log=lambda *a: None)
    rows = {r["contender"]: r for r in rec["rows"]}
    assert rows["subjax"]["ratio"] == 1.0
    assert rows["subjax"]["accuracy"] == 0.0
    assert rows["sleepy"]["median_s"] >= 0.02
    # one uncounted warm-up call, then `repeats` timed calls (the first made during warm-up)
    assert rows["sleepy"]["n"] == 4 and calls["slow"] == 5
    assert rows["sleepy"]["ratio"] < 1.0  # subjax's toy matmul is faster than 20 ms
    assert "peer exploded" in rows["broken"]["error"]
    md = bench.case_markdown(rec)
    assert "FAILED: RuntimeError: peer exploded" in md
    json.dumps(rec)  # JSON-able


def test_max_seconds_limits_rounds():
    case = bench.Case("slowcase", [bench.Contender("subjax", lambda: time.sleep(0.05))],
                      max_seconds=0.1)
    rec = bench.run_case(case, repeats=50, log=lambda *a: None)
    assert rec["rows"][0]["n"] <= 3


def test_scaled_contender_reports_measured_times_the_factor():
    calls = {"count": 0, "fast": 0}

    def fast():
        calls["fast"] += 1
        time.sleep(0.002)
        return np.zeros(1)

    def count():  # the untimed count runs once, after the warm-up
        calls["count"] += 1
        assert calls["fast"] >= 1
        return bench.Scale(50.0, lower_bound=True, what="per-step time x 50 steps (capped)")

    case = bench.Case(
        "scaled",
        [bench.Contender("subjax", lambda: time.sleep(0.004)),
         bench.Contender("peer", fast, scale=count),
         bench.Contender("fixed", fast, scale=bench.Scale(3.0))],
        warmup=False)
    rec = bench.run_case(case, repeats=3, log=lambda *a: None)
    rows = {r["contender"]: r for r in rec["rows"]}
    peer, fixed = rows["peer"], rows["fixed"]
    assert calls["count"] == 1
    assert calls["fast"] == 6  # no uncounted warm-up call: 3 timed calls each
    assert peer["median_s"] == peer["measured_median_s"] * 50.0
    assert peer["min_s"] >= 0.002 * 50.0
    assert peer["lower_bound"] and peer["ratio_bound"] == "<="
    assert peer["ratio"] == rows["subjax"]["median_s"] / peer["median_s"]
    assert fixed["median_s"] == fixed["measured_median_s"] * 3.0 and not fixed["lower_bound"]
    assert "ratio_bound" not in fixed
    md = bench.case_markdown(rec)
    assert "≤ " in md and "(scaled)" in md and "per-step time x 50 steps (capped)" in md
    json.dumps(rec)


def test_bad_scale_is_reported_as_failure():
    case = bench.Case("bad", [bench.Contender("subjax", lambda: 1),
                              bench.Contender("peer", lambda: 1, scale=lambda: 2.0)])
    rec = bench.run_case(case, repeats=1, log=lambda *a: None)
    row = {r["contender"]: r for r in rec["rows"]}["peer"]
    assert "Scale with factor > 0" in row["error"]
