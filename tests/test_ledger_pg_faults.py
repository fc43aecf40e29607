"""Ledger faults under a whole cascade: a PostgreSQL server restarted in the middle of a run
of concurrent agents, one that stays down past the writer's retry budget, and a disk so full
that neither the database nor the spool can be written.

What a user relies on: every step is answered and nothing raises to the caller, whatever the
ledger's storage does; every step answered is one ``steps`` row once the server is back
(zero lost, zero duplicated), or, when even the spool cannot be written, it is counted
``dropped`` and logged as LOST. Each PostgreSQL test runs on a cluster of this module's own
(``private_pg_cluster``, tests/conftest_pg.py), so halting it touches no other test; without
PostgreSQL or psycopg they skip, saying why. See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

import conftest_pg
from conftest_pg import Cluster, fresh_database
from milliwatt import Milliwatt, StepResult
from milliwatt.adapters import LiteLLMBackend
from milliwatt.ledger import Ledger
from milliwatt.model_tier import ModelTier
from milliwatt.rules import RulesTier
from milliwatt.testing import OpenAIStubServer
from test_fuzz import PACK  # a greeting rule and an order rule
from test_ledger_faults import _full_after_open

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning")

# A cluster of this module's own: its tests halt and restart it.
private_pg_cluster = conftest_pg.private_pg_cluster

SYSTEM = {"role": "system", "content": "You are the support agent of an airline."}


def provider(request: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": f"remote answer to: {request['messages'][-1]['content'][:60]}"}


def client(tmp_path: Path, stub: OpenAIStubServer, ledger: Ledger) -> Milliwatt:
    """Rules, then a remote tier over HTTP (LiteLLM to the loopback stub), logging to ``ledger``."""
    pack = tmp_path / "pack.yaml"
    pack.write_text(PACK)
    backend = LiteLLMBackend("openai/stub", api_base=stub.api_base, api_key="sk-pg-faults-not-a-real-key", label="stand-in",
                             energy_model="openai/gpt-4o", max_retries=0, timeout_s=10)  # fmt: skip
    return Milliwatt([RulesTier([pack]), ModelTier("remote", backend)], ledger=ledger)


def question(agent: int, i: int, pad: str = "") -> str:
    """Every fourth step is answered by a rule, the others by the remote tier."""
    if i % 4 == 0:
        return "hello"
    if i % 4 == 2 and pad:
        return f"Where is my order {48000 + i}? {pad}"
    return f"Agent {agent}, step {i}: can I change my flight online? {pad}"


@dataclass
class Run:
    """What the agents were answered, in order of answering."""

    results: list[StepResult] = field(default_factory=list)

    @property
    def ids(self) -> list[str]:
        return [r.record.step_id for r in self.results]


async def agents(mw: Milliwatt, run: Run, n_agents: int, n_steps: int, *, think_s: float = 0.0, pad: str = "") -> None:
    """``n_agents`` concurrent agents, each a conversation of ``n_steps`` steps (an exception
    from ``step`` fails the test: nothing may reach the caller)."""

    async def agent(a: int) -> None:
        messages: list[dict[str, Any]] = [{**SYSTEM, "content": f"{SYSTEM['content']} {pad}"} if pad else SYSTEM]
        for i in range(n_steps):
            messages.append({"role": "user", "content": question(a, i, pad)})
            result = await mw.step(messages, session_id=f"agent-{a}", agent="pg-faults")
            assert result.content, result
            run.results.append(result)
            messages.append(result.message)
            if think_s:
                await asyncio.sleep(think_s)

    await asyncio.gather(*(agent(a) for a in range(n_agents)))


@dataclass
class Outage:
    """The server halted once ``at`` steps are answered, kept down ``down_s``, started again."""

    cluster: Cluster
    run: Run
    at: int
    down_s: float
    answered_while_down: int = 0  # steps answered between the halt and the server being up again
    seconds_down: float = 0.0

    async def __call__(self) -> None:
        while len(self.run.results) < self.at:
            await asyncio.sleep(0.005)
        await asyncio.to_thread(self.cluster.halt)  # fast shutdown: the writer's connections are cut
        t0, n0 = time.monotonic(), len(self.run.results)
        await asyncio.sleep(self.down_s)
        await asyncio.to_thread(self.cluster.start)
        self.seconds_down = time.monotonic() - t0
        self.answered_while_down = len(self.run.results) - n0


def query(url: str, sql: str) -> list[tuple]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql))]
    finally:
        engine.dispose()


def fault_sums(url: str) -> dict[str, int]:
    return {k: int(v) for k, v in query(url, "SELECT kind, sum(count) FROM ledger_faults GROUP BY kind")}


@pytest.fixture
def cluster(private_pg_cluster: Cluster) -> Cluster:
    """The module's cluster, running (a failed test may have left it halted)."""
    if not private_pg_cluster.running():
        private_pg_cluster.start()
    return private_pg_cluster


