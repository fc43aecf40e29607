"""The run report: what the cascade spent against the counterfactual "every step, untrimmed,
sent to the frontier model", with ranges and the methods behind every energy figure.

Everything is aggregated in SQL, so a ledger of millions of steps is summarised without
loading it into Python, and the same queries run on SQLite and PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, case, func, select

from milliwatt.ledger import ATTEMPTS, OUTCOMES, STEPS, LedgerError, fault_lines, open_existing, read_faults
from milliwatt.ledger.schema import OVERHEADS
from milliwatt.types import Energy, savings_factor

_RANGE = ("low", "point", "high")
KINDS = ("exact", "proxy")
LAST_RESORT = "remote"  # the cascade's last tier: the frontier model (config: remote.tier)
# Labels of answers that are the recorded reference answer itself (docs/ledger.md, `label`).
RECORDED_LABELS = ("replay", "oracle")


def summarize(url_or_path: str | Path) -> dict[str, Any]:
    """Aggregate a ledger (a SQLite path or any SQLAlchemy URL) into a JSON-ready dict.

    Raises ``milliwatt.ledger.LedgerError`` naming the path if it is missing or not a ledger.
    """
    engine, where = open_existing(url_or_path)
    try:
        return _summarize(engine, where)
    finally:
        engine.dispose()


def _sum(col: Any) -> Any:
    return func.coalesce(func.sum(col), 0)


def _range(prefix: str) -> list[Any]:
    return [_sum(STEPS.c[f"{prefix}_wh_{k}"]).label(f"{prefix}_{k}") for k in _RANGE]


def _summarize(engine: Engine, where: str) -> dict[str, Any]:
    s = STEPS.c
    with engine.connect() as conn:
        totals = conn.execute(
            select(
                func.count().label("steps"),
                func.count(s.session_id.distinct()).label("sessions"),
                func.min(s.started_at).label("first"),
                func.max(s.started_at).label("last"),
                *_range("energy"),
                *_range("baseline_energy"),
                _sum(s.input_tokens_raw).label("input_raw"),
                _sum(s.input_tokens_sent).label("input_sent"),
                _sum(s.input_tokens_prefix).label("input_prefix"),
                _sum(s.output_tokens).label("output"),
                _sum(s.cost_usd).label("cost"),
                _sum(s.baseline_cost_usd).label("baseline_cost"),
                func.avg(s.latency_ms).label("latency_mean"),
                func.max(s.latency_ms).label("latency_max"),
            )
        ).one()._mapping
        n = totals["steps"]
        by_tier = conn.execute(
            select(s.tier, func.count(), *_range("energy")).group_by(s.tier).order_by(func.count().desc(), s.tier)
        ).all()
        a = ATTEMPTS.c
        by_attempt_tier = conn.execute(
            select(
                a.tier,
                func.count().label("attempts"),
                *[_sum(case((a.outcome == o, 1), else_=0)).label(o) for o in OUTCOMES],
                *[_sum(a[f"energy_wh_{k}"]).label(k) for k in _RANGE],
            ).group_by(a.tier).order_by(a.tier)
        ).all()
        methods = {
            side: _methods(conn, s[f"{side}_method"], s[f"{side}_basis"])
            for side in ("energy", "baseline_energy")
        }
        labels = conn.execute(
            select(s.label, s.tier, func.count()).where(s.label.is_not(None)).group_by(s.label, s.tier).order_by(s.label, s.tier)
        ).all()
        baseline_models = conn.execute(select(s.baseline_model, func.count()).group_by(s.baseline_model)).all()
        latency = {f"p{p}": _percentile(conn, s.latency_ms, n, p) for p in (50, 95)}
        latency_by_tier = conn.execute(
            select(s.tier, func.count(), func.avg(s.latency_ms), _sum(s.latency_ms)).group_by(s.tier).order_by(s.tier)
        ).all()
        latency_tiers = {
            tier: {
                **{f"p{p}": _percentile(conn, s.latency_ms, count, p, s.tier == tier) for p in (50, 95)},
                "mean": mean,
                "total": total,
            }
            for tier, count, mean, total in latency_by_tier
        }
        workflows = _workflows(conn)
        judged = s.quality_kind.is_not(None)
        quality_rows = conn.execute(
            select(s.quality_kind, s.quality_metric, func.count(), _sum(s.quality_agrees), func.avg(s.quality_score))
            .where(judged).group_by(s.quality_kind, s.quality_metric).order_by(s.quality_kind, s.quality_metric)
        ).all()
        quality_by_tier = conn.execute(
            select(s.tier, s.quality_kind, func.count(), _sum(s.quality_agrees))
            .where(judged).group_by(s.tier, s.quality_kind).order_by(s.tier, s.quality_kind)
        ).all()
        energy_by_kind = conn.execute(
            select(s.quality_kind, *_range("energy"), *_range("baseline_energy")).where(judged).group_by(s.quality_kind)
        ).all()
        tokens_by_kind = _tokens_by_kind(conn)
        background = _background(conn)
        trimming = _trimming(conn, totals)
        shadow = _shadow_checks(conn)

    steps_energy = _energy(totals, "energy")
    # Background work is charged to the cascade: the baseline would have loaded no model.
    cascade = steps_energy + background["energy"]
    baseline = _energy(totals, "baseline_energy")
    quality = _quality(quality_rows, energy_by_kind)
    tiers = {tier: count for tier, count, *_ in by_tier}
    quality_tiers = _by_tier(tiers, quality_by_tier, _labels(labels))
    return {
        "ledger": where,
        "steps": n,
        "sessions": totals["sessions"],
        "first_started_at": totals["first"],
        "last_started_at": totals["last"],
        "tiers": tiers,
        # The quality that matters first: that of the steps the cheaper tiers answered.
        "cheap_tiers": _cheap_tiers(quality_tiers),
        "by_tier": quality_tiers,
        # cascade = its steps' attempts + the background work recorded with them (overheads)
        "energy_wh": {
            "cascade": _as_range(cascade),
            "steps": _as_range(steps_energy),
            "background": _as_range(background["energy"]),
            "baseline": _as_range(baseline),
        },
        "background": {**{k: v for k, v in background.items() if k != "energy"},
                       "per_step_wh": {k: v / n for k, v in _as_range(background["energy"]).items()} if n else None},  # fmt: skip
        "energy_method": {
            "cascade": methods["energy"],
            "baseline": {**methods["baseline_energy"], "models": dict(baseline_models)},
            "note": (
                "cascade: the sum over steps of every tier attempt (passes included), plus the background work "
                "(model loads, cache index builds and write-backs), amortised over the steps; "
                "baseline: the same steps, untrimmed, each sent to the frontier model; "
                "savings low = baseline low / cascade high, high = baseline high / cascade low"
            ),
        },
        "savings_factor": savings_factor(baseline, cascade),
        "savings_factor_steps_only": savings_factor(baseline, steps_energy),
        "tokens": {"input_raw": totals["input_raw"], "input_sent": totals["input_sent"], "output": totals["output"]},
        "trimming": trimming,
        "shadow_checks": shadow,
        "cost_usd": {"cascade": totals["cost"], "baseline": totals["baseline_cost"]},
        "latency_ms": {**latency, "mean": totals["latency_mean"], "max": totals["latency_max"]},
        # by the tier that answered the step (the step's whole wall time, its passes included)
        "latency_ms_by_tier": latency_tiers,
        "workflows": workflows,
        "quality": quality,
        # Per kind of measure: the energy of the steps it judged over those that agree. The
        # baseline's needs the frontier's own quality, which only a replay knows (it fills it in).
        "energy_per_useful_answer_wh": {
            kind: {
                "cascade": {k: v / part["agree"] for k, v in part["energy_wh"]["cascade"].items()} if part["agree"] else None,
                "baseline": None,
            }
            for kind, part in ((kind, quality[kind]) for kind in KINDS)
        },
        # Tokens a model read or wrote per answer that agrees (the cascade: every model attempt,
        # passes included, and of it the remote tier's; the baseline: filled in by a replay).
        "tokens_per_useful_answer": {
            kind: {
                "cascade": tokens_by_kind.get(kind, {}).get("cascade", 0) / quality[kind]["agree"] if quality[kind]["agree"] else None,
                "cascade_remote": tokens_by_kind.get(kind, {}).get("remote", 0) / quality[kind]["agree"] if quality[kind]["agree"] else None,
                "baseline": None,
                "baseline_tokens": tokens_by_kind.get(kind, {}).get("baseline", 0),
            }
            for kind in KINDS
        },
        "energy_by_tier": {
            tier: {"steps": count, **dict(zip(_RANGE, wh))} for tier, count, *wh in by_tier
        },
        "attempts_by_tier": {
            r.tier: {k: v for k, v in r._mapping.items() if k != "tier"} for r in by_attempt_tier
        },
        "labels": _labels(labels),
        # Records that missed the tables: counts by kind, and what still waits in the spool.
        "ledger_faults": read_faults(engine),
    }


def _background(conn: Any) -> dict[str, Any]:
    """The background work (``overheads``): its energy, and by kind and tier."""
    o = OVERHEADS.c
    rows = conn.execute(
        select(o.kind, o.tier, func.count(), _sum(o.cpu_seconds), *[_sum(o[f"energy_wh_{k}"]) for k in _RANGE])
        .group_by(o.kind, o.tier).order_by(o.kind, o.tier)
    ).all()
    total = Energy.zero()
    parts = []
    for kind, tier, count, cpu, lo, pt, hi in rows:
        e = Energy("cpu-time", lo, pt, max(hi, pt))
        total = total + e
        parts.append({"kind": kind, "tier": tier, "count": count, "cpu_seconds": cpu, "energy_wh": _as_range(e)})
    return {"energy": total, "items": parts}


def _tokens_by_kind(conn: Any) -> dict[str, dict[str, int]]:
    """Per kind of quality measure, over the steps it judged: tokens every model attempt read
    and wrote, those of the remote tier, and the baseline's."""
    s, a = STEPS.c, ATTEMPTS.c
    model_tokens = a.input_tokens + a.output_tokens
    attempts = conn.execute(
        select(s.quality_kind, _sum(case((a.model.is_not(None), model_tokens), else_=0)),
               _sum(case((a.tier == LAST_RESORT, model_tokens), else_=0)))
        .select_from(STEPS.join(ATTEMPTS, a.step_id == s.id))
        .where(s.quality_kind.is_not(None), a.outcome != "skipped").group_by(s.quality_kind)
    ).all()  # fmt: skip
    baseline = conn.execute(
        select(s.quality_kind, _sum(func.coalesce(s.baseline_input_tokens, s.input_tokens_raw) + func.coalesce(s.baseline_output_tokens, s.output_tokens)))
        .where(s.quality_kind.is_not(None)).group_by(s.quality_kind)
    ).all()  # fmt: skip
    out: dict[str, dict[str, int]] = {}
    for kind, every, remote in attempts:
        out.setdefault(kind, {}).update(cascade=int(every), remote=int(remote))
    for kind, tokens in baseline:
        out.setdefault(kind, {})["baseline"] = int(tokens)
    return out


