"""The per-step ledger: one row per step, one row per tier attempt, in any SQLAlchemy database.

The schema is a public contract for analysts (as in simonw/llm): plain columns, JSON as TEXT
so ``sqlite3`` and Datasette read it directly, every column documented in the models below and
rendered into docs/ledger.md by ``ledger_schema_markdown()``. The schema changes only through
the named Alembic migrations in ``milliwatt.migrations``; opening a ledger upgrades it.

Writing never blocks the event loop: ``write`` only puts the record on a queue; one background
thread owns the database and inserts queued records in batches, one transaction per batch. A
failure in that thread is kept and raised by the next ``write``/``flush``/``close``, so a lost
record is always reported to the caller.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import queue
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import (
    CheckConstraint,
    Connection,
    Engine,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    insert,
    inspect,
    select,
)
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from milliwatt.errors import MilliwattError
from milliwatt.types import Attempt, Energy, Quality, StepRecord

# Compatibility level in milliwatt_meta for milliwatt versions older than the migrations: they
# read any ledger whose schema_version they know. Raised only by a migration such readers
# could not survive (so far none: columns are only added).
SCHEMA_VERSION = 1
# Alembic's bookkeeping table, named so it cannot collide with an application's own history.
VERSION_TABLE = "milliwatt_alembic_version"
DEFAULT_URL = "sqlite:///milliwatt.db"


def iso_utc(unix_seconds: float) -> str:
    """Fixed-width ISO-8601 UTC with microseconds: sorts as text, and SQLite's ``date()`` reads it."""
    return datetime.fromtimestamp(unix_seconds, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# "skipped": a routing decision sent the step past this tier without trying it.
OUTCOMES = ("answered", "passed", "skipped", "error")


class LedgerError(MilliwattError):
    """The ledger could not be opened, read or written; the message names the database."""


# --------------------------------------------------------------------------- the schema


class Base(DeclarativeBase):
    pass


def _col(type_: Any, meaning: str, unit: str = "", *, references: str | None = None, **kw: Any) -> Any:
    # The meaning becomes the column COMMENT (shown by PostgreSQL clients) and, with the
    # unit, the row of the column table in docs/ledger.md.
    fk = (ForeignKey(references),) if references else ()
    return mapped_column(type_, *fk, comment=meaning, info={"unit": unit}, **kw)


class StepRow(Base):
    __tablename__ = "steps"

    id: Mapped[str] = _col(String(26), "ULID of the step; sorts by start time", primary_key=True)
    started_at: Mapped[str] = _col(Text, "when the step started, ISO-8601 UTC (`2026-01-02T03:04:05.678901Z`)", index=True)
    session_id: Mapped[str | None] = _col(Text, "caller's session (conversation) id", index=True)
    run_id: Mapped[str | None] = _col(Text, "caller's run id (one agent run or replay)")
    tenant: Mapped[str | None] = _col(Text, "tenant the step ran for; cache hits never cross tenants")
    agent: Mapped[str | None] = _col(Text, "name of the agent that sent the step")
    tier: Mapped[str] = _col(Text, "tier that answered: `rules`, `cache`, `local`, `remote`, a plugin tier, or `error` if none did", index=True)
    model: Mapped[str | None] = _col(Text, "model that produced the answer (null for rules and cache)")
    label: Mapped[str | None] = _col(Text, "label of the answering tier, e.g. `stand-in` for a loopback stand-in of the remote model")
    input_tokens_raw: Mapped[int] = _col(Integer, "input tokens of the step as the agent sent it", "tokens")
    input_tokens_sent: Mapped[int] = _col(Integer, "input tokens sent to the answering tier, after trimming", "tokens")
    output_tokens: Mapped[int] = _col(Integer, "output tokens of the answer", "tokens")
    latency_ms: Mapped[float] = _col(Float, "wall time of the whole step, all attempts included", "ms")
    energy_method: Mapped[str] = _col(Text, "how the step's energy was obtained: `cpu-time`, `estimate`, `measured`, `mixed` or `none`")
    energy_wh_low: Mapped[float] = _col(Float, "energy of all attempts of the step, low end of the range", "Wh")
    energy_wh_point: Mapped[float] = _col(Float, "energy of all attempts of the step, point estimate", "Wh")
    energy_wh_high: Mapped[float] = _col(Float, "energy of all attempts of the step, high end of the range", "Wh")
    energy_basis: Mapped[str] = _col(Text, "coefficients behind the energy figure, so it can be re-derived")
    cost_usd: Mapped[float] = _col(Float, "money spent on the step (remote tokens at list price)", "USD")
    baseline_model: Mapped[str] = _col(Text, "frontier model of the counterfactual: the untrimmed step sent straight to it")
    baseline_energy_method: Mapped[str] = _col(Text, "how the baseline energy was obtained (usually `estimate`)")
    baseline_energy_wh_low: Mapped[float] = _col(Float, "baseline energy, low end", "Wh")
    baseline_energy_wh_point: Mapped[float] = _col(Float, "baseline energy, point estimate", "Wh")
    baseline_energy_wh_high: Mapped[float] = _col(Float, "baseline energy, high end", "Wh")
    baseline_energy_basis: Mapped[str] = _col(Text, "coefficients behind the baseline energy")
    baseline_cost_usd: Mapped[float] = _col(Float, "what the baseline call would have cost", "USD")
    request_json: Mapped[str] = _col(Text, "the OpenAI chat request as the agent sent it (messages, tools, options)", "JSON")
    response_json: Mapped[str] = _col(Text, "the OpenAI assistant message returned to the agent", "JSON")
    meta_json: Mapped[str] = _col(Text, "the caller's extra tags (`StepMeta.extra`)", "JSON")
    # Quality against a reference answer (set by replays); all null when the step had none.
    quality_metric: Mapped[str | None] = _col(
        Text, "measure the answer was judged by: `tool_call_match`, `bfcl_ast`, `gsm8k_final_number` (exact), `text_token_f1` (proxy); null without a reference"
    )
    quality_kind: Mapped[str | None] = _col(Text, "`exact` (a match against the reference) or `proxy` (an approximation, reported apart)")
    quality_agrees: Mapped[int | None] = _col(Integer, "1 if the answer agrees with the reference, else 0", "0/1")
    quality_score: Mapped[float | None] = _col(Float, "1.0 or 0.0 for an exact measure; the proxy's value for a proxy")
    quality_detail: Mapped[str | None] = _col(Text, "why the measure decided so, in words (e.g. the argument that differed)")


class AttemptRow(Base):
    __tablename__ = "attempts"
    __table_args__ = (CheckConstraint(f"outcome IN ({', '.join(repr(o) for o in OUTCOMES)})", name="attempt_outcome"),)

    step_id: Mapped[str] = _col(String(26), "the step (`steps.id`)", references="steps.id", primary_key=True)
    ordinal: Mapped[int] = _col(Integer, "position in the cascade for this step, from 0", primary_key=True)
    tier: Mapped[str] = _col(Text, "tier that made the attempt")
    outcome: Mapped[str] = _col(
        Text, "`answered`; `passed` (the tier declined: see reason); `skipped` (routed past it); `error` (its backend failed)"
    )
    reason: Mapped[str] = _col(Text, "why the tier answered or passed, in words")
    signal: Mapped[float | None] = _col(Float, "the number the tier decided on: rule hit 1.0, cache similarity, local confidence")
    model: Mapped[str | None] = _col(Text, "model the tier ran, if any")
    label: Mapped[str | None] = _col(Text, "label of the tier, e.g. `stand-in`")
    input_tokens: Mapped[int] = _col(Integer, "input tokens this tier was sent", "tokens")
    output_tokens: Mapped[int] = _col(Integer, "output tokens this tier produced", "tokens")
    latency_ms: Mapped[float] = _col(Float, "wall time of this attempt", "ms")
    energy_method: Mapped[str] = _col(Text, "how this attempt's energy was obtained")
    energy_wh_low: Mapped[float] = _col(Float, "energy of this attempt, low end", "Wh")
    energy_wh_point: Mapped[float] = _col(Float, "energy of this attempt, point estimate", "Wh")
    energy_wh_high: Mapped[float] = _col(Float, "energy of this attempt, high end", "Wh")
    energy_basis: Mapped[str] = _col(Text, "coefficients behind this attempt's energy")
    cost_usd: Mapped[float] = _col(Float, "money spent on this attempt", "USD")


class MetaRow(Base):
    __tablename__ = "milliwatt_meta"

    key: Mapped[str] = _col(Text, "setting name; `schema_version` marks the file as a milliwatt ledger", primary_key=True)
    value: Mapped[str] = _col(Text, "setting value")


STEPS = StepRow.__table__
ATTEMPTS = AttemptRow.__table__
META = MetaRow.__table__


def ledger_schema_markdown() -> str:
    """The column tables of docs/ledger.md, generated from the models so the docs cannot drift."""
    dialect = sqlite_dialect.dialect()
    out: list[str] = [f"Revision `{head_revision()}`.", ""]
    for table in (STEPS, ATTEMPTS, META):
        out += [f"### `{table.name}`", "", "| column | type | unit | meaning |", "|---|---|---|---|"]
        for col in table.columns:
            sql_type = col.type.compile(dialect=dialect) + ("" if col.nullable else " NOT NULL")
            key = " (primary key)" if col.primary_key else ""
            key += "".join(f" references `{fk.target_fullname}`" for fk in col.foreign_keys)
            out.append(f"| `{col.name}` | {sql_type}{key} | {col.info.get('unit', '')} | {col.comment} |")
        indexes = sorted(", ".join(f"`{c.name}`" for c in ix.columns) for ix in table.indexes)
        if indexes:
            out += ["", "Indexes: " + "; ".join(indexes) + "."]
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------- migrations

MIGRATIONS = Path(__file__).with_name("migrations")
# Ledgers made before the migrations existed carry schema_version 1 and no version table:
# their schema is exactly this revision's, so they are stamped with it, then upgraded.
UNVERSIONED_REVISION = "0001_initial"


# Alembic runs a migration through module-level proxies (alembic.op, alembic.context), so
# two threads of one process must not run migrations at the same time, even on two ledgers.
_MIGRATING = threading.Lock()


@cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory(str(MIGRATIONS))


def head_revision() -> str:
    """The newest ledger revision this milliwatt knows."""
    head = _scripts().get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS}"
    return head


