"""Recompute every figure of a ledger with another coefficient set, observations untouched.

``milliwatt report LEDGER --recompute [--coefficients FILE]``: the ledger is copied into a
temporary SQLite file, every energy and cost figure of the copy is computed again from the
stored observations (CPU seconds, counter joules, tokens in / cached / out, the charged
model) by the same functions a live step uses (``milliwatt.energy``, ``milliwatt.pricing``),
and the ordinary report is made from the copy. The ledger itself is only read.

A ledger written before the observations were stored (before migration 0006) is recomputed
from what its rows say: CPU seconds from a ``cpu-time`` figure and the watts its basis
names, the charged model from an estimate's basis, the baseline's tokens counted from the
stored request and answer,
and, for every ledger, the baseline's cached prefix by following each session's requests in
order, as the accountant does live, under the set's prompt-cache rule. A figure that cannot be taken apart (``mixed``: several methods in one
attempt) is kept as written, and counted (``kept``).
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select, update

from milliwatt.accounting import Accountant
from milliwatt.coefficients import Coefficients
from milliwatt.energy import CpuCoefficients, RemoteEnergyModel, cpu_energy, measured_energy
from milliwatt.ledger.engine import make_engine, open_existing, to_url
from milliwatt.ledger.migrate import upgrade_to_head
from milliwatt.ledger.rows import _energy_cols
from milliwatt.ledger.schema import ATTEMPTS, FAULTS, META, OVERHEADS, STEPS
from milliwatt.pricing import cost_usd
from milliwatt.types import Energy, Message, Step, StepMeta

_CPU_BASIS = re.compile(r"cpu-time x [\d.]+/([\d.]+)/[\d.]+ W per vCPU(?: x facility ([\d.]+))?")
_ESTIMATE_BASIS = re.compile(r"^(?:ecologits|table) ([^ ]+/[^ ]+) output")
_CHUNK = 500


@dataclass
class Recomputed:
    """What a recomputation did: the copy's path, the set used, and the figures it kept."""

    path: Path
    coefficients: str
    attempts: int = 0
    steps: int = 0
    overheads: int = 0
    kept: dict[str, int] = field(default_factory=dict)  # why a figure was kept as written -> how many


@contextmanager
def recomputed(url_or_path: str | Path, coefficients: Coefficients) -> Iterator[Recomputed]:
    """A temporary copy of the ledger with every figure recomputed; removed on exit."""
    with tempfile.TemporaryDirectory(prefix="milliwatt-recompute-") as folder:
        path = Path(folder) / "recomputed.db"
        source, _ = open_existing(url_or_path)
        target = make_engine(to_url(path))
        try:
            upgrade_to_head(target, str(path), create=True)
            _copy(source, target)
            result = _recompute(target, coefficients, path)
        finally:
            source.dispose()
            target.dispose()
        yield result


def _copy(source: Engine, target: Engine) -> None:
    with source.connect() as src, target.begin() as dst:
        dst.execute(META.delete())
        for table in (META, STEPS, ATTEMPTS, OVERHEADS, FAULTS):
            rows = src.execute(select(table)).mappings()
            while chunk := rows.fetchmany(_CHUNK):
                dst.execute(insert(table), [dict(r) for r in chunk])


def _recompute(engine: Engine, c: Coefficients, path: Path) -> Recomputed:
    out = Recomputed(path, c.version)
    remote = RemoteEnergyModel(c)
    cpu = CpuCoefficients.of(c)
    weight = c.prompt_cache.price_weight.value
    a, s, o = ATTEMPTS.c, STEPS.c, OVERHEADS.c
    # The live books' own counterfactual (milliwatt.accounting), one per frontier model: its
    # tokenizer, and each session's prefix followed in step order.
    accountants: dict[str, Accountant] = {}
    with engine.begin() as conn:
        step_energy: dict[str, Energy] = {}
        step_cost: dict[str, float] = {}
        for row in conn.execute(select(ATTEMPTS).order_by(a.step_id, a.ordinal)).mappings().all():
            energy, cost = _attempt(row, remote, cpu, c, weight, out)
            conn.execute(
                update(ATTEMPTS).where(a.step_id == row["step_id"], a.ordinal == row["ordinal"]).values(
                    **_energy_cols(energy), cost_usd=cost, coefficients=energy.version or row["coefficients"],
                    cpu_seconds=_observed(energy, "cpu_seconds", row), cached_tokens=_observed(energy, "cached_tokens", row),
                    energy_model=_observed(energy, "model", row, column="energy_model"),
                )
            )  # fmt: skip
            step_energy[row["step_id"]] = step_energy.get(row["step_id"], Energy.zero()) + energy
            step_cost[row["step_id"]] = step_cost.get(row["step_id"], 0.0) + cost
            out.attempts += 1
        for row in conn.execute(select(STEPS).order_by(s.started_at, s.id)).mappings().all():
            model = row["baseline_model"]
            if model not in accountants:
                accountants[model] = Accountant(model, energy_model=remote)
            base = accountants[model].baseline(*_stored_step(row))
            energy = step_energy.get(row["id"], Energy.zero())
            conn.execute(
                update(STEPS).where(s.id == row["id"]).values(
                    **_energy_cols(energy), cost_usd=step_cost.get(row["id"], 0.0),
                    **_energy_cols(base.energy, "baseline_energy"), baseline_cost_usd=base.cost_usd,
                    baseline_input_tokens=base.input_tokens, baseline_output_tokens=base.output_tokens,
                    baseline_cached_tokens=base.cached_tokens, coefficients=c.version,
                )
            )  # fmt: skip
            out.steps += 1
        for row in conn.execute(select(OVERHEADS)).mappings().all():
            energy = cpu_energy(row["cpu_seconds"], cpu)
            conn.execute(update(OVERHEADS).where(o.id == row["id"]).values(**_energy_cols(energy), coefficients=c.version))
            out.overheads += 1
    return out


