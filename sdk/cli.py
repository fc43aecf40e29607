"""The ``milliwatt`` command: ``demo`` (the main job), ``report``, ``replay``, ``rules``, ``cache`` and ``serve``."""

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
    for name, text in (("lint", "validate rule files; print every problem as path:line:column: problem"), ("check", "the same as lint")):
        lint = rules_sub.add_parser(name, help=text)
        lint.add_argument("paths", nargs="*", help="rule files or folders (default: the packs of --config)")
        lint.add_argument("--config", help="a YAML or TOML configuration file whose rules.packs to check")
        lint.add_argument("--tools", help="a JSON file of the agent's tools (OpenAI format): tool calls are checked against them")
    test = rules_sub.add_parser("test", help="run the rule tests (<pack>.tests.yaml) beside the packs; print a pass/fail table")
    test.add_argument("paths", nargs="*", help="rule files or folders (default: the packs of --config)")
    test.add_argument("--config", help="a YAML or TOML configuration file whose rules.packs to test")
    what_if = rules_sub.add_parser("what-if", help="what the rules would have done on recorded steps: answers, agreement, energy saved")
    what_if.add_argument("paths", nargs="+", help="rule files or folders")
    _recorded_arguments(what_if)
    what_if.add_argument("--json", dest="json_out", metavar="OUT", help="also write the figures as JSON")
    suggest = rules_sub.add_parser("suggest", help="propose rules for recurring steps whose answers were a function of the context")
    _recorded_arguments(suggest)
    suggest.add_argument("--out", default="suggested.yaml", help="the pack to write, for review (default suggested.yaml)")
    suggest.add_argument("--min-support", type=int, default=10, help="the fewest steps a rule must answer, fitted and held out (default 10)")
    suggest.add_argument("--min-agreement", type=float, default=0.98, help="the held-out agreement a rule needs (default 0.98)")
    suggest.add_argument("--min-lower-bound", type=float, default=0.0,
                         help="the 95%% Clopper-Pearson lower bound of held-out agreement a rule needs (default 0: reported only)")
    suggest.add_argument("--seed", type=int, default=0, help="seed of the split by session (default 0)")
    suggest.add_argument("--json", dest="json_out", metavar="OUT", help="also write each rule's figures and the what-if reports as JSON")
    from .serve.command import add_arguments as serve_arguments

    serve_arguments(sub.add_parser("serve", help="serve an OpenAI-compatible endpoint (/v1/chat/completions) that answers through the cascade"))
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


def _recorded_arguments(p: argparse.ArgumentParser) -> None:
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--ledger", metavar="DB", help="a ledger: its answered steps, each judged against the answer it got")
    source.add_argument("--trace", metavar="FILE", help="a trace file (tau, bfcl, gsm8k or milliwatt trace): the recorded answers")
    p.add_argument("--tools", help="with --trace of tau: the tool schemas (default: tools.json next to FILE)")


def _rules(args: argparse.Namespace) -> int:
    """``milliwatt rules lint|check|test|what-if|suggest``."""
    cmd = args.rules_command
    if cmd in ("lint", "check", "test"):
        from .config import load_settings

        paths = args.paths or load_settings(args.config).rules.packs
        if not paths:
            print(f"milliwatt: error: no rule packs to {'test' if cmd == 'test' else 'check'}: name files or folders, "
                  "or a --config with rules.packs", file=sys.stderr)  # fmt: skip
            return 2
        if cmd == "test":
            from milliwatt.rules.testing import format_outcomes, run_tests

            outcomes = run_tests(paths)
            if not outcomes:
                print("milliwatt: error: no rule tests found (<pack>.tests.yaml beside a pack, or *.tests.yaml in a pack folder)", file=sys.stderr)
                return 2
            print(format_outcomes(outcomes))
            return 0 if all(o.passed for o in outcomes) else 1
        return _lint(paths, args.tools)
    from milliwatt.rules.whatif import load_steps

    steps = load_steps(ledger=args.ledger, trace=args.trace, tools=args.tools)
    if cmd == "what-if":
        from milliwatt.rules import load_rules
        from milliwatt.rules.whatif import what_if, write_json

        report = what_if(load_rules(args.paths), steps)
        print(report.format())
        if args.json_out:
            write_json(report, args.json_out)
        return 0
    from pathlib import Path

    from milliwatt.evaluation.rule_suggest import suggest

    result = suggest(
        steps, min_support=args.min_support, min_agreement=args.min_agreement, min_lower_bound=args.min_lower_bound,
        seed=args.seed, source=args.ledger or args.trace, log=lambda line: print(line, file=sys.stderr),
    )  # fmt: skip
    Path(args.out).write_text(result.pack, encoding="utf-8")
    for c in result.rules:
        h = c.held_out
        print(f"{c.id}: held out {h['agree']}/{h['fired']} agree ({100 * h['agreement']:.1f}%, 95% lower bound "
              f"{100 * h['agreement_lower_95']:.1f}%); fitted on {c.support} steps")  # fmt: skip
    print(f"{len(result.rules)} rule(s) proposed in {args.out} ({len(result.rejected)} rejected on the held-out half): review before shipping")
    if result.held_out_what_if is not None:
        print("\nheld-out what-if of the proposed pack:\n" + result.held_out_what_if.format())
    if result.rejected and result.candidates_what_if is not None:
        print("\nheld-out what-if of every candidate, before the rejections:\n" + result.candidates_what_if.format())
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n", encoding="utf-8")
    return 0


def _lint(paths: list[str], tools_file: str | None) -> int:
    import inspect

    from milliwatt.rules import check

    kwargs = {}
    if tools_file:
        from .types import validate_tools

        try:
            with open(tools_file, encoding="utf-8") as f:
                kwargs["tools"] = validate_tools(json.load(f))
        except (OSError, ValueError) as e:
            print(f"milliwatt: error: --tools {tools_file}: {e}", file=sys.stderr)
            return 2
        if "tools" not in inspect.signature(check).parameters:  # until the loader checks tool calls against tools
            kwargs.pop("tools")
    errors = check(paths, **kwargs)
    for err in errors:
        where = ":".join(str(x) for x in (err.path, err.line, getattr(err, "column", None)) if x is not None)
        print(f"{where}: {err.problem}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s)", file=sys.stderr)
        return 1
    print("rule files are valid")
    return 0


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
            return _rules(args)
        elif args.command == "serve":
            from .serve.command import run as run_serve

            return run_serve(args)
    except MilliwattError as e:
        print(f"milliwatt: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
