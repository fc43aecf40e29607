"""Latency of the cache on this machine: one lookup, lookups issued together, and the FAISS
search alone up to a million vectors in one partition.

* ``run()`` fills one scope with ~1k real questions (QQP text_a), then times
  ``CacheTier.attempt`` for questions asked one at a time (the micro-batcher's 2 ms window
  included; target p50 < 25 ms), for 32 and 64 questions issued at once with
  ``asyncio.gather`` (the embedder puts them in few batches; target < 6 ms of wall time per
  lookup for 32), and the FAISS search alone over 1k and 10k entries (flat, exact).
* ``run_scale()`` times ``Store.search`` over 1M synthetic unit vectors in one partition
  (100k with ``--quick``): past ``hnsw_from`` the partition is an HNSW graph. It reports the
  build (``Store.add_many``), search p50/p95 (target < 1 ms) and recall@8 against an exact
  search at several efSearch values, the flat scan over the same vectors for comparison, and
  one removal from a 50k-entry graph (a rebuild, under the store's lock).

The synthetic vectors are clustered like sentence embeddings, not uniform: uniform unit
vectors in 384 dimensions have no near neighbours (the nearest of 20k is at cosine 0.2), so
every graph index needs a near-exhaustive walk on them, while MiniLM embeddings of real
questions are clustered (QQP: nearest at 0.80). Clusters of 20 points around centres drawn
with MiniLM's eigen-spectrum (variance of the i-th direction ~ i^-0.6, as measured on QQP
embeddings), each point at its own spread: at 20k vectors this is harder for HNSW than
MiniLM on QQP (recall@8 at efSearch 32: 0.97 vs 0.99). Queries are new points of existing
clusters: paraphrases of stored questions. ``--vectors uniform`` runs the worst case.

Run: ``.venv/bin/python benchmarks/bench_cache.py [--quick] [--json PATH] [--vectors uniform]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from milliwatt.cache import CacheTier
from milliwatt.cache.key import StepKey, step_key
from milliwatt.cache.store import HNSW_EF_SEARCH, Entry, Store
from milliwatt.types import Step, StepMeta

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "qqp" / "pairs.jsonl"
SYSTEM = {"role": "system", "content": "You answer questions briefly."}
DIM = 384
EF_SWEEP = (64, HNSW_EF_SEARCH, 256, 512)


def _step(text: str) -> Step:
    return Step.create([SYSTEM, {"role": "user", "content": text}], meta=StepMeta(tenant="bench"))


def _pairs(n: int) -> list[dict]:
    with DATA.open() as f:
        return [json.loads(line) for _, line in zip(range(n), f, strict=False)]


def _ms(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)

    def at(q: float) -> float:
        return round(xs[int(q * (len(xs) - 1))] * 1e3, 3)

    return {"median_ms": round(statistics.median(xs) * 1e3, 3), "p90_ms": at(0.9), "p95_ms": at(0.95)}


def _entry(key: StepKey, text: str = "", source: str = "pad") -> Entry:
    return Entry(id=0, scope=key.scope, history=key.history, tail=key.tail, text=text, literals=frozenset(),
                 message={"role": "assistant", "content": "stored answer"}, source=source, created_at=0.0)


async def _together(tier: CacheTier, texts: list[str]) -> dict:
    batches = tier.embedder.batches
    t = time.perf_counter()
    await asyncio.gather(*(tier.attempt(_step(text)) for text in texts))
    wall = time.perf_counter() - t
    return {"wall_ms_per_lookup": round(wall / len(texts) * 1e3, 2), "wall_ms": round(wall * 1e3, 1),
            "batches": tier.embedder.batches - batches}


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

    # Concurrent agents; texts changed so the embedder's memo of the loop above does not answer.
    asked = [p["text_b"] for p in pairs[entries:]]
    concurrent_32 = await _together(tier, [t + " ?" for t in asked[:32]])
    concurrent_64 = await _together(tier, [t + " ??" for t in asked[:64]])

    search = {}
    key = step_key(_step(pairs[0]["text_a"]))
    vec, _ = await tier.embedder.embed(key.text)
    for n in (entries, 10_000):
        pad = _unit(np.random.default_rng(0).standard_normal((n - len(tier.store), vec.shape[0])))
        for v in pad:  # pad the same partition to n entries with random unit vectors
            tier.store.add(_entry(key), v)
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
        "concurrent_32": concurrent_32,
        "concurrent_64": concurrent_64,
        **search,
    }


def run(entries: int = 1000, queries: int = 200) -> dict:
    """Lookups through the tier (loads MiniLM; about a minute on 2 cores)."""
    return asyncio.run(_run(entries, queries))


# ---------------------------------------------------------------------- search at scale


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _spectrum() -> np.ndarray:
    """Standard deviation of each direction, variance ~ i^-0.6 as in MiniLM embeddings of QQP; unit norm."""
    scale = np.zeros(DIM, dtype=np.float32)
    scale[:300] = np.arange(1, 301, dtype=np.float32) ** -0.3
    return scale / np.sqrt((scale**2).sum())


def synthetic(n: int, rng: np.random.Generator, kind: str = "clustered", cluster: int = 20) -> np.ndarray:
    """``n`` unit vectors of 384 dims; consecutive blocks are not clusters (labels are drawn)."""
    if kind == "uniform":
        return _unit(rng.standard_normal((n, DIM), dtype=np.float32))
    scale = _spectrum()
    centres = rng.standard_normal((max(1, n // cluster), DIM), dtype=np.float32) * scale
    centres = _unit(centres + 0.25 / np.sqrt(DIM))  # a common offset, as sentence embeddings have
    out = np.empty((n, DIM), dtype=np.float32)
    for i in range(0, n, 100_000):  # in chunks: a few GB less at 1M
        m = min(100_000, n - i)
        spread = rng.uniform(0.5, 2.0, (m, 1)).astype(np.float32)
        noise = rng.standard_normal((m, DIM), dtype=np.float32) * scale
        out[i : i + m] = _unit(centres[rng.integers(0, len(centres), m)] + spread * noise)
    return out


def _exact_top8(vecs: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Row numbers of the 8 nearest stored vectors of each query, by brute force in chunks."""
    best_s = np.full((len(queries), 0), -np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 0), dtype=np.int64)
    for i in range(0, len(vecs), 200_000):
        sims = queries @ vecs[i : i + 200_000].T
        top = np.argpartition(-sims, 8, axis=1)[:, :8]
        best_s = np.concatenate([best_s, np.take_along_axis(sims, top, 1)], axis=1)
        best_i = np.concatenate([best_i, top + i], axis=1)
        keep = np.argsort(-best_s, axis=1)[:, :8]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def _time_search(store: Store, partition: str, queries: np.ndarray) -> tuple[list[float], list[set[int]]]:
    times, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = store.search(partition, q, 8)
        times.append(time.perf_counter() - t)
        found.append({e.id for e, _ in hits})
    return times, found


