"""The cache's store and folder under load and faults: HNSW past a size, saves during the
cache's life, one opener per folder, and damaged files. Random unit vectors stand in for
MiniLM embeddings, so no model loads."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from milliwatt.errors import ConfigError

from milliwatt.cache import persist
from milliwatt.cache.persist import Autosaver, CacheFileError, CacheLockedError, lock_folder
from milliwatt.cache.store import Entry, Store

DIM = 384
MODEL = "test-model"
ROOT = Path(__file__).resolve().parents[1]


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def near(vecs: np.ndarray, seed: int = 1, noise: float = 0.5) -> np.ndarray:
    """Queries close to the given vectors (cosine about 0.9): paraphrases of stored questions."""
    q = vecs + noise * unit(len(vecs), seed, vecs.shape[1])
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def entry(text: str = "", *, history: str = "h") -> Entry:
    return Entry(id=0, scope="s", history=history, tail="t", text=text, literals=frozenset(),
                 message={"role": "assistant", "content": f"answer to {text}"}, source="remote", created_at=0.0)


def partition(store: Store) -> str:
    (key,) = {e.partition for e in store.entries.values()}
    return key


def partition_of(store: Store, text: str) -> str:
    return next(e.partition for e in store.entries.values() if e.text == text)


def filled(n: int, *, hnsw_from: int = 500, seed: int = 0) -> tuple[Store, np.ndarray]:
    vecs = unit(n, seed)
    store = Store(hnsw_from=hnsw_from, use_gpu=False)
    store.add_many([entry(str(i)) for i in range(n)], vecs)
    return store, vecs


def recall_at_8(store: Store, vecs: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> float:
    """Share of the exact 8 nearest (numpy over ``vecs``, whose entry ids are ``ids``) found by search."""
    exact = ids[np.argsort(-(queries @ vecs.T), axis=1)[:, :8]]
    key = partition(store)
    found = [{e.id for e, _ in store.search(key, q, 8)} for q in queries]
    return float(np.mean([len(f & set(x.tolist())) / 8 for f, x in zip(found, exact, strict=True)]))


# ---------------------------------------------------------------------- HNSW past hnsw_from


def test_a_partition_switches_to_hnsw_past_hnsw_from_and_keeps_its_results() -> None:
    vecs = unit(1200)
    store = Store(hnsw_from=500, use_gpu=False)
    for i, v in enumerate(vecs[:500]):
        store.add(entry(str(i)), v)
    key = partition(store)
    assert store.index_kind(key) == "flat"
    queries = near(vecs[:200])
    ids = np.arange(1, 1201)
    assert recall_at_8(store, vecs[:500], ids[:500], queries) == 1.0  # flat is exact

    store.add(entry("500"), vecs[500])  # the 501st entry: rebuilt as a graph
    assert store.index_kind(key) == "hnsw"
    for i, v in enumerate(vecs[501:], start=501):  # then grows by plain adds
        store.add(entry(str(i)), v)
    assert store.index_kind(key) == "hnsw" and len(store) == 1200
    assert recall_at_8(store, vecs, ids, queries) >= 0.99
    for q, i in zip(queries[:50], range(1, 51), strict=True):
        (best, sim), *_ = store.search(key, q, 8)
        assert best.id == i and best.text == str(i - 1)
        assert sim == pytest.approx(float(q @ vecs[i - 1]), abs=1e-5)  # the cosine, as with flat


def test_add_many_builds_the_graph_in_one_go_with_the_same_results() -> None:
    store, vecs = filled(1200)
    assert store.index_kind(partition(store)) == "hnsw"
    assert recall_at_8(store, vecs, np.arange(1, 1201), near(vecs[:200])) >= 0.99
    other = entry("other", history="h2")
    store.add_many([other], unit(1, seed=9))  # another partition stays small, and flat
    assert store.index_kind(other.partition) == "flat" and store.index_kind(partition_of(store, "0")) == "hnsw"


def test_removal_after_switch_over_rebuilds_and_never_returns_removed_entries() -> None:
    store, vecs = filled(1200)
    key = partition(store)
    version = store.version
    gone = set(range(1, 301))  # the nearest entries of the queries below
    store.remove(gone)
    assert store.version == version + 1 and len(store) == 900
    assert store.index_kind(key) == "hnsw"  # 900 > 500: still a graph
    queries = near(vecs[:300])
    for q in queries:
        assert not {e.id for e, _ in store.search(key, q, 8)} & gone
    kept = np.arange(301, 1201)
    assert recall_at_8(store, vecs[300:], kept, near(vecs[300:500])) >= 0.99

    store.remove(set(range(301, 801)))  # 400 left: flat and exact again
    assert store.index_kind(key) == "flat" and len(store) == 400
    assert recall_at_8(store, vecs[800:], np.arange(801, 1201), near(vecs[800:900])) == 1.0
    store.remove(set(range(801, 1201)))
    assert store.index_kind(key) is None and not store.has_partition(key) and len(store) == 0


def test_a_few_removals_from_an_hnsw_partition_are_tombstones_searches_skip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rebuilding a graph takes seconds under the store's lock: a purge of a few expired entries
    must not stall every search. Removed vectors stay in the graph, skipped, until they would
    pass a quarter of it; then one rebuild drops them all."""
    store, vecs = filled(1200)
    key = partition(store)
    builds = []
    real_build = Store._build
    monkeypatch.setattr(Store, "_build", lambda self, *a: builds.append(1) or real_build(self, *a))

    gone = set(range(1, 121))  # 10%: the nearest entries of the queries below
    store.remove(gone)
    part = store._parts[key]
    assert builds == [] and part.index.ntotal == 1200 and part.dead == gone and len(store) == 1080
    for q in near(vecs[:120]):
        found = store.search(key, q, 8)
        assert len(found) == 8 and not {e.id for e, _ in found} & gone
    assert recall_at_8(store, vecs[120:], np.arange(121, 1201), near(vecs[120:320])) >= 0.99

    persist.save(store, tmp_path / "c", MODEL)  # tombstones are not saved
    assert sorted(loaded(tmp_path / "c").entries) == sorted(store.entries)

    builds.clear()  # loading built the other store's index
    store.remove(set(range(121, 321)))  # 320 of 1,200 would be tombstones: past a quarter
    part = store._parts[key]
    assert builds == [1] and part.index.ntotal == 880 and part.dead == set() and store.index_kind(key) == "hnsw"


