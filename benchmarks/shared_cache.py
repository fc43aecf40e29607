"""The shared cache's delay and costs: how long until an entry one worker stores can answer
on another, and what the database adds to a write and to a sync.

Two processes on one database (a throwaway PostgreSQL 15 cluster with fsync on, from
tests/conftest_pg.py, unless ``--url`` names a server): the writer stores an entry every
``--every`` seconds (``SharedStore.add``: into its own indexes, its sync thread woken to
commit it); the reader runs its sync thread at ``sync_s`` and polls its own store every
millisecond for each entry, noting when it appears. Both record wall-clock times (one
machine, one clock). Reported per ``sync_s``: the visibility delay (from the writer's add,
so the commit is in it) p50/p99/max, the writer's ``add`` latency p50/p99 (what the answer's
write-back waits for; against an in-memory ``Store.add`` of the same vectors), and the
reader's sync latency (a pull that finds one new entry). Then the write throughput: 1 and 4
processes, each storing ``--entries`` x 2 entries from 8 threads at once, until committed.

Run: ``.venv/bin/python benchmarks/shared_cache.py`` (``--entries``, ``--sync``, ``--url``, ``--json OUT``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest_pg: the throwaway cluster

MODEL = "bench-model"
DIM = 384


def _entry(text: str):  # noqa: ANN202 - milliwatt is imported in the worker processes
    from milliwatt.cache.store import Entry

    return Entry(id=0, scope="bench", history="h", tail="t", text=text, literals=frozenset(),
                 message={"role": "assistant", "content": text}, source="remote", created_at=time.time())  # fmt: skip


def _vector(i: int) -> np.ndarray:
    v = np.random.default_rng(i).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def writer(url: str, n: int, every: float, ready, out) -> None:  # noqa: ANN001
    from milliwatt.cache.shared import SharedStore

    store = SharedStore(url, MODEL, sync_s=60.0)  # its thread commits when woken by an add
    ready.wait()
    written, add_s = [], []
    for i in range(n):
        t = time.time()
        e = store.add(_entry(f"q{i}"), _vector(i))
        add_s.append(time.time() - t)
        written.append((e.id, t))  # the delay counts from the add: the commit is in it
        time.sleep(every)
    store.close()
    out.put({"written": written, "add_s": add_s})


def reader(url: str, n: int, sync_s: float, ready, out) -> None:  # noqa: ANN001
    from milliwatt.cache.shared import SharedStore

    store = SharedStore(url, MODEL, sync_s=sync_s)
    seen: dict[int, float] = {}
    ready.set()
    deadline = time.time() + 600
    while len(seen) < n and time.time() < deadline:
        for i in list(store.entries):
            seen.setdefault(i, time.time())
        time.sleep(0.001)
    # The cost of one sync that finds one new entry, measured apart from the thread.
    probe = SharedStore(url, MODEL, start=False)
    costs = []
    for i in range(20):
        probe_writer = SharedStore(url, MODEL, start=False)
        probe_writer.add(_entry(f"probe{i}"), _vector(10_000 + i))
        probe_writer.close()  # commits
        t = time.perf_counter()
        probe.sync()
        costs.append(time.perf_counter() - t)
    probe.close()
    store.close()
    out.put({"seen": seen, "sync_s": costs})


def burst(url: str, n: int, threads: int, out) -> None:  # noqa: ANN001
    from concurrent.futures import ThreadPoolExecutor

    from milliwatt.cache.shared import SharedStore

    store = SharedStore(url, MODEL, sync_s=60.0)
    t = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: store.add(_entry(f"b{i}"), _vector(i)), range(n)))
    store.flush()  # the last of them committed
    out.put({"seconds": time.perf_counter() - t, "commits": store.pushes})
    store.close()


def write_rate(server: str, procs: int, n: int, threads: int = 8) -> dict:
    from conftest_pg import fresh_database

    url = fresh_database(server, "burst")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    ps = [ctx.Process(target=burst, args=(url, n, threads, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    done = [out.get(timeout=900) for _ in ps]
    for p in ps:
        p.join()
    seconds = max(d["seconds"] for d in done)
    return {"processes": procs, "threads": threads, "entries": procs * n, "entries_per_s": procs * n / seconds,
            "commits": sum(d["commits"] for d in done)}  # fmt: skip


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def run(url: str, n: int, every: float, sync_s: float) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ready, out_w, out_r = ctx.Event(), ctx.Queue(), ctx.Queue()
    r = ctx.Process(target=reader, args=(url, n, sync_s, ready, out_r))
    w = ctx.Process(target=writer, args=(url, n, every, ready, out_w))
    r.start()
    w.start()
    wrote, read = out_w.get(timeout=900), out_r.get(timeout=900)
    w.join()
    r.join()
    delays = [read["seen"][i] - at for i, at in wrote["written"] if i in read["seen"]]
    return {
        "sync_s": sync_s,
        "entries": n,
        "seen": len(delays),
        "delay_ms": {"p50": pct(delays, 50) * 1e3, "p99": pct(delays, 99) * 1e3, "max": max(delays) * 1e3},
        "add_ms": {"p50": pct(wrote["add_s"], 50) * 1e3, "p99": pct(wrote["add_s"], 99) * 1e3},
        "sync_one_new_ms": {"p50": pct(read["sync_s"], 50) * 1e3, "p99": pct(read["sync_s"], 99) * 1e3},
    }


def in_memory_add_ms(n: int) -> dict:
    from milliwatt.cache.store import Store

    store = Store(use_gpu=False)
    times = []
    for i in range(n):
        t = time.perf_counter()
        store.add(_entry(f"q{i}"), _vector(i))
        times.append(time.perf_counter() - t)
    return {"p50": pct(times, 50) * 1e3, "p99": pct(times, 99) * 1e3}


def main() -> None:
    from conftest_pg import Cluster, fresh_database

    from milliwatt.meters import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=200)
    ap.add_argument("--every", type=float, default=0.02, help="seconds between the writer's entries")
    ap.add_argument("--sync", default="1.0,0.25,0.05", help="the reader's sync_s values, comma-separated")
    ap.add_argument("--url", help="a PostgreSQL server (its user may CREATE DATABASE); default: a throwaway cluster")
    ap.add_argument("--json")
    args = ap.parse_args()
    cluster = None if args.url else Cluster(fsync=True)
    server = args.url or cluster.url  # type: ignore[union-attr]
    try:
        runs = [run(fresh_database(server, "bench"), args.entries, args.every, float(s)) for s in args.sync.split(",")]
        rates = [write_rate(server, procs, 2 * args.entries) for procs in (1, 4)]
    finally:
        if cluster is not None:
            cluster.stop()
    result = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}",
        "backend": "postgresql (throwaway cluster, fsync on)" if cluster else "postgresql (--url)",
        "in_memory_add_ms": in_memory_add_ms(args.entries),
        "runs": runs,
        "write_rate": rates,
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
