"""Rules tier speed: 10 rules beside 1,000 rules, in one run, on tau-bench airline steps.

    .venv/bin/python benchmarks/rules_speed.py [--json rules_speed.json] [--repeat 3]

The rule sets are generated the way a large pack grows: keyword rules and regex rules over
distinct product and topic vocabularies (``keywords.any``/``all``/``none``, ``\\bword\\b``
regexes with captures, phrases, alternations), a share of rules that read the latest tool
result (``after_tool`` + ``tool_result`` on the airline tools), routes, budgets, and a few
rules the prefilter cannot index (a regex with no whole word it must match). The 10-rule set
is the first 10 of the same generator. Steps: every step of the recorded tau-bench airline
trajectories (user-last and tool-last; long system prompts and tool results) and synthetic
user messages that use the rules' vocabulary, so that rules do match.

Reported per step: p50 and p95 microseconds of ``RuleSet.evaluate`` (what ``RulesTier.attempt``
runs), the indexed evaluation and, for comparison, the linear walk over every rule; and
how many steps a rule answered or decided. Each step is timed ``--repeat`` times and its
fastest time kept (the rest is the machine's noise).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from milliwatt.evaluation.importers import load_trace
from milliwatt.evaluation.trim_bench import as_step
from milliwatt.rules import RuleSet, load_rules
from milliwatt.types import Step, StepMeta

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tau_airline"
TOPICS = ["refund", "baggage", "seat", "upgrade", "meal", "pet", "wifi", "lounge", "visa", "insurance", "voucher",
          "delay", "invoice", "receipt", "passport", "wheelchair", "stroller", "infant", "miles", "status"]
TOOL_FIELDS = {
    "get_reservation_details": [("status", "cancelled"), ("cabin", "business"), ("insurance", "yes"), ("flight_type", "one_way")],
    "get_user_details": [("membership", "gold"), ("membership", "silver"), ("membership", "regular")],
    "search_direct_flight": [("0.status", "available")],
}


def product(i: int) -> str:
    """A distinct product word per rule: what a large pack is about (plan names, SKUs, places)."""
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "zi", "be", "do", "fu", "ga", "hi", "jo", "pe", "su"]
    return syll[i % 16] + syll[(i // 16) % 16] + syll[(i // 256) % 16] + "x"


def generate(n: int, seed: int = 7) -> dict[str, Any]:
    """A rule pack of ``n`` rules (the same first rules whatever ``n``)."""
    rnd = random.Random(seed)
    rules: list[dict[str, Any]] = []
    for i in range(n):
        p, topic = product(i), TOPICS[i % len(TOPICS)]
        kind = i % 10
        rule: dict[str, Any] = {"id": f"r{i}", "priority": rnd.choice([0, 0, 0, 10, 20, 50])}
        if kind in (0, 1, 2):
            rule["when"] = {"keywords": {"any": [p, f"{p} plan"], "none": ["cancel", "lawyer"]}, "max_chars": 400}
            rule["reply"] = f"The {p} plan covers {topic} at {{meta.tenant}}."
        elif kind == 3:
            rule["when"] = {"keywords": {"all": [topic, p]}}
            rule["reply"] = f"{topic} for {p}: see the help center."
        elif kind in (4, 5):
            rule["when"] = {"regex": rf"\b{p}\b\D{{0,20}}(?P<n>\d{{1,4}})", "flags": ["IGNORECASE"]}
            rule["reply"] = f"{p} number {{n}} is noted."
        elif kind == 6:
            rule["when"] = {"regex": rf"(?i)\b(?:{p}|{p}s)\s+(?:{topic}|help)\b", "first_turn": False}
            rule["route"] = "remote" if i % 20 == 6 else {"forbid": ["cache"]}
        elif kind == 7:
            tool = list(TOOL_FIELDS)[i % len(TOOL_FIELDS)]
            field, value = TOOL_FIELDS[tool][(i // 10) % len(TOOL_FIELDS[tool])]
            rule["when"] = {"after_tool": [tool], "tool_result": {"fields": {field: value}},
                            "keywords": {"any": [p, topic]}}
            rule["reply"] = f"About {p}: the {field} is {{result.{field}}}."
        elif kind == 8:
            rule["when"] = {"any": [{"keywords": {"any": [f"{p} {topic}"]}}, {"regex": rf"\b{p}-(?P<code>\d+)\b"}],
                            "not": {"keywords": {"any": ["human"]}}}
            rule["budget"] = {"max_input_tokens": 2000}
        elif i % 50 == 9:  # no whole word the prefilter can derive: checked on every step
            rule["when"] = {"regex": rf"(?i){p[:3]}\w*\s+#?(?P<code>\d{{5}})", "max_chars": 200}
            rule["reply"] = "Code {code} received."
        else:
            rule["when"] = {"keywords": {"any": [p]}, "meta": {"agent": ["airline", "support"]}, "turn": {"max": 30}}
            rule["refuse"] = f"I cannot discuss {p}."
        rules.append(rule)
    return {"pack": f"bench{n}", "rules": rules}


def synthetic(n: int, rules: int, seed: int = 11) -> list[Step]:
    """User messages that mention the rules' products and topics (or nothing of theirs)."""
    rnd = random.Random(seed)
    fillers = ["could you help me with", "I have a question about", "what is the status of", "hi, about my",
               "please check", "I'd like to know more about", "is there any news on"]
    steps = []
    for k in range(n):
        i = rnd.randrange(rules)
        p, topic = product(i), TOPICS[i % len(TOPICS)]
        text = rnd.choice([
            f"{rnd.choice(fillers)} the {p} plan",
            f"{rnd.choice(fillers)} {topic} for {p} please",
            f"{p} order {rnd.randrange(10, 9999)}",
            f"{p} {topic} question",
            f"{rnd.choice(fillers)} my {topic}, nothing else",
            f"{p}-{rnd.randrange(100)} is broken",
        ])
        history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "Hi! How can I help?"}] if k % 2 else []
        steps.append(Step.create([{"role": "system", "content": "You are an airline agent."}, *history,
                                  {"role": "user", "content": text}], meta=StepMeta(agent="airline", tenant="acme")))
    return steps