def report(name: str, **figures: object) -> None:
    print(f"\n{name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# --------------------------------------------------------------------------- a server restarted mid-run

AGENTS, STEPS = 32, 20


async def restart_mid_run(cluster: Cluster, tmp_path: Path, down_s: float) -> dict[str, Any]:
    """32 agents x 20 steps through rules and a remote tier, the ledger on PostgreSQL; the
    server is halted a third of the way in, and started ``down_s`` later. Then the ledger is
    closed and opened again (importing the spool): every answered step is one row."""
    url = fresh_database(cluster.url)
    spool = tmp_path / "spool.jsonl"
    ledger = Ledger(url, spool=spool, batch_size=64)
    run = Run()
    outage = Outage(cluster, run, at=AGENTS * STEPS // 3, down_s=down_s)
    t0 = time.monotonic()
    async with OpenAIStubServer(provider, delay_s=0.005) as stub:
        mw = client(tmp_path, stub, ledger)
        try:
            await asyncio.gather(agents(mw, run, AGENTS, STEPS, think_s=0.05), outage())
            await ledger.flush()  # never raises
        finally:
            await mw.aclose()  # closes the ledger: never raises
    seconds = time.monotonic() - t0

    # Every step got its answer, from both tiers, and some were answered while the server was down.
    answered = run.ids
    assert len(answered) == len(set(answered)) == AGENTS * STEPS
    assert {r.tier for r in run.results} == {"rules", "remote"}
    assert outage.answered_while_down > 0, "the run ended before the outage: nothing tested"
    faults = dict(ledger.faults)
    assert faults["dropped"] == 0 and faults["retried"] >= 1, faults

    with Ledger(url, spool=spool) as reopened:  # imports what was spooled
        imported = reopened.faults["imported"]
    assert imported == faults["spooled"]
    assert not spool.exists()
    # Zero lost, zero duplicated: exactly the answered steps, once each, each with its attempts.
    assert query(url, "SELECT count(*), count(DISTINCT id) FROM steps") == [(len(answered), len(answered))]
    assert {i for (i,) in query(url, "SELECT id FROM steps")} == set(answered)
    assert query(url, "SELECT count(*) FROM steps s WHERE NOT EXISTS (SELECT 1 FROM attempts a WHERE a.step_id = s.id)") == [(0,)]
    assert query(url, "SELECT count(*) FROM attempts a WHERE NOT EXISTS (SELECT 1 FROM steps s WHERE s.id = a.step_id)") == [(0,)]
    # ledger_faults says what happened: the retries, and what was spooled and then imported.
    stored = fault_sums(url)
    assert stored.get("retried", 0) == faults["retried"]
    assert stored.get("spooled", 0) == faults["spooled"] == stored.get("imported", 0)
    assert stored.get("dropped", 0) == 0
    figures = dict(answered=len(answered), rows=len(answered), answered_while_down=outage.answered_while_down,
                   seconds_down=round(outage.seconds_down, 2), retried=faults["retried"], spooled=faults["spooled"],
                   imported=imported, dropped=faults["dropped"], seconds=round(seconds, 2))  # fmt: skip
    return figures


@pytest.mark.asyncio
async def test_a_postgresql_restart_mid_run_costs_no_answer_and_loses_or_duplicates_no_row(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The server restarts (fast shutdown, down ~0.3 s, start) within the writer's 5 s retry
    budget: the writes it cut are retried on a new connection."""
    figures = await restart_mid_run(cluster, tmp_path, down_s=0.3)
    report("restart within the retry budget", **figures)


@pytest.mark.asyncio
async def test_a_postgresql_server_down_past_the_retry_budget_spools_and_the_next_open_imports_every_step(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stays down (1.5 s) longer than the writer's retry budget (cut to 0.3 s here,
    5 s in use): the batches written meanwhile are spooled; the next open imports them all."""
    from milliwatt.ledger import writer

    monkeypatch.setattr(writer, "retrying", partial(writer.retrying, budget_s=0.3))
    figures = await restart_mid_run(cluster, tmp_path, down_s=1.5)
    assert figures["spooled"] > 0, figures
    report("down past the retry budget", **figures)


# --------------------------------------------------------------------------- nowhere to write


def unwritable_spool(monkeypatch: pytest.MonkeyPatch, how: str) -> list[int]:
    """The spool's disk is full too: its low-level write fails with ENOSPC, at once
    (``nothing``) or after writing half of what it was given (``cut``: a real full disk
    takes what fits). Returns a list the failed appends' sizes are added to."""
    from milliwatt.ledger import spool as spool_module

    failed: list[int] = []

    def write_all(fd: int, data: bytes) -> None:
        failed.append(len(data))
        if how == "cut":
            os.write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "_write_all", write_all)
    return failed


@pytest.mark.parametrize("how", ["nothing", "cut"])
@pytest.mark.parametrize("backend", ["sqlite-full", "postgresql-down"])
@pytest.mark.asyncio
async def test_a_disk_too_full_for_the_spool_too_costs_no_answer_and_counts_every_record_dropped(
    backend: str, how: str, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    """The database refuses every write (SQLite: SQLITE_FULL from ``max_page_count``;
    PostgreSQL: the server down past the retry budget) and the spool cannot be written
    (ENOSPC). Every step is answered, nothing raises (write, flush, close); each record is
    counted ``dropped`` in ``Ledger.faults`` and, once the database takes writes again,
    ``ledger_faults``; a log line says LOST. A spool append the disk cut short leaves no
    part of itself behind: no record counted dropped turns up later."""
    from milliwatt.ledger import writer

    monkeypatch.setattr(writer, "retrying", partial(writer.retrying, budget_s=0.3))
    spool = tmp_path / "spool.jsonl"
    cluster: Cluster | None = None
    if backend == "sqlite-full":
        db = tmp_path / "l.db"
        url = f"sqlite:///{db}"
        Ledger(url, spool=spool).close()
        _full_after_open(monkeypatch, db)  # the file may not grow by a page: a real SQLITE_FULL
    else:
        cluster = request.getfixturevalue("cluster")
        url = fresh_database(cluster.url)
    ledger = Ledger(url, spool=spool, batch_size=8)
    failed = unwritable_spool(monkeypatch, how)
    if cluster is not None:
        cluster.halt()
    run = Run()
    pad = "y" * 6000  # every row bigger than a page: SQLite's file must grow to take it
    try:
        with caplog.at_level(logging.WARNING, logger="milliwatt.ledger"):
            async with OpenAIStubServer(provider) as stub:
                mw = client(tmp_path, stub, ledger)
                try:
                    await agents(mw, run, 8, 5, pad=pad)
                    await ledger.flush()  # never raises
                finally:
                    if cluster is not None:
                        cluster.start()  # back before closing: the fault rows can be stored
                    await mw.aclose()  # never raises
    finally:
        if cluster is not None and not cluster.running():
            cluster.start()
    answered = run.ids
    assert len(answered) == 40 and {r.tier for r in run.results} == {"rules", "remote"}
    faults = dict(ledger.faults)
    assert faults["dropped"] == len(answered) and faults["spooled"] == 0, faults
    assert failed, "the spool was never tried"
    assert "LOST" in caplog.text and answered[0] in caplog.text
    assert "No space left on device" in caplog.text

    monkeypatch.undo()  # room again, everywhere
    with Ledger(url, spool=spool) as reopened:
        assert reopened.faults == {"spooled": 0, "imported": 0, "dropped": 0, "retried": 0}  # nothing left to import
    assert not spool.exists()
    # Every record counted dropped is indeed absent, none turned up twice-counted.
    assert query(url, "SELECT count(*) FROM steps") == [(0,)]
    stored = fault_sums(url)
    assert stored.get("dropped") == len(answered), stored
    assert stored.get("spooled", 0) == stored.get("imported", 0) == 0
    details = [d for (d,) in query(url, "SELECT detail FROM ledger_faults WHERE kind = 'dropped'")]
    assert all("the spool could not be written: OSError: [Errno 28] No space left on device" in d for d in details), details
    report(f"nowhere to write ({backend}, spool {how})", answered=len(answered), rows=0, dropped=faults["dropped"],
           retried=faults["retried"], failed_spool_appends=len(failed))  # fmt: skip


def test_a_spool_the_full_disk_will_not_let_the_import_rewrite_keeps_every_waiting_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An import stores its ledger's records and rewrites the spool with what must stay there
    (another ledger's lines, records still refused). On a full disk that rewrite fails: the
    spool must stay as it was (the records already stored are found present next time), not
    be left truncated, losing the lines that were to stay."""
    import sqlite3

    from milliwatt.ledger import Spool
    from test_ledger import T0, record

    shared = tmp_path / "shared.spool.jsonl"
    dbs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        db = tmp_path / name / "l.db"
        Ledger(db).close()
        with sqlite3.connect(db) as conn:
            conn.execute("CREATE TRIGGER disk_full BEFORE INSERT ON steps BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        dbs.append(db)
    records = [record(at=T0 + i) for i in range(2)]
    for db, r in zip(dbs, records):
        with Ledger(db, spool=shared) as ledger:
            ledger.write_sync(r)
    a, b = dbs
    with sqlite3.connect(a) as conn:
        conn.execute("DROP TRIGGER disk_full")

    failed = unwritable_spool(monkeypatch, "cut")
    Ledger(a, spool=shared).close()  # a's record is stored; rewriting the spool with b's line fails
    assert failed
    monkeypatch.undo()
    waiting = Spool(shared, owner=str(b)).entries()
    assert [e["step"]["id"] for e in waiting if "step" in e] == [records[1].step_id]  # b's record still waits
    assert not list(tmp_path.glob("*.tmp"))

    with Ledger(a, spool=shared) as ledger:  # a's line, already stored, is found present and removed
        assert ledger.faults["imported"] == 1 and ledger.faults["dropped"] == 0
    with sqlite3.connect(b) as conn:
        conn.execute("DROP TRIGGER disk_full")
    with Ledger(b, spool=shared) as ledger:
        assert ledger.faults["imported"] == 1
    assert not shared.exists()
    for db, r in zip(dbs, records):
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT id FROM steps").fetchall() == [(r.step_id,)]