def run_scale(n: int = 1_000_000, n_queries: int = 500, kind: str = "clustered", seed: int = 0) -> dict:
    """Store.search over ``n`` synthetic vectors in one partition (CPU only; no model).

    Two sets of queries: new points of the same distribution (recall@8: the share of the
    exact 8 nearest that the search returns), and repeats, stored vectors moved to cosine
    ~0.93 (the cache's case: a question asked again in other words; ``repeat_found``: the
    share whose stored original is among the 8 returned)."""
    import faiss

    rng = np.random.default_rng(seed)
    data = synthetic(n + n_queries, rng, kind)
    vecs, queries = data[:n], data[n:]
    source = rng.integers(0, n, n_queries)
    repeats = _unit(vecs[source] + 0.4 * rng.standard_normal((n_queries, DIM), dtype=np.float32) * _spectrum())
    key = step_key(_step("one partition"))
    store = Store(use_gpu=False)

    t = time.perf_counter()
    store.add_many([_entry(key) for _ in range(n)], vecs)
    build_s = time.perf_counter() - t
    ids = np.array(sorted(store.entries), dtype=np.int64)  # add_many gives ids 1..n in order
    exact = [set(ids[row].tolist()) for row in _exact_top8(vecs, queries)]
    exact_repeats = [set(ids[row].tolist()) for row in _exact_top8(vecs, repeats)]

    sweep = {}
    for ef in EF_SWEEP:
        store.set_hnsw_ef_search(ef)
        _time_search(store, key.partition, queries[:20])  # warm the graph's pages
        times, found = _time_search(store, key.partition, queries)
        _, found_repeats = _time_search(store, key.partition, repeats)
        sweep[f"ef_search_{ef}"] = {
            **_ms(times),
            "recall_at_8": _recall(found, exact),
            "repeats_recall_at_8": _recall(found_repeats, exact_repeats),
            "repeat_found": round(statistics.fmean(int(ids[s]) in f for s, f in zip(source, found_repeats, strict=True)), 4),
        }
    store.set_hnsw_ef_search(HNSW_EF_SEARCH)

    flat = faiss.IndexFlatIP(DIM)  # the exact scan the graph replaces, same vectors
    flat.add(vecs)
    flat_times = []
    for q in queries[:50]:
        t = time.perf_counter()
        flat.search(q.reshape(1, -1), 8)
        flat_times.append(time.perf_counter() - t)
    del flat

    return {
        "vectors": n,
        "kind": kind,
        "index": store.index_kind(key.partition),
        "hnsw_from": store.hnsw_from,
        "build_s": round(build_s, 1),
        "default_ef_search": HNSW_EF_SEARCH,
        **sweep,
        "flat_scan": _ms(flat_times),
        "remove_one_of_50k_s": _removal(vecs[:50_000], key),
    }


def _recall(found: list[set[int]], exact: list[set[int]]) -> float:
    return round(statistics.fmean(len(f & x) / 8 for f, x in zip(found, exact, strict=True)), 4)


def _removal(vecs: np.ndarray, key: StepKey) -> float:
    """Seconds to remove one entry from an HNSW partition at the default max_entries (50k):
    HNSW cannot remove, so the partition is rebuilt from the rest, under the store's lock."""
    store = Store(use_gpu=False)
    store.add_many([_entry(key) for _ in range(len(vecs))], vecs)
    t = time.perf_counter()
    store.remove({1})
    return round(time.perf_counter() - t, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="search at scale over 100k vectors, not 1M")
    ap.add_argument("--json", metavar="PATH", help="write the figures here too")
    ap.add_argument("--vectors", choices=("clustered", "uniform"), default="clustered",
                    help="synthetic vectors for the search at scale (default: clustered, like embeddings)")
    ap.add_argument("--scale-only", action="store_true", help="skip the lookups through the tier (no model)")
    args = ap.parse_args()
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} vCPU, Python {platform.python_version()}",
    }
    if not args.scale_only:
        results["lookups"] = run()
    results["search_at_scale"] = run_scale(100_000 if args.quick else 1_000_000, kind=args.vectors)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
