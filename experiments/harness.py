"""The experiment harness: seeded configs, resumable runs, reports, README tables.

An experiment is a subclass of :class:`Experiment` whose instance is exported as
``EXPERIMENT`` from ``experiments/<dir>/experiment.py``. Most reproductions are
sweeps of independent *cells* (one method, one hyperparameter value, one seed):
those subclass :class:`CellExperiment`, and each cell's result is cached as JSON
under ``results/<name>/<mode>/cells/`` so an interrupted sweep resumes cell by
cell. Experiments that carry long-lived state from step to step subclass
:class:`Experiment` directly and are checkpointed with orbax. The harness gives
every experiment:

- ``--quick`` / ``--full`` modes (config overrides declared by the experiment) and
  ``--set key=value`` overrides, validated against the config dataclass *before*
  anything is written;
- a progress bar over the steps;
- orbax ``CheckpointManager`` checkpoints every ``checkpoint_every`` steps. A run
  killed mid-way and restarted with the same command resumes from the last
  checkpoint and ends with the same results as an uninterrupted run (``step`` is a
  deterministic function of ``(cfg, state, i)``). Each checkpoint carries a
  SHA-256 manifest of its files; a corrupted or partial latest checkpoint is
  detected, reported, discarded, and the previous one is used;
- results as JSON (``results.json``), a markdown report (``report.md``) and PNG
  plots under ``results/<name>/<mode>/``; ``results/REPORT.md`` opens with one
  table over every experiment's claims (claim, paper figure, our figure with its
  confidence interval, verdict, time) and collects the reports;
- ``publish``: a full-mode run's summary (``experiments/<name>/results/summary.json``)
  and reference figures (``experiments/<name>/figures/``) committed with the code,
  and the README's results block regenerated from them (``make readme-tables``).

Claims, intervals and verdicts follow ``experiments/stats.py`` (``docs/reproductions.md``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
import math
import os
import pathlib
import platform
import shutil
import sys
import time
import typing
from collections.abc import Mapping
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXPERIMENTS_DIR = ROOT / "experiments"
DEFAULT_RESULTS = ROOT / "results"
MODES = ("quick", "full")
_MANIFEST = "subjax_manifest.json"


class ConfigError(ValueError):
    """A bad experiment name or configuration value given on the command line."""


class Experiment:
    """Base class of a reproducible experiment. See ``docs/CONTRIBUTING.md``.

    Subclasses set ``name``, ``title``, ``config_cls`` (a frozen dataclass with a
    ``seed`` field), ``quick`` / ``full`` overrides and ``checkpoint_every``, and
    implement :meth:`num_steps`, :meth:`init_state`, :meth:`step`,
    :meth:`summarize` and :meth:`report`.
    """

    name: str = ""
    title: str = ""
    config_cls: type = None  # type: ignore[assignment]
    quick: Mapping[str, Any] = {}
    full: Mapping[str, Any] = {}
    checkpoint_every: int = 1

    def num_steps(self, cfg) -> int:
        raise NotImplementedError

    def init_state(self, cfg):
        """Pytree of arrays carried from step to step (checkpointed)."""
        return {}

    def step(self, cfg, state, i: int):
        """Run step ``i``; return ``(new_state, metrics)`` with JSON-able metrics."""
        raise NotImplementedError

    def summarize(self, cfg, state, history: list[dict]) -> dict:
        """Final results (JSON-able) from the last state and every step's metrics."""
        return {"final": history[-1] if history else {}}

    def report(self, cfg, results: dict, history: list[dict], outdir: pathlib.Path) -> str:
        """Write plots into ``outdir``; return markdown that links them by file name."""
        return markdown_table([results]) if results else ""

    #: file names (written by :meth:`report`) published as reference figures.
    figures: tuple[str, ...] = ()

    #: columns that lead every result table, in this order; the others follow in the
    #: order of the rows' keys (a published summary stores them sorted).
    lead_columns: tuple[str, ...] = ()

    def table_columns(self, rows: list[Mapping[str, Any]]) -> list[str]:
        """Column order of a result table: :attr:`lead_columns` first, then the rest."""
        keys = list(dict.fromkeys(k for r in rows for k in r))
        return [k for k in self.lead_columns if k in keys] + [
            k for k in keys if k not in self.lead_columns]

    @property
    def directory(self) -> pathlib.Path | None:
        """The experiment's source folder, ``experiments/<dir>/``."""
        mod = sys.modules.get(type(self).__module__)
        if mod is None or getattr(mod, "__file__", None) is None:
            return None
        return pathlib.Path(mod.__file__).parent

    @property
    def readme(self) -> pathlib.Path | None:
        d = self.directory
        path = None if d is None else d / "README.md"
        return path if path is not None and path.exists() else None

    def readme_tables(self, summary: dict) -> str:
        """Markdown of the README's generated block from a published ``summary``.

        The default renders the claims table, then every table in
        ``summary["results"]["tables"]`` (``{title: [row, ...]}``, columns in the
        order of :meth:`table_columns`), then the time the run took. Override to add
        experiment-specific tables.
        """
        return results_markdown("", summary.get("results", {}), run_cost(summary),
                                columns=self.table_columns).strip()


