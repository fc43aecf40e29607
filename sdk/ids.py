"""Step ids: ULIDs, so ids sort by time as plain strings (in the ledger, in Datasette)."""

from __future__ import annotations

from ulid import LaxMonotonicPolicy, ULIDGenerator

# Lax monotonic: ids made in the same millisecond still increase, so id order is creation order.
_ids = ULIDGenerator(policy=LaxMonotonicPolicy())


def new_step_id(at: float | None = None) -> str:
    """A new 26-character ULID whose first 10 characters encode ``at`` (unix seconds, default now)."""
    return str(_ids.generate(at))
