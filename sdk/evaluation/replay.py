"""``milliwatt replay``: recorded agent traffic through the cascade, open loop, judged per step.

Every recorded step is sent through ``Milliwatt.step`` with the context it was recorded
with; the cascade answers it. The remote tier is the real one (``LiteLLMBackend`` ->
``litellm.acompletion``) with the provider swapped for ``milliwatt-replay``, which serves
the recorded answer (evaluation/replay_provider.py); its energy is estimated for the model
that recorded it, which is also the baseline. Each record's quality is set by wrapping the
ledger (``QualitySink``), so the cascade knows nothing of replays.

Deterministic by construction: the steps run one after the other in trace order (a step's
cache write-back is visible to every later step, as in live traffic), decoding is greedy
with a fixed seed, and the cache starts empty (or from ``--warm-from``'s ledger) every run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from .importers import FORMATS, Trace, TraceError, TraceStep, load_trace
from milliwatt.types import Message, StepMeta, StepRecord

if TYPE_CHECKING:
    from milliwatt.cascade import RecordSink

REPLAY_ID = "replay_id"  # the StepMeta.extra key the replay provider finds the answer by
SEED = 0
# Recorded models EcoLogits does not list, and the model charged instead. gpt-4-1106-preview
# is the first GPT-4 Turbo preview; EcoLogits lists GPT-4 Turbo as gpt-4-turbo.
ENERGY_SUBSTITUTES = {"gpt-4-1106-preview": "openai/gpt-4-turbo"}


def energy_model_for(model: str) -> str:
    """The litellm id the recorded model's energy (and the baseline) is estimated for."""
    from milliwatt.energy import RemoteEnergyModel

    name = ENERGY_SUBSTITUTES.get(model.split("/")[-1]) or (model if "/" in model else f"openai/{model}")
    RemoteEnergyModel().estimate(name, 1, 1)  # raises ValueError naming the model if EcoLogits lacks it
    return name


class QualitySink:
    """A record sink that judges each record against its step's reference, then forwards it."""

    def __init__(self, inner: RecordSink, steps: Iterable[TraceStep]) -> None:
        from milliwatt.quality import judge

        self.inner = inner
        self._judge = judge
        self._steps = {s.id: s for s in steps}

    async def write(self, record: StepRecord) -> None:
        step = self._steps.get(record.meta.extra.get(REPLAY_ID))
        if step is not None and record.response:
            record = replace(record, quality=self._judge(record.response, step.reference, step.tools))
            record = audited(record, step.answer)
        if step is not None:
            record = self._judge_gated(record, step)
        await self.inner.write(record)

    def _judge_gated(self, record: StepRecord, step: TraceStep) -> StepRecord:
        """Judge every answer a gated tier made (``evidence.answer``), accepted or not, by the
        measure the step is judged by: ``milliwatt calibrate`` learns from these verdicts."""

        def judged(a: Any) -> Any:
            q = self._judge(a.evidence["answer"], step.reference, step.tools)
            return replace(a, evidence={**a.evidence, "quality": {"metric": q.metric, "kind": q.kind, "agrees": q.agrees}})

        attempts = tuple(judged(a) if a.evidence and "features" in a.evidence and a.evidence.get("answer") else a for a in record.attempts)
        return replace(record, attempts=attempts) if attempts != record.attempts else record

    async def aclose(self) -> None:
        if hasattr(self.inner, "aclose"):
            await self.inner.aclose()


def audited(record: StepRecord, recorded: Message) -> StepRecord:
    """The record with its answering attempt's trimming audited against the recorded answer
    (``trim.lost`` in the attempt's evidence; ``{}``: nothing the answer used was removed)."""
    from milliwatt.trimming import lost_content

    if record.trimmed is None or not record.trimmed.stages:
        return record
    lost = lost_content(record.trimmed, recorded)
    attempts = tuple(
        replace(a, evidence={**a.evidence, "trim": {**a.evidence["trim"], "lost": lost}})
        if a.outcome == "answered" and a.evidence and "trim" in a.evidence else a
        for a in record.attempts
    )  # fmt: skip
    return replace(record, attempts=attempts)


def frontier_of(trace: Trace, steps: list[TraceStep]) -> tuple[str, str]:
    """The one recorded model and label of the steps (the remote tier is configured once)."""
    first = steps[0]
    for i, s in enumerate(steps):
        if (s.model, s.label) != (first.model, first.label):
            raise TraceError(
                trace.path, f"step {i} (id {s.id})",
                f"model/label {s.model}/{s.label} differs from {first.model}/{first.label}: one replay serves one recorded model",
            )  # fmt: skip
    return first.model, first.label


