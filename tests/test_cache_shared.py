"""The cache shared by many workers (milliwatt.cache.shared): entries in a database, a FAISS
index in each worker kept in step with it.

Every test runs on PostgreSQL (a fresh database on the throwaway cluster of
tests/conftest_pg.py) and on a SQLite file: the same semantics on both.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import text

import conftest_pg
from conftest_pg import Cluster, fresh_database, free_port
from milliwatt import Milliwatt
from milliwatt.cache import CacheFileError, CacheTier, shared
from milliwatt.cache.shared import SharedStore
from milliwatt.cache.store import Entry
from milliwatt.ledger import Ledger
from milliwatt.testing import OpenAIStubServer, cosine_gate
from test_isolation import OnePoint, remote

pg_cluster = conftest_pg.pg_cluster
pg_url = conftest_pg.pg_url
private_pg_cluster = conftest_pg.private_pg_cluster  # one these tests may halt

DIM = 384
MODEL = "test-model"
aio = pytest.mark.asyncio(loop_scope="session")
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning")


@pytest.fixture(params=["postgresql", "sqlite"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cache.db'}"
    return request.getfixturevalue("pg_url")


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def entry(text: str, *, scope: str = "s") -> Entry:
    return Entry(id=0, scope=scope, history="h", tail="t", text=text, literals=frozenset(),
                 message={"role": "assistant", "content": f"answer to {text}"}, source="remote", created_at=time.time())  # fmt: skip


@pytest.fixture
def stores(url: str) -> Iterator[list[SharedStore]]:
    """Two workers' stores on one database, synced by hand (no sync thread)."""
    opened = [SharedStore(url, MODEL, start=False) for _ in range(2)]
    yield opened
    for s in opened:
        s.close()


def test_an_entry_one_worker_stores_answers_on_the_other_after_a_sync(stores: list[SharedStore]) -> None:
    a, b = stores
    stored = a.add(entry("where is my bag"), unit(1))
    assert stored.id > 0
    assert [e.id for e, _ in a.search(stored.partition, unit(1), 1)] == [stored.id]  # a's own at once
    a.flush()  # committed (the sync thread does it within milliseconds of the add)
    assert b.search(stored.partition, unit(1), 1) == []  # not yet: b has not synced
    b.sync()
    [(found, sim)] = b.search(stored.partition, unit(1), 1)
    assert (found.id, found.message, found.text) == (stored.id, stored.message, stored.text)
    assert sim == pytest.approx(1.0, abs=1e-5)
    # ids come from the database's clock: unique across workers
    other = b.add(entry("can I change my seat"), unit(2))
    b.flush()
    a.sync()
    assert other.id != stored.id
    assert sorted(a.entries) == sorted(b.entries) == sorted([stored.id, other.id])


def test_counters_add_up_across_workers_and_unpushed_increments_are_kept(stores: list[SharedStore]) -> None:
    a, b = stores
    e = a.add(entry("q"), unit(1))
    a.flush()
    b.sync()
    eb = b.entries[e.id]
    e.hits += 3
    e.checks, e.failed_checks = 1, 1  # a verdict that retires the entry must reach every worker
    a.touch(e)
    eb.hits += 2
    b.touch(eb)
    a.sync()  # pushes 3 hits and the verdict
    b.sync()  # pushes 2 hits, then reads 5
    a.sync()
    assert (a.entries[e.id].hits, b.entries[e.id].hits) == (5, 5)
    assert (b.entries[e.id].checks, b.entries[e.id].failed_checks) == (1, 1)
    eb.hits += 1  # not pushed yet: a pull must not lose it
    b.touch(eb)
    a.entries[e.id].agree += 1
    a.touch(a.entries[e.id])
    a.sync()
    b._pull()
    assert (eb.hits, eb.agree) == (6, 1)
    b.sync()
    a.sync()
    assert a.entries[e.id].hits == 6


