"""The README's generated benchmark table (`experiments/bench/headline.py`)."""

import json

import pytest

from experiments.bench import headline


def _record(suite="toy"):
    return {
        "suite": suite,
        "command": f"python -m experiments.bench {suite} --quick",
        "environment": {"date": "2026-01-02T03:04:05+00:00", "cpu_count": 2,
                        "jax_backend": "cpu", "versions": {"jax": "0.0.1"}},
        "loadavg_start": [9.0, 9.0, 9.0],
        "loadavg_end": [9.0, 9.0, 9.0],
        "cases": [{
            "case": "solve n=10",
            "reference": "subjax",
            "accuracy_label": "error",
            "rows": [
                {"contender": "subjax", "median_s": 0.002, "ratio": 1.0, "accuracy": 1e-7},
                {"contender": "subjax variant", "median_s": 0.003, "ratio": 0.67},
                {"contender": "peer", "median_s": 0.004, "ratio": 0.5, "accuracy": 1e-3},
                {"contender": "broken peer", "error": "ImportError: missing"},
            ],
        }],
    }


def test_rows_are_peers_with_ratio_and_accuracy():
    rows = headline.headline_rows(_record())
    assert [r["peer"] for r in rows] == ["peer", "broken peer"]
    assert rows[0]["ratio"] == 0.5 and rows[0]["reference_s"] == 0.002
    assert rows[0]["reference_accuracy"] == 1e-7 and rows[0]["peer_accuracy"] == 1e-3
    assert rows[1]["failed"] and rows[1]["ratio"] is None


def test_render_states_command_date_and_ratio():
    text = headline.render([_record()])
    assert "`python -m experiments.bench toy --quick`, measured 2026-01-02" in text
    assert "| solve n=10 | subjax | peer | 0.5x | 2 ms | 4 ms | 1e-07 / 0.001 |" in text
    assert "| broken peer | failed |" in text
    assert "Accuracy: error." in text


def test_publish_drops_load_and_rewrites_block(tmp_path):
    results, reference = tmp_path / "results", tmp_path / "ref"
    results.mkdir()
    (results / "toy.json").write_text(json.dumps(_record()))
    assert headline.publish(results, reference) == ["toy"]
    stored = json.loads((reference / "toy.json").read_text())
    assert "loadavg_start" not in stored and stored["cases"] == _record()["cases"]

    readme = f"# x\n\n{headline.BEGIN}\nold\n{headline.END}\n\nafter\n"
    new = headline.replace_block(readme, headline.block(headline.load_records(reference)))
    assert new.startswith("# x\n\n") and new.endswith("\n\nafter\n")
    assert "old" not in new and "| solve n=10 |" in new


def test_replace_block_needs_markers():
    with pytest.raises(ValueError, match="markers"):
        headline.replace_block("no markers here", "block")


def test_readme_block_matches_committed_records():
    text = headline.README.read_text()
    expected = headline.block(headline.load_records(headline.REFERENCE_DIR))
    assert headline.replace_block(text, expected) == text, (
        "README.md's benchmark block differs from docs/benchmarks/*.json: "
        "run `make bench-publish`")


def test_peer_with_a_dtype_tag_is_compared_with_the_same_dtype():
    """``scipy eigsh f64`` against ``subjax f64`` (not the float32 reference), a
    product row against the subjax product row, an untagged peer against the
    reference; the ratio is recomputed for a side other than the reference."""
    def row(name, t):
        return {"contender": name, "median_s": t, "ratio": 1.0 / t}

    record = {"suite": "s", "cases": [{
        "case": "c", "reference": "subjax", "accuracy_label": "err",
        "rows": [row("subjax", 1.0), row("subjax f64", 2.0), row("subjax 10 matvecs f64", 0.1),
                 row("scipy eigsh f64", 4.0), row("scipy eigsh f32", 2.0),
                 row("jax BCOO 10 matvecs f64", 0.4), row("ott Sinkhorn", 8.0)]}]}
    got = {r["peer"]: (r["reference"], r["ratio"]) for r in headline.headline_rows(record)}
    assert got["scipy eigsh f64"] == ("subjax f64", 0.5)
    assert got["scipy eigsh f32"] == ("subjax", 0.5)
    assert got["jax BCOO 10 matvecs f64"] == ("subjax 10 matvecs f64", 0.25)
    assert got["ott Sinkhorn"] == ("subjax", 0.125)