class CellExperiment(Experiment):
    """A sweep of independent cells, each cached as JSON (resumable cell by cell).

    Subclasses implement :meth:`run_cell` (one cell: a JSON-able dict of its
    coordinates -> a JSON-able dict of results) and :meth:`sweep`, which requests
    cells through the :class:`Cells` it is given (``cells(method="x", seed=3)``)
    and returns the final results. Cells already computed for the same config are
    read back instead of run. A cell's cache key covers the experiment name,
    the config without :attr:`sweep_fields`, and the cell's coordinates.
    """

    #: config fields that decide which cells run but not what a cell computes
    #: (the seed count): changing them keeps the cached cells valid.
    sweep_fields: tuple[str, ...] = ("seeds",)

    def run_cell(self, cfg, cell: dict) -> dict:
        raise NotImplementedError

    def sweep(self, cfg, cells: Cells) -> dict:
        raise NotImplementedError

    def expected_cells(self, cfg) -> int | None:
        """Number of cells a sweep will request (for the progress bar), if known."""
        return None


class SeedSweep(CellExperiment):
    """A sweep of one cell per seed, or one per seed and method when :attr:`methods`
    is set: ``cfg.seeds`` seeds from ``cfg.seed``. Subclasses implement
    :meth:`run_seed` and build their results from :meth:`seed_rows`."""

    #: methods run as separate cells of each seed (empty: one cell per seed).
    methods: tuple[str, ...] = ()

    def run_seed(self, cfg, seed: int, method: str | None = None) -> dict:
        """One cell: ``seed`` (and ``method`` when :attr:`methods` is set)."""
        raise NotImplementedError

    def expected_cells(self, cfg) -> int:
        return cfg.seeds * max(1, len(self.methods))

    def run_cell(self, cfg, cell: dict) -> dict:
        if self.methods:
            return self.run_seed(cfg, cell["seed"], cell["method"])
        return self.run_seed(cfg, cell["seed"])

    def seed_rows(self, cfg, cells: Cells) -> list:
        """Every cell's result in seed order (``{method: result}`` per seed when
        :attr:`methods` is set)."""
        seeds = range(cfg.seed, cfg.seed + cfg.seeds)
        if self.methods:
            return [{m: cells(seed=s, method=m) for m in self.methods} for s in seeds]
        return [cells(seed=s) for s in seeds]


# --------------------------------------------------------------------------- registry


#: ``{module: error}`` of the experiment modules that failed to import in :func:`discover`.
BROKEN: dict[str, str] = {}


def discover() -> dict[str, Experiment]:
    """Import every ``experiments/*/experiment.py`` and return ``{name: EXPERIMENT}``.

    A module that fails to import is left out and its error kept in :data:`BROKEN`
    (one broken experiment does not stop the others from running; ``reproduce``
    reports it as failed).
    """
    found: dict[str, Experiment] = {}
    BROKEN.clear()
    for path in sorted(EXPERIMENTS_DIR.glob("*/experiment.py")):
        modname = f"experiments.{path.parent.name}.experiment"
        try:
            mod = importlib.import_module(modname)
        except Exception as err:  # an import error in one experiment's dependencies
            BROKEN[modname] = f"{type(err).__name__}: {err}"
            continue
        exp = getattr(mod, "EXPERIMENT", None)
        if not isinstance(exp, Experiment):
            raise TypeError(f"{modname} must define EXPERIMENT, an Experiment instance")
        if not exp.name:
            raise TypeError(f"{modname}: EXPERIMENT.name is empty")
        if exp.name in found:
            raise TypeError(f"duplicate experiment name {exp.name!r} in {modname}")
        found[exp.name] = exp
    return found


def get_experiment(name: str) -> Experiment:
    registry = discover()
    if name not in registry:
        known = ", ".join(sorted(registry)) or "(none)"
        broken = "".join(f"; {m} failed to import ({e})" for m, e in sorted(BROKEN.items()))
        raise ConfigError(f"unknown experiment {name!r}; known experiments: {known}{broken}")
    return registry[name]


# --------------------------------------------------------------------------- configs


