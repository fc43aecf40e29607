"""Test doubles shipped with the package (as pydantic-ai ships TestModel).

``ScriptedTier`` answers from a function of the step, so agent code can test its loop,
its tool handling and its ledger queries without loading any model.

``OpenAIStubServer`` is a stand-in for a remote provider: an OpenAI-compatible HTTP server
on 127.0.0.1 that answers every chat completion with one fixed message, or with a function
of the request (a scripted provider: a tool call first, then an answer from its result). It is not a model;
it exercises the real remote path (litellm, HTTP, JSON) in tests and benchmarks. Label the
remote tier ``stand-in`` when it points there. It streams (server-sent events) when asked, and
can be told to fail (``Scripted``): HTTP errors with Retry-After, slow answers, streams cut or
corrupted part-way, so retries, timeouts, fallbacks and broken streams are tested over real HTTP.

``cosine_gate`` is a cache hit gate that serves any candidate at or above a cosine similarity,
templates included: for tests of what the cache's keys and templates do, apart from what a
calibrated gate would decide. It certifies nothing; never use it in service.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
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


@dataclass
class Scripted:
    """What ``OpenAIStubServer`` does with a request, instead of answering it normally: a
    provider misbehaving on purpose. Queue some with ``stub.script(...)``; each applies to the
    next ``times`` requests (None: every one) for ``model`` (None: any model; else the model
    name the provider sees, ``"b"`` for litellm's ``"openai/b"``), then the stub answers again.

    - ``status``: an HTTP error (429, 500, 503, 401...) with an OpenAI-style error body
      carrying ``message``; ``retry_after`` sets the Retry-After header; ``echo_key`` quotes
      the request's Authorization header in the message, as some providers do.
    - ``delay_s``: wait before answering (a slow provider: timeouts).
    - streamed answers (``stream: true``): ``cut_after`` closes the connection after that many
      chunks (a dropped connection: the chunked body ends unfinished); ``malformed_after``
      sends a chunk that is not JSON after that many; ``chunk_delay_s`` waits between chunks.
    """

    status: int = 200
    message: str = "the stub was told to fail"
    retry_after: float | str | None = None
    echo_key: bool = False
    delay_s: float = 0.0
    cut_after: int | None = None
    malformed_after: int | None = None
    chunk_delay_s: float | None = None
    model: str | None = None
    times: int | None = 1


class _Server(ThreadingHTTPServer):
    # Many agents at once (hundreds of concurrent steps): the default backlog of 5 makes the
    # kernel drop connections, which then wait seconds to be retried.
    request_queue_size = 1024


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

    A request with ``stream: true`` is answered as server-sent events over a chunked body,
    as OpenAI streams: a role chunk, the content a word at a time, each tool call's name and
    then its arguments in pieces, a chunk with the ``finish_reason``, a usage chunk when the
    request asks for one (``stream_options.include_usage``; ``stream_usage=False``: never, as
    providers without it), then ``data: [DONE]``. The same answer streamed or not has the same
    usage. ``script(Scripted(...))`` makes the next requests fail (``Scripted``); ``calls``
    lists every request as ``{"model", "stream", "status", "chunks", "body", "headers"}``
    (``chunks``: how many were sent, for a streamed answer; ``body``: the JSON request;
    ``headers``: its HTTP headers, names in lower case).
    """

    def __init__(
        self,
        reply: str | Callable[[dict[str, Any]], Message] = "Thanks, I have passed this on.",
        *,
        port: int = 0,
        delay_s: float = 0.0,
        model: str = "stub",
        chunk_delay_s: float = 0.0,
        stream_usage: bool = True,
    ) -> None:
        self.reply = reply
        self.delay_s = delay_s
        self.model = model
        self.chunk_delay_s = chunk_delay_s
        self.stream_usage = stream_usage
        self.requests = 0
        self.calls: list[dict[str, Any]] = []
        self._scripts: list[Scripted] = []
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", port), self._handler())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *scripted: Scripted) -> OpenAIStubServer:
        """Queue misbehaviours: each request takes the first queued one for its model."""
        with self._lock:
            self._scripts.extend(replace(s) for s in scripted)
        return self

    def _take(self, model: str | None) -> Scripted | None:
        with self._lock:
            for s in self._scripts:
                if s.model is None or s.model == model:
                    if s.times is not None:
                        s.times -= 1
                        if s.times <= 0:
                            self._scripts.remove(s)
                    return s
        return None

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as clients pool connections

            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def handle(self) -> None:
                try:
                    super().handle()
                except (ConnectionResetError, BrokenPipeError):  # the client went away: nothing to answer
                    pass

            def _send(self, code: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
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
                model, stream = request.get("model"), bool(request.get("stream"))
                call: dict[str, Any] = {"model": model, "stream": stream, "status": 200, "chunks": 0,
                                        "body": request, "headers": {k.lower(): v for k, v in self.headers.items()}}
                with stub._lock:
                    stub.calls.append(call)
                scripted = stub._take(model) or Scripted()
                delay = scripted.delay_s or stub.delay_s
                if delay > 0:
                    time.sleep(delay)
                if scripted.status != 200:
                    call["status"] = scripted.status
                    text = scripted.message
                    if scripted.echo_key:
                        text += f" (you sent: {self.headers.get('Authorization')})"
                    headers = {} if scripted.retry_after is None else {"Retry-After": str(scripted.retry_after)}
                    body = {"error": {"message": text, "type": "stub_error", "code": scripted.status}}
                    self._send(scripted.status, body, headers)
                    return
                with stub._lock:
                    stub.requests += 1
                    n = stub.requests
                message = stub.reply(request) if callable(stub.reply) else {"role": "assistant", "content": stub.reply}
                prompt = max(1, len(json.dumps(request.get("messages", []))) // 4)
                completion = max(1, len(json.dumps(message)) // 4)
                usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
                finish = "tool_calls" if message.get("tool_calls") else "stop"
                head = {"id": f"chatcmpl-stub-{n}", "created": int(time.time()), "model": model or stub.model}
                if not stream:
                    choice = {"index": 0, "message": message, "finish_reason": finish}
                    self._send(200, {**head, "object": "chat.completion", "choices": [choice], "usage": usage})
                    return
                with_usage = stub.stream_usage and bool((request.get("stream_options") or {}).get("include_usage"))
                chunks = [{**head, "object": "chat.completion.chunk", "choices": [c]} for c in _choice_deltas(message, finish)]
                if with_usage:
                    chunks.append({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
                try:
                    self._stream(chunks, scripted, call)
                except (BrokenPipeError, ConnectionResetError):  # the client went away (cancelled)
                    self.close_connection = True

            def _stream(self, chunks: list[dict[str, Any]], scripted: Scripted, call: dict[str, Any]) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                pause = stub.chunk_delay_s if scripted.chunk_delay_s is None else scripted.chunk_delay_s

                def send(data: bytes) -> None:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()

                for i, chunk in enumerate(chunks):
                    if i == scripted.cut_after:  # dropped: the chunked body never ends
                        self.close_connection = True
                        return
                    if i == scripted.malformed_after:
                        send(b'data: {"id": "chatcmpl-stub", "choices": [{"delta": {"content": \n\n')
                        call["chunks"] += 1
                        continue
                    send(f"data: {json.dumps(chunk)}\n\n".encode())
                    call["chunks"] += 1
                    if pause > 0:
                        time.sleep(pause)
                send(b"data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

        return Handler

    def start(self) -> OpenAIStubServer:
        if self._thread is None:
            # A short poll, so ``stop`` returns at once (the default waits up to 0.5 s).
            self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="openai-stub", daemon=True)
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


def _choice_deltas(message: Message, finish: str) -> list[dict[str, Any]]:
    """A message as OpenAI streams it: the role, the content a word at a time, each tool
    call's id and name and then its arguments in pieces of 8 characters, the finish."""
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
    deltas += [{"content": word} for word in re.findall(r"\s*\S+\s*", message.get("content") or "")]
    for i, call in enumerate(message.get("tool_calls") or []):
        fn = call.get("function") or {}
        deltas.append({"tool_calls": [{"index": i, "id": call.get("id"), "type": "function",
                                       "function": {"name": fn.get("name"), "arguments": ""}}]})  # fmt: skip
        args = fn.get("arguments") or ""
        deltas += [{"tool_calls": [{"index": i, "function": {"arguments": args[k : k + 8]}}]} for k in range(0, len(args), 8)]
    choices = [{"index": 0, "delta": d, "finish_reason": None} for d in deltas]
    choices.append({"index": 0, "delta": {}, "finish_reason": finish})
    return choices
