"""The per-step ledger: one row per step, one row per tier attempt, in any SQLAlchemy database.

The schema is a public contract for analysts (as in simonw/llm): see ``schema`` and
docs/ledger.md. It changes only through the named Alembic migrations in
``milliwatt.ledger.migrations``; opening a ledger upgrades it (``migrate``).

Modules, each doing one thing:

- ``schema``: the SQLAlchemy models with every column's meaning, ``ledger_schema_markdown``
- ``migrate``: revisions, ``upgrade_to_head``, ``ledger_revision``
- ``engine``: URLs, engines, where a ledger's files (its spool) live, retries of a busy database
- ``rows``: a ``StepRecord`` as the rows it is stored as
- ``spool``: the append-only file of what the database did not take, imported on the next open
- ``faults``: counting, logging and storing ledger faults (``ledger_faults``)
- ``writer``: ``Ledger``, the background writer (``write`` never blocks the loop, never raises
  for a storage fault)
- ``reader``: reading steps and faults back

Everything public is re-exported here: ``from milliwatt.ledger import Ledger``.
"""

from __future__ import annotations

from .engine import (
    DEFAULT_SPOOL,
    DEFAULT_URL,
    SPOOL_SUFFIX,
    delete_ledger_file,
    display_name,
    make_engine,
    open_existing,
    spool_path,
    to_url,
)
from .errors import LedgerError
from .faults import fault_row
from .migrate import MIGRATIONS, UNVERSIONED_REVISION, head_revision, ledger_revision, upgrade_to_head
from .reader import fault_lines, ledger_steps, read_faults, read_steps
from .rows import attempt_rows, iso_utc, record_rows, step_row
from .schema import (
    ATTEMPTS,
    FAULT_KINDS,
    FAULTS,
    META,
    OUTCOMES,
    SCHEMA_VERSION,
    STEPS,
    VERSION_TABLE,
    AttemptRow,
    Base,
    FaultRow,
    MetaRow,
    StepRow,
    ledger_schema_markdown,
)
from .spool import Spool, import_spool
from .writer import Ledger

__all__ = [
    "ATTEMPTS",
    "DEFAULT_SPOOL",
    "DEFAULT_URL",
    "FAULTS",
    "FAULT_KINDS",
    "META",
    "MIGRATIONS",
    "OUTCOMES",
    "SCHEMA_VERSION",
    "SPOOL_SUFFIX",
    "STEPS",
    "UNVERSIONED_REVISION",
    "VERSION_TABLE",
    "AttemptRow",
    "Base",
    "FaultRow",
    "Ledger",
    "LedgerError",
    "MetaRow",
    "Spool",
    "StepRow",
    "attempt_rows",
    "delete_ledger_file",
    "display_name",
    "fault_lines",
    "fault_row",
    "head_revision",
    "import_spool",
    "iso_utc",
    "ledger_revision",
    "ledger_schema_markdown",
    "make_engine",
    "open_existing",
    "read_faults",
    "ledger_steps",
    "read_steps",
    "record_rows",
    "spool_path",
    "step_row",
    "to_url",
    "upgrade_to_head",
]