def _observed(energy: Energy, name: str, row: Any, *, column: str | None = None) -> Any:
    value = getattr(energy.observed, name, None) if energy.observed is not None else None
    return value if value is not None else row[column or name]


def _attempt(row: Any, remote: RemoteEnergyModel, cpu: CpuCoefficients, c: Coefficients, weight: float, out: Recomputed) -> tuple[Energy, float]:
    """An attempt's energy and cost from its observations (or, for an old row, its basis)."""
    method, cost = row["energy_method"], row["cost_usd"]
    if method == "none":
        return Energy.zero(), cost
    if method == "measured" and row["measured_j"] is not None:
        return measured_energy(row["measured_j"], row["meter"] or "counter", c, cpu_seconds=row["cpu_seconds"]), cost
    if method == "cpu-time":
        seconds = row["cpu_seconds"]
        if seconds is None:
            seconds = _cpu_seconds_from_basis(row["energy_basis"], row["energy_wh_point"])
        if seconds is None:
            return _kept(row, "cpu-time basis without watts", out), cost
        return cpu_energy(seconds, cpu), cost
    if method == "estimate":
        model = row["energy_model"]
        if model is None:
            m = _ESTIMATE_BASIS.match(row["energy_basis"] or "")
            model = m.group(1) if m else None
        if model is None:
            return _kept(row, "estimate basis without a model", out), cost
        cached = row["cached_tokens"]
        if cached is None:
            cached = min(c.prompt_cache.cached(row["prefix_tokens"] or 0), row["input_tokens"])
        latency = row["latency_ms"] / 1000.0 if model == row["model"] else None
        energy = remote.estimate(model, row["input_tokens"], row["output_tokens"], latency, cached_tokens=cached)
        if cost and row["model"]:  # unpriced (a stand-in) stays unpriced
            cost = cost_usd(row["model"], row["input_tokens"], row["output_tokens"], cached, weight)
        return energy, cost
    return _kept(row, f"{method} figure", out), cost


def _kept(row: Any, why: str, out: Recomputed) -> Energy:
    out.kept[why] = out.kept.get(why, 0) + 1
    return Energy(row["energy_method"], row["energy_wh_low"], row["energy_wh_point"], row["energy_wh_high"], row["energy_basis"])


def _cpu_seconds_from_basis(basis: str | None, point_wh: float) -> float | None:
    """CPU seconds behind a ``cpu-time`` figure, from the watts (and facility) its basis names."""
    m = _CPU_BASIS.search(basis or "")
    if m is None:
        return None
    watts = float(m.group(1)) * float(m.group(2) or 1.0)
    return point_wh * 3600.0 / watts if watts > 0 else None


def _stored_step(row: Any) -> tuple[Step, Message]:
    """The step as the agent sent it (``request_json``) and the answer it was given."""
    request = json.loads(row["request_json"] or "{}")
    meta = StepMeta(session_id=row["session_id"])
    step = Step(messages=request.get("messages") or [], tools=request.get("tools") or [], meta=meta)
    return step, json.loads(row["response_json"] or "{}")


def run_report(args: Any) -> int:
    """``milliwatt report``: the summary of a ledger, or (``--recompute``) of its recomputed copy."""
    import sys

    from milliwatt.coefficients import load
    from milliwatt.reports.summary import format_summary, summarize

    if args.coefficients and not args.recompute:
        print("milliwatt: error: --coefficients goes with --recompute", file=sys.stderr)
        return 2
    if args.html:
        from milliwatt._extras import require

        require("report", "the HTML report")  # said before the summary is printed

    def report(ledger: str | Path, note: str | None = None) -> None:
        summary = summarize(ledger)
        if note is not None:
            summary["ledger"] = args.ledger
            summary["recomputed"] = note
        text = format_summary(summary)
        print(json.dumps(summary, indent=2) if args.json else (f"{text}\n{note}" if note else text))
        if args.html:
            from milliwatt.reports.html import write_html_report

            page = write_html_report(ledger, args.html, png_dir=args.png_dir)
            print(f"HTML report: {page}", file=sys.stderr)

    if not args.recompute:
        report(args.ledger)
        return 0
    coefficients = load(args.coefficients)
    with recomputed(args.ledger, coefficients) as r:
        kept = "; ".join(f"{n} {why} kept as written" for why, n in r.kept.items()) or "every figure recomputed"
        report(r.path, f"recomputed with coefficients {r.coefficients}: {r.steps} steps, {r.attempts} attempts, "
                       f"{r.overheads} background items ({kept}); the ledger itself was only read")  # fmt: skip
    return 0
