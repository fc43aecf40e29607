"""Work done for many steps, or for none in particular: charged apart, never dropped.

Loading a model, building a cache's index from disk, writing an answer back into the cache
(embedding it, making its template, adding it to the index): none of it is part of the answer
to one step, and all of it costs energy. Components report it here, with the CPU seconds it
took; the next step the cascade records carries what was reported since (``drain``), the
ledger stores it in ``overheads`` rows, priced with the step's coefficients, and the report
shows it apart from the steps' own energy and adds it to the cascade's total, amortised over
the steps of the run.

One log per process: a component reports without knowing which client it serves (a model
loaded at start belongs to none yet). In a process running several clients, the work goes to
whichever records a step next; each item is recorded exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

# What kinds of work are charged here (the ledger's ``overheads.kind``).
KINDS = ("model_load", "index_build", "write_back")


@dataclass(frozen=True)
class Overhead:
    """One piece of background work: which tier, what, when, and the CPU seconds it took."""

    tier: str
    kind: str
    cpu_seconds: float
    at: float  # unix seconds
    detail: str = ""


class OverheadLog:
    def __init__(self) -> None:
        self._items: list[Overhead] = []
        self._lock = threading.Lock()

    def report(self, tier: str, kind: str, cpu_seconds: float, detail: str = "") -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown overhead kind {kind!r} (known: {', '.join(KINDS)})")
        if cpu_seconds <= 0:
            return
        with self._lock:
            self._items.append(Overhead(tier, kind, cpu_seconds, time.time(), detail))

    @contextmanager
    def measure(self, tier: str, kind: str, detail: str = "", *, scope: str = "process") -> Iterator[None]:
        """Report the CPU time of the block: the process's (native libraries loading a model
        spread over threads) or the thread's (``scope="thread"``)."""
        clock = time.thread_time if scope == "thread" else time.process_time
        t0 = clock()
        try:
            yield
        finally:
            self.report(tier, kind, clock() - t0, detail)

    def drain(self) -> tuple[Overhead, ...]:
        """What was reported since the last drain (cheap when nothing was: no lock taken)."""
        if not self._items:
            return ()
        with self._lock:
            items, self._items = tuple(self._items), []
        return items


# The process's log.
overheads = OverheadLog()
