"""Test doubles shipped with the package (as pydantic-ai ships TestModel).

``ScriptedTier`` answers from a function of the step, so agent code can test its loop,
its tool handling and its ledger queries without loading any model.

``OpenAIStubServer`` is a stand-in for a remote provider: an OpenAI-compatible HTTP server
on 127.0.0.1 that answers every chat completion with one fixed message, or with a function
of the request (a scripted provider: a tool call first, then an answer from its result). It is not a model;
it exercises the real remote path (litellm, HTTP, JSON) in tests and benchmarks. Label the
remote tier ``stand-in`` when it points there.

``cosine_gate`` is a cache hit gate that serves any candidate at or above a cosine similarity,
templates included: for tests of what the cache's keys and templates do, apart from what a
calibrated gate would decide. It certifies nothing; never use it in service.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .energy import CpuTimer, cpu_energy
from .tier import Tier
from .types import Message, Step, StepRecord, TierResult


class ScriptedTier(Tier):
    """A tier whose answer is ``script(step)``: a message to answer, or None to pass.

    ``remembered`` records write-backs, so tests can assert what a cache would have stored.
    ``delay_s`` makes every attempt wait that long first (without blocking the event loop),
    to test timeouts, cancellation and what a caller does while a step is in flight.
    """

    def __init__(
        self,
        name: str,
        script: Callable[[Step], Message | None],
        *,
        token_budget: int | None = None,
        cacheable: bool = True,
        delay_s: float = 0.0,
    ) -> None:
        self.name = name
        self.script = script
        self.token_budget = token_budget
        self.cacheable = cacheable
        self.delay_s = delay_s
        self.seen: list[Step] = []
        self.remembered: list[tuple[Step, Message, str]] = []
        self.closed = False

    async def attempt(self, step: Step) -> TierResult:
        self.seen.append(step)
        if self.delay_s > 0:
            await asyncio.sleep(self.delay_s)
        timer = CpuTimer()
        with timer.measure():
            message = self.script(step)
        energy = cpu_energy(timer.seconds)
        if message is None:
            return TierResult.passed(self.name, "script passed", energy=energy)
        return TierResult(self.name, message, "script answered", energy, signal=1.0, model=f"scripted:{self.name}", cacheable=self.cacheable)

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        self.remembered.append((step, message, answered_by))

    async def aclose(self) -> None:
        self.closed = True


def cosine_gate(threshold: float, *, max_wrong: float = 1.0) -> Any:
    """A ``milliwatt.cache.HitGate`` that serves every candidate whose cosine similarity is at
    least ``threshold`` (templated ones too). Its score is 1.0 or 0.0; it certifies nothing.
    ``max_wrong`` is the bound it claims, which the cache's per-entry retirement reads."""
    from milliwatt.cache.evidence import EVIDENCE_VERSION, HitGate
    from milliwatt.calibration import LogisticScorer, Threshold

    # A steep logistic step at the threshold: score ~1 above it, ~0 below.
    scorer = LogisticScorer(("cosine", "templated"), (1e4, 0.0), -1e4 * threshold + 1e-6, (0.0, 0.0), (1.0, 1.0))
    certified = Threshold(0.5, 0, 0, 1.0, 0.0, max_wrong, 0.95)
    return HitGate(scorer, certified, EVIDENCE_VERSION, f"testing: cosine >= {threshold}, certifies nothing", "1970-01-01T00:00:00+00:00")


class RecordingSink:
    """A record sink (what the ledger is to the cascade) that keeps every record in memory."""

    def __init__(self) -> None:
        self.records: list[StepRecord] = []

    async def write(self, record: StepRecord) -> None:
        self.records.append(record)


class OpenAIStubServer:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 that answers ``reply``:
    a fixed text, or a function of the request body returning the assistant message (a
    remote stand-in, not a model). Usable as a context manager, sync or async::

        with OpenAIStubServer("Sure.") as srv:
            backend = LiteLLMBackend("openai/stub", api_base=srv.api_base, api_key="x", label="stand-in")

    ``delay_s`` delays each answer (a provider's latency); ``usage`` reports token counts
    estimated as characters / 4, as a provider would report its own. ``requests`` counts
    the completions served. Runs in daemon threads of this process; ``serve_forever`` runs
    it in the calling thread (for a separate process, so it shares no interpreter lock).
    """

    def __init__(
        self,
        reply: str | Callable[[dict[str, Any]], Message] = "Thanks, I have passed this on.",
        *,
        port: int = 0,
        delay_s: float = 0.0,
        model: str = "stub",
    ) -> None:
        self.reply = reply
        self.delay_s = delay_s
        self.model = model
        self.requests = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _send(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, {"object": "list", "data": [{"id": stub.model, "object": "model", "owned_by": "stub"}]})
                else:
                    self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                    return
                try:
                    request = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    self._send(400, {"error": {"message": "invalid JSON", "type": "invalid_request_error"}})
                    return
                if stub.delay_s > 0:
                    time.sleep(stub.delay_s)
                with stub._lock:
                    stub.requests += 1
                    n = stub.requests
                message = stub.reply(request) if callable(stub.reply) else {"role": "assistant", "content": stub.reply}
                prompt = max(1, len(json.dumps(request.get("messages", []))) // 4)
                completion = max(1, len(json.dumps(message)) // 4)
                finish = "tool_calls" if message.get("tool_calls") else "stop"
                self._send(
                    200,
                    {
                        "id": f"chatcmpl-stub-{n}",
                        "object": "chat.completion",
                        "created": int(time.time()),
                        "model": request.get("model") or stub.model,
                        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
                    },
                )

        return Handler

    def start(self) -> OpenAIStubServer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._server.serve_forever, name="openai-stub", daemon=True)
            self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._server.serve_forever()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> OpenAIStubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> OpenAIStubServer:
        return self.start()

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)