async def replay(
    trace: Trace,
    *,
    ledger: str | Path,
    config: str | Path | dict[str, Any] | None = None,
    limit: int | None = None,
    warm_from: str | Path | None = None,
    progress: TextIO | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Replay ``trace`` (its first ``limit`` steps) into a fresh SQLite ledger; return the summary.

    ``resume``: keep the ledger a replay left (killed part-way) and replay only the steps it
    does not hold (``unrecorded_steps``), under the same run id, the cache warmed with the
    answers already recorded; the summary is then the whole ledger's."""
    from tqdm import tqdm

    from milliwatt.evaluation.replay_provider import PROVIDER, serving

    from milliwatt.client import Milliwatt
    from milliwatt.config import load_settings
    from milliwatt.ids import new_step_id
    from milliwatt.ledger import delete_ledger_file
    from milliwatt.reports.summary import summarize

    steps = trace.steps[:limit] if limit is not None else trace.steps
    model, label = frontier_of(trace, steps)
    try:
        frontier = energy_model_for(model)
    except ValueError as e:
        raise TraceError(trace.path, None, str(e)) from None
    warm = _answered_steps(warm_from) if warm_from else []

    data = load_settings(config).model_dump()
    data["frontier_model"] = frontier
    # The recorded answers replace whatever provider is configured; tier settings stay.
    kept = {k: v for k, v in data["remote"].items() if k in ("timeout_s", "max_retries", "token_budget")}
    data["remote"] = {**kept, "model": f"{PROVIDER}/{model}", "label": label, "energy_model": frontier}
    data["cache"] = {**data["cache"], "path": None}  # in memory: a fresh cache every run
    ledger_path = Path(ledger)
    run_id = f"replay-{trace.format}-{new_step_id()}"
    todo, done = steps, 0
    if resume and ledger_path.is_file():
        recorded = recorded_steps(ledger_path)  # imports the spool first
        todo = [s for s in steps if s.id not in recorded]
        done = len(steps) - len(todo)
        run_id = next(iter(recorded.values()), None) or run_id
        warm = warm + _answered_steps(ledger_path)
    else:
        delete_ledger_file(ledger_path)  # one replay, one ledger: the summary is this run's
    data["ledger"] = f"sqlite:///{ledger_path}"

    tiers: Counter[str] = Counter()
    t0 = time.perf_counter()
    with serving({s.id: s.answer for s in steps}):
        async with Milliwatt.from_config(data, wrap_ledger=lambda ledger: QualitySink(ledger, steps)) as mw:
            if warm and (warm_from or "cache" in [t.name for t in mw.tiers]):
                await _warm_cache(mw, warm)
            bar = tqdm(total=len(todo), unit="step", desc=f"replay {trace.format}", file=progress, disable=progress is None)
            with bar:
                for s in todo:
                    result = await mw.step(
                        s.messages, tools=s.tools or None, tool_choice=s.tool_choice,
                        session_id=s.session, run_id=run_id, agent=s.agent or f"replay-{trace.format}", tenant=s.tenant,
                        metadata={REPLAY_ID: s.id}, temperature=0.0, seed=SEED,
                    )  # fmt: skip
                    tiers[result.tier] += 1
                    bar.set_postfix(tiers, refresh=False)
                    bar.update()
    wall_s = time.perf_counter() - t0

    summary = summarize(ledger_path)
    _add_baseline_quality(summary, steps)
    summary["wall_s"] = wall_s
    summary["replay"] = {
        "file": trace.path, "format": trace.format, "steps": len(steps), "run_id": run_id,
        "recorded_model": model, "label": label, "energy_model": frontier,
        "warm_from": str(warm_from) if warm_from else None, "seed": SEED,
        "resumed": {"already_recorded": done, "replayed": len(todo)} if resume else None,
    }  # fmt: skip
    return summary


def _add_baseline_quality(summary: dict[str, Any], steps: list[TraceStep]) -> None:
    """The frontier's own quality, per kind of measure: its recorded answers judged by the same
    measures (1.0 where the reference is that answer), and per useful answer its energy."""
    from milliwatt.quality import judge

    verdicts = [(judge(s.answer, s.reference, s.tools), s) for s in steps]
    q = summary["quality"]
    for kind in ("exact", "proxy"):
        part = [v.agrees for v, _ in verdicts if v.kind == kind]
        q[kind]["baseline"] = sum(part) / len(part) if part else None
        base, agree = q[kind]["energy_wh"]["baseline"], sum(part)
        summary["energy_per_useful_answer_wh"][kind]["baseline"] = (
            {k: base[k] / agree for k in ("low", "point", "high")} if agree else None
        )
        tokens = summary["tokens_per_useful_answer"][kind]
        tokens["baseline"] = tokens["baseline_tokens"] / agree if agree else None
    recorded = [s.reference["recorded_correct"] for _, s in verdicts if "recorded_correct" in s.reference]
    # The data set's own grading of the recorded answers (GSM8K: RouteLLM's), for comparison.
    q["baseline_recorded"] = sum(recorded) / len(recorded) if recorded else None


def recorded_steps(ledger: str | Path) -> dict[str, str | None]:
    """The trace step ids a replay's ledger holds a row for, each with its run id, in order.
    Opens the ledger first (``Ledger``), so what a killed run left in the spool is imported."""
    from sqlalchemy import func, select

    from milliwatt.ledger import STEPS, Ledger, open_existing

    Ledger(ledger).close()
    engine, _ = open_existing(ledger)
    s = STEPS.c
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(func.json_extract(s.meta_json, f"$.{REPLAY_ID}"), s.run_id).order_by(s.id)).all()
    finally:
        engine.dispose()
    return {rid: run for rid, run in rows if rid is not None}


