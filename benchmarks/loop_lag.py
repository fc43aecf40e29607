"""Event-loop lag of one ``Milliwatt`` serving many concurrent agents.

64 agents (by default) step concurrently through rules -> the real cache (all-MiniLM-L6-v2 +
FAISS, in memory) -> a remote tier, on one event loop, with the real ledger (SQLite in a
temporary folder). A monitor task sleeps 5 ms at a time and records how late it wakes: the
event-loop lag, which every other coroutine of the process (an agent's tool calls, a web
server's requests) also suffers. Reported: lag p50/p99/max, steps per second, step latency
p50/p99, and which tier answered.

The remote is a STAND-IN: ``milliwatt.testing.OpenAIStubServer``, an OpenAI-compatible HTTP
server on 127.0.0.1 in a separate process, answering every chat completion with one fixed
message. The remote path is the real one (litellm, the OpenAI client, HTTP, JSON, on the
backend's own loop thread), the model is not; its energy is charged as openai/gpt-4o-mini and
labelled ``stand-in``. ``--remote http-caller-loop`` runs litellm on the agents' loop instead
(as before the backend had its thread), ``--remote inline`` takes litellm and HTTP out.

The workload: every agent shares a ~5k-token prelude (system prompt, 8 tool schemas, a past
exchange with a tool call). Even-numbered agents open a new ticket at every step (the prelude
plus one question: greetings and hand-offs hit rules, repeated questions hit the cache, new
ones go remote); odd-numbered agents hold one growing conversation (each answer and the next
question appended, so the cache partition is new at every step and the context grows).

Run: ``.venv/bin/python benchmarks/loop_lag.py`` (``--agents``, ``--steps``, ``--remote``,
``--gc-freeze``, ``--json OUT``).

benchmarks/load.py reuses the pieces (``build``, ``start_stub``, ``run_agents`` with its own
``script``, ``LagMonitor``) for its long multi-process run on PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from milliwatt.meters import cpu_model

RULES = """\
pack: bench
rules:
  - id: greeting
    when:
      regex: ^\\W*(?:hi|hello|hey)(?:\\s+there)?\\W*$
      flags: [IGNORECASE]
    reply: Hello! How can I help you today?
  - id: human
    when:
      keywords:
        any: ["talk to a human", "speak to a person", "real person"]
    reply: I'll connect you with a member of our support team.
"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{what} Use it only when the customer has given the identifier it needs; "
            "never guess identifiers, and confirm with the customer before any change.",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string", "description": "The order id, 4-12 digits, optionally with a letter prefix."},
                    "reason": {"type": "string", "enum": ["damaged", "late", "wrong_item", "other"]},
                    "note": {"type": "string", "description": "Free text for the warehouse team."},
                },
                "required": ["order_id"],
            },
        },
    }
    for name, what in [
        ("get_order", "Look up an order: items, status, carrier and tracking number."),
        ("cancel_order", "Cancel an order that has not shipped yet."),
        ("return_order", "Start a return for a delivered order and email a label."),
        ("refund_order", "Refund a returned or lost order to the original payment method."),
        ("update_address", "Change the delivery address of an order that has not shipped."),
        ("get_customer", "Look up the customer's account: name, email, addresses, loyalty tier."),
        ("list_orders", "List the customer's orders of the last 12 months."),
        ("escalate", "Hand the conversation to a human agent with a summary."),
    ]
]

POLICY = " ".join(
    f"Policy {i}: when a customer asks about topic {i}, check the order first, quote the relevant "
    f"clause of the terms ({i}.{i % 7}), never promise refunds outside the 30-day window, and be brief."
    for i in range(60)
)
PRELUDE = [
    {"role": "system", "content": f"You are Acme's support agent. Answer in two sentences at most. {POLICY}"},
    {"role": "user", "content": "Where is my order 48213? " + "I ordered it two weeks ago and it still has not arrived. " * 8},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "call_0", "type": "function", "function": {"name": "get_order", "arguments": '{"order_id": "48213"}'}}],
    },
    {
        "role": "tool",
        "tool_call_id": "call_0",
        "content": json.dumps(
            {
                "order_id": "48213",
                "status": "in transit",
                "carrier": "DHL",
                "tracking": "JD0146000033",
                "events": [{"at": f"2026-01-{d:02d}T10:00:00Z", "where": f"hub {d}", "what": "scanned"} for d in range(1, 40)],
            }
        ),
    },
    {"role": "assistant", "content": "Your order 48213 is in transit with DHL (tracking JD0146000033); it should arrive within 3 days."},
]

