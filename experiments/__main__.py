"""Command line of the experiment harness.

    python -m experiments list
    python -m experiments run NAME [--quick | --full] [--set key=value ...] [--fresh]
    python -m experiments reproduce [--quick | --full]      # all, then results/REPORT.md
    python -m experiments report [--quick | --full]         # rebuild results/REPORT.md
    python -m experiments publish NAME                      # commit-ready full-mode summary,
                                                            # figures and README block
    python -m experiments readme-tables [--check]           # README blocks from summaries
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

from experiments import harness


def _mode(args) -> str:
    return "full" if getattr(args, "full", False) else "quick"


def _add_mode(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="small protocol (default)")
    g.add_argument("--full", action="store_true", help="the full protocol (slow)")
    p.add_argument("--results", type=pathlib.Path, default=harness.DEFAULT_RESULTS,
                   help="results root (default: results/)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="list experiments")
    p_run = sub.add_parser("run", help="run one experiment (resumes from checkpoints)")
    p_run.add_argument("name")
    _add_mode(p_run)
    p_run.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a config field")
    p_run.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    p_run.add_argument("--stop-after", type=int, default=None,
                       help="stop after N steps, keeping checkpoints (testing aid)")
    p_run.add_argument("--throttle", type=float, default=0.0,
                       help="sleep seconds after each step (testing aid)")
    p_run.add_argument("--keep-checkpoints", action="store_true")
    p_rep = sub.add_parser("reproduce", help="run every experiment, then write REPORT.md")
    _add_mode(p_rep)
    p_report = sub.add_parser("report", help="rebuild results/REPORT.md")
    _add_mode(p_report)
    p_pub = sub.add_parser("publish", help="copy a full-mode run's summary and figures into "
                           "experiments/<dir>/ and regenerate its README block")
    p_pub.add_argument("name")
    p_pub.add_argument("--results", type=pathlib.Path, default=harness.DEFAULT_RESULTS)
    p_tab = sub.add_parser("readme-tables", help="regenerate every README's results block "
                           "from its committed summary")
    p_tab.add_argument("--check", action="store_true",
                       help="change nothing; exit 1 when a README is out of date")
    args = parser.parse_args(argv)

    try:
        if args.cmd == "list":
            for name, exp in sorted(harness.discover().items()):
                print(f"{name:20s} {exp.title}")
            return 0
        if args.cmd == "run":
            mode = _mode(args)
            exp = harness.get_experiment(args.name)
            cfg = harness.make_config(exp, mode, harness.parse_overrides(args.overrides))
            if args.stop_after is not None and args.stop_after < 1:
                raise harness.ConfigError("--stop-after must be >= 1")
            if args.throttle < 0:
                raise harness.ConfigError("--throttle must be >= 0")
            out = harness.run_experiment(
                exp, cfg, mode, args.results, fresh=args.fresh,
                progress=not args.no_progress, stop_after=args.stop_after,
                throttle=args.throttle, keep_checkpoints=args.keep_checkpoints,
            )
            if out is not None:
                print(out.outdir / "report.md")
            return 0
        if args.cmd == "reproduce":
            mode = _mode(args)
            registry = harness.discover()
            configs = {n: harness.make_config(e, mode) for n, e in registry.items()}
            failures = {}
            for name, exp in sorted(registry.items()):
                print(f"== {name} ({mode})", file=sys.stderr, flush=True)
                try:
                    harness.run_experiment(exp, configs[name], mode, args.results,
                                           progress=not args.no_progress)
                except Exception:
                    failures[name] = traceback.format_exc(limit=8)
                    print(failures[name], file=sys.stderr)
            path = harness.write_report(args.results, mode, failures)
            print(path)
            failures.update(harness.BROKEN)
            if failures:
                print(f"FAILED: {', '.join(sorted(failures))}", file=sys.stderr)
                return 1
            return 0
        if args.cmd == "report":
            print(harness.write_report(args.results, _mode(args)))
            return 0
        if args.cmd == "publish":
            print(harness.publish(harness.get_experiment(args.name), args.results, "full"))
            return 0
        if args.cmd == "readme-tables":
            stale = [n for n, e in sorted(harness.discover().items())
                     if harness.update_readme(e, check=args.check)]
            if harness.update_root_readme(check=args.check):
                stale.append("README.md (reproductions table)")
            for n in stale:
                print(f"{n}: README results block {'out of date' if args.check else 'updated'}")
            return 1 if (args.check and stale) else 0
    except harness.ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