def _shadow_checks(conn: Any) -> dict[str, dict[str, Any]]:
    """Live precision of the cheap tiers whose answers were checked: per checked tier, how many
    of its served answers agree with the answer the next tier gave in a shadow check
    (``milliwatt.quality.agreement``), with the 95% Clopper-Pearson interval."""
    from milliwatt.calibration import clopper_pearson_lower, clopper_pearson_upper
    from milliwatt.quality import agreement

    a, s = ATTEMPTS.c, STEPS.c
    rows = conn.execute(
        select(s.response_json, a.evidence_json)
        .join(STEPS, STEPS.c.id == a.step_id)
        .where(a.outcome == "shadow", a.evidence_json.like('%"checks"%'))
    )
    counts: dict[str, list[int]] = {}
    for response, raw in rows:
        evidence = json.loads(raw)
        if not evidence.get("answer"):
            continue
        tally = counts.setdefault(evidence["checks"], [0, 0])
        tally[0] += 1
        tally[1] += agreement(json.loads(response), evidence["answer"]).agrees
    out = {}
    for tier, (n, agreed) in sorted(counts.items()):
        wrong = n - agreed
        out[tier] = {
            "checked": n, "agreed": agreed, "precision": agreed / n,
            "precision_low": 1 - clopper_pearson_upper(wrong, n, 0.975), "precision_high": 1 - clopper_pearson_lower(wrong, n, 0.975),
        }  # fmt: skip
    return out


