"""Saving a cache to a folder and loading it back.

The folder holds two files:

* ``index.faiss``: every entry's vector in one ``IndexIDMap2(IndexFlatIP)`` (ids = entry ids),
  written with FAISS's own serialisation;
* ``entries.json``: the entries (keys, literals, answer, source, times, hits), the embedding
  model and the key version (``SCOPE_VERSION``) they were made with, and the sha256 of
  ``index.faiss``.

Each file is written to a temporary name, flushed to disk and renamed over the old one, so
a crash never leaves a half-written file. The two renames are not one atomic step, so the
sidecar records the index's sha256: a pair from different saves is refused with an error
naming the file, instead of serving answers under the wrong vectors.

Entries made under another key (format version 1, or another ``SCOPE_VERSION``) can never
match a step keyed today: a folder of them loads as an empty cache (with a warning), and the
next save replaces it.

A crash loses what was written since the last save, so ``Autosaver`` saves during the cache's
life too, at most every ``every_s`` seconds and only when the store changed. Saves within one
process are serialised (a save at close and an autosave must not interleave their renames).

Two processes saving into one folder would overwrite each other's entries, so an open cache
holds ``lock_folder(folder)``: an exclusive lock (``flock``, through ``filelock``) on
``.lock`` in the folder, for its whole life. A second opener gets ``CacheLockedError``
naming the holder's pid, read from ``.lock.owner``. The operating system drops the lock
when its holder exits or crashes, so there are no stale locks; whoever holds the lock also
removes the temporary files a crashed save left behind (``load`` ignores them).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import numpy as np

from milliwatt.errors import ConfigError
from milliwatt.files import write_atomic
from milliwatt.overheads import overheads
from milliwatt.redaction import get_logger

from .scope import SCOPE_VERSION
from .store import Entry, Store
from .template import Template

INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.json"
LOCK_FILE = ".lock"  # flock'ed for the life of an open cache; never removed (waiters share its inode)
OWNER_FILE = ".lock.owner"  # the holder's pid and host, for the message a second opener gets
FORMAT = "milliwatt-cache"
FORMAT_VERSION = 2  # 2: entries carry "history" and no "grounded"; the doc carries "key"
_STALE_VERSIONS = {1}  # readable enough to know its entries can never match: dropped

log = get_logger()


class CacheFileError(ConfigError):
    """A cache folder cannot be loaded; ``where`` is the offending file."""


class CacheLockedError(CacheFileError):
    """Another open cache (in this or another process) holds the folder; ``where`` is the folder."""


# One save at a time in this process: two interleaved saves could rename one save's index
# next to the other's entries (refused at the next load), or an older snapshot over a newer.
_SAVE_LOCK = threading.Lock()


def save(store: Store, folder: str | os.PathLike[str], model: str) -> None:
    with _SAVE_LOCK:
        _save(store, Path(folder), model)


def _save(store: Store, folder: Path, model: str) -> None:
    from .store import _faiss

    faiss = _faiss()

    folder.mkdir(parents=True, exist_ok=True)
    ids, vecs, entries = store.snapshot()
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(vecs.shape[1]))
    if len(ids):
        index.add_with_ids(vecs, ids)
    index_bytes = faiss.serialize_index(index).tobytes()
    doc = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "key": SCOPE_VERSION,
        "model": model,
        "dim": vecs.shape[1],
        "index_sha256": hashlib.sha256(index_bytes).hexdigest(),
        "entries": [entry_to_json(e) for e in entries],
    }
    write_atomic(folder / INDEX_FILE, index_bytes)
    write_atomic(folder / ENTRIES_FILE, json.dumps(doc, ensure_ascii=False).encode("utf-8"))


def load(store: Store, folder: str | os.PathLike[str], model: str) -> int:
    """Fill an empty store from a folder; returns the number of entries loaded.

    A missing or empty folder is a new cache. Anything else that is not a matching pair of
    files raises ``CacheFileError`` naming the file and the problem.
    """
    from .store import _faiss

    faiss = _faiss()

    folder = Path(folder)
    index_path, entries_path = folder / INDEX_FILE, folder / ENTRIES_FILE
    if not index_path.exists() and not entries_path.exists():
        return 0
    for present, absent in ((index_path, entries_path), (entries_path, index_path)):
        if present.exists() and not absent.exists():
            raise CacheFileError(str(absent), f"missing, but {present.name} is there: not a complete cache folder")

    try:
        doc = json.loads(entries_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheFileError(str(entries_path), f"not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CacheFileError(str(entries_path), f"not a milliwatt cache file (expected format {FORMAT!r})")
    if doc.get("version") in _STALE_VERSIONS or (doc.get("version") == FORMAT_VERSION and doc.get("key") != SCOPE_VERSION):
        stale = doc.get("entries")
        log.warning(
            "cache %s: its %s entries were keyed under %s, not %s; they can never match and are dropped",
            folder, len(stale) if isinstance(stale, list) else "?", doc.get("key", "mw-cache-scope/1"), SCOPE_VERSION,
        )
        return 0
    if doc.get("version") != FORMAT_VERSION:
        raise CacheFileError(str(entries_path), f"format version {doc.get('version')!r}, this milliwatt reads {FORMAT_VERSION}")
    if doc.get("model") != model:
        raise CacheFileError(
            str(entries_path),
            f"made with embeddings of {doc.get('model')!r}, this cache embeds with {model!r}; "
            f"use another path or delete the folder",
        )

    index_bytes = index_path.read_bytes()
    if hashlib.sha256(index_bytes).hexdigest() != doc.get("index_sha256"):
        raise CacheFileError(
            str(index_path), f"does not match {ENTRIES_FILE} (sha256 differs: corrupt, or from another save)"
        )
    try:
        index = faiss.deserialize_index(np.frombuffer(index_bytes, dtype=np.uint8))
    except RuntimeError as e:
        raise CacheFileError(str(index_path), f"not a FAISS index ({str(e).splitlines()[0]})") from None
    if not isinstance(index, faiss.IndexIDMap2):
        raise CacheFileError(str(index_path), f"holds a {type(index).__name__}, expected IndexIDMap2")

    entries = doc.get("entries")
    if not isinstance(entries, list):
        raise CacheFileError(str(entries_path), "'entries' must be a list")
    parsed = [entry_from_json(raw, f"{entries_path}: entries[{i}]") for i, raw in enumerate(entries)]
    ids = faiss.vector_to_array(index.id_map).astype(np.int64) if index.ntotal else np.zeros(0, dtype=np.int64)
    if set(ids.tolist()) != {e.id for e in parsed} or len(ids) != len(parsed) or len({e.id for e in parsed}) != len(parsed):
        raise CacheFileError(str(index_path), f"holds {len(ids)} vectors whose ids differ from the {len(parsed)} entries")
    if index.d != doc.get("dim"):
        raise CacheFileError(str(index_path), f"has {index.d} dimensions, {ENTRIES_FILE} says {doc.get('dim')}")

    if parsed:  # in one call: a partition past the store's hnsw_from builds its graph on every core
        vecs = index.index.reconstruct_n(0, index.ntotal)
        row = {int(i): n for n, i in enumerate(ids)}
        with overheads.measure("cache", "index_build", f"{len(parsed)} entries from {index_path}"):
            store.add_many(parsed, vecs[[row[e.id] for e in parsed]])
    return len(parsed)


def _leftover_temp_files(folder: Path) -> list[Path]:
    """Temporary files of saves that crashed before their rename (``write_atomic``'s names)."""
    return [p for name in (INDEX_FILE, ENTRIES_FILE) for p in folder.glob(f".{name}.*.tmp")]


# ---------------------------------------------------------------------- one opener per folder


class FolderLock:
    """An exclusive hold on a cache folder, from ``lock_folder`` until ``release()``."""

    def __init__(self, folder: Path, lock: Any) -> None:
        self.folder = folder
        self._lock = lock

    @property
    def held(self) -> bool:
        return self._lock is not None

    def release(self) -> None:
        """Let the folder go (idempotent). Call it after the last save."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        try:
            (self.folder / OWNER_FILE).unlink(missing_ok=True)  # ours: only the holder writes it
        finally:
            lock.release()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_folder(folder: str | os.PathLike[str]) -> FolderLock:
    """Hold ``folder`` exclusively for the life of an open cache; ``release()`` the handle at close.

    Take it before ``load`` and release it after the last ``save``. Creates the folder if
    needed, records this process as the holder, and removes temporary files that crashed
    saves left (no other process can be saving: it would hold the lock). Raises
    ``CacheLockedError`` at once, without waiting, when another open cache holds the folder,
    in another process or in this one.
    """
    from filelock import FileLock, Timeout

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # thread_local=False: the cache may be closed from another thread than the one that opened it.
    lock = FileLock(str(folder / LOCK_FILE), thread_local=False)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CacheLockedError(str(folder), _held_by(folder)) from None
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        write_atomic(folder / OWNER_FILE, json.dumps(owner).encode("utf-8"))
        for tmp in _leftover_temp_files(folder):
            log.warning("cache %s: removing %s, left by a save that did not finish", folder, tmp.name)
            tmp.unlink(missing_ok=True)
    except BaseException:
        lock.release()
        raise
    return FolderLock(folder, lock)


def _held_by(folder: Path) -> str:
    """Who holds the folder, for the message a second opener gets."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process has this cache open (it holds the folder's lock); close it first or use another path"
    if pid == os.getpid() and host == socket.gethostname():
        return f"this process (pid {pid}) already has this cache open; close it first or use another path"
    return f"another process (pid {pid} on {host}) has this cache open; close it first or use another path"


# ---------------------------------------------------------------------- saving as it goes


class Autosaver:
    """Saves a store to its folder while the cache is open, so a crash loses at most about
    ``every_s`` seconds of writes instead of everything since it was opened.

    Create it once the store is loaded (a store fresh from its folder counts as saved), and
    call ``maybe_save()`` after each write, from the worker thread that made the write, never
    on the event loop: when it saves, it blocks for one ``save`` (the store's snapshot under its
    lock, then the two files written and renamed). It saves only when the store's ``version``
    moved since the last save and no save was attempted in the last ``every_s`` seconds;
    otherwise it returns False at once. So the first write after a quiet spell is saved
    immediately, and a burst of writes costs one save per ``every_s``.

    A write made after a save and followed by no other write stays unsaved until the next
    call at least ``every_s`` later: call ``maybe_save()`` from a timer too if writes can stop
    for long, and save at close as before. Hit counts do not move ``version``: they are saved
    with the next write or at close. Expired entries are saved as they are (``load`` purges).

    Concurrent calls do not queue: while one saves, the others return False. A failed save
    raises (log it and go on: the store is intact) and is tried again ``every_s`` later.
    """

    def __init__(
        self,
        store: Store,
        folder: str | os.PathLike[str],
        model: str,
        every_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not every_s >= 0:
            raise ValueError(f"every_s must be >= 0 seconds, got {every_s}")
        self.store = store
        self.folder = Path(folder)
        self.model = model
        self.every_s = every_s
        self.saves = 0  # completed saves, for tests and the ledger
        self._clock = clock
        self._saved_version = store.version
        self._last_attempt = -float("inf")
        self._busy = threading.Lock()

    @property
    def changed(self) -> bool:
        """Whether the store was written since the last save (or since this saver was made)."""
        return self.store.version != self._saved_version

    def maybe_save(self, now: float | None = None) -> bool:
        """Save if the store changed and the last attempt is ``every_s`` old; True if it saved."""
        now = self._clock() if now is None else now
        if not self._due(now) or not self._busy.acquire(blocking=False):
            return False
        try:
            if not self._due(now):  # another thread saved while this one was deciding
                return False
            self._last_attempt = now
            # Read before the snapshot: a write racing this save makes the next call save again.
            version = self.store.version
            save(self.store, self.folder, self.model)
            self._saved_version = version
            self.saves += 1
            return True
        finally:
            self._busy.release()

    def _due(self, now: float) -> bool:
        return self.changed and now - self._last_attempt >= self.every_s


def entry_to_json(e: Entry) -> dict[str, Any]:
    return {
        "id": e.id,
        "scope": e.scope,
        "history": e.history,
        "tail": e.tail,
        "text": e.text,
        "literals": sorted(e.literals),
        "message": e.message,
        "source": e.source,
        "created_at": e.created_at,
        "expires_at": e.expires_at,
        "hits": e.hits,
        "template": None if e.template is None else e.template.to_json(),
        "agree": e.agree,
        "disagree": e.disagree,
        "checks": e.checks,
        "failed_checks": e.failed_checks,
    }


def entry_from_json(raw: Any, where: str) -> Entry:
    if not isinstance(raw, dict):
        raise CacheFileError(where, "must be an object")
    try:
        return Entry(
            id=int(raw["id"]),
            scope=str(raw["scope"]),
            history=str(raw["history"]),
            tail=str(raw["tail"]),
            text=str(raw["text"]),
            literals=frozenset(raw["literals"]),
            message=dict(raw["message"]),
            source=str(raw["source"]),
            created_at=float(raw["created_at"]),
            expires_at=None if raw["expires_at"] is None else float(raw["expires_at"]),
            hits=int(raw["hits"]),
            template=None if raw.get("template") is None else Template.from_json(raw["template"]),
            agree=int(raw.get("agree", 0)),
            disagree=int(raw.get("disagree", 0)),
            checks=int(raw.get("checks", 0)),
            failed_checks=int(raw.get("failed_checks", 0)),
        )
    except KeyError as e:
        raise CacheFileError(where, f"missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CacheFileError(where, f"bad value ({e})") from None
