"""Latency of one cache lookup (embed + FAISS search + guards) on this machine.

Fills one scope with ~1k real questions (QQP text_a), then times ``CacheTier.attempt`` for
questions asked one at a time (the micro-batcher's 2 ms window included), and the FAISS
search alone over 1k and 10k entries. Run: ``.venv/bin/python benchmarks/bench_cache.py``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import numpy as np

from milliwatt.cache import CacheTier
from milliwatt.cache.key import step_key
from milliwatt.cache.store import Entry
from milliwatt.types import Step, StepMeta

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qqp" / "pairs.jsonl"
SYSTEM = {"role": "system", "content": "You answer questions briefly."}


def _step(text: str) -> Step:
    return Step.create([SYSTEM, {"role": "user", "content": text}], meta=StepMeta(tenant="bench"))


def _pairs(n: int) -> list[dict]:
    with DATA.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def _ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {"median_ms": round(statistics.median(xs) * 1e3, 2), "p90_ms": round(xs[int(0.9 * (len(xs) - 1))] * 1e3, 2)}


async def _run(entries: int, queries: int) -> dict:
    pairs = _pairs(entries + queries)
    tier = CacheTier(ttl_s=None, max_entries=100_000)
    answer = {"role": "assistant", "content": "stored answer"}
    t0 = time.perf_counter()
    for i in range(0, entries, 64):  # concurrent write-backs share embedding batches
        await asyncio.gather(*(tier.remember(_step(p["text_a"]), answer, "remote") for p in pairs[i : min(i + 64, entries)]))
    fill_s = time.perf_counter() - t0

    lookups, cpu, hits = [], [], 0
    for p in pairs[entries:]:  # questions not stored, asked one at a time
        t = time.perf_counter()
        r = await tier.attempt(_step(p["text_b"]))
        lookups.append(time.perf_counter() - t)
        cpu.append(r.energy.point_wh)
        hits += r.answered

    # 64 concurrent agents (texts changed so the memo of the loop above does not answer).
    batches = tier.embedder.batches
    t = time.perf_counter()
    await asyncio.gather(*(tier.attempt(_step(p["text_b"] + " ?")) for p in pairs[entries : entries + 64]))
    concurrent = {"wall_ms_per_lookup": round((time.perf_counter() - t) / 64 * 1e3, 2), "batches": tier.embedder.batches - batches}

    search = {}
    key = step_key(_step(pairs[0]["text_a"]))
    vec, _ = await tier.embedder.embed(key.text)
    for n in (entries, 10_000):
        store_vecs = np.random.default_rng(0).standard_normal((n - len(tier.store), vec.shape[0])).astype(np.float32)
        if len(store_vecs):  # pad the same partition to n entries with random unit vectors
            store_vecs /= np.linalg.norm(store_vecs, axis=1, keepdims=True)
            for v in store_vecs:
                tier.store.add(Entry(id=0, scope=key.scope, history=key.history, tail=key.tail, text="", literals=frozenset(),
                                      message=answer, source="pad", created_at=0.0), v)
        times = []
        for _ in range(200):
            t = time.perf_counter()
            tier.store.search(key.partition, vec, 8)
            times.append(time.perf_counter() - t)
        search[f"search_only_{n}"] = _ms(times)

    await tier.aclose()
    return {
        "entries": entries,
        "queries": queries,
        "fill_s": round(fill_s, 2),
        "lookup": _ms(lookups),
        "hits": hits,
        "energy_point_mwh_per_lookup": round(statistics.median(cpu) * 1e3, 5),
        "concurrent_64": concurrent,
        **search,
    }


def run(entries: int = 1000, queries: int = 200) -> dict:
    return asyncio.run(_run(entries, queries))


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