def _check_schema_version(conn: Connection, where: str) -> None:
    value = conn.execute(select(META.c.value).where(META.c.key == "schema_version")).scalar()
    if value is None or not value.isdigit():
        raise LedgerError(f"{where} is not a milliwatt ledger (no schema_version in {META.name})")
    if int(value) > SCHEMA_VERSION:
        raise LedgerError(
            f"{where} has ledger schema version {value}; this milliwatt reads up to {SCHEMA_VERSION}: upgrade milliwatt"
        )


def ledger_revision(conn: Connection, where: str) -> str | None:
    """The database's ledger revision, ``UNVERSIONED_REVISION`` for a ledger older than the
    migrations, or None for a database holding no ledger. Raises ``LedgerError`` for a ledger
    written by a newer milliwatt."""
    tables = set(inspect(conn).get_table_names())
    if META.name not in tables:
        if VERSION_TABLE in tables:
            raise LedgerError(f"{where} is not a milliwatt ledger (it has {VERSION_TABLE} but no {META.name} table)")
        return None
    _check_schema_version(conn, where)
    if VERSION_TABLE not in tables:
        return UNVERSIONED_REVISION
    found = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE}).get_current_revision()
    if found is None or found not in {s.revision for s in _scripts().walk_revisions()}:
        raise LedgerError(
            f"{where} is at ledger revision {found!r}, which this milliwatt does not know (its newest is "
            f"{head_revision()!r}): the ledger was written by a newer milliwatt; upgrade milliwatt"
        )
    return found


