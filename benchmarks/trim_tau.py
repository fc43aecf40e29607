"""Trimming on tau-bench airline: milliwatt's default pipeline against the published baselines.

    .venv/bin/pip install langchain-core          # only for the LangChain baseline
    .venv/bin/python benchmarks/trim_tau.py [--json trim_tau.json] [--limit N]

Rows (docs/benchmarks.md, "Trimming"):
  raw                     nothing trimmed
  mask M=10 (published)   "The Complexity Trap" (2025): tool outputs older than the newest 10
                          replaced by a placeholder that keeps nothing
  langchain last          LangChain's trim_messages(strategy="last", include_system=True,
                          start_on="human"), given per step the token budget milliwatt's
                          default ended at (same tokens: which loses more?)
  milliwatt default       compact_json, truncate, mask (ids kept), dedupe, select_tools
  each strategy alone, and the tool-selection settings around the default

Every pipeline runs over the recorded steps in trace order, learning from each recorded
answer after trimming its step (``milliwatt.evaluation.trim_bench``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from milliwatt.config import TrimSettings
from milliwatt.evaluation.importers import load_trace
from milliwatt.evaluation.trim_bench import measure, pipeline, step_key
from milliwatt.tokens import TokenCounter
from milliwatt.trimming import DEFAULT_REMOTE, MaskObservations, PrefixTracker, Stage, Trimmed, Trimmer, build_trimmer
from milliwatt.types import Step

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tau_airline"


def langchain_last(counter: TokenCounter, budgets: dict[tuple[str | None, int], int]):  # noqa: ANN201
    """trim_messages(strategy="last") at the budget milliwatt's default reached on each step."""
    from langchain_core.messages import convert_to_messages, convert_to_openai_messages, trim_messages

    prefix = PrefixTracker()

    def count(messages: list[Any]) -> int:
        return counter.request(convert_to_openai_messages(messages))

    def trim(step: Step, before: int, reveal: frozenset[str]) -> Trimmed:
        tools = counter.tools(step.tools)
        budget = max(budgets[step_key(step)] - tools, 1)  # it cannot cut tool schemas
        kept = trim_messages(
            convert_to_messages(list(step.messages)), max_tokens=budget, token_counter=count,
            strategy="last", include_system=True, start_on="human", allow_partial=False,
        )  # fmt: skip
        messages = convert_to_openai_messages(kept)
        new = step.with_messages(messages) if messages else step.with_messages(step.messages[:1])
        after = counter.request(new.messages, new.tools)
        stage = Stage("langchain_last", before - after, len(step.messages) - len(new.messages), new)
        return Trimmed(new, before, after, (stage,), prefix_tokens=prefix.observe(new, counter), raw=step)

    return trim