def _trimming(conn: Any, totals: Any) -> dict[str, Any]:
    """What trimming did to the answering tiers' requests: tokens saved (by strategy), tokens
    repeating the session's previous request, and, where a replay audited it against the
    recorded answer, the steps that lost content (by the strategy that removed it)."""
    a = ATTEMPTS.c
    saved: dict[str, int] = {}
    lost_by: dict[str, int] = {}
    withheld = audited = lost = 0
    rows = conn.execute(
        select(a.evidence_json).where(a.outcome == "answered", a.evidence_json.like('%"trim"%'))
    )  # one JSON document per trimmed step; SQLite and PostgreSQL read JSON differently, so here
    for (raw,) in rows:
        trim = json.loads(raw).get("trim") or {}
        for strategy, n in (trim.get("saved") or {}).items():
            saved[strategy] = saved.get(strategy, 0) + n
        withheld += bool(trim.get("withheld"))
        if "lost" in trim:
            audited += 1
            lost += bool(trim["lost"])
            for strategy in trim["lost"]:
                lost_by[strategy] = lost_by.get(strategy, 0) + 1
    # Requests a model answered by asking for withheld tool schemas: sent, and asked again.
    asked_steps, asked_tokens, asked_prefix = conn.execute(
        select(func.count(a.step_id.distinct()), _sum(a.input_tokens), _sum(a.prefix_tokens))
        .where(a.evidence_json.like('%"asked_for"%'))
    ).one()
    raw_tokens = totals["input_raw"]
    sent, prefix = totals["input_sent"] + asked_tokens, totals["input_prefix"] + asked_prefix
    return {
        "tokens_raw": raw_tokens,
        "tokens_sent": sent,  # the answering requests, and the requests asked again
        "saved_share": 1 - sent / raw_tokens if raw_tokens else 0.0,
        "asked_again": {"steps": asked_steps, "tokens": asked_tokens},
        "saved_by_strategy": saved,
        "prefix_tokens": prefix,
        "prefix_share": prefix / sent if sent else None,
        "steps_with_tools_withheld": withheld,
        "audited_steps": audited,
        "lost_steps": lost if audited else None,
        "lost_share": lost / audited if audited else None,
        "lost_by_strategy": lost_by,
    }


