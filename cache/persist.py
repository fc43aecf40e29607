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
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from milliwatt.errors import ConfigError
from milliwatt.redaction import get_logger

from .scope import SCOPE_VERSION
from .store import Entry, Store

INDEX_FILE = "index.faiss"
ENTRIES_FILE = "entries.json"
FORMAT = "milliwatt-cache"
FORMAT_VERSION = 2  # 2: entries carry "history" and no "grounded"; the doc carries "key"
_STALE_VERSIONS = {1}  # readable enough to know its entries can never match: dropped

log = get_logger()


class CacheFileError(ConfigError):
    """A cache folder cannot be loaded; ``where`` is the offending file."""


def save(store: Store, folder: str | os.PathLike[str], model: str) -> None:
    import faiss

    folder = Path(folder)
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
        "entries": [_entry_to_json(e) for e in entries],
    }
    _write_atomic(folder / INDEX_FILE, index_bytes)
    _write_atomic(folder / ENTRIES_FILE, json.dumps(doc, ensure_ascii=False).encode("utf-8"))


def load(store: Store, folder: str | os.PathLike[str], model: str) -> int:
    """Fill an empty store from a folder; returns the number of entries loaded.

    A missing or empty folder is a new cache. Anything else that is not a matching pair of
    files raises ``CacheFileError`` naming the file and the problem.
    """
    import faiss

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
    parsed = [_entry_from_json(raw, f"{entries_path}: entries[{i}]") for i, raw in enumerate(entries)]
    ids = faiss.vector_to_array(index.id_map).astype(np.int64) if index.ntotal else np.zeros(0, dtype=np.int64)
    if set(ids.tolist()) != {e.id for e in parsed} or len(ids) != len(parsed):
        raise CacheFileError(str(index_path), f"holds {len(ids)} vectors whose ids differ from the {len(parsed)} entries")
    if index.d != doc.get("dim"):
        raise CacheFileError(str(index_path), f"has {index.d} dimensions, {ENTRIES_FILE} says {doc.get('dim')}")

    vecs = index.index.reconstruct_n(0, index.ntotal) if index.ntotal else None
    row = {int(i): n for n, i in enumerate(ids)}
    for e in parsed:
        store.add(e, vecs[row[e.id]])
    return len(parsed)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _entry_to_json(e: Entry) -> dict[str, Any]:
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
    }


def _entry_from_json(raw: Any, where: str) -> Entry:
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
        )
    except KeyError as e:
        raise CacheFileError(where, f"missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CacheFileError(where, f"bad value ({e})") from None
