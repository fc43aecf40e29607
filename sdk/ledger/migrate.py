"""Bringing a database to the newest ledger revision with the named Alembic migrations.

The migrations live in ``milliwatt.ledger.migrations`` (their revision id is their name);
no ``alembic.ini`` is involved: the configuration is built here, and ``migrations/env.py``
runs on the connection handed to it, inside our transaction.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, inspect, select, text

from .errors import LedgerError
from .schema import META, SCHEMA_VERSION, VERSION_TABLE

MIGRATIONS = Path(__file__).with_name("migrations")
# Ledgers made before the migrations existed carry schema_version 1 and no version table:
# their schema is exactly this revision's, so they are stamped with it, then upgraded.
UNVERSIONED_REVISION = "0001_initial"
# PostgreSQL advisory lock key taken for the duration of an upgrade (the ASCII of "mWledger"),
# so processes opening one database at once create or upgrade the ledger one after the other.
_PG_UPGRADE_LOCK = 0x6D57_6C65_6467_6572


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
        if conn.dialect.name == "postgresql":
            # SQLite's BEGIN IMMEDIATE above serialises upgraders; PostgreSQL's DDL does not
            # (two creators would collide on the catalogs): a transaction-level advisory lock
            # does. Released at commit or rollback.
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_UPGRADE_LOCK})
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
