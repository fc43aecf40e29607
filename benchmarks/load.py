"""Load: 64 concurrent agents through rules, cache and a loopback remote, on one PostgreSQL ledger.

Two configurations (by default): one process with 64 agents, and 4 spawned processes with 16
agents each (64 in all), every process writing to the same PostgreSQL ledger. Each process is
one ``Milliwatt`` built by benchmarks/loop_lag.py's ``build``: rules (an inline pack) -> the
real cache (all-MiniLM-L6-v2 + FAISS, in memory per process; ``--shared-cache``: kept in the
PostgreSQL database, shared by all processes) -> the remote on a loopback stand-in
(``milliwatt.testing.OpenAIStubServer`` in its own process, one per worker, a fixed reply,
reached through litellm and HTTP). Each process runs loop_lag's ``run_agents`` with its
``LagMonitor`` (a 5 ms sleeper; its overshoot is the event-loop lag).

The agents are support sessions: a conversation restarts every 10-20 steps (drawn per
conversation), each step is the whole conversation so far plus one user message, with a short
system prompt and 3 tool schemas (~450-1,000 tokens, characters / 4). A conversation opens with a greeting (rules),
asks up to three frequently asked questions (popular ones more often: the cache answers the
repeats), then asks about its own order, a new order number per conversation (the remote), the
customer saying thanks now and then (rules), and ends with a hand-off to a human (rules).

Reported per configuration: steps answered, wall seconds (first step of any process to the last
answer), steps/s, step latency p50/p99 over all steps, event-loop lag p50/p99/max over all
processes' samples and the worst process's p99, the tier mix, and the ledger counted after every
process closed its ``Milliwatt`` and a fresh ``Ledger`` opened (which imports the spool): rows in
``steps``, distinct ids, lost (answered - distinct rows), duplicated (rows - distinct), attempts
without their step. Before the clock starts each process warms up with 3 steps (the most
popular opening asked twice: rules, remote, cache; models load on first use); they are in the
ledger, so the ledger check counts them with the answered steps (the throughput does not).

PostgreSQL: a throwaway cluster (tests/conftest_pg.py's ``Cluster``, fsync on) unless ``--url``
names a server whose user may CREATE DATABASE; each configuration gets a fresh database.

Run: ``.venv/bin/python benchmarks/load.py --steps 100`` (``--agents`` in all, ``--procs``,
``--configs 1,4``, ``--shared-cache``, ``--gc-freeze``, ``--url``, ``--json OUT``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import os
import random
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT / "benchmarks", ROOT / "tests"):  # loop_lag, ledger_load; conftest_pg
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from ledger_load import _count
from loop_lag import (
    QUESTIONS,
    RULES,
    TOOLS,
    _pct,
    build,
    machine,
    run_agents,
    start_stub,
)

SYSTEM = (
    "You are Acme's support agent. Answer in two sentences at most. Use a tool only when the customer "
    "gives an order id; never guess ids, confirm before any change, and never promise refunds outside "
    "the 30-day window."
)
LOAD_TOOLS = TOOLS[:3]  # get_order, cancel_order, return_order
RULES_PACK = (
    RULES
    + """\
  - id: thanks
    when:
      regex: ^\\W*(?:thanks|thank you)(?:\\s+so much)?\\W*$
      flags: [IGNORECASE]
    reply: You're welcome! Anything else I can help with?