def _parse_value(raw: str, typ, key: str):
    origin = typing.get_origin(typ)
    if origin is typing.Union or origin is getattr(__import__("types"), "UnionType", None):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if raw.lower() in ("none", "null"):
            return None
        typ = args[0]
        origin = typing.get_origin(typ)
    if origin in (tuple, list):
        args = typing.get_args(typ)
        elem = args[0] if args else str
        parts = [p for p in raw.split(",") if p.strip()]
        vals = tuple(_parse_value(p.strip(), elem, key) for p in parts)
        return vals if origin is tuple else list(vals)
    try:
        if typ is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if typ is int:
            return int(raw)
        if typ is float:
            val = float(raw)
            if not math.isfinite(val):
                raise ValueError(raw)
            return val
        if typ is str:
            return raw
    except ValueError:
        raise ConfigError(
            f"bad value {raw!r} for config key {key!r}: expected {getattr(typ, '__name__', typ)}"
        ) from None
    raise ConfigError(f"config key {key!r} has unsupported type {typ!r} for --set")


def make_config(exp: Experiment, mode: str = "quick", overrides: Mapping[str, str] | None = None):
    """Build the config of ``exp`` for ``mode`` with string ``overrides`` applied.

    Raises :class:`ConfigError` naming the offending key on an unknown key, an
    unparsable value, or a value the config itself rejects (``__post_init__``).
    """
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")
    cls = exp.config_cls
    if cls is None or not dataclasses.is_dataclass(cls):
        raise TypeError(f"experiment {exp.name!r}: config_cls must be a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = dict(exp.quick if mode == "quick" else exp.full)
    for key in values:
        if key not in fields:
            raise TypeError(
                f"experiment {exp.name!r}: {mode} override {key!r} is not a config field"
            )
    for key, raw in (overrides or {}).items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key {key!r} for experiment {exp.name!r}; "
                f"known keys: {', '.join(sorted(fields))}"
            )
        values[key] = _parse_value(str(raw), hints[key], key)
    try:
        return cls(**values)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid config for experiment {exp.name!r}: {err}") from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        k, v = pair.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def config_dict(cfg) -> dict:
    return jsonable(dataclasses.asdict(cfg))


