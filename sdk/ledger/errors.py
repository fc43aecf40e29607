"""The one error the ledger raises on purpose."""

from __future__ import annotations

from milliwatt.errors import MilliwattError


class LedgerError(MilliwattError):
    """The ledger could not be opened or read; the message names the database.

    Writing never raises it: a record the database does not take goes to the spool
    (see ``milliwatt.ledger.spool``)."""
