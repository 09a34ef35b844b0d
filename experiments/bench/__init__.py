"""The benchmark harness: subjax against the peers a user would otherwise pick.

A suite is a module ``experiments/bench/bench_<family>.py`` with a function
``cases(quick: bool) -> list[Case]``. For every case the harness

1. warms every contender up once (compilation and caches excluded from timing),
2. runs ``repeats`` rounds in one process, the contenders interleaved and their
   order rotated each round, blocking on JAX outputs (``jax.block_until_ready``),
3. reports the median and the spread (interquartile range, min) of each
   contender's times, the ratio ``reference / contender`` of medians (so
   ``subjax/peer`` when the reference is subjax: below 1 means subjax is faster),
   and each contender's accuracy figure on its own output — a benchmark that is
   fast but wrong must show it,
4. records the machine, the load average, thread settings and library versions,
   and writes ``results/bench/<suite>.json`` and ``.md``, and
   ``results/bench/BENCH.md`` over every suite present.

A contender whose full run is too long to repeat (an iteration with a fixed cost
per step run thousands of times) can time a fixed number of steps and declare a
:class:`Scale`: its reported times are the measured ones times ``factor`` (e.g.
the steps to tolerance, counted once in an untimed run, over the steps timed),
labelled as such in the table; a ``lower_bound`` scale (the count stopped at a
cap) makes its time a lower bound and the ratio a bound.

Run with ``python -m experiments.bench [suite ...] [--quick]`` or ``make bench``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import pathlib
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from experiments.harness import DEFAULT_RESULTS, environment, jsonable, markdown_table

BENCH_DIR = pathlib.Path(__file__).resolve().parent
PEERS = ("ott", "ot", "sklearn", "kfac_jax", "pymanopt", "geoopt", "torch")


@dataclasses.dataclass
class Scale:
    """A declared factor from the timed work to the reported work.

    Attributes:
      factor: reported time = measured time * factor (> 0).
      lower_bound: the reported work is itself a lower bound (e.g. a step count
        stopped at its cap), so is the reported time.
      what: how the factor was obtained, shown in the table, e.g.
        ``"per-sweep time x 12,345 sweeps (counted untimed)"``.
    """

    factor: float
    lower_bound: bool = False
    what: str = ""


@dataclasses.dataclass
class Contender:
    """One implementation in a case.

    Attributes:
      name: label, e.g. ``"subjax"``, ``"scikit-learn"``, ``"matmul floor"``.
      fn: zero-argument callable doing the timed work and returning its output
        (set-up belongs outside it; JAX functions should be jitted already).
      accuracy: optional ``output -> float`` error figure (lower is better unless
        the case's ``accuracy_label`` says otherwise).
      note: free text shown in the table (settings, caveats, workarounds).
      scale: a :class:`Scale`, or a zero-argument callable returning one, called
        once after the warm-up and outside the timing (it may run the untimed
        count); ``None``: the times are reported as measured.
    """

    name: str
    fn: Callable[[], Any]
    accuracy: Callable[[Any], float] | None = None
    note: str = ""
    scale: Scale | Callable[[], Scale] | None = None


@dataclasses.dataclass
class Case:
    """A benchmark case: one workload, several contenders timed side by side."""

    name: str
    contenders: list[Contender]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    reference: str = "subjax"
    accuracy_label: str = "error"
    repeats: int | None = None
    max_seconds: float = 60.0  # per contender: fewer repeats when one call is slow
    note: str = ""
    warmup: bool = True  # False: contenders are compiled already; no uncounted first call


def _block(out):
    try:
        import jax

        return jax.block_until_ready(out)
    except Exception:  # non-JAX outputs (numpy, torch, tuples of them)
        return out


def _call(fn):
    t0 = time.perf_counter()
    out = _block(fn())
    return out, time.perf_counter() - t0


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def run_case(case: Case, repeats: int, log=print) -> dict:
    """Time every contender of ``case``; return a JSON-able record."""
    names = [c.name for c in case.contenders]
    if case.reference not in names:
        raise ValueError(f"case {case.name!r}: reference {case.reference!r} not in {names}")
    repeats = case.repeats or repeats
    outputs, times, errors, rounds = {}, {c.name: [] for c in case.contenders}, {}, {}
    scales: dict[str, Scale] = {}
    for c in case.contenders:  # warm-up (compile); its time decides how many rounds fit
        try:
            if case.warmup:
                _call(c.fn)
            outputs[c.name], t_second = _call(c.fn)
            rounds[c.name] = max(1, min(repeats, int(case.max_seconds / max(t_second, 1e-9))))
            times[c.name].append(t_second)
            if c.scale is not None:
                scale = c.scale() if callable(c.scale) else c.scale
                if not (isinstance(scale, Scale) and scale.factor > 0):
                    raise ValueError(f"scale of {c.name!r} must be a Scale with factor > 0, "
                                     f"got {scale!r}")
                scales[c.name] = scale
        except Exception as err:
            errors[c.name] = f"{type(err).__name__}: {str(err)[:300]}"
            log(f"  {c.name}: FAILED during warm-up: {errors[c.name]}")
            log(traceback.format_exc(limit=4))
    live = [c for c in case.contenders if c.name not in errors]
    for r in range(max((rounds[c.name] for c in live), default=0)):
        k = r % max(len(live), 1)
        for c in live[k:] + live[:k]:  # rotate the order every round
            if len(times[c.name]) >= rounds[c.name]:
                continue
            try:
                out, dt = _call(c.fn)
                times[c.name].append(dt)
                outputs[c.name] = out
            except Exception as err:
                errors[c.name] = f"{type(err).__name__}: {str(err)[:300]}"
    rows = []
    no_scale = Scale(1.0)
    factor = {name: scales.get(name, no_scale).factor for name in names}
    bound = {name: scales.get(name, no_scale).lower_bound for name in names}
    ref_ts = times[case.reference]
    ref_med = statistics.median(ref_ts) * factor[case.reference] if ref_ts else None
    for c in case.contenders:
        ts = times[c.name]
        row: dict[str, Any] = {"contender": c.name, "note": c.note}
        if c.name in errors:
            row["error"] = errors[c.name]
        if ts:
            k = factor[c.name]
            med = statistics.median(ts) * k
            row.update(
                median_s=med,
                q25_s=_quantile(ts, 0.25) * k,
                q75_s=_quantile(ts, 0.75) * k,
                min_s=min(ts) * k,
                n=len(ts),
                ratio=(ref_med / med) if (ref_med is not None and c.name != case.reference)
                else (1.0 if c.name == case.reference else None),
            )
            if c.name in scales:
                row.update(measured_median_s=statistics.median(ts), scale=k,
                           scale_what=scales[c.name].what, lower_bound=bound[c.name])
            if c.name != case.reference and row["ratio"] is not None:
                # reference / this: this time a lower bound -> the ratio an upper bound
                if bound[c.name] and bound[case.reference]:
                    row["ratio"] = None
                elif bound[c.name]:
                    row["ratio_bound"] = "<="
                elif bound[case.reference]:
                    row["ratio_bound"] = ">="
        if c.accuracy is not None and c.name in outputs:
            try:
                row["accuracy"] = float(c.accuracy(outputs[c.name]))
            except Exception as err:
                row["accuracy_error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return {
        "case": case.name,
        "params": jsonable(dict(case.params)),
        "reference": case.reference,
        "accuracy_label": case.accuracy_label,
        "note": case.note,
        "rows": jsonable(rows),
    }


def _versions() -> dict:
    out = {}
    for mod in PEERS:
        try:
            m = importlib.import_module(mod)
            out[mod] = getattr(m, "__version__", "?")
        except Exception:
            out[mod] = "missing"
    return out


def _fmt_time(s):
    if s is None:
        return ""
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def case_markdown(rec: dict) -> str:
    ref = rec["reference"]
    lines = [f"### {rec['case']}", ""]
    if rec.get("params"):
        lines.append("Params: " + ", ".join(f"`{k}={v}`" for k, v in rec["params"].items()))
        lines.append("")
    table = []
    for row in rec["rows"]:
        scaled = "scale" in row
        note = row.get("error") and f"FAILED: {row['error']}" or row.get("note", "")
        if scaled:
            note = (f"time = measured {_fmt_time(row['measured_median_s'])} x "
                    f"{row['scale']:.4g}" + (" (a lower bound)" if row["lower_bound"] else "")
                    + (f": {row['scale_what']}" if row["scale_what"] else "")
                    + (f"; {note}" if note else ""))
        ratio = row.get("ratio")
        table.append({
            "contender": row["contender"],
            "median": ("≥ " if row.get("lower_bound") else "") + _fmt_time(row.get("median_s")),
            "IQR": (f"{_fmt_time(row['q25_s'])} – {_fmt_time(row['q75_s'])}"
                    if "q25_s" in row else ""),
            "n": row.get("n"),
            f"{ref} / this": ("" if ratio is None else
                              {"<=": "≤ ", ">=": "≥ "}.get(row.get("ratio_bound"), "")
                              + f"{ratio:.3g}x" + (" (scaled)" if scaled else "")),
            rec["accuracy_label"]: row.get("accuracy", row.get("accuracy_error", "")),
            "note": note,
        })
    lines.append(markdown_table(table, floatfmt=".3g"))
    if rec.get("note"):
        lines += ["", rec["note"]]
    return "\n".join(lines) + "\n"


def suite_markdown(payload: dict) -> str:
    env = payload["environment"]
    head = [
        f"## {payload['suite']}",
        "",
        f"`{payload['command']}` — {env['platform']}, {env['cpu_count']} cpus, "
        f"JAX {env['versions'].get('jax')} ({env['jax_backend']}), "
        + (f"load average {payload['loadavg_start']} → {payload['loadavg_end']}, "
           if "loadavg_start" in payload else "")  # a published record drops it
        + f"OPENBLAS_NUM_THREADS={payload['threads'].get('OPENBLAS_NUM_THREADS')}. "
        "Ratios are the reference's median time over the contender's "
        "(below 1: the reference is faster).",
        "",
    ]
    return "\n".join(head) + "\n".join(case_markdown(r) for r in payload["cases"])


def discover_suites() -> list[str]:
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def run_suite(suite: str, quick: bool, repeats: int, results: pathlib.Path,
              only: str | None = None, log=print) -> dict:
    mod = importlib.import_module(f"experiments.bench.bench_{suite}")
    load0 = os.getloadavg()
    cases = mod.cases(quick)
    records = []
    for case in cases:
        if only and only not in case.name:
            continue
        log(f"[{suite}] {case.name}")
        rec = run_case(case, repeats, log=log)
        for row in rec["rows"]:
            log(f"    {row['contender']:28s} {_fmt_time(row.get('median_s')):>12s} "
                f"ratio={row.get('ratio')} acc={row.get('accuracy')} {row.get('error', '')}")
        records.append(rec)
    payload = {
        "suite": suite,
        "quick": quick,
        "command": "python -m experiments.bench " + suite + (" --quick" if quick else ""),
        "environment": environment(),
        "peer_versions": _versions(),
        "threads": {k: os.environ.get(k) for k in
                    ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "XLA_FLAGS")},
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cases": records,
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{suite}.json").write_text(json.dumps(jsonable(payload), indent=1))
    (results / f"{suite}.md").write_text(suite_markdown(payload))
    return payload


def write_index(results: pathlib.Path) -> pathlib.Path:
    parts = ["# subjax benchmarks", "",
             "Generated by `make bench` (`python -m experiments.bench`); warm runs only, "
             "contenders interleaved in one process, median of repeated runs.", ""]
    for path in sorted(results.glob("*.json")):
        payload = json.loads(path.read_text())
        parts.append(suite_markdown(payload))
    out = results / "BENCH.md"
    out.write_text("\n".join(parts))
    return out


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m experiments.bench")
    parser.add_argument("suites", nargs="*", help=f"suites (default: all): {discover_suites()}")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--only", default=None, help="run only cases whose name contains this")
    parser.add_argument("--results", type=pathlib.Path, default=DEFAULT_RESULTS / "bench")
    args = parser.parse_args(argv)
    known = discover_suites()
    unknown = [s for s in args.suites if s not in known]
    if unknown:
        print(f"error: unknown suite(s) {unknown}; known: {known}", file=sys.stderr)
        return 2
    if args.repeats is not None and args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    repeats = args.repeats or (3 if args.quick else 7)
    failed = []
    for suite in args.suites or known:
        try:
            run_suite(suite, args.quick, repeats, args.results, args.only)
        except Exception:
            failed.append(suite)
            traceback.print_exc()
    print(write_index(args.results))
    if failed:
        print(f"FAILED suites: {failed}", file=sys.stderr)
        return 1
    return 0
