"""The spool: what the database did not take, one JSON line each, in an append-only file.

A line is a record's rows exactly as they would have been inserted,
``{"step": {...}, "attempts": [...]}`` (see ``rows.record_rows``), or a fault row that could
not be stored, ``{"fault": {...}}``. Each append is written whole, flushed and fsynced, so a
crash mid-write leaves at most one truncated line; the next append first ends such a line,
so the damage stays that one record. Appends and imports take an exclusive ``flock`` on the
file (where the platform has one), so several processes can share a ledger and its spool.

``import_spool`` runs when a ``Ledger`` opens: every record whose step id is not yet in the
ledger is inserted, all in one transaction (each record under its own savepoint, so one that
still fails stays in the spool while the others are stored); unreadable lines are dropped
with a warning; the file is then rewritten with what is left, or removed.

A spool that is not beside its SQLite file (PostgreSQL's default ``./milliwatt-ledger.spool.jsonl``,
or one named by ``spool=``) may be shared by several ledgers: there each line also names its
ledger (``"ledger": <display name>``), and an import takes only its own ledger's lines.

An in-memory SQLite ledger keeps its spool in memory (``Spool.path`` is None): it dies with
the process, as the database does, and ``Spool.entries()`` shows it.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.exc import SQLAlchemyError

from .engine import WRITER_BUSY_TIMEOUT_MS, error_text, is_transient, retrying
from .faults import fault_row
from .rows import to_json
from .schema import ATTEMPTS, FAULTS, OVERHEADS, STEPS

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: one process per spool
    fcntl = None  # type: ignore[assignment]


def _parse(line: bytes) -> dict[str, Any] | None:
    """A spool entry, or None for a line that is not one (truncated by a crash, or damaged)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("step"), dict) and isinstance(entry.get("attempts", []), list):
        return entry
    if isinstance(entry.get("fault"), dict):
        return entry
    return None


