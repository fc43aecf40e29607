"""``create_app``: an OpenAI-compatible HTTP endpoint over one ``Milliwatt``, as an ASGI app.

Routes: ``POST /v1/chat/completions`` (tools, tool_choice, response_format, streaming),
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /health`` (no key needed). Built on
Starlette (no FastAPI: there is no schema to generate; the OpenAI request is validated by
``Step.create`` and ``openai_compat``), so any ASGI server runs it; ``milliwatt serve`` runs it
on uvicorn.

* **Identity**: ``X-Milliwatt-Session``, ``-Tenant``, ``-Agent``, ``-Run``, ``-User`` headers, else
  the body's ``metadata`` (``session_id``, ``tenant``, ``agent``, ``run_id``) and ``user``.
* **Keys**: with ``api_keys``, every ``/v1`` request needs ``Authorization: Bearer <key>``,
  compared in constant time; each key is registered with ``milliwatt.redaction``, so no log
  line, error text or ledger row carries it.
* **Disconnects**: a client that goes away mid-stream closes the ``StepStream`` (the step is
  recorded ``cancelled`` with its partial answer, the provider's stream or local decode
  stopped); one that goes away before a whole answer cancels the step (recorded ``cancelled``).
* **Shutdown**: the lifespan waits for the steps still being recorded, then (for an app that
  owns its ``Milliwatt``) closes it, so the ledger is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
from collections.abc import AsyncIterator, Callable, Collection
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ..client import Milliwatt
from ..errors import ConfigError
from ..redaction import MIN_SECRET_LENGTH, get_logger, register_secret
from ..streaming import StepStream
from . import openai_compat as oc
from .openai_compat import APIError

log = get_logger("milliwatt.serve")

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # base64 images make bodies large; OpenAI's own cap is of this order
_END = object()


class _Service:
    """What the routes share: the client, the keys, the streams still in flight."""

    def __init__(self, mw: Milliwatt | None, api_keys: Collection[str] | None, max_body_bytes: int) -> None:
        self.mw = mw
        self.keys: tuple[bytes, ...] | None = None
        if api_keys is not None:
            keys = [k.strip() for k in api_keys if k and k.strip()]
            if not keys:
                raise ConfigError("serve.api_keys", "authentication is on but no client key was given")
            for k in keys:
                if len(k) < MIN_SECRET_LENGTH:
                    # A key this short could not be redacted without garbling ordinary words.
                    raise ConfigError("serve.api_keys", f"a client key must have at least {MIN_SECRET_LENGTH} characters")
                register_secret(k)
            self.keys = tuple(k.encode() for k in keys)
        self.max_body_bytes = max_body_bytes
        self.tasks: set[asyncio.Task[Any]] = set()

    def client(self) -> Milliwatt:
        if self.mw is None:
            raise APIError(503, "milliwatt is starting or stopping.", type="server_error", code="unavailable")
        return self.mw

    def check_key(self, request: Request) -> None:
        if self.keys is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "You didn't provide an API key. You need to provide your API key in an Authorization header "
                                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).")  # fmt: skip
        given = token.encode()
        ok = False
        for key in self.keys:  # every key compared, in constant time: no early exit to time
            ok |= hmac.compare_digest(given, key)
        if not ok:
            # OpenAI echoes a masked key; this never echoes any part of it.
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def track(self, task: asyncio.Task[Any]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def model_ids(self) -> list[str]:
        ids = ["milliwatt"]
        if self.mw is not None:
            frontier = self.mw.cascade.frontier_model
            ids += [m for m in dict.fromkeys([frontier, frontier.split("/", 1)[-1]]) if m not in ids]
        return ids


def create_app(
    mw: Milliwatt,
    *,
    api_keys: Collection[str] | None = None,
    close_on_shutdown: bool = False,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> Starlette:
    """The endpoint over ``mw``. ``api_keys``: the client keys accepted (None: no authentication).
    ``close_on_shutdown``: the lifespan closes ``mw`` (the app owns it, as ``milliwatt serve``'s does)."""
    return _build(_Service(mw, api_keys, max_body_bytes), opener=None, close=close_on_shutdown)


def create_app_from_config(
    config: Any = None, *, api_keys: Collection[str] | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> Starlette:
    """The endpoint over a ``Milliwatt`` the app opens from ``config`` at startup (off the event
    loop, ``Milliwatt.open``) and closes at shutdown, its ledger drained."""
    return _build(_Service(None, api_keys, max_body_bytes), opener=lambda: Milliwatt.open(config), close=True)


def _build(service: _Service, *, opener: Callable[[], Any] | None, close: bool) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if opener is not None:
            service.mw = await opener()
        try:
            yield
        finally:
            # Streams cut off by the shutdown are recorded before the ledger closes.
            for task in list(service.tasks):
                task.cancel()
            if service.tasks:
                await asyncio.gather(*service.tasks, return_exceptions=True)
            if close and service.mw is not None:
                mw, service.mw = service.mw, None
                await mw.aclose()

    async def chat_completions(request: Request) -> Response:
        service.check_key(request)
        mw = service.client()
        body = await _read_json(request, service.max_body_bytes)
        req = oc.parse_request(body, request.headers)
        if req.stream:
            return await _stream(service, mw, req, request)
        return await _complete(mw, req, request)

    async def models(request: Request) -> Response:
        service.check_key(request)
        return JSONResponse(oc.models_list(service.model_ids()))

    async def model(request: Request) -> Response:
        service.check_key(request)
        model_id = request.path_params["model"]
        if model_id not in service.model_ids():
            raise APIError(404, f"The model `{model_id}` does not exist or you do not have access to it.", code="model_not_found")
        return JSONResponse(oc.model_object(model_id))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok" if service.mw is not None else "starting"})

    routes = [
        Route("/v1/chat/completions", _guard(chat_completions), methods=["POST"]),
        Route("/v1/models", _guard(models), methods=["GET"]),
        Route("/v1/models/{model:path}", _guard(model), methods=["GET"]),
        Route("/health", _guard(health), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.milliwatt = service
    return app


# --------------------------------------------------------------------------- requests


async def _read_json(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _too_large(limit)
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise _too_large(limit)
    try:
        return json.loads(bytes(data))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "We could not parse the JSON body of your request. The API expects a JSON payload, "
                            "but what was sent was not valid JSON.") from None  # fmt: skip


def _too_large(limit: int) -> APIError:
    return APIError(413, f"The request body is larger than {limit} bytes.", code="request_too_large")


def _step_headers(result: Any) -> dict[str, str]:
    return {"X-Milliwatt-Tier": result.tier, "X-Milliwatt-Step": result.record.step_id}


async def _complete(mw: Milliwatt, req: oc.ChatRequest, request: Request) -> Response:
    """A whole answer; a client that goes away first cancels the step (recorded ``cancelled``)."""
    try:
        step = asyncio.ensure_future(mw.step(**req.kwargs))
    except Exception as e:  # noqa: BLE001 - mapped to OpenAI's error
        raise oc.error_for(e) from e
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({step, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not step.done():  # the client left, or this handler was cancelled
            step.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await step
        gone.cancel()
    if step.cancelled():
        return Response(status_code=499)  # nobody is listening; the step is in the ledger as cancelled
    e = step.exception()
    if e is not None:
        raise oc.error_for(e) from e
    result = step.result()
    return JSONResponse(oc.completion(req, result), headers=_step_headers(result))


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body was read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _stream(service: _Service, mw: Milliwatt, req: oc.ChatRequest, request: Request) -> Response:
    """Server-sent events. The step is read by its own task into a queue, so a client that
    goes away (the response cancelled) cancels that task once, and the cascade records the
    step ``cancelled`` undisturbed; a failure before the first chunk is an ordinary error."""
    try:
        stream = mw.stream(**req.kwargs)  # validates now: InvalidRequestError before any byte is sent
    except Exception as e:  # noqa: BLE001
        raise oc.error_for(e) from e
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=64)
    producer = asyncio.ensure_future(_produce(stream, queue))
    service.track(producer)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    first = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait({first, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not first.done():
            first.cancel()
            producer.cancel()
    if first.cancelled():
        return Response(status_code=499)
    item = first.result()
    if isinstance(item, BaseException):
        raise oc.error_for(item) from item
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if stream.result is not None:  # a whole answer (rules, cache, local): its tier is known already
        headers.update(_step_headers(stream.result))
    return _EventStream(_events(req, stream, queue, producer, item), producer, headers)


async def _produce(stream: StepStream, queue: asyncio.Queue[Any]) -> None:
    try:
        async for chunk in stream:
            await queue.put(chunk)
        await queue.put(_END)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # noqa: BLE001 - handed to the response, which maps it
        await queue.put(e)
    finally:
        await stream.aclose()  # cancelled at a put: the step is recorded cancelled here


async def _events(req: oc.ChatRequest, stream: StepStream, queue: asyncio.Queue[Any], producer: asyncio.Task[Any], item: Any) -> AsyncIterator[bytes]:
    try:
        while item is not _END:
            if isinstance(item, BaseException):
                # Chunks were sent already: OpenAI's way is an error event, and no [DONE].
                err = oc.error_for(item)
                log.warning("stream broke after it began: %s", err.message)
                yield _sse(err.body())
                return
            out = oc.chunk(req, item)
            if out is not None:
                yield _sse(out)
            item = await queue.get()
        if req.include_usage and stream.result is not None:
            yield _sse(oc.usage_chunk(req, stream.result))
        yield b"data: [DONE]\n\n"
    finally:
        if not producer.done():
            producer.cancel()


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class _EventStream(Response):
    """A ``text/event-stream`` response that stops as soon as the client disconnects, whatever
    the ASGI server's spec version (Starlette's ``StreamingResponse`` relies on a failing
    ``send`` under ASGI 2.4, which some servers never raise)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], producer: asyncio.Task[Any], headers: dict[str, str]) -> None:
        self.events = events
        self.producer = producer
        self.status_code = 200
        self.background = None
        self.init_headers(headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        sender = asyncio.ensure_future(self._send(send))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({sender, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, gone):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sender
            if not self.producer.done():  # the client left: the step is recorded cancelled
                self.producer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.shield(self.producer)
        if sender.done() and not sender.cancelled() and sender.exception() is not None:
            exc = sender.exception()
            if not isinstance(exc, OSError):
                raise exc

    async def _send(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for data in self.events:
                await send({"type": "http.response.body", "body": data, "more_body": True})
        finally:
            await self.events.aclose()  # type: ignore[attr-defined]
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# --------------------------------------------------------------------------- errors


def _guard(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """Every failure of a route answered in OpenAI's shape (Starlette's own 500 handler would
    re-raise the exception to the server after answering)."""

    async def guarded(request: Request) -> Response:
        try:
            return await handler(request)
        except Exception as e:  # noqa: BLE001 - an internal failure: 500, logged (redacted), its text kept from the client
            err = oc.error_for(e)
            if err.status == 500:
                cause = e.__cause__ if isinstance(e, APIError) and e.__cause__ is not None else e
                log.error("internal error answering %s %s", request.method, request.url.path, exc_info=cause)
            return _api_error(err)

    guarded.__name__ = handler.__name__
    return guarded


def _api_error(err: APIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers or None)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        err = APIError(404, f"Invalid URL ({where})")
    elif exc.status_code == 405:
        err = APIError(405, f"Method not allowed ({where})", headers=exc.headers)
    else:
        err = APIError(exc.status_code, str(exc.detail), headers=exc.headers)
    return _api_error(err)
