"""Step ids: ULIDs, so ids sort by time as plain strings (in the ledger, in Datasette)."""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict

from ulid import ULID

# Ids made in the same millisecond increase, so id order is creation order. ulid's own
# monotonic generator remembers only the last millisecond it saw: an id made for another
# time in between (a fault's, a record's own start) reset it, and the next id of the first
# millisecond drew fresh randomness, possibly below the one before (a step id could sort
# before an earlier step's). So the last randomness is kept per millisecond, for the last
# few hundred milliseconds that ids were made for.
_RECENT_MS = 256
_last: OrderedDict[int, int] = OrderedDict()  # millisecond -> the last 80-bit randomness used
_lock = threading.Lock()
_RANDOM_MAX = (1 << 80) - 1


def new_step_id(at: float | None = None) -> str:
    """A new 26-character ULID whose first 10 characters encode ``at`` (unix seconds, default now)."""
    ms = int((time.time() if at is None else at) * 1000)
    with _lock:
        last = _last.get(ms)
        if last is None or last >= _RANDOM_MAX:  # a new millisecond (or, never in practice, overflow)
            randomness = int.from_bytes(os.urandom(10), "big") >> 1  # room to count up from it
        else:
            randomness = last + 1
        _last[ms] = randomness
        _last.move_to_end(ms)
        while len(_last) > _RECENT_MS:
            _last.popitem(last=False)
    return str(ULID.from_bytes(ms.to_bytes(6, "big") + randomness.to_bytes(10, "big")))

