"""Ledger write load: many concurrent writers, one ledger, nothing lost or duplicated.

Four runs per backend: 64 asyncio writers (by default) in one process, each writing M steps
(``--steps``) through one shared ``Ledger``; and the same in each of 4 processes (``--procs``,
spawned) writing to one ledger at once. Backends: PostgreSQL (a throwaway cluster started
with tests/conftest_pg.py's ``Cluster``, fsync on, unless ``--url`` names a server) and a
SQLite file in a temporary folder, for comparison.

Each run writes to a fresh database, then counts: rows in ``steps`` against the steps
written (lost), ``count(*) - count(DISTINCT id)`` (duplicated), attempts without their step
or steps without their attempt, and what the writers spooled (a full queue spools rather than
block the caller; the next open imports it, and the counts are taken after that import). Throughput is steps committed
(or spooled) per second, from the first write of any process to the last ledger's close; ``write_max_ms`` is the
longest a single ``await ledger.write`` held a writer (it only queues).

Run: ``.venv/bin/python benchmarks/ledger_load.py --steps 200`` (``--writers``, ``--procs``,
``--backends postgresql,sqlite``, ``--url postgresql+psycopg://...``, ``--json OUT``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # conftest_pg (the cluster), test_ledger (the records)


def _writers(url: str, spool: str, writers: int, steps: int, tag: str) -> dict:
    """One process: ``writers`` coroutines each writing ``steps`` records to one Ledger."""
    from milliwatt.ledger import Ledger
    from test_ledger import T0, record

    async def main() -> dict:
        worst = 0.0
        ledger = Ledger(url, spool=spool)

        async def writer(w: int) -> None:
            nonlocal worst
            for i in range(steps):
                r = record(at=T0 + i, session=f"{tag}-{w}")
                t = time.perf_counter()
                await ledger.write(r)
                worst = max(worst, time.perf_counter() - t)
                if i % 16 == 0:
                    await asyncio.sleep(0)  # agents do other work between steps

        t0, start = time.perf_counter(), time.time()
        await asyncio.gather(*(writer(w) for w in range(writers)))
        await ledger.aclose()  # drains: every record committed or spooled
        return {"seconds": time.perf_counter() - t0, "start": start, "end": time.time(), "faults": dict(ledger.faults), "write_max_ms": worst * 1000}

    return asyncio.run(main())


def _count(url: str) -> dict:
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            one = lambda sql: conn.execute(text(sql)).scalar()  # noqa: E731
            return {
                "steps": one("SELECT count(*) FROM steps"),
                "distinct_ids": one("SELECT count(DISTINCT id) FROM steps"),
                "attempts": one("SELECT count(*) FROM attempts"),
                "orphan_attempts": one("SELECT count(*) FROM attempts a LEFT JOIN steps s ON s.id = a.step_id WHERE s.id IS NULL"),
                "steps_without_attempt": one("SELECT count(*) FROM steps s LEFT JOIN attempts a ON a.step_id = s.id WHERE a.step_id IS NULL"),
            }
    finally:
        engine.dispose()


def run(backend: str, url: str, folder: Path, procs: int, writers: int, steps: int) -> dict:
    from milliwatt.ledger import Ledger

    spool = str(folder / f"{backend}-{procs}.spool.jsonl")
    Ledger(url, spool=spool).close()  # created up front, as a deployment would (migrations are not timed)
    t0 = time.perf_counter()
    if procs == 1:
        parts = [_writers(url, spool, writers, steps, "p0")]
    else:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(procs) as pool:
            parts = pool.starmap(_writers, [(url, spool, writers, steps, f"p{p}") for p in range(procs)])
    wall = time.perf_counter() - t0  # includes spawning the processes
    written = procs * writers * steps
    span = max(p["end"] for p in parts) - min(p["start"] for p in parts)
    stored_at_close = _count(url)["distinct_ids"]
    Ledger(url, spool=spool).close()  # the next open imports what was spooled (a full queue spools)
    counts = _count(url)
    spooled = sum(p["faults"].get("spooled", 0) for p in parts)
    return {
        "backend": backend, "processes": procs, "writers_per_process": writers, "steps_per_writer": steps,
        "written": written, "stored_at_close": stored_at_close, "spooled": spooled, **counts,
        "spool_left": Path(spool).exists(),
        "lost": written - counts["distinct_ids"],  # after the import of the spool
        "duplicated": counts["steps"] - counts["distinct_ids"],
        # From the first write of any process to the last close: the processes overlap, not exactly.
        "seconds": round(span, 3), "wall_seconds_with_spawn": round(wall, 3),
        "steps_per_s": round(written / span),
        "write_max_ms": round(max(p["write_max_ms"] for p in parts), 2),
        "retried": sum(p["faults"].get("retried", 0) for p in parts),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="steps per writer (M)")
    ap.add_argument("--writers", type=int, default=64, help="concurrent asyncio writers per process")
    ap.add_argument("--procs", type=int, default=4, help="processes in the multi-process run")
    ap.add_argument("--backends", default="postgresql,sqlite")
    ap.add_argument("--url", help="a PostgreSQL server to use (its user may CREATE DATABASE) instead of a throwaway cluster")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    import conftest_pg

    results = []
    cluster = None
    with tempfile.TemporaryDirectory(prefix="mw-ledger-load-") as tmp:
        folder = Path(tmp)
        try:
            for backend in args.backends.split(","):
                for procs in (1, args.procs):
                    if backend == "postgresql":
                        if args.url is None and cluster is None:
                            why = conftest_pg.unavailable()
                            if why:
                                print(f"postgresql skipped: {why}", file=sys.stderr)
                                break
                            cluster = conftest_pg.Cluster(fsync=True)
                        url = conftest_pg.fresh_database(args.url or cluster.url, "load")
                    else:
                        url = f"sqlite:///{folder / f'load-{procs}.db'}"
                    r = run(backend, url, folder, procs, args.writers, args.steps)
                    results.append(r)
                    print(f"{backend:10} {procs} proc x {args.writers} writers x {args.steps} steps: {r['written']} written, "
                          f"{r['stored_at_close']} stored at close + {r['spooled']} spooled -> {r['steps']} rows ({r['distinct_ids']} distinct) "
                          f"after import, lost {r['lost']}, duplicated {r['duplicated']}, retried {r['retried']}; {r['steps_per_s']} steps/s "
                          f"({r['seconds']} s), longest write() {r['write_max_ms']} ms", flush=True)  # fmt: skip
        finally:
            if cluster is not None:
                cluster.stop()
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0 if all(r["lost"] == 0 and r["duplicated"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