def effective(row: dict[str, Any], w: float) -> float:
    """Input tokens weighted as billed when a cached (prefix) token costs ``w`` of another."""
    return row["tokens_sent"] - (1 - w) * row["prefix_tokens_sent"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--trajectories", default=str(DATA / "trajectories.json"))
    p.add_argument("--tools", default=str(DATA / "tools.json"))
    p.add_argument("--limit", type=int)
    p.add_argument("--json", dest="json_out")
    p.add_argument("--no-langchain", action="store_true", help="skip the LangChain baseline")
    args = p.parse_args(argv)

    trace = load_trace(args.trajectories, tools=args.tools)
    steps = trace.steps[: args.limit] if args.limit else trace.steps
    settings = TrimSettings()
    counter = TokenCounter(settings.encoding)
    for s in steps:  # count every raw request once, as the accountant has before trimming runs
        counter.request(s.messages, s.tools)

    def run(name: str, trimmer: Trimmer, **kw: Any) -> dict[str, Any]:
        t0 = time.perf_counter()
        r = measure(steps, *pipeline(trimmer), counter=counter, **kw)
        r["name"], r["wall_s"] = name, time.perf_counter() - t0
        # Input cost relative to raw when a cached token costs w of an uncached one (OpenAI:
        # 0.5 for gpt-4o, 0.1 to 0.25 for newer models; Anthropic: 0.1): the prefix matters.
        base = rows[0] if rows else r
        eff = {w: effective(r, w) / effective(base, w) for w in (0.1, 0.5)}
        r["input_cost_vs_raw_at_cached_weight"] = {str(w): v for w, v in eff.items()}
        print(f"{name:38s} sent {r['tokens_sent']:>10,} ({r['saved_share']:6.1%} less)  prefix {r['prefix_share_sent']:6.1%}  "
              f"cost@0.1 {eff[0.1]:5.2f} @0.5 {eff[0.5]:5.2f}  "
              f"lost {r['lost_steps']:>3} ({r['lost_share']:5.1%})  asked again {r['reasked_steps']:>3}  p50 {r['overhead_ms']['p50']:.3f} ms", file=sys.stderr)  # fmt: skip
        return r

    def with_tools(**kw: Any) -> TrimSettings:
        return settings.model_copy(update={"select_tools": settings.select_tools.model_copy(update=kw)})

    def with_mask(**kw: Any) -> TrimSettings:
        return settings.model_copy(update={"mask": settings.mask.model_copy(update=kw)})

    rows: list[dict[str, Any]] = []
    rows.append(run("raw", Trimmer(counter=counter)))
    rows.append(run("mask M=10 (published)", Trimmer([MaskObservations(10, block=1, keep_ids=False)], counter=counter)))
    budgets: dict[tuple[str | None, int], int] = {}
    rows.append(run("milliwatt default", build_trimmer(DEFAULT_REMOTE, settings, counter), sent=budgets))
    if not args.no_langchain:
        t0 = time.perf_counter()
        r = measure(steps, langchain_last(counter, budgets), counter=counter)
        r["name"], r["wall_s"] = "langchain last (same tokens)", time.perf_counter() - t0
        eff = {w: effective(r, w) / effective(rows[0], w) for w in (0.1, 0.5)}
        r["input_cost_vs_raw_at_cached_weight"] = {str(w): v for w, v in eff.items()}
        print(f"{r['name']:38s} sent {r['tokens_sent']:>10,} ({r['saved_share']:6.1%} less)  prefix {r['prefix_share_sent']:6.1%}  "
              f"lost {r['lost_steps']:>3} ({r['lost_share']:5.1%})", file=sys.stderr)  # fmt: skip
        rows.append(r)
    for name in DEFAULT_REMOTE:
        rows.append(run(f"only {name}", build_trimmer([name], settings, counter)))
    for kw in ({"index": False}, {"risk": 0.1}, {"risk": 0.3}, {"risk": 1.0}, {"risk": 2.0},
               {"prior": 1.0}, {"prior": 20.0}, {"retrieve": 2}, {"learn": False}):  # fmt: skip
        label = ", ".join(f"{k}={v}" for k, v in kw.items())
        rows.append(run(f"default, select_tools {label}", build_trimmer(DEFAULT_REMOTE, with_tools(**kw), counter)))
    for kw in ({"keep": 10, "block": 1}, {"keep": 5, "block": 5}, {"keep": 3, "block": 1}):
        label = ", ".join(f"{k}={v}" for k, v in kw.items())
        rows.append(run(f"default, mask {label}", build_trimmer(DEFAULT_REMOTE, with_mask(**kw), counter)))
    rows.append(run("default without mask", build_trimmer([n for n in DEFAULT_REMOTE if n != "mask"], settings, counter)))

    # Held out: the default learns from the sessions of the first half of the tasks, and is
    # measured on the sessions of the other half (which it keeps learning from, as it would).
    tasks = sorted({s.id.split("-")[2] for s in steps}, key=lambda t: int(t.removeprefix("task")))
    first = set(tasks[: len(tasks) // 2])
    trimmer = build_trimmer(DEFAULT_REMOTE, settings, counter)
    measure([s for s in steps if s.id.split("-")[2] in first], *pipeline(trimmer), counter=counter)
    held = measure([s for s in steps if s.id.split("-")[2] not in first], *pipeline(trimmer), counter=counter)
    held["name"] = f"milliwatt default, held out (learned on tasks {tasks[0]}..{tasks[len(tasks) // 2 - 1]})"
    raw_held = measure([s for s in steps if s.id.split("-")[2] not in first], *pipeline(Trimmer(counter=counter)), counter=counter)
    held["input_cost_vs_raw_at_cached_weight"] = {str(w): effective(held, w) / effective(raw_held, w) for w in (0.1, 0.5)}
    print(f"{held['name']}: sent {held['saved_share']:.1%} less, prefix {held['prefix_share_sent']:.1%}, lost {held['lost_steps']} "
          f"of {held['steps']}, asked again {held['reasked_steps']}, cost {held['input_cost_vs_raw_at_cached_weight']}", file=sys.stderr)  # fmt: skip
    rows.append(held)

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {platform.processor() or ''} {platform.system()} python {platform.python_version()}".strip(),
        "file": args.trajectories,
        "steps": len(steps),
        "rows": rows,
    }
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps([{k: r[k] for k in ("name", "saved_share", "prefix_share_sent", "lost_steps", "lost_share", "lost_by_strategy")} for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
