"""Where a ledger lives: URLs, the files of a SQLite ledger (its spool included), engines,
and the retry policy for a database that is briefly busy."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import StaticPool
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_delay, wait_exponential

from milliwatt.redaction import redact

from .errors import LedgerError
from .migrate import upgrade_to_head

DEFAULT_URL = "sqlite:///milliwatt.db"
# A SQLite ledger's spool is this suffix appended to the database file's name.
SPOOL_SUFFIX = ".spool.jsonl"
# The spool of a ledger that is not a SQLite file (PostgreSQL, ...), unless ``spool=`` names one.
DEFAULT_SPOOL = "milliwatt-ledger.spool.jsonl"
# How long one SQLite transaction waits for a lock held by another connection (the sqlite3
# module's own default), unless the ``sqlite_busy_timeout_ms`` execution option says otherwise.
DEFAULT_BUSY_TIMEOUT_MS = 5000


def to_url(url_or_path: str | Path) -> str:
    """A SQLAlchemy URL as given, or a filesystem path turned into a SQLite URL."""
    text = str(url_or_path)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def sqlite_file(url: str | URL) -> Path | None:
    """The database file of a SQLite URL; None for an in-memory database or another backend."""
    u = make_url(url) if isinstance(url, str) else url
    if u.get_backend_name() != "sqlite" or u.database in (None, "", ":memory:"):
        return None
    return Path(u.database)


def is_in_memory(url: str | URL) -> bool:
    u = make_url(url) if isinstance(url, str) else url
    return u.get_backend_name() == "sqlite" and u.database in (None, "", ":memory:")


def spool_path(url: str | URL, spool: str | Path | None = None) -> Path | None:
    """Where the ledger at ``url`` spools what it cannot write: ``spool`` if given; beside a
    SQLite file (``<file>.spool.jsonl``); None (kept in memory) for an in-memory SQLite
    database; else ``./milliwatt-ledger.spool.jsonl``."""
    if spool is not None:
        return Path(spool).expanduser().resolve()
    db = sqlite_file(url)
    if db is not None:
        return db.with_name(db.name + SPOOL_SUFFIX)
    if is_in_memory(url):
        return None
    return Path(DEFAULT_SPOOL).resolve()


def display_name(url: str | URL) -> str:
    """The URL as error messages show it: a SQLite file as its path, passwords hidden."""
    u = make_url(url) if isinstance(url, str) else url
    if u.get_backend_name() == "sqlite":
        return u.database or ":memory:"
    return u.render_as_string(hide_password=True)


def make_engine(url: str) -> Engine:
    u = make_url(url)
    if u.get_backend_name() != "sqlite":
        # pre_ping: a connection the server dropped (a restart, a failover) is replaced
        # before use instead of failing the next write.
        return create_engine(url, pool_pre_ping=True)
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
        options = conn.get_execution_options()
        # Per transaction, since pooled connections are shared: the writer waits briefly and
        # retries with backoff (``retrying``), everyone else waits as sqlite3 does by default.
        busy_ms = int(options.get("sqlite_busy_timeout_ms", DEFAULT_BUSY_TIMEOUT_MS))
        conn.exec_driver_sql(f"PRAGMA busy_timeout = {busy_ms}")
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get("sqlite_begin_immediate") else "BEGIN")

    return engine


def open_existing(url_or_path: str | Path) -> tuple[Engine, str]:
    """An engine on an existing ledger, upgraded to the head revision, and its display name;
    never creates a file or a ledger (nor imports its spool: only ``Ledger`` does)."""
    url = to_url(url_or_path)
    where = display_name(url)
    db = sqlite_file(url)
    if db is not None and not db.is_file():
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


def delete_ledger_file(path: str | Path) -> None:
    """Remove an SQLite ledger file with its WAL and shared-memory files and its spool, so a
    run that starts a fresh ledger cannot have a stale journal replayed, or stale spooled
    records imported, into it."""
    path = Path(path)
    for suffix in ("", "-wal", "-shm", SPOOL_SUFFIX):
        path.with_name(path.name + suffix).unlink(missing_ok=True)


# --------------------------------------------------------------------------- busy databases

# A write the database was too busy for is retried for at most this long, then spooled.
RETRY_BUDGET_S = 5.0
# Each try waits this long for SQLite's lock before it counts as busy and backs off.
WRITER_BUSY_TIMEOUT_MS = 100


def error_text(e: BaseException) -> str:
    """The error's class and message for logs and ``ledger_faults.detail``: the driver's error
    for a database error, without SQLAlchemy's rendering of the statement and its parameters
    (which hold the record's content)."""
    orig = e.orig if isinstance(e, DBAPIError) and e.orig is not None else e
    text = redact(f"{type(orig).__name__}: {orig}".strip())  # a driver may echo a connection string
    return text if len(text) <= 500 else text[:497] + "..."


# SQLSTATEs of a server (PostgreSQL, ...) that is unreachable, restarting, or resolved a
# conflict by aborting us: the same statement may well succeed a moment later.
_TRANSIENT_SQLSTATE_CLASSES = ("08", "57P")  # connection exceptions; operator intervention (shutdown, restart)
_TRANSIENT_SQLSTATES = ("40001", "40P01", "53300")  # serialization failure, deadlock, too many connections


def is_transient(e: BaseException) -> bool:
    """A busy or locked SQLite database (another connection holds the write lock), or a
    server that is unreachable or briefly refusing (PostgreSQL down or restarting, a
    deadlock): worth a retry."""
    orig = e.orig if isinstance(e, DBAPIError) else e
    if isinstance(orig, sqlite3.OperationalError):
        message = str(orig).lower()
        return "locked" in message or "busy" in message
    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return True
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    if isinstance(state, str):
        return state.startswith(_TRANSIENT_SQLSTATE_CLASSES) or state in _TRANSIENT_SQLSTATES
    # A driver error with no SQLSTATE: psycopg's for a server it cannot reach at all.
    return type(orig).__name__ == "OperationalError" and type(orig).__module__.startswith(("psycopg", "pg8000", "asyncpg"))


def retrying(on_retry: Callable[[BaseException], None], *, budget_s: float = RETRY_BUDGET_S) -> Retrying:
    """Retry transient errors with exponential backoff (50 ms doubling to 1 s) for at most
    ``budget_s``, then raise the last error. ``on_retry`` hears of each retry."""

    def before_sleep(state: RetryCallState) -> None:
        if state.outcome is not None and (e := state.outcome.exception()) is not None:
            on_retry(e)

    return Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential(multiplier=0.05, max=1.0),
        stop=stop_after_delay(budget_s),
        before_sleep=before_sleep,
        reraise=True,
    )