def _share(agree: int, steps: int) -> float | None:
    return agree / steps if steps else None


def _quality(rows: list[Any], energy_by_kind: list[Any]) -> dict[str, Any]:
    """Agreement with the reference, exact measures and proxies apart (see milliwatt.quality).

    No figure here mixes the two kinds: ``judged`` is only a count, and ``metric`` names every
    measure used. ``baseline`` (the frontier's own quality, per kind) is None here: a replay
    sets it. ``energy_wh`` is the energy of the steps the kind judged, for energy per useful
    answer."""
    energy = {r[0]: r for r in energy_by_kind}
    parts: dict[str, dict[str, Any]] = {}
    for kind in KINDS:
        mine = [r for r in rows if r[0] == kind]
        steps, agree = sum(r[2] for r in mine), sum(int(r[3]) for r in mine)
        sums = energy.get(kind)
        parts[kind] = {
            "steps": steps,
            "agree": agree,
            "share": _share(agree, steps),
            "baseline": None,
            "metrics": {m: {"steps": c, "agree": int(a), "share": _share(int(a), c), "mean_score": sc} for _, m, c, a, sc in mine},
            "energy_wh": {
                side: _as_range(_energy(sums._mapping, prefix)) if sums else {k: 0.0 for k in _RANGE}
                for side, prefix in (("cascade", "energy"), ("baseline", "baseline_energy"))
            },
        }
    return {
        "metric": " + ".join(f"{m} ({k})" for k, m, *_ in rows) or None,
        "judged": parts["exact"]["steps"] + parts["proxy"]["steps"],
        **parts,
    }


def _tier_order(tier: str) -> tuple[int, str]:
    # The cascade's order: rules, cache, local, plugin tiers, then the last resort and failures.
    order = {"rules": 0, "cache": 1, "local": 2, LAST_RESORT: 4, "error": 5, "cancelled": 6}
    return order.get(tier, 3), tier


