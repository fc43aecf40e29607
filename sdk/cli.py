"""The ``milliwatt`` command: ``demo`` (the main job), ``report``, ``replay``, ``rules`` and ``cache``."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from .errors import MilliwattError
from .evaluation.cache_bench import add_arguments as cache_bench_arguments
from .evaluation.replay import add_arguments as replay_arguments
from .evaluation.replay import run as run_replay
from .local_gate import add_arguments as local_calibrate_arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="milliwatt", description="Answer agent steps with the cheapest tier that answers them well.")
    sub = p.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="run the example support agent through the cascade, offline")
    demo.add_argument("--ledger", default="milliwatt-demo.db", help="SQLite file to write (replaced each run)")
    demo.add_argument("--config", help="a YAML or TOML configuration file")
    demo.add_argument("--cache", help="cache folder to use and keep (default: a fresh one per run)")
    demo.add_argument("--json", dest="json_out", help="also write the summary as JSON to this file")

    report = sub.add_parser("report", help="print the summary of a ledger")
    report.add_argument("ledger", help="a ledger file path or SQLAlchemy URL")
    report.add_argument("--json", action="store_true", help="print JSON instead of text")
    report.add_argument("--html", metavar="OUT", help="also write a self-contained HTML page with charts")
    report.add_argument("--png-dir", metavar="DIR", help="with --html: also write each chart as PNG here")
    report.add_argument("--recompute", action="store_true",
                        help="recompute every energy and cost figure from the stored observations (the ledger is only read)")
    report.add_argument("--coefficients", metavar="FILE",
                        help="with --recompute: a coefficient file or shipped version (default: the current one)")  # fmt: skip
    replay_arguments(sub.add_parser("replay", help="replay recorded agent traffic through the cascade; judge each answer"))
    local_calibrate_arguments(sub.add_parser("calibrate", help="fit the local tier's gate to a precision from the answers a ledger recorded"))
    rules = sub.add_parser("rules", help="work with rule packs")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    check = rules_sub.add_parser("check", help="validate rule files; print every error with file and line")
    check.add_argument("paths", nargs="*", help="rule files or folders (default: the packs of --config)")
    check.add_argument("--config", help="a YAML or TOML configuration file whose rules.packs to check")
    cache = sub.add_parser("cache", help="work with the semantic cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    cache_bench_arguments(cache_sub.add_parser("bench", help="wrong hits and recall of the cache's gate on question pairs, vs cosine and GPTCache"))
    calibrate = cache_sub.add_parser("calibrate", help="fit the cache's hit gate from the candidates a ledger recorded")
    calibrate.add_argument("ledger", help="a ledger whose cache attempts recorded candidates (e.g. a replay with cache.observe: true)")
    calibrate.add_argument("--target", type=float, default=0.02, help="δ: the share of served hits allowed to be wrong (default 0.02)")
    calibrate.add_argument("--confidence", type=float, default=0.95, help="confidence of the bound (default 0.95)")
    calibrate.add_argument("--reference-tier", default="remote", help="the tier whose answers are the reference (default remote)")
    calibrate.add_argument("--seed", type=int, default=0, help="seed of the split by session")
    calibrate.add_argument("--out", default="cache-gate.json", help="gate file to write (default cache-gate.json)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "demo":
            from milliwatt.examples.demo import run_demo

            summary = asyncio.run(run_demo(ledger=args.ledger, config=args.config, cache_path=args.cache, out=sys.stdout))
            if args.json_out:
                with open(args.json_out, "w") as f:
                    json.dump(summary, f, indent=2)
        elif args.command == "report":
            from .reports.recompute import run_report

            return run_report(args)
        elif args.command == "replay":
            return run_replay(args)
        elif args.command == "calibrate":
            from .local_gate import run as run_local_calibrate

            return run_local_calibrate(args)
        elif args.command == "cache" and args.cache_command == "bench":
            from .evaluation.cache_bench import run as run_cache_bench

            return run_cache_bench(args)
        elif args.command == "cache" and args.cache_command == "calibrate":
            from milliwatt.cache.calibrate import run as run_calibrate

            return run_calibrate(args)
        elif args.command == "rules":
            from milliwatt.rules import check

            from .config import load_settings

            paths = args.paths or load_settings(args.config).rules.packs
            if not paths:
                print("milliwatt: error: no rule packs to check: name files or folders, or a --config with rules.packs", file=sys.stderr)
                return 2
            errors = check(paths)
            for err in errors:
                print(err, file=sys.stderr)
            if errors:
                return 1
            print("rule files are valid")
    except MilliwattError as e:
        print(f"milliwatt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
