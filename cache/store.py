"""Cache entries and their FAISS indexes, one index per partition.

A partition is (scope, history, tail): entries can only ever match inside it, so each
partition gets its own index, and no search ever reads another partition's vectors.
Inner product over normalized vectors is cosine. Most partitions are small (one agent's
instructions and tools, one tenant, one conversation state) and get an exact
``IndexIDMap2(IndexFlatIP)``: a flat scan is exact and, up to ``hnsw_from`` entries, under a
millisecond (384 dims, 2 cores: 0.9 ms at 16k vectors, 1.1-1.4 ms at 18-20k, 3 ms at 50k).

A partition with more than ``hnsw_from`` entries (one scope of single-turn questions, say)
gets an approximate ``IndexIDMap2(IndexHNSWFlat)`` instead, whose search cost grows with
log(n), not n. It is built from the partition's vectors when the partition crosses the
bound, then grows by plain adds. HNSW cannot remove vectors: removed ones stay in the graph
as tombstones that searches skip, and the partition is rebuilt from the vectors it keeps
once they would pass a quarter of it, with the kind chosen again from the count kept. ``HNSW_EF_SEARCH`` is set for recall@8 >= 0.99 up to the default
``max_entries`` (measured on clustered synthetic vectors no easier than MiniLM's, up to 50k
per partition, and on 19.6k MiniLM embeddings of QQP questions); past that recall falls (see
the constant, and benchmarks/bench_cache.py for the figures at 1M).

When faiss reports GPUs (the faiss-gpu build), each flat index lives on GPU 0. HNSW
indexes stay on the CPU: faiss has no GPU HNSW (its GPU graph index, CAGRA, is another
build and format), and one query walks the graph on one core in under a millisecond there
(0.5 ms over 100k vectors, 1 ms over 1M).

Writes and searches take one lock: the tier calls them from worker threads. Every write
is all-or-nothing: the FAISS work that can fail (adding a vector, rebuilding an index) is
done first on indexes nobody reads yet, and only then are the entries, indexes and counts
updated together, so a failure never leaves an entry without its vector or the reverse.

``has_scope``, ``has_history`` and ``has_partition`` take no lock: they are single dict
lookups (atomic in CPython), called on the event loop, and must not wait while another
thread rebuilds indexes during eviction. A lookup racing a write sees the store either
before or after it; either is a correct answer.

Every write (add, add_many, remove) bumps ``version``, so a saver can tell whether the
store changed since it last saved (persist.Autosaver). Hit counts do not bump it.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from milliwatt.types import Message

from .scope import partition_key
from .template import Template


@dataclass(kw_only=True)  # fields change with the key: a positional call would silently misplace them
class Entry:
    id: int
    scope: str
    history: str
    tail: str
    text: str  # the semantic text that was embedded (kept for reasons and inspection)
    literals: frozenset[str]
    message: Message  # the assistant answer (OpenAI dict)
    source: str  # the tier or model that produced it
    created_at: float
    expires_at: float | None = None
    hits: int = 0
    # A templated entry (template.py) lives in its situation's partition: history is
    # "situation" and tail the situation's shape (key.Situation.partition).
    template: Template | None = None
    # Feedback: how often this entry's candidate answer agreed with the answer the next tier
    # gave (after a miss, or in a shadow check). Evidence for the gate, kept with the entry.
    agree: int = 0
    disagree: int = 0
    # Of those verdicts, the ones given when the gate served the entry, or would have: its
    # record as a hit, which alone may retire it (tier.py, _retired).
    checks: int = 0
    failed_checks: int = 0

    @property
    def partition(self) -> str:
        return partition_key(self.scope, self.history, self.tail)

    @property
    def history_key(self) -> str:
        return partition_key(self.scope, self.history)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


# A flat scan of 384-dim float32 vectors passes 1 ms between 16k and 18k vectors on 2 cores
# (p50 of one query: 0.9 ms at 16k, 1.06 ms at 18k, 1.2 ms at 20k); past this an HNSW graph
# answers in a fraction of that.
HNSW_FROM = 16_000
HNSW_M = 32  # neighbours per node
# Candidates kept while building (faiss's default). A better graph costs build time, and every
# removal rebuilds the graph under the store's lock: over 100k clustered vectors, efSearch 128
# reaches recall@8 0.968 / 0.978 / 0.991 with efConstruction 40 / 100 / 200, built in 13 / 21 / 67 s.
HNSW_EF_CONSTRUCTION = 40
# Candidates kept while walking the graph: recall@8 on clustered synthetic vectors no easier
# than MiniLM's is 0.983 at 64 and 0.996 at 128 over 50k vectors (0.24 and 0.45 ms a query);
# on 19.6k MiniLM embeddings of QQP questions 0.997 at 64 and 1.000 at 128. It falls with size
# on the synthetic vectors: 0.97 at 100k, 0.65 at 1M, where a query at 128 already takes 1 ms
# (benchmarks/bench_cache.py): a partition far past the default max_entries needs a better graph.
HNSW_EF_SEARCH = 128
# An HNSW partition keeps removed vectors as tombstones (skipped by searches) until they would
# be this share of its graph, then is rebuilt: one rebuild per ~25% of a partition expired or
# evicted, instead of one per purge (remove's docstring).
TOMBSTONE_SHARE = 0.25


def _faiss() -> Any:
    from milliwatt._extras import load

    return load("faiss", "cache", "the cache tier")


@dataclass
class _Partition:
    index: Any  # faiss.IndexIDMap2 over an IndexFlatIP (maybe on GPU) or an IndexHNSWFlat
    hnsw: bool = False
    ids: set[int] = field(default_factory=set)
    # HNSW only: ids removed from the store whose vectors are still in the graph (tombstones),
    # and the search parameters that skip them (built on the first search after a change).
    dead: set[int] = field(default_factory=set)
    skip: Any = None

    def search_params(self, ef_search: int) -> Any:
        """FAISS parameters that leave the tombstones out of an HNSW search (None: none)."""
        if not self.dead:
            return None
        if self.skip is None or self.skip[0] != ef_search:
            faiss = _faiss()
            batch = faiss.IDSelectorBatch(np.fromiter(self.dead, dtype=np.int64))
            selector = faiss.IDSelectorNot(batch)
            # The selectors are kept with the parameters: FAISS holds raw pointers to them.
            self.skip = (ef_search, faiss.SearchParametersHNSW(sel=selector, efSearch=ef_search), selector, batch)
        return self.skip[1]


def _decrement(counts: Counter[str], key: str) -> None:
    n = counts[key] - 1
    if n > 0:
        counts[key] = n
    else:
        del counts[key]  # one step: a lock-free reader never sees a zero count


class Store:
    """Entries by id, with one FAISS index per partition."""

    def __init__(
        self, *, use_gpu: bool | None = None, hnsw_from: int = HNSW_FROM, hnsw_ef_search: int = HNSW_EF_SEARCH
    ) -> None:
        if hnsw_from < 1 or hnsw_ef_search < 1:
            raise ValueError(f"hnsw_from and hnsw_ef_search must be >= 1, got {hnsw_from} and {hnsw_ef_search}")
        self.entries: dict[int, Entry] = {}
        self.dim: int | None = None
        self._parts: dict[str, _Partition] = {}
        self._scopes: Counter[str] = Counter()
        self._histories: Counter[str] = Counter()
        self._next_id = 1
        self._lock = threading.RLock()
        self._use_gpu = use_gpu
        self._gpu_res: Any = None
        self.hnsw_from = hnsw_from  # a partition with more entries than this searches an HNSW graph
        self.hnsw_ef_search = hnsw_ef_search
        self.version = 0  # bumped by every write; read without the lock (an int read is atomic)

    def __len__(self) -> int:
        return len(self.entries)

    # ------------------------------------------------------------------ indexes

    def _gpu(self) -> Any:
        """GPU resources when the gpu build of faiss sees a GPU (checked once), else None."""
        if self._use_gpu is None:
            faiss = _faiss()
            self._use_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
        if self._use_gpu and self._gpu_res is None:
            self._gpu_res = _faiss().StandardGpuResources()
        return self._gpu_res if self._use_gpu else None

    def _new_index(self, dim: int) -> Any:
        """An empty exact index, on GPU 0 when there is one."""
        faiss = _faiss()
        flat = faiss.IndexFlatIP(dim)
        res = self._gpu()
        if res is not None:
            flat = faiss.index_cpu_to_gpu(res, 0, flat)
        return faiss.IndexIDMap2(flat)

    def _new_hnsw(self, dim: int) -> Any:
        """An empty HNSW index, on the CPU even with GPUs: faiss has no GPU HNSW."""
        faiss = _faiss()
        graph = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.hnsw.efSearch = self.hnsw_ef_search
        return faiss.IndexIDMap2(graph)

    def _build(self, dim: int, ids: np.ndarray, vecs: np.ndarray) -> tuple[Any, bool]:
        """A new index holding exactly these vectors, of the kind their count calls for, and
        whether it is HNSW."""
        hnsw = len(ids) > self.hnsw_from
        index = self._new_hnsw(dim) if hnsw else self._new_index(dim)
        if len(ids):
            index.add_with_ids(np.ascontiguousarray(vecs, dtype=np.float32), ids.astype(np.int64))
        return index, hnsw

    def set_hnsw_ef_search(self, ef_search: int) -> None:
        """Trade recall for speed in HNSW partitions, those there now (no rebuild) and later."""
        if ef_search < 1:
            raise ValueError(f"hnsw_ef_search must be >= 1, got {ef_search}")
        with self._lock:
            self.hnsw_ef_search = ef_search
            for part in self._parts.values():
                if part.hnsw:
                    _faiss().downcast_index(part.index.index).hnsw.efSearch = ef_search

    # ------------------------------------------------------------------ writes

    def add(self, entry: Entry, vector: np.ndarray) -> Entry:
        """Store an entry (its ``id`` is assigned here unless it is > 0, as on load).

        All or nothing: if FAISS refuses the vector, the store is as it was."""
        with self._lock:
            dim = int(vector.shape[-1])
            if self.dim is not None and dim != self.dim:
                raise ValueError(f"embedding has {dim} dimensions, the cache holds {self.dim}")
            entry_id = entry.id if entry.id > 0 else self._next_id
            if entry_id in self.entries:
                raise ValueError(f"entry id {entry_id} is already in the cache")
            key = entry.partition
            part = self._parts.get(key)
            row = vector.reshape(1, -1).astype(np.float32)
            id_row = np.array([entry_id], dtype=np.int64)
            if part is not None and (part.hnsw or len(part.ids) + 1 <= self.hnsw_from):
                part.index.add_with_ids(row, id_row)
                built = None
            elif part is None:
                built = self._build(dim, id_row, row)
            else:  # this entry takes a flat partition past hnsw_from: built afresh as HNSW
                old_ids, old_vecs = self._vectors_of(part)
                built = self._build(dim, np.concatenate([old_ids, id_row]), np.concatenate([old_vecs, row]))
            # The vector is in; from here on only plain dict and set updates.
            self._commit_index(key, built)
            self.dim = dim
            self._commit_entry(entry, entry_id)
            self.version += 1
            return entry

    def add_many(self, entries: list[Entry], vectors: np.ndarray) -> list[Entry]:
        """Store many entries at once (loading a folder, bulk fills); ids as in ``add``.

        Each partition they touch is built afresh from its old and new vectors in one FAISS
        call: for an HNSW partition that is several times faster than adding one by one (the
        graph is built on every core), for a large partition that already exists it is a full
        rebuild. All or nothing: every index is built before anything is committed."""
        with self._lock:
            if not entries:
                return []
            vecs = np.ascontiguousarray(vectors, dtype=np.float32)
            if vecs.ndim != 2 or len(vecs) != len(entries):
                raise ValueError(f"{len(entries)} entries need {len(entries)} vectors, got an array of shape {vecs.shape}")
            dim = vecs.shape[1]
            if self.dim is not None and dim != self.dim:
                raise ValueError(f"embedding has {dim} dimensions, the cache holds {self.dim}")
            given = [e.id for e in entries if e.id > 0]
            next_id = max([self._next_id, *(i + 1 for i in given)])
            ids = np.empty(len(entries), dtype=np.int64)
            for n, e in enumerate(entries):
                if e.id > 0:
                    ids[n] = e.id
                else:
                    ids[n], next_id = next_id, next_id + 1
            if len(set(ids.tolist())) < len(ids):
                raise ValueError("an entry id is given twice")
            clash = next((int(i) for i in ids if int(i) in self.entries), None)
            if clash is not None:
                raise ValueError(f"entry id {clash} is already in the cache")
            rows: dict[str, list[int]] = {}
            for n, e in enumerate(entries):
                rows.setdefault(e.partition, []).append(n)
            built: dict[str, tuple[Any, bool]] = {}
            for key, at in rows.items():
                part_ids, part_vecs = ids[at], vecs[at]
                if key in self._parts:
                    old_ids, old_vecs = self._vectors_of(self._parts[key])
                    part_ids, part_vecs = np.concatenate([old_ids, part_ids]), np.concatenate([old_vecs, part_vecs])
                built[key] = self._build(dim, part_ids, part_vecs)
            # Every index is built; from here on only plain dict and set updates.
            for key, index in built.items():
                self._commit_index(key, index)
            self.dim = dim
            for e, i in zip(entries, ids, strict=True):
                self._commit_entry(e, int(i))
            self.version += 1
            return entries

    def _commit_index(self, key: str, built: tuple[Any, bool] | None) -> None:
        """Put a partition's new index in place (None: its index took the vector in place)."""
        if built is None:
            return
        part = self._parts.get(key)
        if part is None:
            self._parts[key] = _Partition(*built)
        else:
            part.index, part.hnsw = built
            part.dead, part.skip = set(), None  # built from the live vectors only

    def _commit_entry(self, entry: Entry, entry_id: int) -> None:
        entry.id = entry_id
        self._next_id = max(self._next_id, entry_id + 1)
        self._parts[entry.partition].ids.add(entry_id)
        self.entries[entry_id] = entry
        self._scopes[entry.scope] += 1
        self._histories[entry.history_key] += 1

    def remove(self, ids: set[int]) -> None:
        """Drop entries. A flat partition is rebuilt from the vectors it keeps (one rebuild per
        batch of removals). An HNSW partition cannot remove vectors, and rebuilding one takes
        seconds (5 s for 50k vectors on 2 idle cores, 12 s on busy ones) under the lock, while
        searches wait; so its removed vectors stay in the graph as tombstones that searches
        skip (a FAISS id selector), until they would pass ``TOMBSTONE_SHARE`` of the graph:
        then it is rebuilt from the vectors it keeps, its kind chosen again from their count
        (a partition that falls to ``hnsw_from`` or fewer entries is flat and exact again).

        All or nothing: every rebuild is done before anything is dropped, so a FAISS
        failure leaves the store as it was."""
        with self._lock:
            by_part: dict[str, set[int]] = {}
            for i in ids:
                entry = self.entries.get(i)
                if entry is not None:
                    by_part.setdefault(entry.partition, set()).add(i)
            rebuilt: dict[str, tuple[Any, bool]] = {}  # partition -> its new index; absent: it goes
            buried: set[str] = set()  # HNSW partitions whose removed vectors become tombstones
            for key, gone in by_part.items():
                part = self._parts[key]
                if part.ids <= gone:
                    continue
                if part.hnsw and len(part.dead) + len(gone) <= TOMBSTONE_SHARE * part.index.ntotal:
                    buried.add(key)
                    continue
                keep_ids, keep_vecs = self._vectors_of(part)
                mask = np.isin(keep_ids, np.fromiter(gone, dtype=np.int64))
                rebuilt[key] = self._build(self.dim or keep_vecs.shape[1], keep_ids[~mask], keep_vecs[~mask])
            # Commit: plain dict and set updates only.
            for key, gone in by_part.items():
                for i in gone:
                    entry = self.entries.pop(i)
                    _decrement(self._scopes, entry.scope)
                    _decrement(self._histories, entry.history_key)
                part = self._parts[key]
                if key in buried:
                    part.dead |= gone
                    part.skip = None
                    part.ids -= gone
                elif key in rebuilt:
                    part.index, part.hnsw = rebuilt[key]
                    part.dead, part.skip = set(), None
                    part.ids -= gone
                else:
                    del self._parts[key]
            if by_part:
                self.version += 1

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            gone = {i for i, e in self.entries.items() if e.expired(now)}
            self.remove(gone)
            return len(gone)

    def evict(self, max_entries: int, now: float | None = None) -> int:
        """Keep at most ``max_entries``: expired entries go first, then the least-hit, oldest.

        Evicts down to 95% of the bound so a full cache rebuilds indexes once per 5% of
        inserts, not on every insert, and removes expired entries and victims in one
        ``remove``: one rebuild per touched partition (seconds for an HNSW one), all or nothing.
        """
        now = time.time() if now is None else now
        with self._lock:
            if len(self.entries) <= max_entries:
                return 0
            gone = {i for i, e in self.entries.items() if e.expired(now)}
            excess = len(self.entries) - len(gone) - int(max_entries * 0.95)
            if excess > 0:
                alive = (e for e in self.entries.values() if e.id not in gone)
                gone |= {e.id for e in sorted(alive, key=lambda e: (e.hits, e.created_at))[:excess]}
            self.remove(gone)
            return len(gone)

    def touch(self, entry: Entry) -> None:
        """The tier changed an entry's counters (a hit, a verdict). Nothing to do here: they
        live on the entry; a shared store (shared.py) pushes them to the other workers."""

    def close(self) -> None:
        """Nothing to release here (a shared store stops syncing and pushes what it holds)."""

    # ------------------------------------------------------------------ reads

    def has_scope(self, scope: str) -> bool:
        return scope in self._scopes  # lock-free, see the module docstring

    def has_history(self, history_key: str) -> bool:
        return history_key in self._histories  # lock-free

    def has_partition(self, partition: str) -> bool:
        return partition in self._parts  # lock-free

    def index_kind(self, partition: str) -> str | None:
        """``"flat"`` (exact) or ``"hnsw"`` (approximate), None for a partition with no entries."""
        part = self._parts.get(partition)  # lock-free, as above
        return None if part is None else ("hnsw" if part.hnsw else "flat")

    def search(self, partition: str, vector: np.ndarray, k: int) -> list[tuple[Entry, float]]:
        """The ``k`` nearest entries of a partition, best first, with their cosine similarity."""
        with self._lock:
            part = self._parts.get(partition)
            if part is None:
                return []
            k = min(k, len(part.ids))
            params = part.search_params(self.hnsw_ef_search) if part.hnsw else None
            sims, ids = part.index.search(vector.reshape(1, -1).astype(np.float32), k, params=params)
            return [(self.entries[int(i)], float(s)) for s, i in zip(sims[0], ids[0], strict=True) if i >= 0]

    def _vectors_of(self, part: _Partition) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of a partition's live entries (tombstones left out)."""
        faiss = _faiss()
        ids = faiss.vector_to_array(part.index.id_map).astype(np.int64)
        vecs = np.ascontiguousarray(part.index.index.reconstruct_n(0, part.index.ntotal), dtype=np.float32)
        if part.dead:
            live = ~np.isin(ids, np.fromiter(part.dead, dtype=np.int64))
            ids, vecs = ids[live], vecs[live]
        return ids, vecs

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, list[Entry]]:
        """(ids, vectors, entries) of every entry at one instant, for saving."""
        with self._lock:
            pairs = [self._vectors_of(p) for p in self._parts.values()]
            entries = list(self.entries.values())
            if not pairs:
                return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim or 0), dtype=np.float32), entries
            return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]), entries