def _kind_counts(judged: int, agree: int) -> dict[str, Any]:
    return {"judged": judged, "agree": agree, "share": _share(agree, judged)}


def _by_tier(tiers: dict[str, int], rows: list[Any], labels: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Per answering tier: its steps, and how many of them each kind of measure judged and found
    agreeing. ``agree``/``share`` repeat the exact figures where the tier has exact judgments,
    else the proxy's (``measure`` says which; None when nothing was judged)."""
    counts = {(t, k): (c, int(a)) for t, k, c, a in rows}
    out: dict[str, dict[str, Any]] = {}
    for tier in sorted(tiers, key=_tier_order):
        entry: dict[str, Any] = {"steps": tiers[tier]}
        for kind in KINDS:
            judged, agree = counts.get((tier, kind), (0, 0))
            entry |= {f"judged_{kind}": judged, f"agree_{kind}": agree, f"share_{kind}": _share(agree, judged)}
        measure = next((k for k in KINDS if entry[f"judged_{k}"]), None)
        entry |= {
            "measure": measure,
            "agree": entry[f"agree_{measure}"] if measure else 0,
            "share": entry[f"share_{measure}"] if measure else None,
            # Every step answered with the recorded answer itself (a replay's remote tier): its
            # agreement is the recorded model's own, true by construction where that answer is
            # the reference, and says nothing of the cascade.
            "serves_recorded_answer": sum(labels.get(lb, {}).get(tier, 0) for lb in RECORDED_LABELS) == tiers[tier],
        }
        out[tier] = entry
    return out


def _cheap_tiers(by_tier: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The steps answered by every tier but the last-resort remote one (and failures), together."""
    cheap = [t for t in by_tier if t not in (LAST_RESORT, "error", "cancelled")]
    out: dict[str, Any] = {"tiers": cheap, "steps": sum(by_tier[t]["steps"] for t in cheap)}
    for kind in KINDS:
        out[kind] = _kind_counts(sum(by_tier[t][f"judged_{kind}"] for t in cheap), sum(by_tier[t][f"agree_{kind}"] for t in cheap))
    return out


def _energy(row: Any, prefix: str) -> Energy:
    low, point, high = (float(row[f"{prefix}_{k}"]) for k in _RANGE)
    # Each row satisfies low <= point <= high, but the three sums are rounded separately;
    # clamp the last-bit differences rather than reject a valid ledger.
    point = max(point, low)
    return Energy("mixed", low, point, max(high, point))


def _as_range(e: Energy) -> dict[str, float]:
    return {"low": e.low_wh, "point": e.point_wh, "high": e.high_wh}


def _methods(conn: Any, method_col: Any, basis_col: Any) -> dict[str, Any]:
    rows = conn.execute(select(method_col, func.count()).group_by(method_col).order_by(method_col)).all()
    basis = conn.execute(select(basis_col).where(basis_col != "").distinct().order_by(basis_col)).scalars().all()
    return {"methods": dict(rows), "basis": list(basis)}


def _labels(rows: list[Any]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for label, tier, count in rows:
        out.setdefault(label, {})[tier] = count
    return out


def _percentile(conn: Any, col: Any, n: int, p: int, where: Any = None) -> float | None:
    """Nearest-rank percentile of the ``n`` values (those ``where`` selects): the smallest
    value with at least p% of the values at or below it."""
    if n == 0:
        return None
    rank = max(1, math.ceil(p / 100 * n))
    query = select(col) if where is None else select(col).where(where)
    return conn.execute(query.order_by(col).limit(1).offset(rank - 1)).scalar()


def _nearest_rank(values: list[float], p: int) -> float:
    return sorted(values)[max(1, math.ceil(p / 100 * len(values))) - 1]


def _workflows(conn: Any) -> dict[str, Any]:
    """What one workflow (a session; a step without one is its own) costs, cascade and
    baseline side by side: the distribution over sessions of their summed energy (point),
    cost and steps. A buyer prices workflows, not steps."""
    s = STEPS.c
    rows = conn.execute(
        select(
            func.count(),
            _sum(s.energy_wh_point),
            _sum(s.baseline_energy_wh_point),
            _sum(s.cost_usd),
            _sum(s.baseline_cost_usd),
        ).group_by(func.coalesce(s.session_id, s.id))
    ).all()
    if not rows:
        return {"sessions": 0}
    columns = {"steps": 0, "energy_wh_cascade": 1, "energy_wh_baseline": 2, "cost_usd_cascade": 3, "cost_usd_baseline": 4}
    out: dict[str, Any] = {"sessions": len(rows)}
    for name, i in columns.items():
        values = [float(r[i] or 0.0) for r in rows]
        out[name] = {"p50": _nearest_rank(values, 50), "p95": _nearest_rank(values, 95), "mean": sum(values) / len(values)}
    return out


# --------------------------------------------------------------------------- text


def _wh(x: float | None) -> str:
    if x is None:
        return "-"
    if x == 0:
        return "0"
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"


def _factor(x: float | None) -> str:
    return "n/a" if x is None else f"{x:,.3g}x" if x < 1e4 else f"{x:,.0f}x"


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: list[str]) -> str:
        # First column left-aligned (names), the rest right-aligned (numbers).
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    return [line(header), line(["-" * w for w in widths]), *map(line, rows)]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _of(agree: int, judged: int) -> str:
    return f"{agree} of {judged} ({_pct(agree / judged)})" if judged else "-"


def _cheap_tier_lines(s: dict[str, Any]) -> list[str]:
    """The quality that leads: per cheap tier and together, exact and proxy apart; the last-resort
    tier below them, marked when it served the recorded answer rather than answering."""
    q, by_tier, cheap = s.get("quality") or {}, s.get("by_tier") or {}, s.get("cheap_tiers")
    if not q.get("judged") or cheap is None:
        return []
    rows = [[t, str(v["steps"]), _of(v["agree_exact"], v["judged_exact"]), _of(v["agree_proxy"], v["judged_proxy"])]
            for t, v in by_tier.items() if t in cheap["tiers"]]  # fmt: skip
    rows.append(["cheap tiers together", str(cheap["steps"]), _of(cheap["exact"]["agree"], cheap["exact"]["judged"]),
                 _of(cheap["proxy"]["agree"], cheap["proxy"]["judged"])])  # fmt: skip
    notes = []
    for t, v in by_tier.items():
        if t in cheap["tiers"]:
            continue
        mark = " *" if v["serves_recorded_answer"] else ""
        rows.append([t + mark, str(v["steps"]), _of(v["agree_exact"], v["judged_exact"]), _of(v["agree_proxy"], v["judged_proxy"])])
        if mark:
            notes.append(
                f"* {t} served the recorded answer: its agreement is the recorded model's own (true by construction "
                "where that answer is the reference), not the quality of the cascade"
            )
    out = ["", "Quality of the cheap tiers: steps whose answer agrees with the reference (exact and proxy apart)"]
    out += _table(["tier", "steps", "exact: agree of judged", "proxy: agree of judged"], rows)
    if not cheap["steps"]:
        out.append("no step was answered by a tier cheaper than " + LAST_RESORT)
    return out + notes


def _quality_lines(s: dict[str, Any]) -> list[str]:
    q = s.get("quality") or {}
    if not q.get("judged"):
        return []
    out = ["", f"Quality by measure, every answering tier ({q['judged']} judged steps): {q['metric']}"]
    rows = []
    for kind in KINDS:
        part = q[kind]
        if part["steps"]:
            rows.append([kind + (" (reported apart)" if kind == "proxy" else ""), str(part["steps"]),
                         _pct(part["share"]), _pct(part["baseline"])])  # fmt: skip
            rows += [[f"  {m}", str(v["steps"]), _pct(v["share"]), ""] for m, v in part["metrics"].items()]
    out += _table(["measure", "steps", "all tiers agree", "baseline agrees"], rows)
    served = {t: v["steps"] for t, v in (s.get("by_tier") or {}).items() if v["serves_recorded_answer"]}
    if served:
        out.append("all tiers includes " + ", ".join(f"{t}'s {_steps(c)}" for t, c in served.items())
                   + " answered with the recorded answer itself: read the cheap tiers' quality above")  # fmt: skip
    if q.get("baseline_recorded") is not None:
        out.append(f"baseline as graded by the data set itself: {_pct(q['baseline_recorded'])}")
    per = s["energy_per_useful_answer_wh"]
    tokens = s.get("tokens_per_useful_answer") or {}
    for kind in KINDS:
        for side in ("cascade", "baseline"):
            if (per.get(kind) or {}).get(side):
                out.append(f"energy per useful answer, {kind}-judged steps, {side}: "
                           + " / ".join(_wh(per[kind][side][k]) for k in _RANGE) + " Wh (low / point / high)")  # fmt: skip
        t = tokens.get(kind) or {}
        if t.get("cascade") is not None:
            baseline = f", baseline {t['baseline']:,.0f}" if t.get("baseline") is not None else ""
            out.append(f"tokens per useful answer, {kind}-judged steps: cascade {t['cascade']:,.0f} "
                       f"(remote {t['cascade_remote']:,.0f}){baseline}")  # fmt: skip
    return out


def _background_lines(b: dict[str, Any] | None, steps: int) -> list[str]:
    if not b or not b["items"]:
        return ["background work: none recorded"]
    per = b["per_step_wh"]
    out = [f"background work, charged to the cascade ({_wh(per['point'])} Wh per step over {_steps(steps)}):"]
    out += [f"  {i['tier']} {i['kind']}: {i['count']}x, {i['cpu_seconds']:.2f} CPU s, {_wh(i['energy_wh']['point'])} Wh"
            for i in b["items"]]  # fmt: skip
    return out


def _shadow_lines(checks: dict[str, dict[str, Any]] | None) -> list[str]:
    """Live precision of checked tiers, beside the replay-judged quality above it."""
    if not checks:
        return []
    out = ["", "Live checks: served answers a later tier answered again off the critical path"]
    for tier, c in checks.items():
        out.append(
            f"  {tier}: {c['agreed']} of {c['checked']} agree ({100 * c['precision']:.1f}%, "
            f"95% interval {100 * c['precision_low']:.1f}-{100 * c['precision_high']:.1f}%)"
        )
    return out


def _trimming_lines(t: dict[str, Any] | None) -> list[str]:
    if not t:
        return []
    out = []
    if t["saved_by_strategy"]:
        out.append("  trimmed by: " + ", ".join(f"{k} {v:,}" for k, v in sorted(t["saved_by_strategy"].items(), key=lambda kv: -kv[1])))
    if t["asked_again"]["steps"]:
        out.append(
            f"  asked again with withheld tool schemas: {t['asked_again']['steps']} step(s), "
            f"{t['asked_again']['tokens']:,} tokens for the first requests ({100 * t['saved_share']:.1f}% fewer tokens in all)"
        )
    if t["prefix_share"] is not None:
        out.append(f"  repeating the session's previous request (prompt-cacheable): {t['prefix_tokens']:,} ({100 * t['prefix_share']:.1f}% of sent)")
    if t["audited_steps"]:
        by = ", ".join(f"{k} {v}" for k, v in sorted(t["lost_by_strategy"].items()))
        out.append(
            f"  steps that lost content the recorded answer used: {t['lost_steps']} of {t['audited_steps']} "
            f"({100 * t['lost_share']:.1f}%)" + (f"; by {by}" if by else "")
        )
    return out


def _latency_lines(by_tier: dict[str, dict[str, Any]] | None) -> list[str]:
    if not by_tier:
        return []
    rows = [[t, f"{v['p50']:.1f}", f"{v['p95']:.1f}", f"{v['mean']:.1f}"] for t, v in sorted(by_tier.items(), key=lambda kv: _tier_order(kv[0]))]
    return ["", "Latency by answering tier (ms, the step's wall time)", *_table(["tier", "p50", "p95", "mean"], rows)]


def _workflow_lines(w: dict[str, Any] | None) -> list[str]:
    if not w or not w.get("sessions"):
        return []
    rows = [
        [f"{unit}, {side}", *(fmt(w[f"{key}_{side}"][k]) for k in ("p50", "p95", "mean"))]
        for unit, key, fmt in (("energy Wh", "energy_wh", _wh), ("cost $", "cost_usd", lambda x: f"{x:.4f}"))
        for side in ("cascade", "baseline")
    ]
    steps = w["steps"]
    return [
        "",
        f"Per workflow ({w['sessions']} sessions; steps per session p50 {steps['p50']:.0f}, p95 {steps['p95']:.0f})",
        *_table(["", "p50", "p95", "mean"], rows),
    ]


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text report of ``summarize``'s result: ranges, methods and labels spelled out."""
    s = summary
    n = s["steps"]
    out = [f"milliwatt ledger: {s['ledger']}"]
    out += fault_lines(s.get("ledger_faults"))  # first: it says whether the figures below are whole
    if n == 0:
        return "\n".join([*out, "no steps logged"])
    out += [f"steps: {n} in {s['sessions']} session(s), {s['first_started_at']} .. {s['last_started_at']}"]
    out += _cheap_tier_lines(s)
    out += _shadow_lines(s.get("shadow_checks"))
    out += ["", "Answered by tier"]
    out += _table(
        ["tier", "steps", "share", "Wh low", "Wh point", "Wh high"],
        [
            [t, str(v["steps"]), f"{100 * v['steps'] / n:.1f}%", *(_wh(v[k]) for k in _RANGE)]
            for t, v in s["energy_by_tier"].items()
        ],
    )
    out += ["", "Attempts by tier (energy spent in the tier, passes included)"]
    out += _table(
        ["tier", "attempts", *OUTCOMES, "Wh point"],
        [
            [t, *(str(v[k]) for k in ("attempts", *OUTCOMES)), _wh(v["point"])]
            for t, v in s["attempts_by_tier"].items()
        ],
    )
    e, f = s["energy_wh"], s["savings_factor"]
    out += ["", "Energy (Wh)"]
    out += _table(
        ["", "low", "point", "high"],
        [
            ["cascade, steps", *(_wh(e["steps"][k]) for k in _RANGE)],
            ["cascade, background work", *(_wh(e["background"][k]) for k in _RANGE)],
            ["cascade, total", *(_wh(e["cascade"][k]) for k in _RANGE)],
            ["baseline (all frontier)", *(_wh(e["baseline"][k]) for k in _RANGE)],
            ["savings factor", *(_factor(f[k]) for k in _RANGE)],
        ],
    )
    out += _background_lines(s.get("background"), n)
    out += _quality_lines(s)
    tok, cost, lat = s["tokens"], s["cost_usd"], s["latency_ms"]
    trimmed = 100 * (1 - tok["input_sent"] / tok["input_raw"]) if tok["input_raw"] else 0.0
    out += [
        "",
        f"tokens: input {tok['input_raw']:,} raw -> {tok['input_sent']:,} sent ({trimmed:.1f}% trimmed), output {tok['output']:,}",
        *_trimming_lines(s.get("trimming")),
        f"cost: cascade ${cost['cascade']:.4f}, baseline ${cost['baseline']:.4f}",
        f"latency per step: p50 {lat['p50']:.1f} ms, p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms",
        *_latency_lines(s.get("latency_ms_by_tier")),
        *_workflow_lines(s.get("workflows")),
        "",
        "How the energy was obtained",
    ]
    m = s["energy_method"]
    for side in ("cascade", "baseline"):
        out.append(f"  {side}: " + ", ".join(f"{k} ({_steps(v)})" for k, v in m[side]["methods"].items()))
        out += [f"    basis: {b}" for b in m[side]["basis"]]
    out.append("  baseline model: " + ", ".join(f"{k} ({_steps(v)})" for k, v in m["baseline"]["models"].items()))
    out += [f"  {part}" for part in m["note"].split("; ")]
    for label, tiers in s["labels"].items():
        where = ", ".join(f"{t}: {_steps(c)}" for t, c in tiers.items())
        out.append(f"NOTE: answered by a tier labelled '{label}' ({where}); read those figures accordingly")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m milliwatt.reports.summary LEDGER [--json]``."""
    parser = argparse.ArgumentParser(prog="python -m milliwatt.reports.summary", description=__doc__.split("\n")[0])
    parser.add_argument("ledger", help="path to a SQLite ledger, or a SQLAlchemy URL")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = parser.parse_args(argv)
    try:
        summary = summarize(args.ledger)
    except LedgerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
