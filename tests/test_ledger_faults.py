"""Nothing lost: a ledger fault never costs the caller the answer nor later steps. Records the
database does not take go to the spool and are imported on the next open; a busy database is
retried; a full queue spools instead of blocking; every fault is counted and reported."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from milliwatt.ledger import Ledger
from milliwatt.reports.summary import format_summary, summarize

from test_ledger import T0, record, rows

DISK_FULL = "CREATE TRIGGER disk_full BEFORE INSERT ON steps BEGIN SELECT RAISE(ABORT, 'disk full'); END"
NO_FAULTS = {"spooled": 0, "imported": 0, "dropped": 0, "retried": 0}


def execute(db: Path, sql: str) -> None:
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(sql)
    conn.close()


def failing_ledger(tmp_path: Path) -> Path:
    """A ledger whose every insert into ``steps`` fails, as on a full disk."""
    db = tmp_path / "l.db"
    Ledger(db).close()
    execute(db, DISK_FULL)
    return db


def spool_entries(path: Path) -> list[dict]:
    from milliwatt.ledger import Spool

    return Spool(path).entries()


def spooled_ids(spool: Path) -> list[str]:
    return [json.loads(line)["step"]["id"] for line in spool.read_text().splitlines()]


class HeldLock:
    """Another connection holding SQLite's write lock (BEGIN EXCLUSIVE) for ``seconds``."""

    def __init__(self, db: Path, seconds: float) -> None:
        self.db, self.seconds = db, seconds
        self.taken, self.released = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._hold)

    def _hold(self) -> None:
        conn = sqlite3.connect(self.db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        self.taken.set()
        time.sleep(self.seconds)
        conn.execute("COMMIT")
        conn.close()
        self.released.set()

    def __enter__(self) -> HeldLock:
        self.thread.start()
        assert self.taken.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()


@pytest.mark.asyncio
async def test_a_failing_insert_is_spooled_counted_and_imported_on_the_next_open(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = failing_ledger(tmp_path)
    spool = tmp_path / "l.db.spool.jsonl"
    first, later = record(at=T0), record(at=T0 + 1)
    ledger = Ledger(db)
    with caplog.at_level(logging.WARNING, logger="milliwatt.ledger"):
        await ledger.write(first)
        await ledger.flush()  # the insert has failed in the writer thread by now: nothing raised
        await ledger.write(later)  # nor is the next write refused
        await ledger.flush()
        await ledger.aclose()
    assert ledger.faults == NO_FAULTS | {"spooled": 2}
    assert "disk full" in caplog.text and first.step_id in caplog.text
    assert spooled_ids(spool) == [first.step_id, later.step_id]
    line = json.loads(spool.read_text().splitlines()[0])
    assert line["step"]["request_json"] == json.dumps(first.request, separators=(",", ":"))
    assert [a["tier"] for a in line["attempts"]] == ["rules"]
    assert rows(db, "SELECT count(*) FROM steps") == [(0,)]
    # The fault names the error, never the record's content.
    assert rows(db, "SELECT kind, sum(count), detail FROM ledger_faults GROUP BY kind, detail") == [
        ("spooled", 2, "IntegrityError: disk full"),
    ]
    s = summarize(db)["ledger_faults"]
    assert s == NO_FAULTS | {"spooled": 2, "in_spool": 2, "spool": str(spool)}
    assert f"ledger faults: 2 spooled; 2 record(s) wait in the spool {spool}" in format_summary(summarize(db))

    # Still failing: opening keeps the records in the spool (and still opens).
    Ledger(db).close()
    assert spooled_ids(spool) == [first.step_id, later.step_id]

    execute(db, "DROP TRIGGER disk_full")
    with Ledger(db) as reopened:
        assert reopened.faults == NO_FAULTS | {"imported": 2}
        steps = reopened.read_steps()
    assert [s["id"] for s in steps] == [first.step_id, later.step_id]
    assert steps[0]["request"] == first.request and len(steps[0]["attempts"]) == 1
    assert not spool.exists()
    s = summarize(db)["ledger_faults"]
    assert s == NO_FAULTS | {"spooled": 2, "imported": 2, "in_spool": 0, "spool": str(spool)}
    assert "ledger faults: 2 spooled, 2 imported\n" in format_summary(summarize(db))

    Ledger(db).close()  # nothing left to import: idempotent
    assert rows(db, "SELECT count(*) FROM steps") == [(2,)]


@pytest.mark.asyncio
async def test_a_briefly_locked_database_is_retried_not_spooled(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    r = record()
    with HeldLock(db, 0.5) as lock:
        await ledger.write(r)
        await ledger.flush()  # waits for the retries
        assert lock.released.is_set()
    await ledger.aclose()
    assert rows(db, "SELECT id FROM steps") == [(r.step_id,)]
    assert not (tmp_path / "l.db.spool.jsonl").exists()
    assert ledger.faults["spooled"] == 0 and ledger.faults["retried"] >= 1
    [(kind, count, detail)] = rows(db, "SELECT kind, count, detail FROM ledger_faults")
    assert (kind, count, detail) == ("retried", ledger.faults["retried"], "OperationalError: database is locked")


@pytest.mark.asyncio
async def test_a_full_queue_spools_at_once_and_loses_nothing(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    ledger = Ledger(db, max_queue=2, batch_size=1)
    records = [record(at=T0 + i) for i in range(20)]
    with HeldLock(db, 2.0) as lock:  # the writer is stuck retrying its first record
        for r in records:
            await ledger.write(r)
        assert not lock.released.is_set(), "write waited for the writer"
        assert ledger.faults["spooled"] >= 20 - 1 - 2  # all but the writer's batch and the queue
    await ledger.aclose()
    assert ledger.faults["dropped"] == 0
    assert ("spooled", "queue full (2 records)") in rows(db, "SELECT kind, detail FROM ledger_faults")

    Ledger(db).close()  # imports the spool
    assert {i for (i,) in rows(db, "SELECT id FROM steps")} == {r.step_id for r in records}
    assert rows(db, "SELECT count(*) FROM attempts") == [(20,)]
    assert not (tmp_path / "l.db.spool.jsonl").exists()


@pytest.mark.asyncio
async def test_a_truncated_spool_line_is_skipped_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = failing_ledger(tmp_path)
    spool = tmp_path / "l.db.spool.jsonl"
    records = [record(at=T0 + i) for i in range(3)]
    async with Ledger(db) as ledger:
        for r in records:
            await ledger.write(r)
    data = spool.read_bytes()
    spool.write_bytes(data[: len(data) - 40])  # a crash in the middle of the last append
    execute(db, "DROP TRIGGER disk_full")

    with caplog.at_level(logging.WARNING, logger="milliwatt.ledger"):
        ledger = Ledger(db)
        ledger.close()
    assert "unreadable spool line(s)" in caplog.text and "line 3" in caplog.text
    assert ledger.faults == NO_FAULTS | {"imported": 2, "dropped": 1}
    assert [i for (i,) in rows(db, "SELECT id FROM steps ORDER BY id")] == [r.step_id for r in records[:2]]
    assert not spool.exists()
    assert summarize(db)["ledger_faults"]["dropped"] == 1


def test_an_append_after_a_truncated_line_stays_readable(tmp_path: Path) -> None:
    from milliwatt.ledger import Spool

    path = tmp_path / "x.spool.jsonl"
    path.write_bytes(b'{"step":{"id":"A"},"attempts":[]}\n{"step":{"id":"B"},"att')  # B was cut short
    Spool(path).append([{"step": {"id": "C"}, "attempts": []}])
    assert [e["step"]["id"] for e in Spool(path).entries()] == ["A", "C"]
    assert Spool(path).pending_records() == 2


@pytest.mark.asyncio
async def test_a_step_still_answers_when_the_ledger_fails(tmp_path: Path) -> None:
    from milliwatt import Milliwatt
    from milliwatt.testing import ScriptedTier

    db = failing_ledger(tmp_path)
    tier = ScriptedTier("remote", lambda step: {"role": "assistant", "content": "hi"})
    async with Milliwatt([tier], ledger=Ledger(db)) as mw:
        first = await mw.step([{"role": "user", "content": "q1"}])
        await mw.ledger.flush()  # the first record has failed in the writer by now
        second = await mw.step([{"role": "user", "content": "q2"}])
        await mw.ledger.flush()
    assert first.content == second.content == "hi"
    assert spooled_ids(tmp_path / "l.db.spool.jsonl") == [first.record.step_id, second.record.step_id]


@pytest.mark.asyncio
async def test_an_in_memory_ledger_spools_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    async with Ledger("sqlite://") as ledger:
        assert ledger.spool.path is None
        r = record()
        await ledger.write(r)
        await ledger.flush()
        await ledger.write(r)  # the same step id again: refused by the database
        await ledger.flush()
        assert ledger.faults["spooled"] == 1 and len(ledger.spool.entries()) == 1
    assert list(tmp_path.iterdir()) == []


def test_where_the_spool_is(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from milliwatt.ledger import spool_path

    monkeypatch.chdir(tmp_path)
    assert spool_path(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db.spool.jsonl"
    assert spool_path("sqlite://") is None and spool_path("sqlite:///:memory:") is None
    assert spool_path("postgresql+psycopg://u:p@h/db") == tmp_path / "milliwatt-ledger.spool.jsonl"
    assert spool_path("postgresql+psycopg://u:p@h/db", tmp_path / "s.jsonl") == tmp_path / "s.jsonl"


def test_user_is_stored(tmp_path: Path) -> None:
    from milliwatt.types import StepMeta

    db = tmp_path / "l.db"
    with Ledger(db) as ledger:
        ledger.write_sync(record(meta=StepMeta(session_id="s", user="u-7f3a")))
        ledger.write_sync(record(at=T0 + 1))
    assert rows(db, "SELECT user_id FROM steps ORDER BY id") == [("u-7f3a",), (None,)]


@pytest.mark.asyncio
async def test_flush_and_close_never_raise_while_the_database_is_gone(tmp_path: Path) -> None:
    """A ledger whose tables vanished under it (another process dropped them): every record
    is spooled, and the fault rows, which cannot be stored either, are spooled at close."""
    db = tmp_path / "l.db"
    ledger = Ledger(db)
    execute(db, "DROP TABLE attempts")
    execute(db, "DROP TABLE steps")
    execute(db, "DROP TABLE ledger_faults")
    await asyncio.gather(*(ledger.write(record(at=T0 + i)) for i in range(5)))
    await ledger.flush()
    await ledger.aclose()
    entries = spool_entries(tmp_path / "l.db.spool.jsonl")
    assert sum("step" in e for e in entries) == 5
    assert [e["fault"]["kind"] for e in entries if "fault" in e] == ["spooled"]


def test_a_shared_spool_is_imported_by_each_ledger_for_its_own_lines(tmp_path: Path) -> None:
    """PostgreSQL ledgers spool to ./milliwatt-ledger.spool.jsonl by default, so two ledgers
    run from one directory share it: each line names its ledger, and each open takes its own."""
    shared = tmp_path / "shared.spool.jsonl"
    dbs = [failing_ledger(tmp_path / name) for name in ("a", "b") if (tmp_path / name).mkdir() is None]
    records = {db: record(at=T0 + i) for i, db in enumerate(dbs)}
    for db, r in records.items():
        with Ledger(db, spool=shared) as ledger:
            ledger.write_sync(r)
    assert len(shared.read_text().splitlines()) == 2
    a, b = dbs
    execute(a, "DROP TRIGGER disk_full")
    with Ledger(a, spool=shared) as ledger:
        assert ledger.faults["imported"] == 1
    assert rows(a, "SELECT id FROM steps") == [(records[a].step_id,)]
    [left] = shared.read_text().splitlines()
    assert json.loads(left)["ledger"] == str(b) and json.loads(left)["step"]["id"] == records[b].step_id
    assert summarize(a)["ledger_faults"]["in_spool"] == 0  # the report of a ledger that is a file looks beside it


def _full_after_open(monkeypatch: pytest.MonkeyPatch, db: Path) -> None:
    """The ledger's file cannot grow past its size now, as on a full disk: every connection
    the writer opens gets ``PRAGMA max_page_count`` = the pages it has (real SQLITE_FULL)."""
    from sqlalchemy import event

    from milliwatt.ledger import writer

    made = writer.make_engine

    def make_engine(url: str):
        engine = made(url)

        @event.listens_for(engine, "connect")
        def _full(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            (pages,) = cur.execute("PRAGMA page_count").fetchone()
            cur.execute(f"PRAGMA max_page_count = {max(pages, 1)}")
            cur.close()

        return engine

    monkeypatch.setattr(writer, "make_engine", make_engine)


@pytest.mark.asyncio
async def test_a_full_disk_answers_every_step_spools_and_the_next_open_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's own SQLITE_FULL (``database or disk is full``), not a trigger: the ledger file
    may not grow by a page. Steps are answered, their records spooled, the fault counted; once
    there is room again the next open imports them, and the file passes integrity_check."""
    from milliwatt import Milliwatt
    from milliwatt.testing import ScriptedTier

    db = tmp_path / "l.db"
    Ledger(db).close()
    _full_after_open(monkeypatch, db)
    tier = ScriptedTier("remote", lambda step: {"role": "assistant", "content": "hi " + "x" * 2000})
    ledger = Ledger(db)
    async with Milliwatt([tier], ledger=ledger) as mw:
        results = [await mw.step([{"role": "user", "content": f"q{i} " + "y" * 3000}]) for i in range(10)]
        await mw.ledger.flush()
    assert all(r.content.startswith("hi ") for r in results)
    spooled = spooled_ids(tmp_path / "l.db.spool.jsonl")
    assert spooled == [r.record.step_id for r in results]
    assert ledger.faults["spooled"] == 10 and ledger.faults["dropped"] == 0
    assert rows(db, "SELECT count(*) FROM steps") == [(0,)]

    monkeypatch.undo()  # room again
    with Ledger(db) as reopened:
        assert reopened.faults["imported"] == 10
    assert [i for (i,) in rows(db, "SELECT id FROM steps ORDER BY id")] == [r.record.step_id for r in results]
    assert rows(db, "PRAGMA integrity_check") == [("ok",)]
    assert ("spooled", "OperationalError: database or disk is full") in rows(db, "SELECT DISTINCT kind, detail FROM ledger_faults")
    assert not (tmp_path / "l.db.spool.jsonl").exists()


@pytest.mark.asyncio
async def test_a_lock_held_past_the_retry_budget_spools_and_the_next_open_imports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another connection keeps the write lock longer than the writer's retry budget (cut to
    0.3 s here, 5 s in use): the steps are answered, the batch is spooled ``database is
    locked``, and the next open, the lock gone, imports it."""
    from functools import partial

    from milliwatt import Milliwatt
    from milliwatt.ledger import writer
    from milliwatt.testing import ScriptedTier

    monkeypatch.setattr(writer, "retrying", partial(writer.retrying, budget_s=0.3))
    db = tmp_path / "l.db"
    tier = ScriptedTier("remote", lambda step: {"role": "assistant", "content": "hi"})
    ledger = Ledger(db)
    with HeldLock(db, 2.0) as lock:
        async with Milliwatt([tier], ledger=ledger) as mw:
            results = [await mw.step([{"role": "user", "content": f"q{i}"}]) for i in range(3)]
            await mw.ledger.flush()
        assert not lock.released.is_set(), "the writer waited past its budget"
    assert [r.content for r in results] == ["hi"] * 3
    entries = spool_entries(tmp_path / "l.db.spool.jsonl")
    assert sorted(e["step"]["id"] for e in entries if "step" in e) == sorted(r.record.step_id for r in results)
    # Closing found the database still locked: the fault rows wait in the spool too.
    assert {e["fault"]["kind"] for e in entries if "fault" in e} == {"spooled", "retried"}
    assert ledger.faults["spooled"] == 3 and ledger.faults["retried"] >= 1
    with Ledger(db) as reopened:
        assert reopened.faults["imported"] == 3
    assert {i for (i,) in rows(db, "SELECT id FROM steps")} == {r.record.step_id for r in results}
    assert ("spooled", "OperationalError: database is locked") in rows(db, "SELECT DISTINCT kind, detail FROM ledger_faults")
