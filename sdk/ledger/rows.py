"""A ``StepRecord`` as the rows of ``steps`` and ``attempts``: exactly what is inserted, and
exactly what a spool line holds when the insert fails."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from milliwatt.types import Attempt, Energy, Quality, StepRecord


def iso_utc(unix_seconds: float) -> str:
    """Fixed-width ISO-8601 UTC with microseconds: sorts as text, and SQLite's ``date()`` reads it."""
    return datetime.fromtimestamp(unix_seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def to_json(value: Any) -> str:
    # default=str: a stray non-JSON value (a datetime in meta.extra) must not lose the step.
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _energy_cols(e: Energy, prefix: str = "energy") -> dict[str, Any]:
    return {
        f"{prefix}_method": e.method,
        f"{prefix}_wh_low": e.low_wh,
        f"{prefix}_wh_point": e.point_wh,
        f"{prefix}_wh_high": e.high_wh,
        f"{prefix}_basis": e.basis,
    }


def step_row(r: StepRecord) -> dict[str, Any]:
    return {
        "id": r.step_id,
        "started_at": iso_utc(r.started_at),
        "session_id": r.meta.session_id,
        "run_id": r.meta.run_id,
        "tenant": r.meta.tenant,
        "agent": r.meta.agent,
        "tier": r.tier,
        "model": r.model,
        "label": r.label,
        "input_tokens_raw": r.input_tokens_raw,
        "input_tokens_sent": r.input_tokens_sent,
        "input_tokens_prefix": r.input_tokens_prefix,
        "output_tokens": r.output_tokens,
        "latency_ms": r.latency_s * 1000.0,
        **_energy_cols(r.energy),
        "cost_usd": r.cost_usd,
        "baseline_model": r.baseline_model,
        **_energy_cols(r.baseline_energy, "baseline_energy"),
        "baseline_cost_usd": r.baseline_cost_usd,
        "request_json": to_json(r.request),
        "response_json": to_json(r.response),
        "meta_json": to_json(r.meta.extra),
        **_quality_cols(r.quality),
        "user_id": r.meta.user,
        "baseline_input_tokens": r.baseline_input_tokens,
        "baseline_cached_tokens": r.baseline_cached_tokens if r.baseline_input_tokens is not None else None,
        "baseline_output_tokens": r.baseline_output_tokens,
        "baseline_tokenizer": r.baseline_tokenizer,
        "coefficients": r.coefficients,
        "hardware": r.hardware,
    }


def _quality_cols(q: Quality | None) -> dict[str, Any]:
    if q is None:
        return dict.fromkeys(("quality_metric", "quality_kind", "quality_agrees", "quality_score", "quality_detail"))
    return {
        "quality_metric": q.metric,
        "quality_kind": q.kind,
        "quality_agrees": int(q.agrees),
        "quality_score": q.score,
        "quality_detail": q.detail,
    }


def attempt_rows(r: StepRecord) -> list[dict[str, Any]]:
    return [_attempt_row(r.step_id, i, a) for i, a in enumerate(r.attempts)]


def _attempt_row(step_id: str, ordinal: int, a: Attempt) -> dict[str, Any]:
    return {
        "step_id": step_id,
        "ordinal": ordinal,
        "tier": a.tier,
        "outcome": a.outcome,
        "reason": a.reason,
        "signal": a.signal,
        "model": a.model,
        "label": a.label,
        "input_tokens": a.input_tokens,
        "output_tokens": a.output_tokens,
        "latency_ms": a.latency_s * 1000.0,
        **_energy_cols(a.energy),
        "cost_usd": a.cost_usd,
        "evidence_json": None if a.evidence is None else to_json(a.evidence),
        "prefix_tokens": a.prefix_tokens,
        **_observed_cols(a.energy),
    }


def _observed_cols(e: Energy) -> dict[str, Any]:
    o = e.observed
    if o is None:
        return {"cpu_seconds": None, "measured_j": None, "meter": None, "energy_model": None, "cached_tokens": None, "coefficients": e.version}
    return {
        "cpu_seconds": o.cpu_seconds,
        "measured_j": o.joules,
        "meter": o.meter,
        "energy_model": o.model,
        "cached_tokens": o.cached_tokens,
        "coefficients": e.version,
    }


def overhead_rows(r: StepRecord) -> list[dict[str, Any]]:
    from milliwatt.ids import new_step_id

    return [
        {
            "id": new_step_id(o.at),
            "step_id": r.step_id,
            "at": iso_utc(o.at),
            "tier": o.tier,
            "kind": o.kind,
            "detail": o.detail,
            "cpu_seconds": o.cpu_seconds,
            **_energy_cols(e),
            "coefficients": e.version,
        }
        for o, e in r.overheads
    ]


def record_rows(r: StepRecord) -> dict[str, Any]:
    """One record as its rows: ``{"step": <steps row>, "attempts": [<attempts rows>]}`` (and
    ``"overheads"`` when background work came with it), the unit the writer inserts (in one
    transaction) and the spool stores (as one line)."""
    rows: dict[str, Any] = {"step": step_row(r), "attempts": attempt_rows(r)}
    if r.overheads:
        rows["overheads"] = overhead_rows(r)
    return rows