def test_a_failed_switch_over_or_rebuild_leaves_the_store_as_it_was(monkeypatch: pytest.MonkeyPatch) -> None:
    vecs = unit(502)
    store = Store(hnsw_from=500, use_gpu=False)
    store.add_many([entry(str(i)) for i in range(500)], vecs[:500])
    key = partition(store)
    before = [(e.id, s) for e, s in store.search(key, vecs[0], 8)]

    def refuse(*args: object) -> None:
        raise RuntimeError("faiss: out of memory")

    monkeypatch.setattr(Store, "_build", refuse)
    with pytest.raises(RuntimeError):
        store.add(entry("500"), vecs[500])  # would switch to HNSW
    assert len(store) == 500 and store.index_kind(key) == "flat" and store.version == 1
    assert [(e.id, s) for e, s in store.search(key, vecs[0], 8)] == before
    monkeypatch.undo()

    store.add(entry("500"), vecs[500])
    assert store.index_kind(key) == "hnsw"
    monkeypatch.setattr(Store, "_build", refuse)
    with pytest.raises(RuntimeError):
        store.remove(set(range(1, 201)))  # too many for tombstones: the graph is rebuilt
    assert len(store) == 501 and 1 in store.entries and store.version == 2
    assert store.search(key, vecs[0], 1)[0][0].id == 1