def test_a_removal_reaches_every_worker(stores: list[SharedStore]) -> None:
    a, b = stores
    keep, drop = a.add(entry("keep"), unit(1)), a.add(entry("drop"), unit(2))
    a.flush()
    b.sync()
    assert set(b.entries) == {keep.id, drop.id}
    a.remove({drop.id})
    a.flush()
    b.sync()
    assert set(b.entries) == {keep.id}
    assert [e.id for e, _ in b.search(keep.partition, unit(2), 8)] == [keep.id]


def test_expiry_and_eviction_go_through_the_database(stores: list[SharedStore]) -> None:
    a, b = stores
    old = entry("old")
    old.expires_at = time.time() - 1
    a.add(old, unit(1))
    for i in range(5):
        a.add(entry(f"q{i}"), unit(10 + i))
    a.flush()
    b.sync()
    assert len(b) == 6
    assert a.purge_expired() == 1
    a.evict(3)  # down to 95% of the bound: two entries left
    a.flush()
    b.sync()
    assert set(b.entries) == set(a.entries) and len(b) == 2


def test_a_worker_that_fell_behind_the_tombstones_reloads(stores: list[SharedStore], monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = stores
    ids = [a.add(entry(f"q{i}"), unit(i)).id for i in range(4)]
    a.flush()
    b.sync()
    a.remove({ids[0], ids[1]})
    a.add(entry("new"), unit(99))
    a.flush()
    monkeypatch.setattr(shared, "TOMBSTONE_KEEP_S", -1.0)
    a._collect_tombstones()  # b never saw the removals: they are gone from the database
    with a.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM cache_entries WHERE deleted")).scalar() == 0
    b.sync()
    assert set(b.entries) == set(a.entries) and len(b) == 3


def test_workers_writing_at_once_get_unique_ids_and_the_same_view(url: str) -> None:
    workers = [SharedStore(url, MODEL, start=False) for _ in range(4)]
    try:

        def write(n: int) -> None:
            for i in range(25):
                workers[n].add(entry(f"w{n}-{i}"), unit(100 * n + i))

        threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for w in workers:
            w.flush()
        for w in workers:
            w.sync()
        views = [sorted(w.entries) for w in workers]
        assert all(v == views[0] for v in views) and len(views[0]) == 100
    finally:
        for w in workers:
            w.close()


def test_a_workers_writes_are_committed_in_batches_by_its_thread_each_with_its_own_id(url: str) -> None:
    """16 threads storing at once: each entry is searchable here at once, and the sync thread
    commits them (woken by the writes, not waiting for sync_s) in far fewer transactions than
    entries, each with its own id, row and vector."""
    store = SharedStore(url, MODEL, sync_s=60.0)
    try:
        def write(n: int) -> list[int]:
            return [store.add(entry(f"t{n}-{i}"), unit(7000 + 10 * n + i)).id for i in range(10)]

        with ThreadPoolExecutor(16) as pool:
            ids = [i for mine in pool.map(write, range(16)) for i in mine]
        assert len(set(ids)) == 160 and set(store.entries) == set(ids)
        t0 = time.monotonic()
        while store._inserts and time.monotonic() - t0 < 10:  # committed by the thread, well before sync_s
            time.sleep(0.01)
        assert not store._inserts
        assert 1 <= store.pushes < 160
        other = SharedStore(url, MODEL, start=False)
        try:
            for i in ids:
                e = other.entries[i]
                n, k = (int(x) for x in e.text[1:].split("-"))
                [(found, _)] = other.search(e.partition, unit(7000 + 10 * n + k), 1)
                assert found.id == i
        finally:
            other.close()
    finally:
        store.close()


def _process_worker(url: str, n: int, count: int, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = SharedStore(url, MODEL, start=False)
    try:
        mine = [store.add(entry(f"p{n}-{i}"), unit(1000 * n + i)).id for i in range(count)]
        out.put((n, mine))
    finally:
        store.close()


def test_four_processes_share_one_cache_with_nothing_lost_or_duplicated(url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_process_worker, args=(url, n, 30, out)) for n in range(4)]
    for p in procs:
        p.start()
    written = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    ids = [i for mine in written.values() for i in mine]
    assert len(ids) == len(set(ids)) == 120
    reader = SharedStore(url, MODEL, start=False)
    try:
        assert set(reader.entries) == set(ids)
        assert {reader.entries[i].text for i in written[2]} == {f"p2-{i}" for i in range(30)}
    finally:
        reader.close()


def test_the_sync_thread_brings_another_workers_entry_within_a_few_intervals(url: str) -> None:
    a = SharedStore(url, MODEL, start=False)
    b = SharedStore(url, MODEL, sync_s=0.1)
    try:
        stored = a.add(entry("q"), unit(1))
        a.flush()
        t0 = time.monotonic()
        while stored.id not in b.entries and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert stored.id in b.entries  # brought by b's thread: nothing here called b.sync()
    finally:
        a.close()
        b.close()


def test_another_embedding_model_is_refused_and_another_key_version_is_dropped(url: str, monkeypatch: pytest.MonkeyPatch,
                                                                                caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    a = SharedStore(url, MODEL, start=False)
    a.add(entry("q"), unit(1))
    a.close()
    with pytest.raises(CacheFileError, match="made with embeddings of 'test-model', this cache embeds with 'other'"):
        SharedStore(url, "other", start=False)
    monkeypatch.setattr(shared, "SCOPE_VERSION", "mw-cache-scope/999")
    with caplog.at_level(logging.WARNING):
        b = SharedStore(url, MODEL, start=False)
    try:
        assert len(b) == 0
        assert "can never match" in caplog.text
    finally:
        b.close()


def test_an_unreachable_database_is_a_clear_error_without_the_password() -> None:
    bad = f"postgresql+psycopg://mw:hunter2secret@127.0.0.1:{free_port()}/cache"
    with pytest.raises(CacheFileError) as info:
        SharedStore(bad, MODEL, start=False)
    message = str(info.value)
    assert "cannot open the shared cache" in message and "127.0.0.1" in message
    assert "hunter2secret" not in message
    with pytest.raises(CacheFileError, match="not a usable database URL"):
        SharedStore("nosuchdialect://x/y", MODEL, start=False)
    with pytest.raises(CacheFileError, match="not a database URL"):
        SharedStore("postgresql://u:p@host:notaport/db", MODEL, start=False)


def test_a_database_restart_costs_no_answer_and_the_worker_catches_up(private_pg_cluster: Cluster, caplog: pytest.LogCaptureFixture) -> None:
    cluster = private_pg_cluster
    url = fresh_database(cluster.url)
    a = SharedStore(url, MODEL, start=False)
    b = SharedStore(url, MODEL, sync_s=0.05)
    try:
        first = a.add(entry("q1"), unit(1))
        a.flush()
        b.sync()
        cluster.halt()
        with caplog.at_level(logging.WARNING):
            # b answers from what it holds, its counts wait; a stores new answers for itself
            assert [e.id for e, _ in b.search(first.partition, unit(1), 1)] == [first.id]
            b.entries[first.id].hits += 1
            b.touch(b.entries[first.id])
            during = a.add(entry("during"), unit(2))
            assert [e.id for e, _ in a.search(during.partition, unit(2), 1)] == [during.id]
            with pytest.raises(Exception):
                a.flush()  # the database is away: it stays queued
            time.sleep(0.3)
            assert "cannot sync" in caplog.text
            cluster.start()
            second = a.add(entry("q2"), unit(3))
            a.flush()  # commits the entry stored during the outage too
            t0 = time.monotonic()
            while not {during.id, second.id} <= set(b.entries) and time.monotonic() - t0 < 15:
                time.sleep(0.02)
        assert {during.id, second.id} <= set(b.entries)
        assert "in sync again" in caplog.text
        a.sync()
        assert a.entries[first.id].hits == 1  # the increment made during the outage arrived
    finally:
        if not cluster.running():
            cluster.start()
        a.close()
        b.close()


# ---------------------------------------------------------------------- through the tier


@aio
async def test_two_workers_caches_answer_each_others_steps(url: str, tmp_path: Path) -> None:
    """Worker A's remote answer is stored in the shared cache; worker B, with its own
    process-local index, answers the same step from it, and the ledger says so."""
    step = [{"role": "system", "content": "You are an airline agent."}, {"role": "user", "content": "How many bags can I check?"}]
    async with OpenAIStubServer(lambda r: {"role": "assistant", "content": "Two bags of 23 kg."}) as stub:
        tiers = [CacheTier(path=url, embedder=OnePoint(), gate=cosine_gate(0.5), shadow_share=0.0, sync_s=0.05) for _ in range(2)]
        async with Milliwatt([tiers[0], remote(stub)], ledger=Ledger(f"sqlite:///{tmp_path / 'a.db'}")) as a, \
                Milliwatt([tiers[1], remote(stub)], ledger=Ledger(f"sqlite:///{tmp_path / 'b.db'}")) as b:  # fmt: skip
            first = await a.step(step, tenant="acme")
            assert first.tier == "remote"
            await asyncio.to_thread(tiers[0].store.flush)  # the sync thread's commit, made sure of
            await asyncio.to_thread(tiers[1].store.sync)
            second = await b.step(step, tenant="acme")
            assert second.tier == "cache" and second.message["content"] == "Two bags of 23 kg."
            other = await b.step(step, tenant="globex")  # no hit crosses tenants, shared or not
            assert other.tier == "remote"
            hits = tiers[1].store.entries[second.record.attempts[0].evidence["candidates"][0]["entry"]].hits
            assert hits == 1
    # closed: counts pushed; a third worker opening now sees the hit
    third = SharedStore(url, OnePoint().name, start=False)
    try:
        assert sorted(e.hits for e in third.entries.values()) == [0, 1]
    finally:
        third.close()


def test_the_cache_path_setting_takes_a_database_url(url: str) -> None:
    from milliwatt.config import Settings
    from milliwatt.registry import build_tier

    settings = Settings.model_validate({"tiers": ["cache"], "cache": {"path": url, "sync_s": 0.5}})
    tier = build_tier("cache", settings)
    try:
        assert isinstance(tier.store, SharedStore) and tier.store.sync_s == 0.5
    finally:
        asyncio.run(tier.aclose())


def _write_forever(url: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    store = SharedStore(url, MODEL, sync_s=0.05)
    for i in range(100_000):
        stored = store.add(entry(f"k{i}"), unit(5000 + i))
        store.flush()
        out.put(stored.id)  # reported once committed


def test_a_worker_killed_mid_write_leaves_a_cache_the_others_open_whole(url: str) -> None:
    """SIGKILL while storing entries: every entry the dead worker committed is there, whole
    (its answer and its vector), and nothing else; the database needs no repair."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    victim = ctx.Process(target=_write_forever, args=(url, out))
    victim.start()
    committed = [out.get(timeout=60) for _ in range(40)]
    victim.kill()
    victim.join(timeout=30)
    while not out.empty():
        committed.append(out.get())
    reader = SharedStore(url, MODEL, start=False)
    try:
        assert set(committed) <= set(reader.entries)
        # at most the one being written when the signal came, committed but not yet reported
        assert len(reader.entries) - len(committed) <= 1
        for i in committed:
            e = reader.entries[i]
            assert e.message["content"] == f"answer to {e.text}"
            [(found, sim)] = reader.search(e.partition, unit(5000 + int(e.text[1:])), 1)
            assert found.id == i and sim == pytest.approx(1.0, abs=1e-5)
    finally:
        reader.close()
