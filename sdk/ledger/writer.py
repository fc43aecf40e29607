"""The writer: ``Ledger``, where every step is logged, without ever costing the caller a step.

``write`` never blocks the event loop and never raises for a storage fault: it puts the
record on a bounded queue, and one background thread owns the database and inserts queued
records in batches, one transaction per batch. What cannot be inserted (after retries with
backoff while the database is busy) goes to the spool, is counted in ``Ledger.faults`` and
``ledger_faults``, and is imported by the next open. When the queue is full, ``write`` spools
the record itself, off the event loop, instead of waiting for the writer or dropping it.
"""

from __future__ import annotations

import asyncio
import atexit
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from sqlalchemy import insert
from sqlalchemy.exc import SQLAlchemyError

from milliwatt.types import StepRecord

from .engine import (
    DEFAULT_URL,
    WRITER_BUSY_TIMEOUT_MS,
    display_name,
    error_text,
    is_transient,
    make_engine,
    retrying,
    spool_path,
    sqlite_file,
    to_url,
)
from .errors import LedgerError
from .faults import FaultLog, log
from .migrate import upgrade_to_head
from .reader import read_steps
from .rows import record_rows
from .schema import ATTEMPTS, FAULTS, OVERHEADS, STEPS
from .spool import Spool, import_spool

_STOP = object()
# Execution options of the writer's transactions: take SQLite's write lock up front, and wait
# for it only briefly, since ``retrying`` backs off and counts the retries.
_WRITE = {"sqlite_begin_immediate": True, "sqlite_busy_timeout_ms": WRITER_BUSY_TIMEOUT_MS}


