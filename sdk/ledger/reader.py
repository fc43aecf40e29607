"""Reading a ledger: steps with their attempts, and the faults the report shows."""

from __future__ import annotations

import json
import os
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, func, select

from .engine import display_name, open_existing, spool_path, sqlite_file
from .schema import ATTEMPTS, FAULT_KINDS, FAULTS, STEPS
from .spool import Spool


def read_steps(
    engine: Engine,
    *,
    session_id: str | None = None,
    limit: int | None = None,
    db_lock: threading.Lock | None = None,
) -> list[dict[str, Any]]:
    """Committed steps in id (time) order, JSON columns decoded and each step's attempts
    under ``"attempts"`` in cascade order."""
    query = select(STEPS).order_by(STEPS.c.id).limit(limit)
    if session_id is not None:
        query = query.where(STEPS.c.session_id == session_id)
    # A subquery, not a list of ids: SQLite caps the number of bound parameters.
    ids = select(query.subquery().c.id)
    attempts = select(ATTEMPTS).where(ATTEMPTS.c.step_id.in_(ids)).order_by(ATTEMPTS.c.step_id, ATTEMPTS.c.ordinal)
    with db_lock or nullcontext(), engine.connect() as conn:
        steps = [dict(m) for m in conn.execute(query).mappings()]
        by_id = {s["id"]: s for s in steps}
        for s in steps:
            for col in ("request_json", "response_json", "meta_json"):
                s[col.removesuffix("_json")] = json.loads(s.pop(col))
            if s["quality_agrees"] is not None:
                s["quality_agrees"] = bool(s["quality_agrees"])
            s["attempts"] = []
        for a in conn.execute(attempts).mappings():
            row = dict(a)
            raw = row.pop("evidence_json")
            row["evidence"] = None if raw is None else json.loads(raw)
            by_id[a["step_id"]]["attempts"].append(row)
    return steps


def read_faults(engine: Engine, spool: str | Path | None = None) -> dict[str, Any]:
    """The ledger's faults for the report: the sum of ``count`` per kind in ``ledger_faults``
    (every kind present, 0 if none), ``in_spool``, the records waiting in the spool for the
    next open, and ``spool``, the spool's path. ``spool`` is needed only for a ledger that is
    not a SQLite file and spools somewhere other than the default."""
    with engine.connect() as conn:
        counts = dict(conn.execute(select(FAULTS.c.kind, func.sum(FAULTS.c.count)).group_by(FAULTS.c.kind)).all())
    path = spool_path(engine.url, spool)
    beside = spool is None and sqlite_file(engine.url) is not None
    owner = None if beside else display_name(engine.url)  # as Ledger.where
    return {
        **{kind: int(counts.get(kind) or 0) for kind in FAULT_KINDS},
        "in_spool": Spool(path, owner).pending_records() if path is not None else 0,
        "spool": str(path) if path is not None else None,
    }


def fault_lines(faults: dict[str, Any] | None) -> list[str]:
    """The report's line on ledger faults, if there were any (docs/ledger.md, "Faults")."""
    if not faults:
        return []
    counts = [f"{faults[k]} {k}" for k in FAULT_KINDS if faults.get(k)]
    waiting = faults.get("in_spool") or 0
    if not counts and not waiting:
        return []
    line = "ledger faults: " + (", ".join(counts) or "none counted")
    if waiting:
        line += f"; {waiting} record(s) wait in the spool {faults.get('spool')} for the next open of the ledger"
    return [line]


def ledger_steps(ledger: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every step of a ledger with its attempts (``read_steps``), opened read only: a missing
    file or a non-ledger is a ``LedgerError``. What the calibrate commands learn from."""
    engine, _ = open_existing(ledger)
    try:
        return read_steps(engine)
    finally:
        engine.dispose()