def upgrade_to_head(engine: Engine, where: str, *, create: bool) -> None:
    """Bring the ledger to the head revision; with ``create``, make one in an empty database.

    Checking costs one read when the ledger is current. An upgrade is one transaction, taken
    with SQLite's write lock up front: it is applied whole or not at all, and two processes
    opening the same old ledger upgrade it one after the other.
    """
    head = head_revision()
    with engine.connect() as conn:
        if ledger_revision(conn, where) == head:
            return
    with _MIGRATING, engine.connect().execution_options(sqlite_begin_immediate=True) as conn, conn.begin():
        found = ledger_revision(conn, where)  # again, under the lock: another process may have upgraded it
        if found == head:
            return
        if found is None and not create:
            raise LedgerError(f"{where} is not a milliwatt ledger (it has no {META.name} table)")
        # No alembic.ini: the configuration is built here, and env.py runs on this connection.
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = conn
        if found is not None and not inspect(conn).has_table(VERSION_TABLE):
            command.stamp(config, UNVERSIONED_REVISION)
        command.upgrade(config, "head")


# --------------------------------------------------------------------------- rows


def _json(value: Any) -> str:
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
        "output_tokens": r.output_tokens,
        "latency_ms": r.latency_s * 1000.0,
        **_energy_cols(r.energy),
        "cost_usd": r.cost_usd,
        "baseline_model": r.baseline_model,
        **_energy_cols(r.baseline_energy, "baseline_energy"),
        "baseline_cost_usd": r.baseline_cost_usd,
        "request_json": _json(r.request),
        "response_json": _json(r.response),
        "meta_json": _json(r.meta.extra),
        **_quality_cols(r.quality),
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
    }


