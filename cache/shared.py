"""A cache shared by every worker: entries in a database, a FAISS index in each worker.

``CacheTier(path="postgresql+psycopg://...")`` (config: ``cache.path`` set to an SQLAlchemy
URL) keeps the cache's entries in the database, so an answer one worker stores can answer
a step on any other worker, on any machine. Searching stays where it is fast: each worker
holds every entry and its vector in its own ``Store`` (one FAISS index per partition,
sub-millisecond), and keeps it in step with the database. The database is the store of
record, not a vector index: pgvector is not needed (nor packaged by Debian 12), and a
search never waits on the network.

Tables (created on first use, beside the ledger's when the URL is the ledger's database):

* ``cache_state``: one row; the embedding model and key version the entries were made with,
  and ``seq``, the **clock**: every write transaction first bumps it, so it holds the row
  lock until it commits, and writes commit in clock order. A change stamped ``seq`` = n is
  therefore visible to any reader that sees a change stamped m > n: a worker that has
  applied every change up to m never needs to look below m again. ``gc_seq``: tombstones
  at or below it were deleted (a worker behind it reloads everything).
* ``cache_entries``: an entry per row (``persist``'s JSON, its vector as float32 bytes), the
  ``seq`` of its last change, and its counters (hits, agree, disagree, checks,
  failed_checks) as columns, so that workers add to them and never overwrite each other.
  A removed entry stays as a tombstone (``deleted``, no JSON, no vector) for
  ``TOMBSTONE_KEEP_S``, so every worker hears of the removal.

Writes are the worker's own at once and the database's a moment later. Storing an answer
adds it to this worker's indexes and queues it; removals (expiry, eviction) and counter
changes queue too. A daemon thread per worker (``sync()`` does the same at once) commits the
queue in one transaction when woken by a write (a group commit: one clock tick and one fsync
for everything queued meanwhile: inserts, tombstones, ``hits = hits + n`` increments), and
every ``sync_s`` seconds pulls every change stamped after the last one it applied (keyset
pages on ``(seq, id)``): new entries are added to its indexes, removed ones dropped,
counters taken from the database plus the increments not pushed yet. So the answer's path
never waits for the database, and an entry stored by one worker can answer on another
**within one commit plus ``sync_s`` plus one pull** (measured: benchmarks/shared_cache.py);
a verdict that retires an entry reaches every worker as fast.

Ids are unique across workers without a round trip per entry: each worker reserves blocks
of ``ID_BLOCK`` ids from the clock (one tick of ``ID_BLOCK``), topped up by the thread. An
insert retried after a commit whose acknowledgement was lost is ignored (ON CONFLICT DO
NOTHING), so a retry never fails on its own row. Eviction stays per worker: each keeps
``max_entries`` by the same rule (expired first, then least hit, oldest) on the same
entries, so they converge.

Faults: a database that is unreachable when the cache opens is a ``CacheFileError`` naming
the URL (password hidden). Once open, a worker whose database goes away keeps answering
from the entries it holds and keeps storing new ones in its own indexes; what it queued is
committed when the database is back (a new answer needs an id: with the reserved block used
up and the database away, storing fails, logged by the cascade: a future hit lost, never an
answer). The thread logs the outage once and catches up; what is still queued at close
while the database is away is logged as not shared.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    delete,
    func,
    insert,
    select,
    text,
    tuple_,
    update,
)

from milliwatt.ledger.engine import display_name, error_text, make_engine
from milliwatt.redaction import get_logger, redact

from .persist import CacheFileError, entry_from_json, entry_to_json
from .scope import SCOPE_VERSION
from .store import Entry, Store

log = get_logger(__name__)

DEFAULT_SYNC_S = 1.0  # the bound on how stale a worker's view of the others' writes may be
PULL_PAGE = 2000  # rows per pull query
# A tombstone is kept this long so that every live worker applies the removal; a worker that
# falls further behind (stopped, partitioned) reloads the whole cache at its next sync.
TOMBSTONE_KEEP_S = 600.0
GC_EVERY_S = 300.0
ID_BLOCK = 1024  # ids a worker reserves at a time; topped up when a quarter is left
_PG_SETUP_LOCK = 0x6D77_6361  # "mwca": serialises table creation across workers (PostgreSQL)

COUNTERS = ("hits", "agree", "disagree", "checks", "failed_checks")

metadata = MetaData()
STATE = Table(
    "cache_state",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("model", String(300), nullable=False),
    Column("key", String(64), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("gc_seq", BigInteger, nullable=False),
    comment="milliwatt's shared cache: the embedding model, the key version, and the clock of its writes",
)
ENTRIES = Table(
    "cache_entries",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False, index=True),
    Column("deleted", Boolean, nullable=False),
    Column("changed_at", Float, nullable=False),
    Column("entry", Text),  # persist's JSON of the entry; NULL for a tombstone
    Column("vector", LargeBinary),  # float32, little-endian; NULL for a tombstone
    *(Column(name, BigInteger, nullable=False, server_default="0") for name in COUNTERS),
    comment="milliwatt's shared cache entries, each with the clock value of its last change",
)

Counts = tuple[int, int, int, int, int]
# What a pull reads of every changed row; a row's entry and vector are read only by a worker
# that does not hold it yet (_payloads).
_CHANGE = (ENTRIES.c.id, ENTRIES.c.seq, ENTRIES.c.deleted, *(ENTRIES.c[c] for c in COUNTERS))


def _counts(e: Entry) -> Counts:
    return (e.hits, e.agree, e.disagree, e.checks, e.failed_checks)


def _set_counts(e: Entry, c: Iterable[int]) -> None:
    e.hits, e.agree, e.disagree, e.checks, e.failed_checks = c


class SharedStore(Store):
    """A ``Store`` whose writes are this worker's at once and the database's as soon as its
    sync thread commits them; the thread also applies the other workers' writes every
    ``sync_s`` seconds (see the module docstring)."""

    def __init__(self, url: str, model: str, *, sync_s: float = DEFAULT_SYNC_S, start: bool = True, **store_kwargs: Any) -> None:
        super().__init__(**store_kwargs)
        if not sync_s > 0:
            raise ValueError(f"sync_s must be > 0 seconds, got {sync_s}")
        self.url, self.model, self.sync_s = url, model, sync_s
        try:
            self.where = display_name(url)
        except Exception as e:  # noqa: BLE001 - SQLAlchemy cannot parse it
            raise CacheFileError(redact(url), f"not a database URL ({error_text(e)})") from None
        self.syncs = 0  # completed syncs, for tests and benchmarks
        self.synced_at: float | None = None  # time.monotonic() of the last completed sync
        self._loaded = False  # whether the whole cache was read once (at open)
        self._last = 0  # the clock value of the last change applied
        self._last_id = 0  # ... and the id of that change's last row (a page boundary)
        self._base: dict[int, Counts] = {}  # counters as the database has them (incl. our pushes)
        self._dirty: set[int] = set()  # entries whose counters moved since the last push
        self._inserts: dict[int, tuple[Entry, np.ndarray]] = {}  # stored here, not committed yet
        self._removals: set[int] = set()  # removed here, tombstones not committed yet
        self._ids: deque[int] = deque()  # reserved ids (ID_BLOCK at a time)
        self._sync_lock = threading.Lock()  # one push or sync at a time (the thread, close, tests)
        self._wake = threading.Event()  # a write is queued: commit it now
        self.pushes = 0  # committed pushes, for tests and benchmarks
        self._last_gc = time.monotonic()
        self._down_since: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.engine = self._connect()
        try:
            self._pull()
            self._reserve_ids()
        except BaseException:
            self.engine.dispose()
            raise
        if start:
            self._thread = threading.Thread(target=self._run, name="milliwatt-cache-sync", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ opening

    def _connect(self) -> Engine:
        try:
            engine = make_engine(self.url)
        except ImportError as e:
            raise CacheFileError(self.where, f"its database driver is not installed ({e}); for PostgreSQL: pip install 'psycopg[binary]'") from None
        except Exception as e:  # noqa: BLE001 - a malformed URL, an unknown dialect
            raise CacheFileError(self.where, f"not a usable database URL ({error_text(e)})") from None
        try:
            with self._writing(engine) as conn:
                if conn.dialect.name == "postgresql":
                    # Workers starting together would collide creating the tables.
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_SETUP_LOCK})
                metadata.create_all(conn)
                self._check_state(conn)
        except CacheFileError:
            engine.dispose()
            raise
        except Exception as e:  # noqa: BLE001 - unreachable, refused, not a database we may write
            engine.dispose()
            raise CacheFileError(self.where, f"cannot open the shared cache: {error_text(e)}") from None
        return engine

    def _check_state(self, conn: Connection) -> None:
        """Make the state row, or check the entries were made with this model and key version."""
        row = conn.execute(select(STATE).where(STATE.c.id == 1)).mappings().first()
        if row is None:
            conn.execute(insert(STATE).values(id=1, model=self.model, key=SCOPE_VERSION, seq=0, gc_seq=0))
            return
        if row["model"] != self.model:
            raise CacheFileError(
                self.where,
                f"its cache was made with embeddings of {row['model']!r}, this cache embeds with {self.model!r}; "
                "use another database or drop its cache_entries and cache_state tables",
            )
        if row["key"] != SCOPE_VERSION:
            # Entries keyed under another version can never match a step keyed today (as persist.load).
            log.warning("shared cache %s: its entries were keyed under %s, not %s; they can never match and are dropped", self.where, row["key"], SCOPE_VERSION)
            tick = _tick(conn)
            conn.execute(delete(ENTRIES))
            conn.execute(update(STATE).where(STATE.c.id == 1).values(key=SCOPE_VERSION, gc_seq=tick))

    @staticmethod
    @contextmanager
    def _writing(engine: Engine) -> Iterator[Connection]:
        # SQLite: take the write lock up front (the clock bump is the first statement anyway).
        with engine.connect().execution_options(sqlite_begin_immediate=True) as conn, conn.begin():
            yield conn

    # ------------------------------------------------------------------ writes: here now, there soon

    def add(self, entry: Entry, vector: np.ndarray) -> Entry:
        """Store a new entry in this worker's indexes at once (its id from the reserved block)
        and queue it for the database (the sync thread commits it within milliseconds)."""
        if entry.id > 0:
            raise ValueError("a shared cache gives entries their ids; add entries with id 0")
        row = np.ascontiguousarray(vector, dtype=np.float32).reshape(-1)
        with self._lock:
            if not self._ids:
                self._reserve_ids()  # the block is used up: one round trip (usually the thread tops it up)
            entry.id = self._ids[0]
            try:
                Store.add(self, entry, row)
            except BaseException:
                entry.id = 0
                raise
            self._ids.popleft()
            self._base[entry.id] = (0, 0, 0, 0, 0)  # inserted with zero counts; the rest are increments
            self._dirty.add(entry.id)
            self._inserts[entry.id] = (entry, row)
        self._wake.set()
        return entry

    def add_many(self, entries: list[Entry], vectors: np.ndarray) -> list[Entry]:
        return [self.add(e, v) for e, v in zip(entries, np.asarray(vectors), strict=True)]

    def remove(self, ids: set[int]) -> None:
        """Drop entries here, and queue their tombstones for the other workers."""
        with self._lock:
            ids = {i for i in ids if i in self.entries}
            if not ids:
                return
            Store.remove(self, ids)
            for i in ids:
                self._base.pop(i, None)
                self._dirty.discard(i)
                if self._inserts.pop(i, None) is None:  # never committed: nothing to tombstone
                    self._removals.add(i)
        self._wake.set()

    def touch(self, entry: Entry) -> None:
        with self._lock:
            if entry.id in self._base:
                self._dirty.add(entry.id)
        # No wake-up: counts ride with the next commit or sync.

    def _reserve_ids(self) -> None:
        with self._writing(self.engine) as conn:
            top = _tick(conn, ID_BLOCK)
        with self._lock:
            self._ids.extend(range(top - ID_BLOCK + 1, top + 1))

    def _push(self) -> None:
        """Commit what this worker queued (inserts, tombstones, counter increments) in one
        transaction. On failure everything stays queued for the next try."""
        with self._lock:
            inserts, self._inserts = self._inserts, {}
            removals, self._removals = self._removals, set()
            deltas: dict[int, Counts] = {}
            for i in self._dirty:
                entry, base = self.entries.get(i), self._base.get(i)
                if entry is not None and base is not None and any(d := tuple(n - b for n, b in zip(_counts(entry), base, strict=True))):
                    deltas[i] = d  # type: ignore[assignment]
                    self._base[i] = _counts(entry)  # as if pushed; undone below if the push fails
            self._dirty.clear()
        if not (inserts or removals or deltas):
            return
        try:
            with self._writing(self.engine) as conn:
                tick, now = _tick(conn), time.time()
                if inserts:
                    rows = [{"id": i, "seq": tick, "deleted": False, "changed_at": now,
                             "entry": json.dumps(entry_to_json(e), ensure_ascii=False), "vector": v.astype("<f4").tobytes()}
                            for i, (e, v) in inserts.items()]  # fmt: skip
                    conn.execute(_insert_new(conn), rows)
                ids = sorted(removals)
                for at in range(0, len(ids), 1000):
                    conn.execute(
                        update(ENTRIES)
                        .where(ENTRIES.c.id.in_(ids[at : at + 1000]), ENTRIES.c.deleted.is_(False))
                        .values(deleted=True, seq=tick, changed_at=now, entry=None, vector=None)
                    )
                if deltas:
                    stmt = (
                        update(ENTRIES)
                        .where(ENTRIES.c.id == bindparam("entry_id"), ENTRIES.c.deleted.is_(False))
                        .values(seq=tick, **{c: getattr(ENTRIES.c, c) + bindparam(f"d_{c}") for c in COUNTERS})
                    )
                    conn.execute(stmt, [{"entry_id": i, **{f"d_{c}": n for c, n in zip(COUNTERS, d, strict=True)}} for i, d in deltas.items()])
        except BaseException:
            with self._lock:  # not committed: all of it waits for the next try
                for i, pair in inserts.items():
                    if i in self.entries:  # removed meanwhile: no insert, no tombstone
                        self._inserts.setdefault(i, pair)
                    else:
                        self._removals.discard(i)
                self._removals |= removals
                for i, d in deltas.items():
                    if i in self._base:
                        self._base[i] = tuple(b - n for b, n in zip(self._base[i], d, strict=True))  # type: ignore[assignment]
                        self._dirty.add(i)
            raise
        self.pushes += 1

    # ------------------------------------------------------------------ sync

    def sync(self) -> None:
        """Commit what this worker queued, then apply every change the database has that this
        worker has not (blocking; the sync thread does the first when woken by a write and
        both every ``sync_s``). Raises the database's error; nothing is lost by a failed sync."""
        with self._sync_lock:
            self._push()
            self._pull()
            self._top_up_ids()
            if time.monotonic() - self._last_gc >= GC_EVERY_S:
                self._collect_tombstones()
                self._last_gc = time.monotonic()
            self.syncs += 1
            self.synced_at = time.monotonic()

    def flush(self) -> None:
        """Commit what this worker queued, now (blocking); raises the database's error."""
        with self._sync_lock:
            self._push()
            self._top_up_ids()

    def _top_up_ids(self) -> None:
        if len(self._ids) < ID_BLOCK // 4:  # in the thread, so that an add rarely waits for ids
            self._reserve_ids()

    def _run(self) -> None:
        next_pull = time.monotonic() + self.sync_s
        while not self._stop.is_set():
            self._wake.wait(max(0.0, next_pull - time.monotonic()))
            self._wake.clear()
            if self._stop.is_set():
                return
            pull = time.monotonic() >= next_pull
            try:
                self.sync() if pull else self.flush()
            except Exception as e:  # noqa: BLE001 - the worker goes on with what it has
                if self._down_since is None:
                    self._down_since = time.monotonic()
                    log.warning("shared cache %s: cannot sync, serving from this worker's copy until it can: %s", self.where, error_text(e))
                self._stop.wait(self.sync_s)  # writes keep waking us: try again once per interval
                next_pull = time.monotonic()
                continue
            if pull:
                next_pull = time.monotonic() + self.sync_s
                if self._down_since is not None:
                    log.warning("shared cache %s: in sync again after %.1f s", self.where, time.monotonic() - self._down_since)
                    self._down_since = None

    def _pull(self) -> None:
        with self.engine.connect() as conn:
            seq, gc_seq = conn.execute(select(STATE.c.seq, STATE.c.gc_seq).where(STATE.c.id == 1)).one()
            if not self._loaded or self._last < gc_seq:
                self._reload(conn, seq)
                return
            while True:
                rows = conn.execute(
                    select(*_CHANGE)
                    .where(tuple_(ENTRIES.c.seq, ENTRIES.c.id) > tuple_(self._last, self._last_id))
                    .order_by(ENTRIES.c.seq, ENTRIES.c.id)
                    .limit(PULL_PAGE)
                ).mappings().all()  # fmt: skip
                if rows:
                    self._apply(rows, self._payloads(conn, rows))
                    self._last, self._last_id = rows[-1]["seq"], rows[-1]["id"]
                if len(rows) < PULL_PAGE:
                    return

    def _reload(self, conn: Connection, seq: int) -> None:
        """Take the whole cache from the database (at open, or after falling behind the
        tombstones): every change up to ``seq`` is in what the pages below read, so the
        next pull starts after it (changes after it may be applied twice: harmless)."""
        rows: list[Any] = []
        after = 0
        while True:
            page = conn.execute(
                select(*_CHANGE).where(ENTRIES.c.deleted.is_(False), ENTRIES.c.id > after).order_by(ENTRIES.c.id).limit(PULL_PAGE)
            ).mappings().all()  # fmt: skip
            rows.extend(page)
            if len(page) < PULL_PAGE:
                break
            after = page[-1]["id"]
        payloads = self._payloads(conn, rows)
        with self._lock:
            live = {r["id"] for r in rows}
            gone = set(self.entries) - live - set(self._inserts)  # queued here, not committed yet
            if gone:
                Store.remove(self, gone)
                for i in gone:
                    self._base.pop(i, None)
            self._apply(rows, payloads)
            # Every change up to seq is applied: the next pull reads (seq, id) > (seq, any id).
            self._last, self._last_id, self._loaded = seq, 2**62, True

    def _payloads(self, conn: Connection, rows: list[Any]) -> dict[int, tuple[Entry, np.ndarray]]:
        """The entries and vectors of the changed rows this worker does not hold yet, read and
        parsed before the store's lock is taken (its own entries coming back cost nothing)."""
        need = [r["id"] for r in rows if not r["deleted"] and r["id"] not in self.entries]
        out: dict[int, tuple[Entry, np.ndarray]] = {}
        for at in range(0, len(need), 1000):
            for i, doc, vector in conn.execute(
                select(ENTRIES.c.id, ENTRIES.c.entry, ENTRIES.c.vector).where(ENTRIES.c.id.in_(need[at : at + 1000]), ENTRIES.c.deleted.is_(False))
            ):  # fmt: skip
                entry = entry_from_json(json.loads(doc), f"{self.where}: cache_entries id {i}")
                entry.id = i
                out[i] = (entry, np.frombuffer(vector, dtype="<f4").astype(np.float32))
        return out

    def _apply(self, rows: list[Any], payloads: dict[int, tuple[Entry, np.ndarray]]) -> None:
        """Apply changes read from the database: tombstones, counters, new entries."""
        new: list[tuple[Entry, np.ndarray]] = []
        with self._lock:
            gone = {r["id"] for r in rows if r["deleted"] and r["id"] in self.entries}
            if gone:
                Store.remove(self, gone)
            for r in rows:
                i = r["id"]
                if r["deleted"]:
                    self._base.pop(i, None)
                    continue
                if i in self._removals:  # removed here; its tombstone is not committed yet
                    continue
                db = tuple(int(r[c]) for c in COUNTERS)
                entry = self.entries.get(i)
                if entry is not None:  # its counters: the database's, plus what is not pushed yet
                    base = self._base.get(i, db)
                    _set_counts(entry, (d + n - b for d, n, b in zip(db, _counts(entry), base, strict=True)))
                    self._base[i] = db  # type: ignore[assignment]
                elif i in payloads:  # (absent: removed between the two reads; its tombstone comes next)
                    entry, vector = payloads[i]
                    _set_counts(entry, db)
                    self._base[i] = db  # type: ignore[assignment]
                    new.append((entry, vector))
            if len(new) > 64:  # many at once (a reload): one build per partition
                Store.add_many(self, [e for e, _ in new], np.stack([v for _, v in new]))
            else:
                for entry, vector in new:
                    Store.add(self, entry, vector)

    def _collect_tombstones(self) -> None:
        """Delete tombstones older than ``TOMBSTONE_KEEP_S``; a worker that has not applied
        them yet (its last change is below ``gc_seq``) reloads the whole cache instead."""
        with self._writing(self.engine) as conn:
            _tick(conn)  # the clock's row lock: one collector at a time
            top = conn.execute(
                select(func.max(ENTRIES.c.seq)).where(ENTRIES.c.deleted.is_(True), ENTRIES.c.changed_at < time.time() - TOMBSTONE_KEEP_S)
            ).scalar()  # fmt: skip
            if top is None:
                return
            conn.execute(delete(ENTRIES).where(ENTRIES.c.deleted.is_(True), ENTRIES.c.seq <= top))
            conn.execute(update(STATE).where(STATE.c.id == 1, STATE.c.gc_seq < top).values(gc_seq=top))

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Stop syncing and commit what is queued (best effort: logged if the database is
        away); idempotent."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            self.flush()
        except Exception as e:  # noqa: BLE001 - the entries stay in this worker only
            log.warning("shared cache %s: closing with %d entries, %d removals and %d counts not shared: %s",
                        self.where, len(self._inserts), len(self._removals), len(self._dirty), error_text(e))  # fmt: skip
        finally:
            self.engine.dispose()


def _tick(conn: Connection, n: int = 1) -> int:
    """Advance the clock by ``n`` and return it. Its row stays locked until the transaction
    ends, so transactions that tick commit in the order of their ticks."""
    return int(conn.execute(update(STATE).where(STATE.c.id == 1).values(seq=STATE.c.seq + n).returning(STATE.c.seq)).scalar_one())


def _insert_new(conn: Connection) -> Any:
    """An INSERT that skips rows already there: a retry after a commit whose acknowledgement
    was lost must not fail on the rows it committed."""
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(ENTRIES).on_conflict_do_nothing(index_elements=["id"])
    if conn.dialect.name == "sqlite":
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert

        return sqlite_insert(ENTRIES).on_conflict_do_nothing(index_elements=["id"])
    return insert(ENTRIES)
