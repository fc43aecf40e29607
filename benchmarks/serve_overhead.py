"""What ``milliwatt serve`` adds to a step: HTTP endpoint vs a direct ``await mw.step`` (docs/benchmarks.md).

    .venv/bin/python benchmarks/serve_overhead.py [--json serve.json] [--clients 64] [--requests 20]

Same configuration both ways: a rules tier with a small pack, then the remote tier through
litellm to ``milliwatt.testing.OpenAIStubServer`` (its own process, loopback; a stand-in, no
model). Two workloads: ``rules`` (every step answered by a rule: the endpoint's overhead is
most of the latency) and ``remote`` (every step passes the rules and goes to the stub over
HTTP). For each, ``--clients`` concurrent agents send ``--requests`` steps each:

* direct: asyncio tasks sharing one ``Milliwatt`` in this process, ``await mw.step(...)``;
* http: the real ``milliwatt serve`` command (uvicorn, a separate process, client keys on),
  one ``httpx.AsyncClient`` per agent in this process, ``POST /v1/chat/completions``.

Per-request wall time, p50 / p95 / mean, and the overhead (http minus direct, at p50 and at
p95). Rounds alternate direct and http so drift hits both. Everything on this machine's
cores, loopback: the client, the server and the stub compete for them, as on one host.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

KEY = "mw-bench-client-key-5d1e9a7c"
PACK = """\
pack: bench
version: 1
rules:
  - id: opening-hours
    when:
      regex: \\bopening hours\\b
      flags: [IGNORECASE]
    reply: We are open 9:00-17:00, Monday to Friday.
