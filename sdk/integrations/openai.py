"""The OpenAI client as a drop-in: a real ``openai.AsyncOpenAI`` (or ``openai.OpenAI``) whose
HTTP requests go, in this process, to ``milliwatt serve``'s app over ``mw``.

    from milliwatt.integrations.openai import async_client
    client = async_client(mw, agent="support", tenant="acme")
    response = await client.chat.completions.create(model="milliwatt", messages=messages, tools=tools)

Nothing is mapped twice: the client is OpenAI's own, the app is the one ``milliwatt serve``
runs (``milliwatt.serve.create_app``), so every framework that takes an OpenAI client (the
OpenAI Agents SDK's ``OpenAIChatCompletionsModel``, pydantic-ai's ``OpenAIProvider``,
langchain-openai's ``ChatOpenAI``) gets OpenAI's types, tool calls with their ids, usage and
finish reasons exactly as the HTTP API returns them. No socket is opened: the transport
hands each request to the app as an ASGI call (``httpx2.ASGITransport``).

Identity: ``session_id``, ``run_id``, ``tenant``, ``agent`` and ``user`` given here are sent as
the ``X-Milliwatt-*`` headers of every request; per call, pass ``extra_headers`` (e.g.
``{"X-Milliwatt-Session": "s-2"}``) or ``metadata={"session_id": ...}`` and ``user=``.
Which tier answered is in the response's headers (``with_raw_response``) and the ledger.

``model`` is the request's own name: the cascade decides who answers. Streaming
(``stream=True``) works; the in-process transport hands the stream over once the step has
ended (the chunks are OpenAI's, but arrive together).

The sync ``client(mw)`` runs the app on an event loop of its own, in a daemon thread: each
request blocks the calling thread until the step is answered. ``mw`` must then be used from
that client only (its tiers and ledger serve one event loop at a time); close the client
(``client.close()``) to end the thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import httpx2
import openai

if TYPE_CHECKING:
    from milliwatt.client import Milliwatt

BASE_URL = "http://milliwatt.invalid/v1"
API_KEY = "milliwatt"  # the in-process app takes any key unless api_keys are set

_HEADERS = {
    "session_id": "X-Milliwatt-Session",
    "run_id": "X-Milliwatt-Run",
    "tenant": "X-Milliwatt-Tenant",
    "agent": "X-Milliwatt-Agent",
    "user": "X-Milliwatt-User",
}


def identity_headers(
    *, session_id: str | None = None, run_id: str | None = None, tenant: str | None = None, agent: str | None = None, user: str | None = None
) -> dict[str, str]:
    """The ``X-Milliwatt-*`` headers that name who is asking (for ``extra_headers`` or ``default_headers``)."""
    values = {"session_id": session_id, "run_id": run_id, "tenant": tenant, "agent": agent, "user": user}
    return {_HEADERS[k]: str(v) for k, v in values.items() if v is not None}


def app_for(mw: Milliwatt, **kw: Any) -> Any:
    """``milliwatt serve``'s ASGI app over ``mw`` (``milliwatt.serve.create_app``)."""
    from milliwatt.serve import create_app

    return create_app(mw, **kw)


def async_http_client(mw: Milliwatt, *, app: Any = None) -> httpx2.AsyncClient:
    """An ``httpx2.AsyncClient`` that sends every request to ``mw``'s in-process app (for
    clients that take an HTTP client rather than an OpenAI client)."""
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app or app_for(mw)), base_url=BASE_URL, timeout=None)


def http_client(mw: Milliwatt, *, app: Any = None) -> httpx2.Client:
    """The sync twin of ``async_http_client``: requests are answered on an event loop in a
    daemon thread (``LoopTransport``)."""
    return httpx2.Client(transport=LoopTransport(app or app_for(mw)), base_url=BASE_URL, timeout=None)


def _client_kwargs(
    identity: Mapping[str, str | None], default_headers: Mapping[str, str] | None, kw: dict[str, Any]
) -> dict[str, Any]:
    headers = {**identity_headers(**identity), **dict(default_headers or {})}
    kw.setdefault("api_key", API_KEY)
    kw.setdefault("base_url", BASE_URL)
    kw.setdefault("max_retries", 0)  # the cascade retries its provider itself
    return {**kw, "default_headers": headers}


def async_client(
    mw: Milliwatt,
    *,
    session_id: str | None = None,
    run_id: str | None = None,
    tenant: str | None = None,
    agent: str | None = None,
    user: str | None = None,
    default_headers: Mapping[str, str] | None = None,
    **kw: Any,
) -> openai.AsyncOpenAI:
    """A real ``openai.AsyncOpenAI`` answered in-process by ``mw`` (see the module's docstring).
    Other keyword arguments go to ``openai.AsyncOpenAI`` (``timeout``, ``max_retries``...)."""
    identity = {"session_id": session_id, "run_id": run_id, "tenant": tenant, "agent": agent, "user": user}
    return openai.AsyncOpenAI(http_client=async_http_client(mw), **_client_kwargs(identity, default_headers, kw))


def client(
    mw: Milliwatt,
    *,
    session_id: str | None = None,
    run_id: str | None = None,
    tenant: str | None = None,
    agent: str | None = None,
    user: str | None = None,
    default_headers: Mapping[str, str] | None = None,
    **kw: Any,
) -> openai.OpenAI:
    """A real ``openai.OpenAI`` answered in-process by ``mw``, for sync code (see the module's
    docstring). Close it to end its event loop's thread."""
    identity = {"session_id": session_id, "run_id": run_id, "tenant": tenant, "agent": agent, "user": user}
    return openai.OpenAI(http_client=http_client(mw), **_client_kwargs(identity, default_headers, kw))


class LoopTransport(httpx2.BaseTransport):
    """A sync transport over an ASGI app: each request is sent through an
    ``httpx2.ASGITransport`` on an event loop that runs in a daemon thread of its own, and
    the calling thread waits for the answer. ``close`` stops the loop."""

    def __init__(self, app: Any) -> None:
        self._transport = httpx2.ASGITransport(app=app)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="milliwatt-openai-sync", daemon=True)
        self._lock = threading.Lock()

    def _running(self) -> asyncio.AbstractEventLoop:
        """The loop, its thread started on first use (a client built and never used costs no thread)."""
        with self._lock:
            if self._loop.is_closed():
                raise RuntimeError("this client is closed")
            if not self._thread.is_alive():
                self._thread.start()
        return self._loop

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        future = asyncio.run_coroutine_threadsafe(self._send(request.method, request.url, request.headers, body), self._running())
        status, headers, content = future.result()
        return httpx2.Response(status, headers=headers, content=content, request=request)

    async def _send(self, method: str, url: httpx2.URL, headers: httpx2.Headers, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        request = httpx2.Request(method, url, headers=headers, content=body)
        response = await self._transport.handle_async_request(request)
        try:
            content = await response.aread()
        finally:
            await response.aclose()
        # The body is read whole here: the decoded length no longer matches an encoded one.
        headers_out = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in ("content-encoding", "content-length", "transfer-encoding")]
        return response.status_code, headers_out, content

    def close(self) -> None:
        with self._lock:
            if self._loop.is_closed():
                return
            if self._thread.is_alive():
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join(timeout=5)
            if not self._thread.is_alive():
                self._loop.close()

    def run(self, coro: Any) -> Any:
        """Run ``coro`` on this transport's loop (where ``mw`` serves) and wait for it: e.g.
        ``transport.run(mw.aclose())`` before ``close``."""
        return asyncio.run_coroutine_threadsafe(coro, self._running()).result()