def config_hash(exp: Experiment, cfg) -> str:
    blob = json.dumps({"name": exp.name, "config": config_dict(cfg)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- utilities


def jsonable(x):
    """Convert numpy / jax scalars and arrays, tuples and dataclasses to JSON types."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return jsonable(dataclasses.asdict(x))
    if isinstance(x, Mapping):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        v = float(x)
        return v if math.isfinite(v) else str(v)
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        arr = np.asarray(x)
        return jsonable(arr.item() if arr.ndim == 0 else arr.tolist())
    if x is None or isinstance(x, str):
        return x
    return str(x)


def _atomic_write(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def environment() -> dict:
    """Machine and library versions, recorded with every result."""
    import jax

    versions = {}
    for mod in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "scipy"):
        try:
            m = importlib.import_module(mod)
            versions[mod] = getattr(m, "__version__", "?")
        except Exception:  # pragma: no cover - optional
            versions[mod] = "missing"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "versions": versions,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def markdown_table(rows: list[Mapping[str, Any]], columns: list[str] | None = None,
                   floatfmt: str = ".4g") -> str:
    """Render a list of dicts as a markdown table."""
    if not rows:
        return ""
    if columns is None:
        columns = []
        for r in rows:
            for k in r:
                if k not in columns:
                    columns.append(k)

    def fmt(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        if isinstance(v, (list, tuple)):
            return ", ".join(fmt(x) for x in v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- checkpoints


def _file_digests(step_dir: pathlib.Path) -> dict[str, str]:
    out = {}
    for p in sorted(step_dir.rglob("*")):
        if p.is_file() and p.name != _MANIFEST:
            out[str(p.relative_to(step_dir))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


class _Checkpoints:
    """Orbax CheckpointManager plus a SHA-256 manifest per step for integrity."""

    def __init__(self, directory: pathlib.Path, max_to_keep: int = 3):
        import orbax.checkpoint as ocp

        self._ocp = ocp
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=max_to_keep,
                enable_async_checkpointing=False,
                create=True,
            ),
            item_names=("state", "meta"),
        )

    def save(self, step: int, state, meta: dict) -> None:
        ocp = self._ocp
        payload = {"completed": np.asarray(step, np.int64), "state": state}
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(payload), meta=ocp.args.JsonSave(jsonable(meta))
            ),
            force=True,
        )
        self.manager.wait_until_finished()
        step_dir = self._step_dir(step)
        _atomic_write(step_dir / _MANIFEST, json.dumps(_file_digests(step_dir), indent=0))

    def _step_dir(self, step: int) -> pathlib.Path:
        return self.directory / str(step)

    def _verify(self, step: int) -> str | None:
        step_dir = self._step_dir(step)
        manifest = step_dir / _MANIFEST
        if not manifest.exists():
            return "its integrity manifest is missing (the save did not finish)"
        try:
            expected = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            return "its integrity manifest is unreadable"
        actual = _file_digests(step_dir)
        if actual != expected:
            bad = sorted(k for k in set(expected) | set(actual) if expected.get(k) != actual.get(k))
            return f"{len(bad)} file(s) differ from the manifest (e.g. {bad[0]})"
        return None

    def restore_latest(self, template_state, log) -> tuple[int, Any, dict] | None:
        """Restore the newest readable checkpoint, discarding corrupt ones."""
        ocp = self._ocp
        self.manager.reload()
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = self._verify(step)
            if problem is None:
                try:
                    template = {"completed": np.asarray(0, np.int64), "state": template_state}
                    restored = self.manager.restore(
                        step,
                        args=ocp.args.Composite(
                            state=ocp.args.StandardRestore(template), meta=ocp.args.JsonRestore()
                        ),
                    )
                    payload, meta = restored["state"], restored["meta"]
                    if int(payload["completed"]) != step:
                        raise ValueError("step counter inside the checkpoint does not match")
                    return step, payload["state"], dict(meta)
                except Exception as err:  # orbax raises many types on damaged files
                    problem = f"restoring it failed ({type(err).__name__}: {str(err)[:200]})"
            log(f"checkpoint at step {step} is corrupt or partial: {problem}; discarding it "
                "and trying the previous one")
            shutil.rmtree(self._step_dir(step), ignore_errors=True)
            self.manager.reload()
        return None

    def close(self):
        self.manager.close()


# --------------------------------------------------------------------------- cells


class _StopSweep(Exception):
    """Raised by :class:`Cells` after ``stop_after`` newly computed cells."""


def cell_key(exp: Experiment, cfg, cell: Mapping[str, Any]) -> str:
    """The cache key of ``cell``: name, config (without ``sweep_fields``), coordinates."""
    skip = set(getattr(exp, "sweep_fields", ()))
    conf = {k: v for k, v in config_dict(cfg).items() if k not in skip}
    blob = json.dumps({"name": exp.name, "config": conf, "cell": jsonable(dict(cell))},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Cells:
    """Runs the cells a sweep asks for, caching each result as one JSON file.

    ``cells(**coords)`` returns the cell's result dict: read from
    ``directory/<key>.json`` when present and readable, else computed with
    ``exp.run_cell(cfg, coords)`` and written atomically. ``records`` lists every
    requested cell in request order (``{"cell", "result", "elapsed_s", "cached"}``).
    """

    def __init__(self, exp: CellExperiment, cfg, directory: pathlib.Path, *, log=print,
                 stop_after: int | None = None, progress: bool = False, mode: str = "quick"):
        self.exp, self.cfg, self.directory = exp, cfg, pathlib.Path(directory)
        self.mode = mode
        #: verdicts of this sweep are indicative (quick mode): pass to ``stats.compare``.
        self.quick = mode != "full"
        self.directory.mkdir(parents=True, exist_ok=True)
        self.log, self.stop_after = log, stop_after
        self.records: list[dict] = []
        self._seen: dict[str, dict] = {}
        self.computed = 0
        self.cached = 0
        self._bar = _progress(exp.expected_cells(cfg), 0, exp.name, progress)

    def _read(self, path: pathlib.Path, coords: dict) -> dict | None:
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
            if rec.get("cell") != coords or not isinstance(rec.get("result"), dict):
                raise ValueError("its coordinates or result do not match")
            return rec
        except (json.JSONDecodeError, ValueError, AttributeError) as err:
            self.log(f"cached cell {path.name} is unreadable ({err}); recomputing it")
            return None

    def __call__(self, **coords) -> dict:
        coords = jsonable(coords)
        key = cell_key(self.exp, self.cfg, coords)
        if key in self._seen:
            return self._seen[key]["result"]
        path = self.directory / f"{key}.json"
        rec = self._read(path, coords)
        if rec is None:
            if self.stop_after is not None and self.computed >= self.stop_after:
                raise _StopSweep
            t0 = time.perf_counter()
            result = jsonable(self.exp.run_cell(self.cfg, dict(coords)))
            if not isinstance(result, dict):
                raise TypeError(f"{self.exp.name}: run_cell must return a dict, got "
                                f"{type(result).__name__}")
            rec = {"cell": coords, "result": result,
                   "elapsed_s": time.perf_counter() - t0}
            _atomic_write(path, json.dumps(rec, indent=1))
            self.computed += 1
            rec = dict(rec, cached=False)
        else:
            self.cached += 1
            rec = dict(rec, cached=True)
        self._seen[key] = rec
        self.records.append(rec)
        self._bar.update(1)
        return rec["result"]

    def map(self, coords: list[Mapping[str, Any]]) -> list[dict]:
        """Results of several cells, in order."""
        return [self(**dict(c)) for c in coords]

    @property
    def compute_s(self) -> float:
        """Seconds spent computing every requested cell (cached ones included)."""
        return float(sum(r.get("elapsed_s", 0.0) for r in self.records))

    def close(self):
        self._bar.close()


def _run_cells(exp: CellExperiment, cfg, outdir: pathlib.Path, *, fresh: bool, progress: bool,
               stop_after: int | None, log, mode: str) -> tuple[dict, list, int, float] | None:
    directory = outdir / "cells"
    if fresh and directory.exists():
        shutil.rmtree(directory)
    cells = Cells(exp, cfg, directory, log=log, stop_after=stop_after, progress=progress,
                  mode=mode)
    try:
        results = exp.sweep(cfg, cells)
    except _StopSweep:
        log(f"stopping after {cells.computed} new cells as asked (--stop-after); "
            "run again to resume")
        return None
    finally:
        cells.close()
    if cells.cached:
        log(f"{cells.cached} of {len(cells.records)} cells read back from {directory}")
    history = [{k: r[k] for k in ("cell", "result", "elapsed_s")} for r in cells.records]
    return jsonable(results), history, cells.cached, cells.compute_s


# --------------------------------------------------------------------------- running


@dataclasses.dataclass
class RunOutcome:
    name: str
    mode: str
    outdir: pathlib.Path
    results: dict
    history: list
    resumed_from: int
    elapsed_s: float


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                mininterval=0.5, dynamic_ncols=True, file=sys.stderr)


def run_experiment(
    exp: Experiment,
    cfg,
    mode: str,
    results_root: pathlib.Path = DEFAULT_RESULTS,
    *,
    fresh: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
    throttle: float = 0.0,
    keep_checkpoints: bool = False,
    log=None,
) -> RunOutcome | None:
    """Run (or resume) ``exp`` with config ``cfg``; write results and report.

    Args:
      exp, cfg, mode: the experiment, its config and the mode label.
      results_root: ``results/``; output goes to ``results_root/<name>/<mode>/``.
      fresh: ignore (and delete) existing checkpoints of this config.
      progress: show a progress bar.
      stop_after: stop after this many completed steps without writing results
        (a clean interruption; the checkpoints stay, the next run resumes).
      throttle: seconds to sleep after each step (testing aid).
      keep_checkpoints: keep checkpoints after a completed run.
      log: callable for messages (default: print to stderr).

    Returns:
      the outcome, or ``None`` when stopped early by ``stop_after``.
    """
    import jax

    log = log or (lambda msg: print(f"[{exp.name}] {msg}", file=sys.stderr, flush=True))
    outdir = pathlib.Path(results_root) / exp.name / mode
    if isinstance(exp, CellExperiment):
        t0 = time.perf_counter()
        swept = _run_cells(exp, cfg, outdir, fresh=fresh, progress=progress,
                           stop_after=stop_after, log=log, mode=mode)
        if swept is None:
            return None
        results, history, cached, compute_s = swept
        return _finish(exp, cfg, mode, outdir, results, history, cached,
                       time.perf_counter() - t0, log, compute_s=compute_s)
    ckpt_dir = outdir / f"checkpoints-{config_hash(exp, cfg)}"
    every = int(getattr(cfg, "checkpoint_every", exp.checkpoint_every))
    if every < 1:
        raise ConfigError(f"checkpoint_every must be >= 1, got {every}")
    n_steps = int(exp.num_steps(cfg))
    if fresh and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)

    t0 = time.perf_counter()
    state = exp.init_state(cfg)
    history: list[dict] = []
    start = 0
    ckpts = _Checkpoints(ckpt_dir)
    restored = ckpts.restore_latest(state, log)
    if restored is not None:
        start, state, meta = restored
        history = list(meta.get("history", []))
        if len(history) != start:
            raise RuntimeError(f"checkpoint history has {len(history)} rows for step {start}")
        log(f"resumed from checkpoint at step {start}/{n_steps} ({ckpt_dir})")

    bar = _progress(n_steps, start, exp.name, progress)
    try:
        for i in range(start, n_steps):
            state, metrics = exp.step(cfg, state, i)
            state = jax.block_until_ready(state)
            history.append(jsonable(metrics))
            bar.update(1)
            if throttle:
                time.sleep(throttle)
            done = i + 1
            if done % every == 0 or done == n_steps:
                ckpts.save(done, state, {"history": history, "config": config_dict(cfg)})
            if stop_after is not None and done >= stop_after and done < n_steps:
                log(f"stopping after step {done} as asked (--stop-after); run again to resume")
                return None
    finally:
        bar.close()
        ckpts.close()

    results = jsonable(exp.summarize(cfg, state, history))
    out = _finish(exp, cfg, mode, outdir, results, history, start,
                  time.perf_counter() - t0, log)
    if not keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    return out


def _finish(exp, cfg, mode, outdir, results, history, resumed_from, elapsed, log,
            compute_s=None) -> RunOutcome:
    """Write ``results.json`` and ``report.md``.

    ``compute_s`` is the time the whole run costs from scratch: for a sweep the
    sum over its cells (cached cells count with the time they took when they ran),
    else the wall time of this run.
    """
    payload = {
        "experiment": exp.name,
        "title": exp.title,
        "mode": mode,
        "config": config_dict(cfg),
        "results": results,
        "history": history,
        "resumed_from": resumed_from,
        "elapsed_s": elapsed,
        "compute_s": elapsed if compute_s is None else compute_s,
        "environment": environment(),
    }
    outdir.mkdir(parents=True, exist_ok=True)
    _atomic_write(outdir / "results.json", json.dumps(payload, indent=1))
    md = exp.report(cfg, results, history, outdir)
    _atomic_write(outdir / "report.md", md)
    log(f"done in {elapsed:.1f}s -> {outdir}")
    return RunOutcome(exp.name, mode, outdir, results, history, resumed_from, elapsed)


# --------------------------------------------------------------------------- report


def _rel_images(md: str, prefix: str) -> str:
    """Rewrite ``![alt](file.png)`` links of a per-experiment report under ``prefix``."""
    import re

    def sub(m):
        target = m.group(2)
        if "://" in target or target.startswith("/"):
            return m.group(0)
        return f"![{m.group(1)}]({prefix}/{target})"

    return re.sub(r"!\[([^\]]*)\]\(([^)]+)\)", sub, md)


CLAIM_COLUMNS = ["experiment", "claim", "paper figure", "our figure (95% CI)", "verdict",
                 "time"]


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def claims_table(claims: list[Mapping[str, Any]], experiment: str | None = None,
                 time_s: float | None = None) -> str:
    """The claims table (see :func:`experiments.stats.claim`); with ``experiment`` the
    rows carry its name and run time, as in ``results/REPORT.md``."""
    rows = []
    for c in claims:
        row = {"claim": c["claim"], "paper figure": c["paper"],
               "our figure (95% CI)": c["ours"], "verdict": c["verdict"]}
        if experiment is not None:
            row["experiment"] = experiment
            row["time"] = "" if time_s is None else _duration(time_s)
        rows.append(row)
    cols = CLAIM_COLUMNS if experiment is not None else CLAIM_COLUMNS[1:5]
    return markdown_table(rows, cols)


def results_markdown(intro: str, results: Mapping[str, Any], *images: str,
                     columns=None) -> str:
    """The standard body of a ``report.md``: an intro line, the claims table, every
    table of ``results["tables"]`` and the image links (or any closing lines).

    ``columns`` maps a table's rows to its column order
    (:meth:`Experiment.table_columns`); ``None`` keeps the rows' key order.
    """
    parts = [intro] if intro else []
    if results.get("claims"):
        parts.append(claims_table(results["claims"]))
    parts += [f"**{t}**\n\n{markdown_table(r, None if columns is None else columns(r))}"
              for t, r in (results.get("tables") or {}).items()]
    parts += list(images)
    return "\n\n".join(parts) + "\n"


def run_cost(summary: Mapping[str, Any]) -> str:
    """One line: the mode, the seed count and the time the run takes from scratch."""
    secs = float(summary.get("compute_s", summary.get("elapsed_s", 0.0)))
    seeds = summary.get("config", {}).get("seeds")
    cpus = summary.get("cpu_count")
    what = f"{summary.get('mode', '?')} mode" + (f", {seeds} seeds" if seeds else "")
    where = f" on {cpus} CPU cores" if cpus else ""
    cmd = f"make reproduce-{summary['experiment']}" + (
        " FULL=1" if summary.get("mode") == "full" else "")
    return f"Time: {_duration(secs)} for the {what}{where} (`{cmd}`)."


def write_report(results_root: pathlib.Path = DEFAULT_RESULTS, mode: str = "quick",
                 failures: Mapping[str, str] | None = None) -> pathlib.Path:
    """Write ``results/REPORT.md``: the claims table over every experiment, then each
    experiment's ``report.md`` with its plots."""
    results_root = pathlib.Path(results_root)
    registry = discover()
    failures = dict(failures or {})
    rows, sections = [], []
    for modname, err in sorted(BROKEN.items()):
        rows.append({"experiment": modname, "claim": "", "paper figure": "",
                     "our figure (95% CI)": "", "verdict": "FAILED (import)", "time": ""})
        sections.append(f"## {modname} — FAILED to import\n\n```\n{err}\n```\n")
    for name, exp in sorted(registry.items()):
        outdir = results_root / name / mode
        res_path, md_path = outdir / "results.json", outdir / "report.md"
        readme = exp.readme
        readme_link = os.path.relpath(readme, results_root) if readme else ""
        blank = {"experiment": name, "claim": exp.title, "paper figure": "",
                 "our figure (95% CI)": "", "time": ""}
        if name in failures:
            rows.append(dict(blank, verdict="FAILED"))
            sections.append(f"## {name} — FAILED\n\n```\n{failures[name]}\n```\n")
            continue
        if not res_path.exists() or not md_path.exists():
            rows.append(dict(blank, verdict="not run"))
            continue
        payload = json.loads(res_path.read_text())
        secs = float(payload.get("compute_s", payload.get("elapsed_s", 0.0)))
        claims = (payload.get("results") or {}).get("claims") or []
        if claims:
            for c in claims:
                rows.append({"experiment": name, "claim": c["claim"], "paper figure": c["paper"],
                             "our figure (95% CI)": c["ours"], "verdict": c["verdict"],
                             "time": _duration(secs)})
        else:
            rows.append(dict(blank, verdict="no computed verdict (see its report)",
                             time=_duration(secs)))
        body = _rel_images(md_path.read_text(), f"{name}/{mode}")
        head = f"## {name}: {exp.title}\n\n"
        if readme_link:
            head += f"Claim, protocol and discussion: [{readme_link}]({readme_link}).\n\n"
        sections.append(head + body.strip() + "\n")
    env = environment()
    text = [
        "# subjax reproduction report",
        "",
        markdown_table(rows, CLAIM_COLUMNS),
        "",
        f"Mode: `{mode}`"
        + (" (verdicts from quick runs are indicative)" if mode == "quick" else "")
        + f". Generated {env['date']} on {env['platform']} "
        f"({env['cpu_count']} cpus, JAX {env['versions'].get('jax')} on {env['jax_backend']}). "
        "Verdicts follow docs/reproductions.md. Regenerate with `make reproduce` (quick) or "
        "`make reproduce-<name> FULL=1`.",
        "",
    ]
    bench = results_root / "bench" / "BENCH.md"
    if bench.exists():
        text += ["Benchmarks: see [bench/BENCH.md](bench/BENCH.md) (`make bench`).", ""]
    text += sections
    results_root.mkdir(parents=True, exist_ok=True)
    out = results_root / "REPORT.md"
    _atomic_write(out, "\n".join(text))
    return out


# --------------------------------------------------------------------------- README tables

README_BEGIN = ("<!-- results: generated by `make readme-tables` from results/summary.json "
                "and figures/; do not edit by hand -->")
README_END = "<!-- end of generated results -->"


def summary_path(exp: Experiment) -> pathlib.Path:
    return exp.directory / "results" / "summary.json"


def readme_block(exp: Experiment, summary: dict) -> str:
    """The generated README block (markers included) for a published ``summary``."""
    body = exp.readme_tables(summary).strip()
    figdir = exp.directory / "figures"
    links = [f"![{pathlib.Path(f).stem.replace('_', ' ')}](figures/{f})" for f in exp.figures
             if (figdir / f).exists()]
    if links:
        body += "\n\n" + "\n\n".join(links)
    return f"{README_BEGIN}\n\n{body}\n\n{README_END}"


def render_readme(exp: Experiment, text: str, summary: dict) -> str:
    """``text`` with its generated block replaced (or appended under a Results heading)."""
    block = readme_block(exp, summary)
    if README_BEGIN in text:
        head, rest = text.split(README_BEGIN, 1)
        if README_END not in rest:
            raise ValueError(f"{exp.readme}: generated block has no end marker")
        tail = rest.split(README_END, 1)[1]
        return head + block + tail
    return text.rstrip("\n") + "\n\n## Results (full mode)\n\n" + block + "\n"


def update_readme(exp: Experiment, check: bool = False) -> bool:
    """Regenerate ``exp``'s README block from its committed summary.

    Returns True when the README changed (with ``check``, when it would change;
    nothing is written). An experiment with no published summary is left alone.
    """
    spath = summary_path(exp)
    if exp.directory is None or not spath.exists():
        return False
    readme = exp.directory / "README.md"
    text = readme.read_text() if readme.exists() else f"# {exp.name}\n"
    new = render_readme(exp, text, json.loads(spath.read_text()))
    if new == text:
        return False
    if not check:
        _atomic_write(readme, new)
    return True


ROOT_BEGIN = ("<!-- reproductions: generated by `make readme-tables` from "
              "experiments/*/results/summary.json; do not edit by hand -->")
ROOT_END = "<!-- end of generated reproductions -->"


def reproductions_table(registry: Mapping[str, Experiment] | None = None) -> str:
    """One table over every published summary: experiment, claim, ours, verdict, time."""
    rows = []
    for name, exp in sorted((registry or discover()).items()):
        if exp.directory is None:
            continue
        if not summary_path(exp).exists():
            rows.append({"experiment": f"[{name}](experiments/{exp.directory.name}/README.md)",
                         "claim": exp.title or name,
                         "our figure (95% CI)": "no full-mode run published",
                         "verdict": "—", "full-mode time": "—"})
            continue
        summary = json.loads(summary_path(exp).read_text())
        secs = float(summary.get("compute_s", 0.0))
        link = f"[{name}](experiments/{exp.directory.name}/README.md)"
        for c in (summary.get("results") or {}).get("claims") or []:
            rows.append({"experiment": link, "claim": c["claim"],
                         "our figure (95% CI)": c["ours"], "verdict": c["verdict"],
                         "full-mode time": _duration(secs)})
    return markdown_table(rows, ["experiment", "claim", "our figure (95% CI)", "verdict",
                                 "full-mode time"])


def update_root_readme(path: pathlib.Path = ROOT / "README.md", check: bool = False,
                       registry: Mapping[str, Experiment] | None = None) -> bool:
    """Regenerate the reproductions table between the root README's markers, if present."""
    path = pathlib.Path(path)
    if not path.exists():
        return False
    text = path.read_text()
    if ROOT_BEGIN not in text:
        return False
    head, rest = text.split(ROOT_BEGIN, 1)
    if ROOT_END not in rest:
        raise ValueError(f"{path}: generated reproductions table has no end marker")
    tail = rest.split(ROOT_END, 1)[1]
    new = f"{head}{ROOT_BEGIN}\n\n{reproductions_table(registry)}\n\n{ROOT_END}{tail}"
    if new == text:
        return False
    if not check:
        _atomic_write(path, new)
    return True


def publish(exp: Experiment, results_root: pathlib.Path = DEFAULT_RESULTS,
            mode: str = "full") -> pathlib.Path:
    """Commit-ready copy of a finished run: ``experiments/<dir>/results/summary.json``
    (config, results, time; no dates or machine state), the figures named in
    ``exp.figures`` into ``experiments/<dir>/figures/``, and the README block."""
    outdir = pathlib.Path(results_root) / exp.name / mode
    res = outdir / "results.json"
    if not res.exists():
        raise ConfigError(f"no {mode}-mode results for {exp.name!r} under {outdir}; run "
                          f"`make reproduce-{exp.name}" + (" FULL=1`" if mode == "full" else "`"))
    payload = json.loads(res.read_text())
    summary = {"experiment": exp.name, "mode": mode, "config": payload["config"],
               "results": payload["results"],
               "compute_s": round(float(payload.get("compute_s", payload["elapsed_s"])), 1),
               "cpu_count": payload.get("environment", {}).get("cpu_count")}
    spath = summary_path(exp)
    spath.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(spath, json.dumps(summary, indent=1, sort_keys=True) + "\n")
    figdir = exp.directory / "figures"
    for f in exp.figures:
        src = outdir / f
        if not src.exists():
            raise FileNotFoundError(f"{exp.name}: figure {f} was not written by the run")
        figdir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, figdir / f)
    update_readme(exp)
    update_root_readme()
    return spath


# --------------------------------------------------------------------------- plots


def new_figure(*args, **kwargs):
    """``plt.subplots`` on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_figure(fig, outdir: pathlib.Path, filename: str, alt: str = "") -> str:
    """Save ``fig`` as ``outdir/filename`` (PNG), close it, return a markdown image link."""
    import matplotlib.pyplot as plt

    outdir = pathlib.Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(outdir / filename, dpi=110)
    plt.close(fig)
    return f"![{alt or filename}]({filename})"