class Ledger:
    """Where every step is logged. Share one instance between all concurrent agents.

    ``url`` is any SQLAlchemy URL or a path to a SQLite file. A new ledger is created, an
    older one upgraded to the head revision (see ``upgrade_to_head``), and the spool left by
    an earlier run imported. ``batch_size`` caps the records inserted per transaction;
    ``max_queue`` the records waiting for the writer (beyond it, ``write`` spools).
    ``spool`` is the spool file of a ledger that is not a SQLite file (default
    ``./milliwatt-ledger.spool.jsonl``); a SQLite file's spool is ``<file>.spool.jsonl``, an
    in-memory database's is kept in memory.
    """

    def __init__(
        self,
        url: str | Path = DEFAULT_URL,
        *,
        batch_size: int = 500,
        max_queue: int = 10_000,
        spool: str | Path | None = None,
    ) -> None:
        self.url = to_url(url)
        self.where = display_name(self.url)
        self._batch_size = max(1, batch_size)
        self._max_queue = max(1, max_queue)
        self._engine = make_engine(self.url)
        try:
            upgrade_to_head(self._engine, self.where, create=True)
        except SQLAlchemyError as e:
            self._engine.dispose()
            raise LedgerError(f"cannot open the ledger at {self.where}: {getattr(e, 'orig', None) or e}") from e
        except BaseException:
            self._engine.dispose()
            raise
        path = spool_path(self.url, spool)
        # A spool beside its SQLite file is this ledger's alone; any other may be shared.
        beside = spool is None and sqlite_file(self.url) is not None
        self.spool = Spool(path, owner=None if beside else self.where)
        self._faults = FaultLog(self.where)
        # Serialises the writer and readers on this instance; it matters only for an in-memory
        # database, where both share one connection.
        self._db_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Taken around every put and around closing, so nothing is queued behind the stop
        # marker; guards ``_queued``, the records in the queue (markers not counted).
        self._lock = threading.Lock()
        self._queued = 0
        self._closed = False
        self._finished = False
        self._finish_lock = threading.Lock()
        self._import_spool()
        self._thread = threading.Thread(target=self._run, name="milliwatt-ledger", daemon=True)
        self._thread.start()
        # The thread is a daemon so a forgotten ledger cannot hang interpreter exit; closing at
        # exit drains what is queued instead of dropping it.
        atexit.register(self.close)

    @property
    def faults(self) -> dict[str, int]:
        """Faults since this ledger was opened, by kind: records ``spooled`` (not written to
        the tables), ``imported`` (from the spool, on opening), ``dropped`` (lost), and
        ``retried`` (retries of a busy write). ``ledger_faults`` holds them for good."""
        return self._faults.counts

    # ----------------------------------------------------------------- writing

    async def write(self, record: StepRecord) -> None:
        """Hand one step to the writer thread; returns at once. Never raises for a storage
        fault: what the database does not take goes to the spool. When the queue is full (or
        the ledger closed) the record is appended to the spool in a worker thread, so the
        caller waits for one append, and the event loop not at all."""
        reason = self._put(record)
        if reason is not None:
            try:
                await asyncio.to_thread(self._spool, [record], reason)
            except RuntimeError:  # no executor left (interpreter shutting down): spool here
                self._spool([record], reason)

    def write_sync(self, record: StepRecord) -> None:
        """``write`` for code without an event loop (CLI, tests)."""
        reason = self._put(record)
        if reason is not None:
            self._spool([record], reason)

    async def flush(self) -> None:
        """Wait until every record written so far is committed or spooled."""
        fut = self._put_marker()
        if fut is not None:
            await asyncio.wrap_future(fut)

    def flush_sync(self) -> None:
        fut = self._put_marker()
        if fut is not None:
            fut.result()

    async def aclose(self) -> None:
        """Store (or spool) everything queued, stop the writer and release the database.
        Idempotent; every caller waits for the drain, not only the first."""
        self._stop()
        await asyncio.to_thread(self._thread.join)
        await asyncio.to_thread(self._finish)

    def close(self) -> None:
        self._stop()
        self._thread.join()
        self._finish()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, record: StepRecord) -> str | None:
        """Queue the record; or say why it must be spooled instead."""
        # Checked here so a wrong argument fails at the caller, not later in the writer thread.
        if not isinstance(record, StepRecord):
            raise TypeError(f"Ledger.write takes a StepRecord, got {type(record).__name__}")
        with self._lock:
            if self._closed:
                return "ledger closed"
            if self._queued >= self._max_queue:
                return f"queue full ({self._max_queue} records)"
            self._queued += 1
            self._queue.put(record)
        return None

    def _put_marker(self) -> Future[None] | None:
        fut: Future[None] = Future()
        with self._lock:
            if self._closed:
                return None  # closing already drained the queue
            self._queue.put(fut)
        return fut

    def _stop(self) -> None:
        """Mark closed and queue the stop marker, once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        atexit.unregister(self.close)

    def _finish(self) -> None:
        """After the writer stopped: store the last fault rows, release the database. Once."""
        with self._finish_lock:
            if self._finished:
                return
            self._finished = True
            try:
                self._store_faults()
            finally:
                self._engine.dispose()

    # ----------------------------------------------------------------- the writer thread

    def _run(self) -> None:
        stopping = False
        while not stopping:
            records: list[StepRecord] = []
            waiters: list[Future[None]] = []
            item = self._queue.get()
            while True:
                if item is _STOP:
                    stopping = True
                elif isinstance(item, Future):
                    waiters.append(item)
                else:
                    records.append(item)
                if len(records) >= self._batch_size:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            with self._lock:
                self._queued -= len(records)
            try:
                if records:
                    self._store(records)
                if not stopping:  # the last ones are stored by _finish, after the thread ends
                    self._store_faults()
            except Exception as e:  # a bug, not a database fault: still lose nothing, hang no one
                log.exception("ledger %s: the writer failed unexpectedly; spooling its batch", self.where)
                # A record stored before the failure is spooled too: the import skips it.
                self._spool(records, f"writer error: {error_text(e)}")
            finally:
                # Every record queued before a waiter is in ``records`` or an earlier batch:
                # committed or spooled.
                for w in waiters:
                    w.set_result(None)

    def _store(self, records: list[StepRecord]) -> None:
        batch: list[dict[str, Any]] = []
        for r in records:
            try:
                batch.append(record_rows(r))
            except Exception as e:  # cannot even be turned into rows: nothing to spool either
                self._faults.record("dropped", 1, f"unserialisable record: {error_text(e)}",
                                    message=f"step {r.step_id} dropped: it cannot be turned into rows: {error_text(e)}")  # fmt: skip
        try:
            self._insert(batch)
            return
        except Exception as e:
            if is_transient(e):  # still busy after the retry budget: the whole batch waits in the spool
                self._spool_rows(batch, error_text(e))
                return
        # One bad record must not take its batch with it: one by one, spooling only the bad
        # ones (in one append per error, not one fsync per record).
        refused: dict[str, list[dict[str, Any]]] = {}
        for i, rows in enumerate(batch):
            try:
                self._insert([rows])
            except Exception as e:
                if is_transient(e):
                    refused.setdefault(error_text(e), []).extend(batch[i:])
                    break
                refused.setdefault(error_text(e), []).append(rows)
        for reason, bad in refused.items():
            self._spool_rows(bad, reason)

    def _insert(self, batch: list[dict[str, Any]]) -> None:
        if not batch:
            return
        retries: list[BaseException] = []
        try:
            retrying(retries.append)(self._insert_once, batch)
        finally:
            if retries:
                self._faults.record(
                    "retried", len(retries), error_text(retries[-1]),
                    message=f"retried a write {len(retries)} time(s): {error_text(retries[-1])}",
                )  # fmt: skip

    def _insert_once(self, batch: list[dict[str, Any]]) -> None:
        attempts = [a for rows in batch for a in rows["attempts"]]
        overheads = [o for rows in batch for o in rows.get("overheads", ())]
        with self._db_lock, self._engine.connect().execution_options(**_WRITE) as conn, conn.begin():
            conn.execute(insert(STEPS), [rows["step"] for rows in batch])
            if attempts:
                conn.execute(insert(ATTEMPTS), attempts)
            if overheads:
                conn.execute(insert(OVERHEADS), overheads)

    def _store_faults(self, *, use_db: bool = True) -> None:
        """Store the fault rows not yet stored; on failure keep them for the next batch, or,
        once the ledger is closing, put them in the spool (the next open imports them)."""
        rows = self._faults.take_pending()
        if not rows:
            return
        error: BaseException | None = None
        if use_db:
            try:
                with self._db_lock, self._engine.connect().execution_options(**_WRITE) as conn, conn.begin():
                    conn.execute(insert(FAULTS), rows)
                return
            except Exception as e:
                error = e
        if not self._closed:
            self._faults.put_back(rows)
            return
        try:
            self.spool.append([{"fault": row} for row in rows])
        except Exception as e:
            why = f"not stored ({error_text(error)}) nor spooled" if error else "not spooled"
            log.error("ledger %s: %d fault row(s) lost: %s (%s)", self.where, len(rows), why, error_text(e))

    # ----------------------------------------------------------------- the spool

    def _spool(self, records: list[StepRecord], reason: str) -> None:
        batch: list[dict[str, Any]] = []
        for r in records:
            try:
                batch.append(record_rows(r))
            except Exception as e:
                self._faults.record("dropped", 1, f"unserialisable record: {error_text(e)}",
                                    message=f"step {r.step_id} dropped: it cannot be turned into rows: {error_text(e)}")  # fmt: skip
        self._spool_rows(batch, reason)

    def _spool_rows(self, batch: list[dict[str, Any]], reason: str) -> None:
        """Append records to the spool; never raises. After close, their fault goes there too."""
        if not batch:
            return
        ids = ", ".join(rows["step"]["id"] for rows in batch[:5]) + (" ..." if len(batch) > 5 else "")
        where = self.spool.path or "the in-memory spool"
        try:
            self.spool.append(batch)
        except Exception as e:
            self._faults.record(
                "dropped", len(batch), f"{reason}; the spool could not be written: {error_text(e)}",
                message=f"{len(batch)} step(s) LOST ({ids}): {reason}, and the spool {where} could not be written: {error_text(e)}",
            )  # fmt: skip
        else:
            self._faults.record(
                "spooled", len(batch), reason,
                message=f"{len(batch)} step(s) spooled to {where} ({ids}): {reason}; the next open of the ledger imports them",
            )  # fmt: skip
        if self._finished:  # the database is released: the fault row waits in the spool too
            self._store_faults(use_db=False)

    def _import_spool(self) -> None:
        """Import what an earlier run spooled; on failure leave it for the next open."""
        retries: list[BaseException] = []
        try:
            result = import_spool(self.spool, self._engine, db_lock=self._db_lock, on_retry=retries.append)
        except Exception as e:
            log.warning("ledger %s: could not import the spool %s (%s); it stays for the next open",
                        self.where, self.spool.path, error_text(e))  # fmt: skip
            return
        finally:
            if retries:
                self._faults.record("retried", len(retries), error_text(retries[-1]))
        if result is None:
            return
        for row in result.fault_rows:
            self._faults.record(row["kind"], row["count"], row["detail"], stored=True,
                                message=f"{row['kind']} {row['count']} record(s): {row['detail']}")  # fmt: skip
        if result.kept:
            log.warning("ledger %s: %d spooled record(s) still cannot be stored (%s); they stay in %s",
                        self.where, result.kept, result.error, self.spool.path)  # fmt: skip

    # ----------------------------------------------------------------- reading

    def read_steps(self, *, session_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Committed steps in id (time) order, JSON columns decoded and each step's attempts
        under ``"attempts"`` in cascade order. Call ``flush`` first to see recent writes."""
        return read_steps(self._engine, session_id=session_id, limit=limit, db_lock=self._db_lock)
