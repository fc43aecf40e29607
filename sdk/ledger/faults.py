"""Ledger faults: counted live, logged, and stored as rows of ``ledger_faults``.

A fault is anything that kept a record from going straight into the tables: it was spooled,
imported later, dropped, or its write had to be retried. Each is logged on the
``milliwatt.ledger`` logger at WARNING, counted in ``Ledger.faults``, and kept as a row for
``ledger_faults`` until the writer stores it (a fault that cannot be stored either goes to
the spool, so the report still sees it after the next open).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from milliwatt.ids import new_step_id
from milliwatt.redaction import get_logger

from .rows import iso_utc
from .schema import FAULT_KINDS

log = get_logger("milliwatt.ledger")


def fault_row(kind: str, count: int, detail: str, at: float | None = None) -> dict[str, Any]:
    """A row of ``ledger_faults``. Its id is a ULID, so importing it twice stores it once."""
    assert kind in FAULT_KINDS, kind
    at = time.time() if at is None else at
    return {"id": new_step_id(at), "at": iso_utc(at), "kind": kind, "count": count, "detail": detail}


class FaultLog:
    """One ledger's faults: counters since it was opened, and the rows not yet stored."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(FAULT_KINDS, 0)
        self._pending: list[dict[str, Any]] = []

    @property
    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def record(self, kind: str, count: int, detail: str, *, stored: bool = False, message: str | None = None) -> None:
        """Count, log and (unless ``stored`` already) keep a row for ``ledger_faults``.

        A fault like the last one not yet stored (same kind and detail) adds to that row and
        is not logged again, so a flood of identical faults costs one row and one log line
        per writer batch, not one per record."""
        if count <= 0:
            return
        repeat = False
        with self._lock:
            self._counts[kind] += count
            if not stored:
                last = self._pending[-1] if self._pending else None
                if last is not None and last["kind"] == kind and last["detail"] == detail:
                    last["count"] += count
                    repeat = True
                else:
                    self._pending.append(fault_row(kind, count, detail))
        if not repeat:
            log.warning("ledger %s: %s", self.where, message or f"{kind} {count}: {detail}")

    def take_pending(self) -> list[dict[str, Any]]:
        with self._lock:
            rows, self._pending = self._pending, []
        return rows

    def put_back(self, rows: list[dict[str, Any]]) -> None:
        """Rows that could not be stored, kept (ahead of newer ones) for the next try."""
        with self._lock:
            self._pending[:0] = rows