@contextmanager
def _locked(path: Path, *, create: bool) -> Iterator[int]:
    """An append-mode descriptor of ``path`` under an exclusive lock. Raises FileNotFoundError
    without ``create`` if there is no file. If an importer removed or replaced the file while
    we waited for the lock, the path is opened afresh, so nothing is appended to a dead file."""
    flags = os.O_RDWR | os.O_APPEND | (os.O_CREAT if create else 0)
    while True:
        fd = os.open(path, flags, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            st = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                if now is None and not create:
                    raise FileNotFoundError(path)
                continue  # closed by the finally below, then opened again
            yield fd
            return
        finally:
            os.close(fd)  # closing releases the lock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _truncate(fd: int, size: int) -> None:
    """Cut the file back to ``size`` bytes, if it can be (shrinking needs no free space)."""
    try:
        os.ftruncate(fd, size)
    except OSError:
        pass


def _replace(path: Path, data: bytes) -> None:
    """Make ``data`` the file's content, all or nothing: written whole to a file beside it,
    then renamed over it. If that fails (a full disk), the file stays as it was and this
    raises. Called under the file's lock: an appender waiting for it finds the new file."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


def _fsync_dir(path: Path) -> None:
    # So a newly created (or removed) spool file survives a crash of the machine too.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Spool:
    """Append-only JSON lines of rows the database did not take; see the module doc."""

    def __init__(self, path: Path | None, owner: str | None = None) -> None:
        self.path = path
        # The ledger whose lines these are, in a spool several ledgers may share; None beside a SQLite file.
        self.owner = owner
        # One appender at a time within the process (flock orders the processes).
        self._lock = threading.Lock()
        self._memory: list[str] = []

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Write ``entries`` as lines, durably, before returning. Raises OSError if it cannot."""
        lines = [to_json({"ledger": self.owner, **e} if self.owner else e) for e in entries]
        if not lines:
            return
        with self._lock:
            if self.path is None:
                self._memory += lines
                return
            data = ("\n".join(lines) + "\n").encode()
            with _locked(self.path, create=True) as fd:
                size = os.fstat(fd).st_size
                if size and os.pread(fd, 1, size - 1) != b"\n":
                    data = b"\n" + data  # end a line a crash cut short: it stays one bad line
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                except BaseException:
                    # All or nothing: a full disk may have taken part of the append. Left there,
                    # its whole lines would be imported later although the caller counted them
                    # lost, and its cut line counted lost a second time.
                    _truncate(fd, size)
                    raise
            if size == 0:
                _fsync_dir(self.path.parent)

    def entries(self) -> list[dict[str, Any]]:
        """The readable entries now in the spool, in order (unreadable lines left out)."""
        if self.path is None:
            with self._lock:
                raw = [line.encode() for line in self._memory]
        else:
            try:
                raw = self.path.read_bytes().split(b"\n")
            except FileNotFoundError:
                return []
        return [e for e in map(_parse, raw) if e is not None and self._mine(e)]

    def _mine(self, entry: dict[str, Any]) -> bool:
        return self.owner is None or entry.get("ledger") in (None, self.owner)

    def pending_records(self) -> int:
        """How many records wait in the spool for the next open of the ledger."""
        return sum(1 for e in self.entries() if "step" in e)


@dataclass
class ImportResult:
    """What one import of a spool did."""

    imported: int = 0  # records stored now
    present: int = 0  # records whose step id the ledger already had: stored before (counted as imported)
    kept: int = 0  # records that still cannot be stored: they stay in the spool
    dropped: int = 0  # unreadable lines (a truncated write): removed
    faults: int = 0  # spooled fault rows stored
    error: str | None = None  # why the kept records were refused
    fault_rows: list[dict[str, Any]] = field(default_factory=list)  # the rows this import added to ledger_faults


def import_spool(
    spool: Spool,
    engine: Engine,
    *,
    db_lock: threading.Lock,
    on_retry: Callable[[BaseException], None],
) -> ImportResult | None:
    """Store the spool's records in the ledger and shrink the spool to what is left; None if
    there was no spool. Raises (and leaves the spool as it was) if the transaction fails
    as a whole, e.g. the database stays busy for longer than the retry budget."""
    path = spool.path
    if path is None or not path.exists():
        return None
    with spool._lock, ExitStack() as stack:
        try:
            fd = stack.enter_context(_locked(path, create=False))
        except FileNotFoundError:
            return None
        lines = _read_all(fd).split(b"\n")
        entries: list[tuple[bytes, dict[str, Any]]] = []
        others: list[bytes] = []  # another ledger's lines, in a shared spool: left as they are
        bad: list[tuple[int, int]] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            entry = _parse(line)
            if entry is None:
                bad.append((n, len(line)))
            elif not spool._mine(entry):
                others.append(line)
            else:
                entries.append((line, entry))
        if not entries and not bad:
            if not others:
                path.unlink()  # an empty spool
            return None
        result, kept = retrying(on_retry)(_store, engine, db_lock, path, entries, bad)
        kept += others
        if kept:
            # Not truncated in place: on a full disk the rewrite would fail after the
            # truncation, losing the records that were to stay.
            _replace(path, b"".join(line + b"\n" for line in kept))
        else:
            path.unlink()  # still under the lock: an appender waiting for it opens a new file
            _fsync_dir(path.parent)
    return result


def _store(
    engine: Engine, db_lock: threading.Lock, path: Path, entries: list[tuple[bytes, dict[str, Any]]], bad: list[tuple[int, int]]
) -> tuple[ImportResult, list[bytes]]:
    result = ImportResult(dropped=len(bad))
    kept: list[bytes] = []
    options = {"sqlite_begin_immediate": True, "sqlite_busy_timeout_ms": WRITER_BUSY_TIMEOUT_MS}
    with db_lock, engine.connect().execution_options(**options) as conn, conn.begin():
        for line, entry in entries:
            is_record = "step" in entry
            if is_record:
                table, row_id = STEPS, entry["step"].get("id")
                inserts = [(STEPS, [entry["step"]]), (ATTEMPTS, entry.get("attempts") or []), (OVERHEADS, entry.get("overheads") or [])]
            else:
                table, row_id = FAULTS, entry["fault"].get("id")
                inserts = [(FAULTS, [entry["fault"]])]
            if row_id is not None and conn.execute(select(table.c.id).where(table.c.id == row_id)).first() is not None:
                result.present += is_record  # stored before: the import is idempotent
                continue
            try:
                with conn.begin_nested():
                    for tbl, rows in inserts:
                        if rows:
                            conn.execute(insert(tbl), rows)
            except SQLAlchemyError as e:
                if is_transient(e):
                    raise  # the whole transaction is retried
                kept.append(line)
                result.kept += is_record
                result.error = error_text(e)
                continue
            if is_record:
                result.imported += 1
            else:
                result.faults += 1
        done = result.imported + result.present
        if done:
            already = f" ({result.present} of them already in the ledger)" if result.present else ""
            result.fault_rows.append(fault_row("imported", done, f"from {path}{already}"))
        if bad:
            where = ", ".join(f"line {n} ({size} bytes)" for n, size in bad[:5]) + (" ..." if len(bad) > 5 else "")
            result.fault_rows.append(fault_row("dropped", len(bad), f"unreadable spool line(s) in {path}: {where}; a write cut short?"))
        if result.fault_rows:
            conn.execute(insert(FAULTS), result.fault_rows)
    return result, kept