def test_hnsw_partitions_never_ask_for_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss has no GPU HNSW: even with GPUs, a graph stays on the CPU (flat ones may move)."""

    def no_gpu_here(self: Store) -> None:
        raise AssertionError("an HNSW partition asked for a GPU")

    monkeypatch.setattr(Store, "_gpu", no_gpu_here)
    store = Store(hnsw_from=50, use_gpu=True)
    store.add_many([entry(str(i)) for i in range(80)], unit(80))
    store.add(entry("80"), unit(1, seed=3)[0])
    store.remove({1})
    assert store.index_kind(partition(store)) == "hnsw" and len(store) == 80


def test_a_saved_hnsw_partition_loads_as_the_loading_store_decides(tmp_path: Path) -> None:
    store, vecs = filled(800)
    persist.save(store, tmp_path, MODEL)
    big = Store(hnsw_from=500, use_gpu=False)
    assert persist.load(big, tmp_path, MODEL) == 800
    assert big.index_kind(partition(big)) == "hnsw"
    assert recall_at_8(big, vecs, np.arange(1, 801), near(vecs[:100])) >= 0.99
    exact = Store(use_gpu=False)  # default hnsw_from: 800 entries are a flat partition
    persist.load(exact, tmp_path, MODEL)
    assert exact.index_kind(partition(exact)) == "flat"
    assert recall_at_8(exact, vecs, np.arange(1, 801), near(vecs[:100])) == 1.0


def test_ef_search_trades_recall_for_speed_without_a_rebuild() -> None:
    vecs = unit(3000)
    store = Store(hnsw_from=500, hnsw_ef_search=1, use_gpu=False)
    store.add_many([entry(str(i)) for i in range(3000)], vecs)
    queries, ids = near(vecs[:200]), np.arange(1, 3001)
    low = recall_at_8(store, vecs, ids, queries)
    store.set_hnsw_ef_search(256)
    assert low < recall_at_8(store, vecs, ids, queries) >= 0.99 and store.hnsw_ef_search == 256
    with pytest.raises(ValueError):
        store.set_hnsw_ef_search(0)


def test_store_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError):
        Store(hnsw_from=0)
    with pytest.raises(ValueError):
        Store(hnsw_ef_search=0)


def test_add_many_is_all_or_nothing_on_bad_input() -> None:
    store, _ = filled(10)
    with pytest.raises(ValueError, match="already in the cache"):
        store.add_many([Entry(**{**entry("x").__dict__, "id": 3})], unit(1))
    with pytest.raises(ValueError, match="given twice"):
        store.add_many([Entry(**{**entry("x").__dict__, "id": 50}), Entry(**{**entry("y").__dict__, "id": 50})], unit(2))
    with pytest.raises(ValueError, match="shape"):
        store.add_many([entry("x"), entry("y")], unit(3))
    assert len(store) == 10 and store.version == 1


# ---------------------------------------------------------------------- autosave


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def loaded(folder: Path) -> Store:
    store = Store(use_gpu=False)
    persist.load(store, folder, MODEL)
    return store


def test_autosave_only_when_changed_and_at_most_every_every_s(tmp_path: Path) -> None:
    store, clock = Store(use_gpu=False), Clock()
    saver = Autosaver(store, tmp_path, MODEL, every_s=30.0, clock=clock)
    assert saver.maybe_save() is False and not (tmp_path / persist.INDEX_FILE).exists()  # nothing to save

    store.add(entry("a"), unit(1)[0])
    assert saver.changed and saver.maybe_save() is True  # the first write after a quiet spell: at once
    assert [e.text for e in loaded(tmp_path).entries.values()] == ["a"] and not saver.changed

    clock.now += 10
    store.add(entry("b"), unit(1, seed=1)[0])
    assert saver.maybe_save() is False  # 10 s after the last save
    clock.now += 19.9
    assert saver.maybe_save() is False
    assert len(loaded(tmp_path)) == 1
    clock.now += 0.1
    assert saver.maybe_save() is True and len(loaded(tmp_path)) == 2

    clock.now += 1000
    assert saver.maybe_save() is False and saver.saves == 2  # unchanged: no save however late
    store.remove({1})
    assert saver.maybe_save(clock.now) is True and [e.text for e in loaded(tmp_path).entries.values()] == ["b"]


def test_a_store_fresh_from_its_folder_counts_as_saved(tmp_path: Path) -> None:
    store, _ = filled(20)
    persist.save(store, tmp_path, MODEL)
    again = loaded(tmp_path)
    saver = Autosaver(again, tmp_path, MODEL)
    assert not saver.changed and saver.maybe_save() is False


def test_a_failed_autosave_raises_keeps_the_store_and_retries_every_every_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, clock = Store(use_gpu=False), Clock()
    saver = Autosaver(store, tmp_path, MODEL, every_s=30.0, clock=clock)
    store.add(entry("a"), unit(1)[0])

    def disk_full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(persist, "save", disk_full)
    with pytest.raises(OSError):
        saver.maybe_save()
    assert len(store) == 1 and saver.changed and saver.saves == 0
    monkeypatch.undo()
    clock.now += 5
    assert saver.maybe_save() is False  # no retry storm
    clock.now += 25
    assert saver.maybe_save() is True and len(loaded(tmp_path)) == 1


def test_a_write_racing_an_autosave_is_saved_by_the_next_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, clock = Store(use_gpu=False), Clock()
    saver = Autosaver(store, tmp_path, MODEL, every_s=0.0, clock=clock)
    store.add(entry("a"), unit(1)[0])
    real_save = persist.save

    def save_then_write(*args: object) -> None:
        real_save(*args)
        store.add(entry("b"), unit(1, seed=1)[0])  # lands after the snapshot

    monkeypatch.setattr(persist, "save", save_then_write)
    assert saver.maybe_save() is True
    monkeypatch.undo()
    assert saver.changed and saver.maybe_save() is True
    assert sorted(e.text for e in loaded(tmp_path).entries.values()) == ["a", "b"]


def test_concurrent_autosaves_do_not_queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, clock = Store(use_gpu=False), Clock()
    saver = Autosaver(store, tmp_path, MODEL, every_s=0.0, clock=clock)
    store.add(entry("a"), unit(1)[0])
    inside, go_on = threading.Event(), threading.Event()
    real_save = persist.save

    def slow_save(*args: object) -> None:
        inside.set()
        go_on.wait(10)
        real_save(*args)

    monkeypatch.setattr(persist, "save", slow_save)
    first = threading.Thread(target=saver.maybe_save)
    first.start()
    assert inside.wait(10)
    store.add(entry("b"), unit(1, seed=1)[0])
    assert saver.maybe_save() is False  # one save at a time; this thread does not wait
    go_on.set()
    first.join(10)
    assert saver.saves == 1


@pytest.mark.asyncio
async def test_autosaves_from_worker_threads_while_writing_leave_a_loadable_folder(tmp_path: Path) -> None:
    """As the tier uses it: writes and maybe_save in worker threads, a final save at close."""
    store = Store(use_gpu=False)
    saver = Autosaver(store, tmp_path, MODEL, every_s=0.0)
    vecs = unit(60)

    def write(i: int) -> None:
        store.add(entry(str(i), history=f"h{i % 3}"), vecs[i])
        saver.maybe_save()

    await asyncio.gather(*(asyncio.to_thread(write, i) for i in range(60)))
    assert saver.saves >= 1
    middle = loaded(tmp_path)  # whatever the last autosave caught is a consistent pair
    assert 1 <= len(middle) <= 60
    await asyncio.to_thread(persist.save, store, tmp_path, MODEL)
    final = loaded(tmp_path)
    assert sorted(e.text for e in final.entries.values()) == sorted(str(i) for i in range(60))


# ---------------------------------------------------------------------- one opener per folder


def test_a_second_opener_is_refused_until_the_first_releases(tmp_path: Path) -> None:
    folder = tmp_path / "cache"  # created by the lock
    first = lock_folder(folder)
    assert first.held and folder.is_dir()
    with pytest.raises(CacheLockedError) as err:
        lock_folder(folder)
    assert isinstance(err.value, CacheFileError) and isinstance(err.value, ConfigError)
    assert err.value.where == str(folder)
    assert f"this process (pid {os.getpid()}) already has this cache open" in str(err.value)
    first.release()
    first.release()  # idempotent
    assert not first.held and not (folder / persist.OWNER_FILE).exists()
    with lock_folder(folder) as second:
        assert second.held
    assert not second.held
    lock_folder(folder).release()


HOLDER = """
import sys
from milliwatt.cache.persist import lock_folder
handle = lock_folder(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
handle.release()
print("released", flush=True)
"""


def test_another_process_holding_the_folder_is_named_and_its_crash_frees_it(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheLockedError) as err:
            lock_folder(tmp_path)
        assert f"another process (pid {holder.pid} on " in str(err.value)
        assert str(tmp_path) in str(err.value)
        holder.kill()  # a crash: no release, no clean-up
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    lock_folder(tmp_path).release()  # the operating system dropped the lock with the process


def test_a_clean_release_in_another_process_frees_the_folder(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert holder.stdin is not None
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        lock_folder(tmp_path).release()  # while the other process still runs
    finally:
        holder.kill()
        holder.wait(10)


def test_the_lock_survives_release_from_another_thread(tmp_path: Path) -> None:
    handle = lock_folder(tmp_path)
    closer = threading.Thread(target=handle.release)  # a cache closed from a worker thread
    closer.start()
    closer.join(10)
    lock_folder(tmp_path).release()


# ---------------------------------------------------------------------- damaged folders


def saved(folder: Path, n: int = 30) -> tuple[Store, np.ndarray]:
    store, vecs = filled(n)
    persist.save(store, folder, MODEL)
    return store, vecs


def rewrite_sha(folder: Path) -> None:
    """Make the sidecar agree with whatever index.faiss now holds (a damaged index that passes the hash)."""
    doc = json.loads((folder / persist.ENTRIES_FILE).read_text())
    doc["index_sha256"] = hashlib.sha256((folder / persist.INDEX_FILE).read_bytes()).hexdigest()
    (folder / persist.ENTRIES_FILE).write_text(json.dumps(doc))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())


def drop_an_entry(folder: Path) -> None:
    doc = json.loads((folder / persist.ENTRIES_FILE).read_text())
    doc["entries"] = doc["entries"][1:]
    (folder / persist.ENTRIES_FILE).write_text(json.dumps(doc))


def duplicate_an_entry(folder: Path) -> None:
    doc = json.loads((folder / persist.ENTRIES_FILE).read_text())
    doc["entries"][1]["id"] = doc["entries"][0]["id"]
    (folder / persist.ENTRIES_FILE).write_text(json.dumps(doc))


def empty(path: Path) -> None:
    path.write_bytes(b"")


DAMAGE = {
    "truncated index": (lambda f: truncate(f / persist.INDEX_FILE), persist.INDEX_FILE, "sha256 differs"),
    "truncated entries": (lambda f: truncate(f / persist.ENTRIES_FILE), persist.ENTRIES_FILE, "not valid JSON"),
    "garbage index": (lambda f: garbage(f / persist.INDEX_FILE), persist.INDEX_FILE, "sha256 differs"),
    "garbage index, sidecar agrees": (
        lambda f: (garbage(f / persist.INDEX_FILE), rewrite_sha(f)), persist.INDEX_FILE, "not a FAISS index"),
    "truncated index, sidecar agrees": (
        lambda f: (truncate(f / persist.INDEX_FILE), rewrite_sha(f)), persist.INDEX_FILE, "not a FAISS index"),
    "empty index": (lambda f: empty(f / persist.INDEX_FILE), persist.INDEX_FILE, "sha256 differs"),
    "empty entries": (lambda f: empty(f / persist.ENTRIES_FILE), persist.ENTRIES_FILE, "not valid JSON"),
    "index without entries": (lambda f: (f / persist.ENTRIES_FILE).unlink(), persist.ENTRIES_FILE, "missing"),
    "entries without index": (lambda f: (f / persist.INDEX_FILE).unlink(), persist.INDEX_FILE, "missing"),
    "an entry lost": (drop_an_entry, persist.INDEX_FILE, "ids differ"),
    "an id twice": (duplicate_an_entry, persist.INDEX_FILE, "ids differ"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_folder_is_refused_naming_the_file_and_serves_nothing(tmp_path: Path, damage: str) -> None:
    harm, bad_file, problem = DAMAGE[damage]
    saved(tmp_path)
    harm(tmp_path)
    store = Store(use_gpu=False)
    with pytest.raises(CacheFileError) as err:
        persist.load(store, tmp_path, MODEL)
    assert err.value.where == str(tmp_path / bad_file)
    assert problem in err.value.problem
    assert len(store) == 0 and store.version == 0 and not store.has_scope("s")  # nothing half-loaded


def test_a_crash_between_the_two_renames_is_refused(tmp_path: Path) -> None:
    """The index of a newer save next to the entries of an older one: vectors under wrong answers."""
    store, vecs = saved(tmp_path, 30)
    older_entries = (tmp_path / persist.ENTRIES_FILE).read_bytes()
    store.remove({1})
    store.add(entry("new"), vecs[0])  # id 31 now has the vector that id 1 had
    persist.save(store, tmp_path, MODEL)
    (tmp_path / persist.ENTRIES_FILE).write_bytes(older_entries)
    with pytest.raises(CacheFileError) as err:
        persist.load(Store(use_gpu=False), tmp_path, MODEL)
    assert err.value.where == str(tmp_path / persist.INDEX_FILE) and "from another save" in err.value.problem


def test_temp_files_of_a_crashed_save_are_ignored_then_cleaned_by_the_lock(tmp_path: Path) -> None:
    _, vecs = saved(tmp_path, 30)
    # A later save crashed while writing: half of each new file under its temporary name.
    index_bytes, entries_bytes = (tmp_path / persist.INDEX_FILE).read_bytes(), (tmp_path / persist.ENTRIES_FILE).read_bytes()
    left = [tmp_path / f".{persist.INDEX_FILE}.99999.tmp", tmp_path / f".{persist.ENTRIES_FILE}.99999.tmp"]
    left[0].write_bytes(index_bytes[: len(index_bytes) // 3])
    left[1].write_bytes(entries_bytes[: len(entries_bytes) // 3])

    again = Store(use_gpu=False)
    assert persist.load(again, tmp_path, MODEL) == 30  # the last complete save, untouched
    key = partition(again)
    (best, sim), *_ = again.search(key, vecs[7], 1)
    assert best.text == "7" and sim == pytest.approx(1.0, abs=1e-5)
    assert all(p.exists() for p in left)

    with lock_folder(tmp_path):
        assert not any(p.exists() for p in left)
        assert (tmp_path / persist.INDEX_FILE).read_bytes() == index_bytes  # the real files stay


def test_saves_leave_no_temp_files_and_replace_the_pair_whole(tmp_path: Path) -> None:
    store, _ = saved(tmp_path, 30)
    store.add(entry("new"), unit(1, seed=5)[0])
    persist.save(store, tmp_path, MODEL)
    assert sorted(p.name for p in tmp_path.iterdir()) == [persist.ENTRIES_FILE, persist.INDEX_FILE]
    assert len(loaded(tmp_path)) == 31



def test_eviction_rebuilds_each_partition_once_and_all_or_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    store, _ = filled(1200)
    for e in list(store.entries.values())[:100]:
        e.expires_at = 10.0  # expired: these go first
    builds = []
    real_build = Store._build

    def counting(self: Store, *args: object) -> object:
        builds.append(1)
        return real_build(self, *args)

    monkeypatch.setattr(Store, "_build", counting)
    # 440 of 1,200 go: more than the tombstones an HNSW partition keeps, so one rebuild.
    assert store.evict(800, now=20.0) == 1200 - 760
    assert len(builds) == 1 and len(store) == 760 and not any(e.expired(20.0) for e in store.entries.values())

    def refuse(*args: object) -> None:
        raise RuntimeError("faiss: out of memory")

    monkeypatch.setattr(Store, "_build", refuse)
    with pytest.raises(RuntimeError):
        store.evict(500, now=20.0)
    assert len(store) == 760


@pytest.mark.slow
@pytest.mark.asyncio
async def test_an_open_cache_tier_holds_its_folder_and_saves_while_open(tmp_path: Path) -> None:
    """The tier wires the lock and the autosave: a second tier on the same folder is refused
    until the first closes, and a write is on disk before close."""
    from milliwatt.cache import CacheLockedError, CacheTier, Embedder
    from milliwatt.types import Step

    embedder = Embedder()
    first = CacheTier(path=str(tmp_path / "c"), embedder=embedder, autosave_s=0.0)
    step = Step.create([{"role": "user", "content": "What is your returns policy?"}])
    await first.remember(step, {"role": "assistant", "content": "30 days."}, "remote")
    saved = json.loads((tmp_path / "c" / "entries.json").read_text())
    assert [e["text"] for e in saved["entries"]] == ["What is your returns policy?"]  # autosaved, not yet closed
    with pytest.raises(CacheLockedError, match="already has this cache open"):
        CacheTier(path=str(tmp_path / "c"), embedder=embedder)
    await first.aclose()
    second = CacheTier(path=str(tmp_path / "c"), embedder=embedder)
    assert len(second.store) == 1
    await second.aclose()