def unrecorded_steps(trace: Trace, ledger: str | Path, *, limit: int | None = None) -> list[TraceStep]:
    """The steps of ``trace`` (its first ``limit``) that have no row in ``ledger``: after a
    replay was killed, exactly the steps it did not record (``--resume`` replays these)."""
    steps = trace.steps[:limit] if limit is not None else trace.steps
    if not Path(ledger).is_file():
        return list(steps)
    recorded = recorded_steps(ledger)
    return [s for s in steps if s.id not in recorded]


def _answered_steps(ledger: str | Path) -> list[dict[str, Any]]:
    """(request, response, tier, model, tenant) of every answered step of a ledger, in order."""
    from sqlalchemy import select

    from milliwatt.ledger import STEPS, open_existing

    engine, _ = open_existing(ledger)
    s = STEPS.c
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(s.request_json, s.response_json, s.tier, s.model, s.tenant).where(s.tier.not_in(("error", "cancelled"))).order_by(s.id)
            ).mappings().all()
    finally:
        engine.dispose()
    return [dict(r) for r in rows]


async def _warm_cache(mw: Any, rows: list[dict[str, Any]]) -> None:
    """Write a ledger's model answers into the cache, as the cascade's write-back would have."""
    from milliwatt.errors import ConfigError
    from milliwatt.types import Step

    names = [t.name for t in mw.tiers]
    if "cache" not in names:
        raise ConfigError("--warm-from", "the configured cascade has no cache tier to warm")
    cache = mw.tier("cache")
    later = set(names[names.index("cache") + 1 :])
    for row in rows:
        if row["tier"] not in later:
            continue
        request = json.loads(row["request_json"])
        step = Step.create(
            request.pop("messages"), tools=request.pop("tools", None), tool_choice=request.pop("tool_choice", None),
            response_format=request.pop("response_format", None), options=request, meta=StepMeta(tenant=row["tenant"]),
        )  # fmt: skip
        asked = mw.cascade.trimmers[cache.name].trim(step, cache.token_budget).step
        await cache.remember(asked, json.loads(row["response_json"]), row["tier"], model=row["model"])


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="recorded traffic: tau-bench JSON, BFCL JSONL, GSM8K paired CSV, or a milliwatt trace")
    p.add_argument("--format", choices=FORMATS, help="the file's format (default: detected from its content)")
    p.add_argument("--tools", help="tau: the tool schemas (default: tools.json next to FILE)")
    p.add_argument("--answers", help="bfcl: the ground truth (default: <FILE stem>_answers.jsonl next to FILE)")
    p.add_argument("--limit", type=int, help="replay only the first N steps")
    p.add_argument("--config", help="a YAML or TOML configuration file")
    p.add_argument("--ledger", help="SQLite file to write, replaced each run (default: replay-<format>.db)")
    p.add_argument("--json", dest="json_out", help="also write the summary as JSON to this file")
    p.add_argument("--warm-from", help="a ledger whose answered steps are written into the cache first")
    p.add_argument("--save-trace", help="also write the imported steps as a milliwatt trace (JSONL)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume", action="store_true",
        help="keep --ledger (a replay killed part-way) and replay only the steps it does not hold",
    )  # fmt: skip


def run(args: argparse.Namespace) -> int:
    import asyncio

    from milliwatt.reports.summary import format_summary

    if args.limit is not None and args.limit < 1:
        raise TraceError(args.file, None, f"--limit must be at least 1, got {args.limit}")
    trace = load_trace(args.file, format=args.format, tools=args.tools, answers=args.answers)
    if args.save_trace:
        write_trace(trace.steps, args.save_trace)
    ledger = args.ledger or f"replay-{trace.format}.db"
    progress = None if args.quiet or not sys.stderr.isatty() else sys.stderr
    summary = asyncio.run(
        replay(trace, ledger=ledger, config=args.config, limit=args.limit, warm_from=args.warm_from, progress=progress,
               resume=args.resume)  # fmt: skip
    )
    print(format_summary(summary))
    print(f"replay: {summary['replay']['steps']} steps of {trace.path} ({trace.format}) in {summary['wall_s']:.1f} s")
    if (resumed := summary["replay"]["resumed"]) is not None:
        print(f"resumed: {resumed['already_recorded']} step(s) were already in {ledger}, {resumed['replayed']} replayed")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    return 0


def write_trace(steps: Iterable[TraceStep], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for s in steps:
            f.write(json.dumps(s.to_json(), ensure_ascii=False) + "\n")