"""
)
FAQ = [q for q in QUESTIONS[:12]]  # the loop_lag questions no rule answers
FAQ_WEIGHTS = [1 / (rank + 1) for rank in range(len(FAQ))]  # popular questions are asked more
ORDER_QUESTIONS = [
    "Where is my order {o}? It was due yesterday.",
    "Can I return order {o}? The item arrived damaged.",
    "Please change the delivery address of order {o} to 12 Elm Street, Springfield.",
    "When will order {o} ship?",
    "Cancel order {o} please, I ordered the wrong size.",
    "Has the refund for order {o} gone through yet?",
    "The tracking number of order {o} does not work, can you check it?",
    "Order {o} is missing one of the three items I paid for.",
]
HANDOFF = ["Can I talk to a human please?", "I want to speak to a person about this"]


def conversation_script(a: int, steps: int) -> Any:
    """loop_lag's ``Script`` protocol: agent ``a``'s ``steps`` steps as consecutive support
    conversations of 10-20 steps each (the last one cut short at ``steps``)."""
    done = 0
    c = 0
    while done < steps:
        rng = random.Random(f"{a}-{c}")
        length = rng.randint(10, 20)
        order = f"{a:03d}{c:05d}"  # a new order number per conversation: these go remote
        faqs = rng.sample(range(len(FAQ)), k=len(FAQ))
        faqs.sort(key=lambda i: -FAQ_WEIGHTS[i] * rng.random())  # a weighted order, no repeats
        turns = ["hi"]
        turns += [FAQ[i] for i in faqs[: rng.randint(1, 3)]]
        while len(turns) < length - 1:
            if turns[-1] not in ("hi", "thank you") and rng.random() < 0.25:
                turns.append("thank you")
            else:
                turns.append(rng.choice(ORDER_QUESTIONS).format(o=order))
        turns.append(rng.choice(HANDOFF))
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
        for text in turns[: steps - done]:
            messages.append({"role": "user", "content": text})
            answer = yield list(messages), f"agent-{a}-c{c}"
            messages.append(answer)
            done += 1
        c += 1


def _worker(
    p: int, first: int, agents: int, steps: int, url: str, spool: str, shared_cache: bool, gc_freeze: bool, barrier: Any, out: Any
) -> None:
    """One process: its own stub remote and ``Milliwatt``; warm-up, wait for every process,
    then ``agents`` agents (numbered from ``first``) of ``steps`` steps each."""

    async def main() -> dict[str, Any]:
        proc, api_base = start_stub(keep_calls=False)
        try:
            with tempfile.TemporaryDirectory() as tmp:
                rules_path = str(Path(tmp) / "load_rules.yaml")
                Path(rules_path).write_text(RULES_PACK)
                cache_path, cache_options = (url, {"sync_s": 1.0}) if shared_cache else (None, None)
                mw = await asyncio.to_thread(
                    build, api_base, rules_path, url, cache_path=cache_path, cache_options=cache_options, spool=spool
                )
                warmup = 0
                try:
                    # Not timed: MiniLM, litellm, tiktoken and EcoLogits load on first use. The
                    # most popular opening (greeting, first FAQ) is asked twice: rules, remote, cache.
                    opening = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}]
                    answer = await mw.step(opening, tools=LOAD_TOOLS, session_id=f"warmup-{p}", agent="support", tenant="acme")
                    opening += [answer.message, {"role": "user", "content": FAQ[0]}]
                    for _ in range(2):
                        await mw.step(opening, tools=LOAD_TOOLS, session_id=f"warmup-{p}", agent="support", tenant="acme")
                    warmup = 3
                    if gc_freeze:
                        gc.collect()
                        gc.freeze()
                    await asyncio.to_thread(barrier.wait, 600)
                    result = await run_agents(mw, agents, steps, script=conversation_script, tools=LOAD_TOOLS, keep_latencies=True, first=first)
                finally:
                    t = time.perf_counter()
                    await mw.aclose()  # drains the ledger: every record committed or spooled
                    close_s = time.perf_counter() - t
                faults = dict(mw.ledger.faults)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
        result.update(process=p, warmup=warmup, close_s=round(close_s, 2), faults=faults, pid=os.getpid())
        return result

    try:
        out.put(asyncio.run(main()))
    except BaseException as e:
        out.put({"process": p, "error": f"{type(e).__name__}: {e}"})
        raise


def run_config(url: str, folder: Path, procs: int, agents: int, steps: int, *, shared_cache: bool = False, gc_freeze: bool = False) -> dict[str, Any]:
    """``procs`` spawned processes sharing ``agents`` agents (``agents // procs`` each) of
    ``steps`` steps, on the ledger at ``url``; the figures and the ledger counts."""
    from milliwatt.ledger import Ledger

    if agents % procs:
        raise ValueError(f"{agents} agents do not split evenly over {procs} processes")
    per = agents // procs
    spool = str(folder / f"load-{procs}.spool.jsonl")
    Ledger(url, spool=spool).close()  # created up front, as a deployment would (migrations are not timed)
    ctx = multiprocessing.get_context("spawn")
    barrier, out = ctx.Barrier(procs), ctx.Queue()
    t0 = time.perf_counter()
    workers = [
        ctx.Process(target=_worker, args=(p, p * per, per, steps, url, spool, shared_cache, gc_freeze, barrier, out), name=f"load-{p}")
        for p in range(procs)
    ]
    for w in workers:
        w.start()
    parts = [out.get() for _ in workers]  # before join: a child cannot exit with a full pipe
    for w in workers:
        w.join()
    wall_with_spawn = time.perf_counter() - t0
    errors = [r["error"] for r in parts if "error" in r]
    if errors:
        raise RuntimeError(f"{len(errors)} of {procs} processes failed: {errors}")
    parts.sort(key=lambda r: r["process"])
    stored_at_close = _count(url)["distinct_ids"]
    Ledger(url, spool=spool).close()  # the next open imports what was spooled
    counts = _count(url)
    answered = sum(r["steps"] for r in parts)
    warmup = sum(r["warmup"] for r in parts)
    latencies = [x for r in parts for x in r["latencies_s"]]
    lags = [x for r in parts for x in r["lags_s"]]
    span = max(r["ended"] for r in parts) - min(r["started"] for r in parts)
    tiers: dict[str, int] = {}
    for r in parts:
        for k, v in r["tiers"].items():
            tiers[k] = tiers.get(k, 0) + v
    ms = lambda x: round(x * 1e3, 2)
    return {
        "processes": procs,
        "agents_per_process": per,
        "agents": agents,
        "steps_per_agent": steps,
        "cache": "shared (PostgreSQL)" if shared_cache else "in memory, per process",
        "answered": answered,
        "expected": agents * steps,
        "wall_s": round(span, 1),
        "wall_s_with_spawn_and_warmup": round(wall_with_spawn, 1),
        "steps_per_s": round(answered / span, 1),
        "step_latency_ms": {k: round(v, 1) for k, v in {"p50": ms(_pct(latencies, 0.5)), "p99": ms(_pct(latencies, 0.99)), "max": ms(max(latencies))}.items()},
        "loop_lag_ms": {"p50": ms(_pct(lags, 0.5)), "p99": ms(_pct(lags, 0.99)), "max": ms(max(lags)), "samples": len(lags)},
        "loop_lag_p99_worst_process_ms": max(r["loop_lag_ms"]["p99"] for r in parts),
        "per_process": [
            {k: r[k] for k in ("process", "steps", "wall_s", "steps_per_s", "loop_lag_ms", "step_latency_ms", "tiers", "close_s", "faults")}
            for r in parts
        ],
        "tiers": dict(sorted(tiers.items())),
        "ledger": {
            **counts,
            "warmup_steps": warmup,
            "stored_at_close": stored_at_close,
            "spooled": sum(r["faults"].get("spooled", 0) for r in parts),
            "dropped": sum(r["faults"].get("dropped", 0) for r in parts),
            "spool_left": Path(spool).exists(),
            "lost": answered + warmup - counts["distinct_ids"],
            "duplicated": counts["steps"] - counts["distinct_ids"],
        },
        "close_s_max": max(r["close_s"] for r in parts),
        "loadavg_at_end": os.getloadavg(),  # the 2-core machine may be shared with other jobs
    }


def markdown(results: list[dict[str, Any]]) -> str:
    head = (
        "| processes x agents x steps | answered | wall | steps/s | step latency p50 / p99 | loop lag p50 / p99 / max "
        "(worst process p99) | rules / cache / remote | ledger rows (distinct) | lost | duplicated | attempts without step | spooled |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    rows = []
    for r in results:
        lg, lat, led, t = r["loop_lag_ms"], r["step_latency_ms"], r["ledger"], r["tiers"]
        rows.append(
            f"| {r['processes']} x {r['agents_per_process']} x {r['steps_per_agent']:,} | {r['answered']:,} | {r['wall_s']:,} s | "
            f"{r['steps_per_s']:,} | {lat['p50']} / {lat['p99']} ms | {lg['p50']} / {lg['p99']} / {lg['max']} ms ({r['loop_lag_p99_worst_process_ms']}) | "
            f"{t.get('rules', 0):,} / {t.get('cache', 0):,} / {t.get('remote', 0):,} | {led['steps']:,} ({led['distinct_ids']:,}) | "
            f"{led['lost']} | {led['duplicated']} | {led['orphan_attempts']} | {led['spooled']} |"
        )
    return "\n".join([head, *rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--agents", type=int, default=64, help="concurrent agents in all (split over the processes)")
    ap.add_argument("--steps", type=int, default=100, help="steps per agent")
    ap.add_argument("--procs", type=int, default=4, help="processes of the multi-process configuration")
    ap.add_argument("--configs", default=None, help="process counts to run, comma-separated (default: 1,<procs>)")
    ap.add_argument("--shared-cache", action="store_true", help="the cache kept in the PostgreSQL database, shared by the processes")
    ap.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after the warm-up (see benchmarks/loop_lag.py)")
    ap.add_argument("--url", help="a PostgreSQL server to use (its user may CREATE DATABASE) instead of a throwaway cluster")
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()

    import conftest_pg
    from milliwatt.meters import cpu_model

    info = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "nproc": os.cpu_count(),
        "machine": machine(),
        "loadavg_at_start": os.getloadavg(),
        "command": "benchmarks/load.py " + " ".join(sys.argv[1:]),
        "remote": "stand-in: OpenAI-compatible stub on 127.0.0.1 (one process per worker), fixed reply, through litellm",
    }
    print(f"{info['date']}  cpu: {info['cpu']}  nproc: {info['nproc']}  python {info['machine']['python']}  load average {info['loadavg_at_start']}", flush=True)
    configs = [int(c) for c in (args.configs or f"1,{args.procs}").split(",")]
    results: list[dict[str, Any]] = []
    cluster = None
    try:
        if args.url is None:
            why = conftest_pg.unavailable()
            if why:
                print(f"postgresql unavailable: {why}", file=sys.stderr)
                return 2
            cluster = conftest_pg.Cluster(fsync=True)
        server = args.url or cluster.url
        info["postgresql"] = "throwaway PostgreSQL cluster (tests/conftest_pg.py Cluster, fsync on)" if args.url is None else "server from --url"
        with tempfile.TemporaryDirectory(prefix="mw-load-") as tmp:
            for procs in configs:
                url = conftest_pg.fresh_database(server, "load")
                r = run_config(url, Path(tmp), procs, args.agents, args.steps, shared_cache=args.shared_cache, gc_freeze=args.gc_freeze)
                results.append(r)
                led = r["ledger"]
                print(
                    f"{procs} proc x {r['agents_per_process']} agents x {args.steps} steps: {r['answered']} answered in {r['wall_s']} s, "
                    f"{r['steps_per_s']} steps/s, latency p50/p99 {r['step_latency_ms']['p50']}/{r['step_latency_ms']['p99']} ms, "
                    f"lag p50/p99/max {r['loop_lag_ms']['p50']}/{r['loop_lag_ms']['p99']}/{r['loop_lag_ms']['max']} ms "
                    f"(worst process p99 {r['loop_lag_p99_worst_process_ms']}), tiers {r['tiers']}; ledger {led['steps']} rows "
                    f"({led['distinct_ids']} distinct, {led['warmup_steps']} warm-up), lost {led['lost']}, duplicated {led['duplicated']}, "
                    f"orphan attempts {led['orphan_attempts']}, spooled {led['spooled']}",
                    flush=True,
                )  # fmt: skip
    finally:
        if cluster is not None:
            cluster.stop()
    print()
    print(markdown(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**info, "results": results}, indent=2) + "\n")
    ok = all(r["ledger"]["lost"] == 0 and r["ledger"]["duplicated"] == 0 and r["answered"] == r["expected"] for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