"""
WORKLOADS = {
    "rules": [{"role": "system", "content": "You are a support agent."}, {"role": "user", "content": "What are your opening hours?"}],
    "remote": [{"role": "system", "content": "You are a support agent."}, {"role": "user", "content": "My parcel arrived damaged, what now?"}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def summary(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": pct(ms, 0.50), "p95_ms": pct(ms, 0.95), "mean_ms": statistics.fmean(ms)}


async def run_clients(clients: int, requests: int, one) -> tuple[list[float], float]:
    """``clients`` agents, each sending ``requests`` steps one after another; the latencies (ms)."""
    latencies: list[float] = []

    async def agent(i: int) -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            await one(i)
            latencies.append((time.perf_counter() - t0) * 1000)

    t0 = time.perf_counter()
    await asyncio.gather(*(agent(i) for i in range(clients)))
    return latencies, time.perf_counter() - t0


async def direct(mw, workload: str, clients: int, requests: int) -> tuple[list[float], float]:
    messages = WORKLOADS[workload]
    expected = "rules" if workload == "rules" else "remote"

    async def one(i: int) -> None:
        result = await mw.step(messages, session_id=f"direct-{i}")
        assert result.tier == expected, result.tier

    return await run_clients(clients, requests, one)


async def http(base: str, workload: str, clients: int, requests: int) -> tuple[list[float], float]:
    body = {"model": "gpt-4o", "messages": WORKLOADS[workload]}
    expected = "rules" if workload == "rules" else "remote"
    pool = [httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {KEY}", "X-Milliwatt-Session": f"http-{i}"},
                              timeout=60) for i in range(clients)]  # fmt: skip

    async def one(i: int) -> None:
        r = await pool[i].post("/chat/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-milliwatt-tier"] == expected
        r.json()

    try:
        return await run_clients(clients, requests, one)
    finally:
        await asyncio.gather(*(c.aclose() for c in pool))


async def main_async(args: argparse.Namespace, work: Path) -> dict:
    from milliwatt import Milliwatt

    stub_port, serve_port = free_port(), free_port()
    (work / "bench.yaml").write_text(PACK)
    config = {
        "frontier_model": "openai/gpt-4o",
        "tiers": ["rules", "remote"],
        "rules": {"packs": [str(work / "bench.yaml")], "reload": False},
        "remote": {"model": "openai/gpt-4o", "api_base": f"http://127.0.0.1:{stub_port}/v1", "api_key": "sk-bench-stub-0000000000",
                   "label": "stand-in", "max_retries": 0, "timeout_s": 30, "trim": []},
        "ledger": f"sqlite:///{work / 'direct.db'}",
    }  # fmt: skip
    served = {**config, "ledger": f"sqlite:///{work / 'served.db'}"}
    (work / "served.yaml").write_text(yaml.safe_dump(served))
    env = {**os.environ, "MW_BENCH_KEYS": KEY, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "HF_HUB_OFFLINE": "1"}
    stub = subprocess.Popen(
        [sys.executable, "-c", "import sys; from milliwatt.testing import OpenAIStubServer as S; "
         f"s = S(reply='Sorry to hear that: send us a photo and we will replace it.', port={stub_port}); "
         "s._server.socket.listen(1024); s.serve_forever()"],  # a backlog for 64 clients (http.server's is 5)
        env=env,
    )  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "milliwatt.cli", "serve", "--config", str(work / "served.yaml"), "--port", str(serve_port),
         "--api-keys-env", "MW_BENCH_KEYS", "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    out: dict = {"clients": args.clients, "requests_per_client": args.requests, "rounds": args.rounds,
                 "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}}  # fmt: skip
    try:
        wait_http(f"http://127.0.0.1:{stub_port}/v1/models")
        wait_http(f"http://127.0.0.1:{serve_port}/health")
        base = f"http://127.0.0.1:{serve_port}/v1"
        async with await Milliwatt.open(config) as mw:
            for workload in WORKLOADS:
                # Warm both paths (imports, connection pools, the stub's threads).
                await direct(mw, workload, args.clients, 2)
                await http(base, workload, args.clients, 2)
                lat: dict[str, list[float]] = {"direct": [], "http": []}
                wall: dict[str, float] = {"direct": 0.0, "http": 0.0}
                for _ in range(args.rounds):
                    ms, s = await direct(mw, workload, args.clients, args.requests)
                    lat["direct"] += ms
                    wall["direct"] += s
                    ms, s = await http(base, workload, args.clients, args.requests)
                    lat["http"] += ms
                    wall["http"] += s
                d, h = summary(lat["direct"]), summary(lat["http"])
                d["steps_per_s"] = d["n"] / wall["direct"]
                h["steps_per_s"] = h["n"] / wall["http"]
                out[workload] = {
                    "direct": d,
                    "http": h,
                    "overhead_p50_ms": h["p50_ms"] - d["p50_ms"],
                    "overhead_p95_ms": h["p95_ms"] - d["p95_ms"],
                    "overhead_mean_ms": h["mean_ms"] - d["mean_ms"],
                }
                print(f"{workload:6s}  direct p50 {d['p50_ms']:7.2f} ms  p95 {d['p95_ms']:7.2f} ms  ({d['steps_per_s']:.0f} steps/s)   "
                      f"http p50 {h['p50_ms']:7.2f} ms  p95 {h['p95_ms']:7.2f} ms  ({h['steps_per_s']:.0f} steps/s)   "
                      f"overhead p50 {out[workload]['overhead_p50_ms']:+.2f} ms  p95 {out[workload]['overhead_p95_ms']:+.2f} ms",
                      flush=True)  # fmt: skip
    finally:
        for p in (server, stub):
            p.terminate()
        for p in (server, stub):
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=64, help="concurrent agents (default 64)")
    ap.add_argument("--requests", type=int, default=20, help="steps each agent sends per round (default 20)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating direct/http rounds (default 2)")
    ap.add_argument("--json", dest="json_out", metavar="OUT", help="also write the figures as JSON")
    args = ap.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="mw-serve-bench-") as tmp:
        out = asyncio.run(main_async(args, Path(tmp)))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
