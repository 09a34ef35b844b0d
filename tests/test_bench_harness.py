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