QUESTIONS = [
    "What is your return policy?",
    "How long does shipping take to Germany?",
    "Do you ship to Canada?",
    "How do I change my delivery address?",
    "Can I pay with PayPal?",
    "How do I reset my password?",
    "What are your opening hours?",
    "Is there a warranty on electronics?",
    "How do I use a discount code?",
    "Can I cancel an order after it ships?",
    "Do you offer gift wrapping?",
    "How do I unsubscribe from the newsletter?",
    "hi",
    "Can I talk to a human please?",
    "hello there",
    "I want to speak to a person about this",
]
REPLY = "Thanks for asking. Our team has noted this and the details are on our help page."


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def machine() -> dict[str, Any]:
    return {"nproc": os.cpu_count(), "cpu": cpu_model(), "python": platform.python_version()}


def start_stub(*, keep_calls: bool = True) -> tuple[subprocess.Popen[str], str]:
    """The stand-in remote in its own process (it must not share this interpreter's lock).
    ``keep_calls=False``: the server keeps only its last 16 requests (a long run would
    otherwise hold every request body in memory)."""
    forget = "" if keep_calls else "import collections\ns.calls = collections.deque(maxlen=16)\n"
    code = (
        "from milliwatt.testing import OpenAIStubServer as S\n"
        f"s = S({REPLY!r})\n{forget}print(s.port, flush=True)\ns.serve_forever()\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    return proc, f"http://127.0.0.1:{port}/v1"


class _InlineRemote:
    """``--remote inline``: no HTTP and no litellm, an answer after 2 ms (for attribution only)."""

    name = "remote"
    token_budget = None

    async def attempt(self, step: Any) -> Any:
        from milliwatt import Energy, TierResult

        await asyncio.sleep(0.002)
        return TierResult("remote", {"role": "assistant", "content": REPLY}, "inline", Energy.zero(), model="inline", label="stand-in")

    async def remember(self, *a: Any, **kw: Any) -> None:
        pass

    async def aclose(self) -> None:
        pass


def build(
    api_base: str,
    rules_path: str,
    ledger_url: str | None,
    remote_kind: str = "http",
    *,
    cache_path: str | None = None,
    cache_options: dict[str, Any] | None = None,
    spool: str | None = None,
) -> Any:
    """The benchmark's ``Milliwatt``: rules -> cache (in memory unless ``cache_path``; more
    ``CacheTier`` keywords in ``cache_options``) -> the remote; the ledger at ``ledger_url``
    (``spool``: its spool file) or none."""
    from milliwatt import Milliwatt
    from milliwatt.adapters.litellm_backend import LiteLLMBackend
    from milliwatt.cache import CacheTier
    from milliwatt.config import TrimSettings
    from milliwatt.model_tier import ModelTier
    from milliwatt.rules import RulesTier
    from milliwatt.trimming import DEFAULT_REMOTE, build_trimmer

    class CallerLoopBackend(LiteLLMBackend):
        """``--remote http-caller-loop``: litellm on the caller's loop, as before the backend had
        its own loop thread (for comparison only: it reaches into a private method)."""

        async def complete(self, step: Any, *, abort: Any = None) -> Any:
            return await self._complete(step)

    remote: Any = _InlineRemote()
    if remote_kind in ("http", "http-caller-loop"):
        backend = (LiteLLMBackend if remote_kind == "http" else CallerLoopBackend)(
            "openai/stub", api_base=api_base, api_key="stand-in", label="stand-in", energy_model="openai/gpt-4o-mini",
            max_retries=0, timeout_s=60,
        )  # fmt: skip
        remote = ModelTier("remote", backend)
    ledger = None
    if ledger_url:
        from milliwatt.ledger import Ledger

        ledger = Ledger(ledger_url, spool=spool)
    tiers = [RulesTier([rules_path]), CacheTier(path=cache_path, **(cache_options or {})), remote]
    # The remote tier's default trimming, as Milliwatt.from_config builds it (docs/trimming.md).
    trimmers = {"remote": build_trimmer(DEFAULT_REMOTE, TrimSettings())}
    return Milliwatt(tiers, frontier_model="openai/gpt-4o", ledger=ledger, trimmers=trimmers)


class LagMonitor:
    """Sleeps ``period`` seconds at a time and records how late it wakes: the event-loop lag.
    ``start()`` on the loop to watch, ``await stop()``; ``lags`` in seconds, ``summary()`` in ms."""

    def __init__(self, period: float = 0.005) -> None:
        self.period = period
        self.lags: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(self.period)
            self.lags.append(max(0.0, time.perf_counter() - t - self.period))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def summary(self) -> dict[str, float]:
        lags = self.lags or [0.0]
        return {"p50": round(_pct(lags, 0.5) * 1e3, 2), "p99": round(_pct(lags, 0.99) * 1e3, 2), "max": round(max(lags) * 1e3, 2), "samples": len(self.lags)}


# A script drives one agent: ``script(a, steps)`` is a generator that yields
# ``(messages, session_id)`` for each step and is sent the answered message back.
Script = Callable[[int, int], Generator[tuple[list[dict[str, Any]], str], Any, None]]


def ticket_script(a: int, steps: int) -> Generator[tuple[list[dict[str, Any]], str], Any, None]:
    """This benchmark's workload: even agents open a new ticket per step (the prelude plus one
    question), odd agents grow one conversation for all their steps."""
    history = list(PRELUDE)
    for s in range(steps):
        question = QUESTIONS[(a * 5 + s * 7) % len(QUESTIONS)]
        if a % 2 == 0:
            messages = [*PRELUDE, {"role": "user", "content": question}]
        else:
            history.append({"role": "user", "content": f"{question} (about my order {48213 + a})"})
            messages = history
        message = yield messages, f"agent-{a}"
        if a % 2 == 1:
            history.append(message)


async def run_agents(
    mw: Any,
    agents: int,
    steps: int,
    *,
    script: Script = ticket_script,
    tools: list[dict[str, Any]] = TOOLS,
    keep_latencies: bool = False,
    first: int = 0,
) -> dict[str, Any]:
    """``agents`` concurrent agents (numbered from ``first``), each stepping ``steps`` times
    through ``mw`` as ``script`` says, while a ``LagMonitor`` watches the loop.
    ``keep_latencies``: the result also holds every step's latency (``latencies_s``)."""
    latencies: list[float] = []
    tiers: dict[str, int] = {}

    async def agent(a: int) -> None:
        turns = script(a, steps)
        try:
            messages, session = next(turns)
            while True:
                t = time.perf_counter()
                result = await mw.step(messages, tools=tools, session_id=session, agent="support", tenant="acme")
                latencies.append(time.perf_counter() - t)
                tiers[result.tier] = tiers.get(result.tier, 0) + 1
                messages, session = turns.send(result.message)
        except StopIteration:
            pass

    monitor = LagMonitor()
    monitor.start()
    t0, started = time.perf_counter(), time.time()
    await asyncio.gather(*(agent(a) for a in range(first, first + agents)))
    wall = time.perf_counter() - t0
    ended = time.time()
    await monitor.stop()
    n = len(latencies)  # steps answered (agents * steps unless a script stops early)
    out = {
        "agents": agents,
        "steps": n,
        "wall_s": round(wall, 2),
        "steps_per_s": round(n / wall, 1),
        "loop_lag_ms": monitor.summary(),
        "step_latency_ms": {"p50": round(_pct(latencies, 0.5) * 1e3, 1), "p99": round(_pct(latencies, 0.99) * 1e3, 1)},
        "tiers": dict(sorted(tiers.items())),
    }
    if keep_latencies:
        out.update(latencies_s=latencies, lags_s=monitor.lags, started=started, ended=ended)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    proc, api_base = start_stub()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            rules_path = str(Path(tmp) / "bench_rules.yaml")
            Path(rules_path).write_text(RULES)
            ledger_url = None if args.no_ledger else f"sqlite:///{tmp}/ledger.db"
            mw = await asyncio.to_thread(build, api_base, rules_path, ledger_url, args.remote)
            try:
                # Warm-up, not measured: MiniLM, litellm, tiktoken and EcoLogits load on first use.
                for q in ("hi", "What is a warm-up question?", "What is a warm-up question?"):
                    await mw.step([*PRELUDE, {"role": "user", "content": q}], tools=TOOLS, tenant="warmup")
                if args.gc_freeze:
                    gc.collect()
                    gc.freeze()
                result = await run_agents(mw, args.agents, args.steps)
            finally:
                await mw.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    result.update(
        date=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        machine=machine(),
        ledger="sqlite (temporary file)" if not args.no_ledger else "none",
        gc_freeze=bool(args.gc_freeze),
        command="benchmarks/loop_lag.py " + " ".join(sys.argv[1:]),
        remote={
            "http": "stand-in: OpenAI-compatible stub on 127.0.0.1 (separate process), fixed reply, through litellm "
            "on the backend's own loop thread",
            "http-caller-loop": "stand-in, as http, but litellm on the caller's event loop (comparison run)",
            "inline": "inline: no HTTP, no litellm (attribution run)",
        }[args.remote],
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20, help="steps per agent")
    parser.add_argument("--no-ledger", action="store_true", help="no ledger (default: SQLite in a temporary folder)")
    parser.add_argument(
        "--remote",
        choices=("http", "http-caller-loop", "inline"),
        default="http",
        help="http (default): litellm to the stand-in server, on the backend's own loop thread; "
        "http-caller-loop: the same with litellm on the caller's loop (as before that thread); inline: a tier "
        "answering after 2 ms with no HTTP and no litellm, to see how much of the lag is the remote client's",
    )
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after the warm-up: the ~900k objects of torch, transformers and litellm leave the "
        "collector's view, so a full collection no longer scans them (see docs/benchmarks.md)",
    )
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
