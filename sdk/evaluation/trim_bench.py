"""Measure a trimming pipeline over recorded agent steps: tokens, prefix stability, lost content.

Open loop, like the replay: every recorded step is trimmed as the remote tier would be sent
it, in trace order, and the pipeline learns from each recorded answer after trimming its
step (what the cascade does with a verified answer), so every step is trimmed before its own
answer is seen. A recorded answer calling a tool whose schema was withheld, from a request
that offered the index of withheld tools, is asked again with it, as the cascade does: both
requests are counted. Per pipeline: input tokens raw and sent, tokens repeating the
session's previous request (raw and sent), steps asked again, steps that lost content
(``milliwatt.trimming.audit``) by strategy, and the time trimming took per step.

``benchmarks/trim_tau.py`` runs it over tau-bench airline with the published baselines; the
replay reports the same figures for the pipeline it ran (``trimming`` in its JSON).
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from milliwatt.tokens import TokenCounter
from milliwatt.trimming import PrefixTracker, Trimmed, Trimmer, lost_content, wanted
from milliwatt.types import Message, Step, StepMeta

from .importers import TraceStep

TrimFn = Callable[[Step, int, frozenset[str]], Trimmed]  # (step, tokens before, tools to reveal)


def as_step(s: TraceStep) -> Step:
    return Step.create(
        s.messages, tools=s.tools or None, tool_choice=s.tool_choice,
        meta=StepMeta(session_id=s.session, agent=s.agent, tenant=s.tenant),
    )  # fmt: skip


def step_key(step: Step) -> tuple[str | None, int]:
    """A recorded step's key within its trace: its session and how many messages it carries."""
    return (step.meta.session_id, len(step.messages))


def pipeline(trimmer: Trimmer) -> tuple[TrimFn, Callable[[Step, Message], None]]:
    """A ``Trimmer`` as what ``measure`` runs: trim without a budget (the remote tier has none), learn."""
    return (lambda step, before, reveal: trimmer.trim(step, None, tokens_before=before, reveal=reveal)), trimmer.learn


def measure(
    steps: Sequence[TraceStep],
    trim: TrimFn,
    learn: Callable[[Step, Message], None] | None = None,
    *,
    counter: TokenCounter | None = None,
    sent: dict[tuple[str | None, int], int] | None = None,
) -> dict[str, Any]:
    """Run ``trim`` over ``steps``; ``sent`` (if given) is filled with each step's tokens sent,
    by ``step_key``."""
    counter = counter or TokenCounter()
    raw_prefix = PrefixTracker()
    raw = out = prefix_raw = prefix_sent = 0
    lost_steps = reasks = 0
    lost_by: Counter[str] = Counter()
    saved_by: Counter[str] = Counter()
    examples: list[dict[str, Any]] = []
    times: list[tuple[int, float]] = []
    for s in steps:
        step = as_step(s)
        before = counter.request(step.messages, step.tools)  # the accountant's count, memoised as in the cascade
        prefix_raw += raw_prefix.observe(step, counter)
        t0 = time.perf_counter()
        t = trim(step, before, frozenset())
        times.append((before, time.perf_counter() - t0))
        asked = wanted(s.answer, t)
        if asked:  # as the cascade does: the first request is spent, and the step asked again
            reasks += 1
            out += t.tokens_after
            prefix_sent += t.prefix_tokens
            t = trim(step, before, asked)
        raw += before
        out += t.tokens_after
        prefix_sent += t.prefix_tokens
        for stage in t.stages:
            saved_by[stage.strategy] += stage.saved
        lost = lost_content(t, s.answer)
        if lost:
            lost_steps += 1
            for strategy in lost:
                lost_by[strategy] += 1
            if len(examples) < 20:
                examples.append({"step": s.id, "lost": lost})
        if sent is not None:
            sent[step_key(step)] = t.tokens_after
        if learn is not None:
            learn(step, s.answer)
    n = len(steps)
    return {
        "steps": n,
        "tokens_raw": raw,
        "tokens_sent": out,
        "saved_share": 1 - out / raw if raw else 0.0,
        "prefix_tokens_raw": prefix_raw,
        "prefix_tokens_sent": prefix_sent,
        "prefix_share_sent": prefix_sent / out if out else 0.0,
        "reasked_steps": reasks,
        "lost_steps": lost_steps,
        "lost_share": lost_steps / n if n else 0.0,
        "lost_by_strategy": dict(lost_by),
        "saved_by_strategy": {k: v for k, v in saved_by.items() if v},
        "overhead_ms": _overhead(times),
        "lost_examples": examples,
    }


def _overhead(times: Iterable[tuple[int, float]]) -> dict[str, float | int | None]:
    times = list(times)
    all_ms = [dt * 1000 for _, dt in times]
    near_5k = [dt * 1000 for tokens, dt in times if 4000 <= tokens <= 6000]
    return {
        "p50": statistics.median(all_ms) if all_ms else None,
        "p95": statistics.quantiles(all_ms, n=20)[-1] if len(all_ms) >= 20 else None,
        "p50_steps_4k_6k": statistics.median(near_5k) if near_5k else None,
        "steps_4k_6k": len(near_5k),
    }
