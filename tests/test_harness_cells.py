"""Cell sweeps: cell-level resume, cache keys, validation tuning through cells, README blocks."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

from experiments import harness, stats
from experiments.data import digits


@dataclasses.dataclass(frozen=True)
class ToyConfig:
    seed: int = 0
    seeds: int = 4
    noise: float = 0.1
    lr_grid: tuple[float, ...] = (1e-3, 1e-2)
    budget: int = 6


class Toy(harness.CellExperiment):
    """Validation score peaks at lr = 0.1; method "b" is better by 0.5 on every seed."""

    name = "toy"
    title = "toy sweep"
    config_cls = ToyConfig
    figures = ("toy.png",)

    def __init__(self, directory=None, fail_on=None):
        self.calls = []
        self.fail_on = fail_on
        self._dir = directory

    @property
    def directory(self):
        return self._dir

    def run_cell(self, cfg, cell):
        self.calls.append(dict(cell))
        if self.fail_on is not None and cell == self.fail_on:
            raise RuntimeError("simulated crash")
        rng = np.random.default_rng(cell["seed"])
        score = -(np.log10(cell["lr"]) + 1.0) ** 2 + rng.normal() * cfg.noise
        return {"score": float(score + (0.5 if cell["method"] == "b" else 0.0))}

    def sweep(self, cfg, cells):
        seeds = range(cfg.seed, cfg.seed + cfg.seeds)
        tuned = {m: stats.tune(lambda lr, m=m: cells(method=m, lr=lr, seed=99)["score"],
                               cfg.lr_grid, budget=cfg.budget) for m in ("a", "b")}
        per = {m: [cells(method=m, lr=tuned[m].best, seed=s)["score"] for s in seeds]
               for m in ("a", "b")}
        cmp = stats.compare(per["b"], per["a"], quick=cells.quick)
        return {"tuned": {m: t.to_dict() for m, t in tuned.items()},
                "claims": [stats.claim("b beats a", "b is better", cmp, names=("b", "a"))],
                "tables": {"scores": [{"method": m, "score": stats.mean_ci(v).format()}
                                      for m, v in per.items()]}}

    def report(self, cfg, results, history, outdir):
        fig, ax = harness.new_figure(figsize=(2, 2))
        ax.plot([0, 1])
        return harness.save_figure(fig, outdir, "toy.png")


def _run(exp, root, cfg=None, mode="quick", **kw):
    return harness.run_experiment(exp, cfg or ToyConfig(), mode, root, progress=False,
                                  log=lambda m: None, **kw)


def test_interrupted_sweep_resumes_cell_by_cell(tmp_path):
    ref_exp = Toy()
    ref = _run(ref_exp, tmp_path / "ref")
    n_cells = len(ref_exp.calls)
    assert n_cells == len({json.dumps(c, sort_keys=True) for c in ref_exp.calls})

    exp = Toy()
    assert _run(exp, tmp_path / "run", stop_after=3) is None
    assert len(exp.calls) == 3
    assert len(list((tmp_path / "run" / "toy" / "quick" / "cells").glob("*.json"))) == 3
    crash = Toy(fail_on=ref_exp.calls[5])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(crash, tmp_path / "run")
    assert len(crash.calls) == 3  # cells 4 and 5 ran, the sixth crashed; 1-3 were read back
    again = Toy()
    out = _run(again, tmp_path / "run")
    assert len(again.calls) == n_cells - 5  # only the cells never finished
    assert out.results == ref.results and out.resumed_from == 5
    payload = json.loads((out.outdir / "results.json").read_text())
    assert payload["compute_s"] >= 0 and len(payload["history"]) == n_cells


def test_cache_key_ignores_the_seed_count_but_not_the_protocol(tmp_path):
    _run(Toy(), tmp_path)
    more_seeds = Toy()
    _run(more_seeds, tmp_path, ToyConfig(seeds=5))
    assert more_seeds.calls == [{"method": m, "lr": 0.1, "seed": 4} for m in ("a", "b")]
    other = Toy()
    _run(other, tmp_path, ToyConfig(noise=0.2))
    assert len(other.calls) > 2  # a protocol change invalidates every cell


def test_corrupt_cell_file_is_recomputed(tmp_path):
    _run(Toy(), tmp_path)
    victim = sorted((tmp_path / "toy" / "quick" / "cells").glob("*.json"))[0]
    victim.write_text('{"cell": ')
    exp, msgs = Toy(), []
    harness.run_experiment(exp, ToyConfig(), "quick", tmp_path, progress=False,
                           log=msgs.append)
    assert len(exp.calls) == 1 and any("unreadable" in m for m in msgs)


def test_sweep_tunes_on_validation_and_extends_the_grid(tmp_path):
    res = _run(Toy(), tmp_path).results
    for m in ("a", "b"):
        t = res["tuned"][m]
        assert t["best"] == pytest.approx(0.1) and not t["at_edge"]
        assert len(t["tried"]) <= ToyConfig.budget
    claim = res["claims"][0]
    assert claim["verdict"] == "held (indicative)"  # quick mode, and 4 seeds < 5
    assert claim["difference"]["lo"] > 0


def test_grid_override_reaches_the_cells():
    exp = Toy()
    harness.discover  # noqa: B018 - the registry is not needed for make_config
    cfg = harness.make_config(exp, "quick", {"lr_grid": "0.001,0.01,0.1", "budget": "8"})
    assert cfg.lr_grid == (0.001, 0.01, 0.1) and cfg.budget == 8


def test_publish_writes_summary_figures_and_readme_block(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "README.md").write_text("# toy\n\nProse.\n")
    exp = Toy(directory=src)
    _run(exp, tmp_path / "results", ToyConfig(seeds=5))
    with pytest.raises(harness.ConfigError, match="no full-mode results"):
        harness.publish(exp, tmp_path / "results")
    _run(exp, tmp_path / "results", ToyConfig(seeds=5), mode="full")
    spath = harness.publish(exp, tmp_path / "results")
    summary = json.loads(spath.read_text())
    assert "date" not in json.dumps(summary) and "environment" not in summary
    assert (src / "figures" / "toy.png").stat().st_size > 500
    text = (src / "README.md").read_text()
    assert text.startswith("# toy\n\nProse.\n\n## Results (full mode)\n\n" + harness.README_BEGIN)
    assert "| b beats a | b is better |" in text and "| held |" in text
    assert "![toy](figures/toy.png)" in text
    assert not harness.update_readme(exp, check=True)
    # hand edits inside the block are detected and overwritten; prose outside is kept
    (src / "README.md").write_text(text.replace("| held |", "| did not hold |") + "More.\n")
    assert harness.update_readme(exp, check=True)
    assert harness.update_readme(exp)
    assert (src / "README.md").read_text() == text + "More.\n"


def test_digits_splits_are_deterministic_stratified_and_disjoint():
    a, b, c = digits(0), digits(0), digits(1)
    assert np.array_equal(a.test.x, b.test.x) and np.array_equal(a.val.y, b.val.y)
    assert not np.array_equal(a.test.y, c.test.y)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    rows = {r.tobytes() for r in a.train.x} | {r.tobytes() for r in a.val.x}
    assert sum(r.tobytes() in rows for r in a.test.x) <= 5  # the data set has a few duplicates
    counts = np.bincount(a.test.y, minlength=10)
    assert counts.min() >= 50 and a.train.x.dtype == np.float32 and a.train.x.max() <= 1.0
    assert set(np.unique(a.train.classes([0, 1]).y)) == {0, 1}
    with pytest.raises(ValueError, match="`val` must be in"):
        digits(0, val=1.5)


def test_committed_readme_tables_match_their_summaries():
    """Every README with a committed summary equals its regenerated block."""
    for name, exp in harness.discover().items():
        if harness.summary_path(exp).exists():
            assert not harness.update_readme(exp, check=True), (
                f"{name}: README results block differs from `make readme-tables` output")


def test_root_readme_table_between_markers(tmp_path):
    src = tmp_path / "toy_dir"
    src.mkdir()
    exp = Toy(directory=src)
    _run(exp, tmp_path / "results", ToyConfig(seeds=5), mode="full")
    harness.publish(exp, tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    assert not harness.update_root_readme(readme, registry={"toy": exp})  # no markers
    readme.write_text(f"# x\n\n{harness.ROOT_BEGIN}\nstale\n{harness.ROOT_END}\nafter\n")
    assert harness.update_root_readme(readme, check=True, registry={"toy": exp})
    assert "stale" in readme.read_text()  # check writes nothing
    assert harness.update_root_readme(readme, registry={"toy": exp})
    text = readme.read_text()
    assert "| [toy](experiments/toy_dir/README.md) | b beats a |" in text
    assert text.endswith(f"{harness.ROOT_END}\nafter\n") and "stale" not in text
    assert not harness.update_root_readme(readme, registry={"toy": exp})


def test_committed_root_readme_table_matches_the_summaries():
    assert not harness.update_root_readme(check=True)


def test_readme_block_is_a_function_of_the_summary(tmp_path):
    exp = Toy(directory=tmp_path)
    summary = {"experiment": "toy", "mode": "full", "config": {"seeds": 10}, "compute_s": 600.0,
               "cpu_count": 2, "results": {"claims": [], "tables": {"t": [{"x": 1}]}}}
    block = harness.readme_block(exp, summary)
    assert block == harness.readme_block(exp, json.loads(json.dumps(summary)))
    assert "Time: 10.0 min for the full mode, 10 seeds on 2 CPU cores" in block
    assert pathlib.Path is not None


class Seeds(harness.SeedSweep):
    """One cell per seed and method; a table whose rows start with the wrong column."""

    name = "seeds"
    config_cls = ToyConfig
    methods = ("x", "y")
    lead_columns = ("method", "absent")

    def run_seed(self, cfg, seed, method=None):
        return {"v": 10 * seed + (method == "y")}

    def sweep(self, cfg, cells):
        return {"rows": self.seed_rows(cfg, cells),
                "tables": {"t": [{"score": 1, "method": "x"}, {"extra": 2, "method": "y"}]}}

    def report(self, cfg, results, history, outdir):
        return harness.results_markdown("", results, columns=self.table_columns)


def test_seed_sweep_runs_one_cell_per_seed_and_method(tmp_path):
    cfg = ToyConfig(seed=2, seeds=3)
    exp = Seeds()
    assert exp.expected_cells(cfg) == 6
    out = _run(exp, tmp_path / "m", cfg)
    assert out.results["rows"] == [{"x": {"v": 10 * s}, "y": {"v": 10 * s + 1}}
                                   for s in (2, 3, 4)]
    assert [h["cell"] for h in out.history][:2] == [{"seed": 2, "method": "x"},
                                                   {"seed": 2, "method": "y"}]
    single = Seeds()
    single.methods = ()
    assert single.expected_cells(cfg) == 3
    out = _run(single, tmp_path / "s", cfg)
    assert out.results["rows"] == [{"v": 10 * s} for s in (2, 3, 4)]
    assert [h["cell"] for h in out.history] == [{"seed": s} for s in (2, 3, 4)]


def test_lead_columns_order_the_report_and_readme_tables(tmp_path):
    exp = Seeds()
    rows = [{"score": 1, "method": "x"}, {"extra": 2, "method": "y"}]
    assert exp.table_columns(rows) == ["method", "score", "extra"]
    out = _run(exp, tmp_path, ToyConfig(seeds=1))
    head = "| method | score | extra |"
    assert head in (out.outdir / "report.md").read_text()
    summary = {"experiment": "seeds", "mode": "full", "config": {"seeds": 1},
               "results": json.loads(json.dumps(out.results, sort_keys=True)), "compute_s": 1.0}
    assert head in exp.readme_tables(summary)