# --------------------------------------------------------------------------- opening


def to_url(url_or_path: str | Path) -> str:
    """A SQLAlchemy URL as given, or a filesystem path turned into a SQLite URL."""
    text = str(url_or_path)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def display_name(url: str) -> str:
    """The URL as error messages show it: a SQLite file as its path, passwords hidden."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        return u.database or ":memory:"
    return u.render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        return create_engine(url)
    if u.database in (None, "", ":memory:"):
        # One shared connection, or the writer thread would see a different empty database.
        engine = create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
    else:
        engine = create_engine(url)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Transactions are begun below, not by the sqlite3 module, which begins none before
        # DDL: so a migration is one transaction too.
        dbapi_conn.isolation_level = None
        # WAL: readers (sqlite3, Datasette, the report) never block the writer or each other.
        # synchronous=NORMAL is durable against crashes of the process; a power cut may lose
        # the last transactions, an accepted trade for a log.
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_begin_immediate")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def open_existing(url_or_path: str | Path) -> tuple[Engine, str]:
    """An engine on an existing ledger, upgraded to the head revision, and its display name;
    never creates a file or a ledger."""
    url = to_url(url_or_path)
    where = display_name(url)
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database not in (None, "", ":memory:"):
        if not Path(u.database).is_file():
            raise LedgerError(f"no ledger at {where}: the file does not exist")
    engine = make_engine(url)
    try:
        upgrade_to_head(engine, where, create=False)
    except DBAPIError as e:
        engine.dispose()
        raise LedgerError(f"{where} is not a milliwatt ledger: {e.orig}") from e
    except BaseException:
        engine.dispose()
        raise
    return engine, where


# --------------------------------------------------------------------------- the writer

_STOP = object()


class Ledger:
    """Where every step is logged. Share one instance between all concurrent agents.

    ``url`` is any SQLAlchemy URL or a path to a SQLite file. A new ledger is created, an
    older one upgraded to the head revision (see ``upgrade_to_head``).
    ``batch_size`` caps the records inserted per transaction.
    """

    def __init__(self, url: str | Path = DEFAULT_URL, *, batch_size: int = 500) -> None:
        self.url = to_url(url)
        self.where = display_name(self.url)
        self._batch_size = batch_size
        self._engine = make_engine(self.url)
        try:
            upgrade_to_head(self._engine, self.where, create=True)
        except SQLAlchemyError as e:
            self._engine.dispose()
            raise LedgerError(f"cannot open the ledger at {self.where}: {getattr(e, 'orig', None) or e}") from e
        except BaseException:
            self._engine.dispose()
            raise
        # Serialises the writer and readers on this instance; it matters only for an in-memory
        # database, where both share one connection.
        self._db_lock = threading.Lock()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        # Taken around every put and around closing, so nothing is queued behind the stop marker.
        self._lock = threading.Lock()
        self._closed = False
        self._failure: BaseException | None = None
        self._lost: list[str] = []
        self._thread = threading.Thread(target=self._run, name="milliwatt-ledger", daemon=True)
        self._thread.start()
        # The thread is a daemon so a forgotten ledger cannot hang interpreter exit; closing at
        # exit drains what is queued instead of dropping it.
        atexit.register(self.close)

    # ----------------------------------------------------------------- writing

    async def write(self, record: StepRecord) -> None:
        """Queue one step for the writer thread; returns at once. Raises ``LedgerError`` if an
        earlier record could not be stored, or the ledger is closed."""
        self._put(record)

    def write_sync(self, record: StepRecord) -> None:
        """``write`` for code without an event loop (CLI, tests)."""
        self._put(record)

    async def flush(self) -> None:
        """Wait until every record written so far is committed."""
        fut = self._put_marker()
        if fut is not None:
            await asyncio.wrap_future(fut)
        self._raise_if_failed()

    def flush_sync(self) -> None:
        fut = self._put_marker()
        if fut is not None:
            fut.result()
        self._raise_if_failed()

    async def aclose(self) -> None:
        """Store everything queued, stop the writer and release the database. Idempotent;
        every caller waits for the drain, not only the first."""
        self._stop()
        await asyncio.to_thread(self._thread.join)
        self._engine.dispose()
        self._raise_if_failed()

    def close(self) -> None:
        self._stop()
        self._thread.join()
        self._engine.dispose()
        self._raise_if_failed()

    async def __aenter__(self) -> Ledger:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _put(self, record: StepRecord) -> None:
        # Checked here so a wrong argument fails at the caller, not later in the writer thread.
        if not isinstance(record, StepRecord):
            raise TypeError(f"Ledger.write takes a StepRecord, got {type(record).__name__}")
        self._raise_if_failed()
        with self._lock:
            if self._closed:
                raise LedgerError(f"the ledger at {self.where} is closed")
            self._queue.put(record)

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

    def _raise_if_failed(self) -> None:
        # A fresh exception each time: the failure may be reported to several callers.
        if self._failure is not None:
            lost = ", ".join(self._lost[:5]) + (" ..." if len(self._lost) > 5 else "")
            raise LedgerError(
                f"the ledger writer for {self.where} failed to store {len(self._lost)} step(s) "
                f"({lost}): {self._failure}"
            ) from self._failure

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
            if records:
                self._store(records)
            # Every record queued before a waiter is in ``records`` or an earlier batch: committed.
            for w in waiters:
                w.set_result(None)

    def _store(self, records: list[StepRecord]) -> None:
        try:
            self._insert(records)
            return
        except Exception:
            pass  # retried one by one below, so one bad record does not lose its batch
        for r in records:
            try:
                self._insert([r])
            except Exception as e:
                if self._failure is None:
                    self._failure = e
                self._lost.append(r.step_id)

    def _insert(self, records: Iterable[StepRecord]) -> None:
        steps: list[dict[str, Any]] = []
        attempts: list[dict[str, Any]] = []
        for r in records:
            steps.append(step_row(r))
            attempts += attempt_rows(r)
        with self._db_lock, self._engine.begin() as conn:
            conn.execute(insert(STEPS), steps)
            if attempts:
                conn.execute(insert(ATTEMPTS), attempts)

    # ----------------------------------------------------------------- reading

    def read_steps(self, *, session_id: str | None = None, limit: int | None = None) -> list[dict[str, Any]]:
        """Committed steps in id (time) order, JSON columns decoded and each step's attempts
        under ``"attempts"`` in cascade order. Call ``flush`` first to see recent writes."""
        query = select(STEPS).order_by(STEPS.c.id).limit(limit)
        if session_id is not None:
            query = query.where(STEPS.c.session_id == session_id)
        # A subquery, not a list of ids: SQLite caps the number of bound parameters.
        ids = select(query.subquery().c.id)
        attempts = select(ATTEMPTS).where(ATTEMPTS.c.step_id.in_(ids)).order_by(ATTEMPTS.c.step_id, ATTEMPTS.c.ordinal)
        with self._db_lock, self._engine.connect() as conn:
            steps = [dict(m) for m in conn.execute(query).mappings()]
            by_id = {s["id"]: s for s in steps}
            for s in steps:
                for col in ("request_json", "response_json", "meta_json"):
                    s[col.removesuffix("_json")] = json.loads(s.pop(col))
                if s["quality_agrees"] is not None:
                    s["quality_agrees"] = bool(s["quality_agrees"])
                s["attempts"] = []
            for a in conn.execute(attempts).mappings():
                by_id[a["step_id"]]["attempts"].append(dict(a))
        return steps


def delete_ledger_file(path: str | Path) -> None:
    """Remove an SQLite ledger file with its WAL and shared-memory files, so a run that
    starts a fresh ledger cannot have a stale journal replayed into it."""
    path = Path(path)
    for stale in (path, *(path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))):
        stale.unlink(missing_ok=True)