def load_steps(limit: int | None) -> list[Step]:
    trace = load_trace(DATA / "trajectories.json")
    steps = [as_step(s) for s in trace.steps[:limit]]
    return [s if s.meta.agent else Step(s.messages, s.tools, s.tool_choice, s.response_format, s.options,
                                        StepMeta(session_id=s.meta.session_id, agent="airline", tenant="acme")) for s in steps]


def time_steps(ruleset: RuleSet, steps: list[Step], *, linear: bool, repeat: int) -> tuple[list[float], int]:
    times, decided = [], 0
    for step in steps:
        best = float("inf")
        for _ in range(repeat):
            t0 = time.perf_counter_ns()
            e = ruleset.evaluate(step, linear=linear)
            best = min(best, time.perf_counter_ns() - t0)
        times.append(best / 1000)
        decided += e.match is not None
    return times, decided


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100, method="inclusive")[int(q) - 1] if len(xs) > 1 else xs[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--limit", type=int, default=None, help="at most this many tau steps")
    ap.add_argument("--synthetic", type=int, default=1000, help="synthetic user messages")
    args = ap.parse_args(argv)

    tau = load_steps(args.limit)
    results: dict[str, Any] = {"machine": platform.platform(), "python": sys.version.split()[0],
                               "tau_steps": len(tau), "synthetic_steps": args.synthetic, "repeat": args.repeat, "sets": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (10, 1000):
            path = Path(tmp) / f"bench{n}.yaml"
            path.write_text(yaml.safe_dump(generate(n), sort_keys=False))
            t0 = time.perf_counter()
            ruleset = load_rules(path)
            load_s = time.perf_counter() - t0
            steps = tau + synthetic(args.synthetic, n)
            row: dict[str, Any] = {"rules": len(ruleset), "indexed_rules": ruleset.index.keyed, "load_s": round(load_s, 3)}
            for mode, linear in (("indexed", False), ("linear", True)):
                times, decided = time_steps(ruleset, steps, linear=linear, repeat=args.repeat)
                tau_times = times[: len(tau)]
                row[mode] = {
                    "p50_us": round(pct(times, 50), 1), "p95_us": round(pct(times, 95), 1),
                    "tau_p50_us": round(pct(tau_times, 50), 1), "tau_p95_us": round(pct(tau_times, 95), 1),
                    "mean_us": round(statistics.fmean(times), 1), "decided_steps": decided,
                }
            results["sets"][str(n)] = row
    print(f"rules tier speed: {len(tau)} tau-bench airline steps + {args.synthetic} synthetic user messages, "
          f"fastest of {args.repeat} per step (Python {results['python']})")
    print(f"{'rules':>6} {'indexed':>8} {'load s':>7} | {'p50 µs':>7} {'p95 µs':>7} {'tau p95':>8} {'decided':>8} | "
          f"{'linear p50':>10} {'p95':>7}")
    for n, row in results["sets"].items():
        ix, ln = row["indexed"], row["linear"]
        print(f"{n:>6} {row['indexed_rules']:>8} {row['load_s']:>7} | {ix['p50_us']:>7} {ix['p95_us']:>7} {ix['tau_p95_us']:>8} "
              f"{ix['decided_steps']:>8} | {ln['p50_us']:>10} {ln['p95_us']:>7}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
