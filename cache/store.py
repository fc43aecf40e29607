"""Cache entries and their FAISS indexes, one exact index per partition.

A partition is (scope, history, tail): entries can only ever match inside it, so each
partition gets its own ``IndexIDMap2(IndexFlatIP)``. Exact inner product over normalized
vectors is cosine; partitions stay small (one agent's instructions and tools, one tenant,
one conversation state), so a flat scan is both exact and fast (10k vectors x 384 dims is
~4 M multiply-adds, well under a millisecond), and no search ever reads another
partition's vectors. When faiss reports GPUs (the faiss-gpu build), each partition's flat
index lives on GPU 0.

Writes and searches take one lock: the tier calls them from worker threads. Every write
is all-or-nothing: the FAISS work that can fail (adding a vector, rebuilding an index) is
done first on indexes nobody reads yet, and only then are the entries, indexes and counts
updated together, so a failure never leaves an entry without its vector or the reverse.

``has_scope``, ``has_history`` and ``has_partition`` take no lock: they are single dict
lookups (atomic in CPython), called on the event loop, and must not wait while another
thread rebuilds indexes during eviction. A lookup racing a write sees the store either
before or after it; either is a correct answer.
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

    @property
    def partition(self) -> str:
        return partition_key(self.scope, self.history, self.tail)

    @property
    def history_key(self) -> str:
        return partition_key(self.scope, self.history)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


def _faiss() -> Any:
    import faiss

    return faiss


@dataclass
class _Partition:
    index: Any  # faiss.IndexIDMap2
    ids: set[int] = field(default_factory=set)


def _decrement(counts: Counter[str], key: str) -> None:
    n = counts[key] - 1
    if n > 0:
        counts[key] = n
    else:
        del counts[key]  # one step: a lock-free reader never sees a zero count


class Store:
    """Entries by id, with one FAISS index per partition."""

    def __init__(self, *, use_gpu: bool | None = None) -> None:
        self.entries: dict[int, Entry] = {}
        self.dim: int | None = None
        self._parts: dict[str, _Partition] = {}
        self._scopes: Counter[str] = Counter()
        self._histories: Counter[str] = Counter()
        self._next_id = 1
        self._lock = threading.RLock()
        self._use_gpu = use_gpu
        self._gpu_res: Any = None

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
        faiss = _faiss()
        flat = faiss.IndexFlatIP(dim)
        res = self._gpu()
        if res is not None:
            flat = faiss.index_cpu_to_gpu(res, 0, flat)
        return faiss.IndexIDMap2(flat)

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
            index = part.index if part is not None else self._new_index(dim)
            index.add_with_ids(vector.reshape(1, -1).astype(np.float32), np.array([entry_id], dtype=np.int64))
            # The vector is in; from here on only plain dict and set updates.
            if part is None:
                part = self._parts[key] = _Partition(index)
            self.dim = dim
            entry.id = entry_id
            self._next_id = max(self._next_id, entry_id + 1)
            part.ids.add(entry_id)
            self.entries[entry_id] = entry
            self._scopes[entry.scope] += 1
            self._histories[entry.history_key] += 1
            return entry

    def remove(self, ids: set[int]) -> None:
        """Drop entries; each touched partition is rebuilt from the vectors it keeps (one path
        for CPU and GPU indexes, and one rebuild per batch of removals).

        All or nothing: every rebuild is done before anything is dropped, so a FAISS
        failure leaves the store as it was."""
        with self._lock:
            by_part: dict[str, set[int]] = {}
            for i in ids:
                entry = self.entries.get(i)
                if entry is not None:
                    by_part.setdefault(entry.partition, set()).add(i)
            rebuilt: dict[str, Any] = {}  # partition -> its new index; absent: the partition goes
            for key, gone in by_part.items():
                part = self._parts[key]
                if part.ids <= gone:
                    continue
                keep_ids, keep_vecs = self._vectors_of(part)
                mask = np.isin(keep_ids, np.fromiter(gone, dtype=np.int64))
                fresh = self._new_index(self.dim or keep_vecs.shape[1])
                fresh.add_with_ids(keep_vecs[~mask], keep_ids[~mask])
                rebuilt[key] = fresh
            # Commit: plain dict and set updates only.
            for key, gone in by_part.items():
                for i in gone:
                    entry = self.entries.pop(i)
                    _decrement(self._scopes, entry.scope)
                    _decrement(self._histories, entry.history_key)
                if key in rebuilt:
                    part = self._parts[key]
                    part.index = rebuilt[key]
                    part.ids -= gone
                else:
                    del self._parts[key]

    def purge_expired(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._lock:
            gone = {i for i, e in self.entries.items() if e.expired(now)}
            self.remove(gone)
            return len(gone)

    def evict(self, max_entries: int, now: float | None = None) -> int:
        """Keep at most ``max_entries``: expired entries go first, then the least-hit, oldest.

        Evicts down to 95% of the bound so a full cache rebuilds indexes once per 5% of
        inserts, not on every insert.
        """
        with self._lock:
            if len(self.entries) <= max_entries:
                return 0
            removed = self.purge_expired(now)
            excess = len(self.entries) - int(max_entries * 0.95)
            if excess > 0:
                victims = sorted(self.entries.values(), key=lambda e: (e.hits, e.created_at))[:excess]
                self.remove({e.id for e in victims})
                removed += len(victims)
            return removed

    # ------------------------------------------------------------------ reads

    def has_scope(self, scope: str) -> bool:
        return scope in self._scopes  # lock-free, see the module docstring

    def has_history(self, history_key: str) -> bool:
        return history_key in self._histories  # lock-free

    def has_partition(self, partition: str) -> bool:
        return partition in self._parts  # lock-free

    def search(self, partition: str, vector: np.ndarray, k: int) -> list[tuple[Entry, float]]:
        """The ``k`` nearest entries of a partition, best first, with their cosine similarity."""
        with self._lock:
            part = self._parts.get(partition)
            if part is None:
                return []
            k = min(k, part.index.ntotal)
            sims, ids = part.index.search(vector.reshape(1, -1).astype(np.float32), k)
            return [(self.entries[int(i)], float(s)) for s, i in zip(sims[0], ids[0], strict=True) if i >= 0]

    def _vectors_of(self, part: _Partition) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        ids = faiss.vector_to_array(part.index.id_map).astype(np.int64)
        vecs = part.index.index.reconstruct_n(0, part.index.ntotal)
        return ids, np.ascontiguousarray(vecs, dtype=np.float32)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, list[Entry]]:
        """(ids, vectors, entries) of every entry at one instant, for saving."""
        with self._lock:
            pairs = [self._vectors_of(p) for p in self._parts.values()]
            entries = list(self.entries.values())
            if not pairs:
                return np.zeros(0, dtype=np.int64), np.zeros((0, self.dim or 0), dtype=np.float32), entries
            return np.concatenate([p[0] for p in pairs]), np.concatenate([p[1] for p in pairs]), entries
