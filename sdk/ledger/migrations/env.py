"""Alembic environment for the ledger.

Two callers: ``milliwatt.ledger``, which hands over an open connection in
``config.attributes["connection"]`` (inside its own transaction, so an upgrade is all or
nothing), and the ``alembic`` command line for developers adding a migration, which names
the database with ``-x url=...`` (see docs/ledger.md).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from milliwatt.ledger import VERSION_TABLE, Base, make_engine, to_url

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # Not "alembic_version": a ledger may share a PostgreSQL database with an application
        # that has its own Alembic history.
        version_table=VERSION_TABLE,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise SystemExit("name the ledger: alembic -x url=sqlite:///path/to/ledger.db ...")
    return to_url(url)


connection = config.attributes.get("connection")
if connection is not None:
    _configure(connection)
elif context.is_offline_mode():
    # `alembic upgrade --sql`: the DDL as a script, for a DBA to review and run.
    context.configure(url=_url(), target_metadata=Base.metadata, version_table=VERSION_TABLE, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = make_engine(_url())
    try:
        with engine.connect() as conn:
            _configure(conn)
            conn.commit()
    finally:
        engine.dispose()
