"""The remote tier: litellm against a real OpenAI-compatible server on loopback, and
tiny local servers that misbehave on purpose (no answer, HTTP errors, nothing listening)."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
from conftest_models import loopback  # noqa: F401 - session fixture

from milliwatt._offline import import_litellm
from milliwatt.adapters import LiteLLMBackend
from milliwatt.errors import RemoteAuthError, RemoteBadRequest, RemoteRateLimited, RemoteTimeout, RemoteUnavailable
from milliwatt.evaluation.loopback import LoopbackServer, free_port
from milliwatt.model_tier import ModelTier
from milliwatt.testing import OpenAIStubServer
from milliwatt.types import Step

STEP = Step.create([{"role": "user", "content": "Say hello."}], options={"max_tokens": 12})


def _remote_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("milliwatt-remote")]


def _no_loop_thread_left() -> None:
    deadline = time.monotonic() + 10
    while _remote_threads() and time.monotonic() < deadline:
        gc.collect()  # a dropped backend is often in a cycle (an error's traceback holds its frames)
        time.sleep(0.05)
    assert not _remote_threads(), "a backend's loop thread outlived its test"


@pytest.fixture(autouse=True)
def no_loop_thread_outlives_its_test() -> None:
    """No backend loop thread from an earlier test is still running when a test starts (checked
    here, after every fixture of the earlier test, monkeypatch's undo included, has run): closed
    backends end theirs in ``aclose``, the others (most tests here drop theirs unclosed) once
    the backend is collected."""
    _no_loop_thread_left()


@pytest.fixture(autouse=True, scope="module")
def no_loop_thread_outlives_the_module() -> Iterator[None]:
    yield
    _no_loop_thread_left()


def backend(api_base: str, **kw: object) -> LiteLLMBackend:
    settings: dict = {"backoff_base_s": 0.001, "backoff_cap_s": 0.01, **kw}
    return LiteLLMBackend("openai/test", api_base=api_base, api_key="sk-test", **settings)


@asynccontextmanager
async def http_server(status: int | None, headers: str = "") -> AsyncIterator[tuple[str, list[float]]]:
    """A one-route HTTP server answering every request with ``status`` (None: never answers)
    and the extra ``headers`` ("Name: value\r\n" lines); ``hits`` holds each request's time."""
    hits: list[float] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
        await reader.readexactly(length)
        hits.append(time.monotonic())
        if status is None:
            await asyncio.sleep(3600)
        body = json.dumps({"error": {"message": f"provider says {status}", "type": "test_error", "code": status}}).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{headers}Connection: close\r\n\r\n".encode() + body
        )
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", hits
    finally:
        server.close()


@pytest.mark.asyncio(loop_scope="session")
async def test_completion_through_loopback(loopback: LoopbackServer) -> None:  # noqa: F811
    b = LiteLLMBackend(f"openai/{loopback.model}", api_base=loopback.api_base, api_key="sk-none", label="stand-in")
    c = await b.complete(STEP)
    assert c.message["role"] == "assistant" and c.message["content"].strip()
    assert c.input_tokens > 0 and c.output_tokens > 0
    assert c.cost_usd == 0.0 and c.label == "stand-in" and c.cpu_seconds is None


@pytest.mark.asyncio(loop_scope="session")
async def test_remote_tier_charges_an_estimate(loopback: LoopbackServer) -> None:  # noqa: F811
    b = LiteLLMBackend(f"openai/{loopback.model}", api_base=loopback.api_base, api_key="sk-none", energy_model="openai/gpt-4o")
    result = await ModelTier("remote", b).attempt(STEP)
    assert result.answered and result.signal is None
    assert result.energy.method == "estimate" and "gpt-4o" in result.energy.basis
    assert 0 < result.energy.low_wh <= result.energy.point_wh <= result.energy.high_wh


@pytest.mark.asyncio(loop_scope="session")
async def test_connection_refused_is_retried_then_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = import_litellm()

    calls = []
    real = litellm.acompletion

    async def counting(**kw: object) -> object:
        calls.append(1)
        return await real(**kw)

    monkeypatch.setattr(litellm, "acompletion", counting)
    with pytest.raises(RemoteUnavailable) as err:
        await backend(f"http://127.0.0.1:{free_port()}/v1", max_retries=2).complete(STEP)
    assert len(calls) == 3
    assert err.value.backend == "litellm" and err.value.model == "openai/test"


@pytest.mark.asyncio(loop_scope="session")
async def test_no_answer_times_out() -> None:
    async with http_server(None) as (api_base, hits):
        with pytest.raises(RemoteTimeout):
            await backend(api_base, timeout_s=0.5, max_retries=1).complete(STEP)
    assert len(hits) == 2  # one retry, and no hidden retries inside litellm or the OpenAI client


@pytest.mark.asyncio(loop_scope="session")
@pytest.mark.parametrize(
    ("status", "error", "attempts"),
    [(400, RemoteBadRequest, 1), (401, RemoteAuthError, 1), (429, RemoteRateLimited, 3), (503, RemoteUnavailable, 3)],
)
async def test_http_errors_are_typed_and_retried_only_when_useful(status: int, error: type, attempts: int) -> None:
    async with http_server(status) as (api_base, hits):
        with pytest.raises(error) as err:
            await backend(api_base, max_retries=2).complete(STEP)
    assert len(hits) == attempts
    assert f"provider says {status}" in str(err.value)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_rate_limits_retry_after_is_honoured() -> None:
    async with http_server(429, "Retry-After: 0.4\r\n") as (api_base, hits):
        with pytest.raises(RemoteRateLimited):
            await backend(api_base, max_retries=1, backoff_cap_s=5.0).complete(STEP)
    assert len(hits) == 2 and hits[1] - hits[0] >= 0.35  # the jitter alone waits at most 0.002 s


@pytest.mark.asyncio(loop_scope="session")
async def test_a_retry_after_beyond_the_cap_waits_only_the_cap() -> None:
    t0 = time.monotonic()
    async with http_server(429, "Retry-After: 120\r\n") as (api_base, hits):
        with pytest.raises(RemoteRateLimited):
            await backend(api_base, max_retries=1, backoff_cap_s=0.05).complete(STEP)
    assert len(hits) == 2 and time.monotonic() - t0 < 30


@pytest.mark.asyncio(loop_scope="session")
async def test_each_retry_is_logged_with_its_bounded_wait(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="milliwatt.remote")
    async with http_server(503) as (api_base, hits):
        with pytest.raises(RemoteUnavailable):
            await backend(api_base, max_retries=2).complete(STEP)
    lines = [r.getMessage() for r in caplog.records if r.name == "milliwatt.remote"]
    assert len(hits) == 3 and len(lines) == 2
    for n, line in enumerate(lines, 1):
        assert f"openai/test attempt {n} failed" in line and "provider says 503" in line
        assert float(line.rsplit("retrying in ", 1)[1].rstrip("s")) <= 0.01  # the cap


@pytest.mark.asyncio(loop_scope="session")
async def test_retries_run_through_tenacity(monkeypatch: pytest.MonkeyPatch) -> None:
    """The retry loop is tenacity's, with its full-jitter wait (not a hand-written loop)."""
    import tenacity
    from milliwatt.adapters import litellm_backend

    made = []
    real = litellm_backend.AsyncRetrying

    def recording(*args: object, **kw: object) -> tenacity.AsyncRetrying:
        made.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(litellm_backend, "AsyncRetrying", recording)
    async with http_server(503) as (api_base, hits):
        with pytest.raises(RemoteUnavailable):
            await backend(api_base, max_retries=1).complete(STEP)
    assert len(made) == 1 and len(hits) == 2
    assert isinstance(made[0]["stop"], tenacity.stop_after_attempt) and made[0]["stop"].max_attempt_number == 2


REQUEST_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_tag", default=None)


@pytest.mark.asyncio(loop_scope="session")
async def test_calls_run_on_one_background_loop_shared_by_concurrent_steps(monkeypatch: pytest.MonkeyPatch) -> None:
    """litellm's call and the ``Completion`` are made on the backend's own loop, in one daemon
    thread shared by concurrent steps; ``aclose`` ends it and closes litellm's clients on it."""
    litellm = import_litellm()
    caller = (threading.current_thread(), asyncio.get_running_loop())
    seen: list[tuple[threading.Thread, asyncio.AbstractEventLoop, str | None]] = []
    real = litellm.acompletion

    async def recording(**kw: object) -> object:
        seen.append((threading.current_thread(), asyncio.get_running_loop(), REQUEST_TAG.get()))
        return await real(**kw)

    monkeypatch.setattr(litellm, "acompletion", recording)
    async with OpenAIStubServer("Hello.", delay_s=0.5) as stub:
        b = LiteLLMBackend("openai/stub", api_base=stub.api_base, api_key="stand-in", max_retries=0)
        built: list[threading.Thread] = []
        completion = b._completion

        def building(*args: object) -> object:
            built.append(threading.current_thread())
            return completion(*args)

        b._completion = building  # type: ignore[method-assign]
        REQUEST_TAG.set("from the caller")
        t0 = time.monotonic()
        answers = await asyncio.gather(*(b.complete(STEP) for _ in range(8)))
        elapsed = time.monotonic() - t0
        assert [a.message["content"] for a in answers] == ["Hello."] * 8 and stub.requests == 8
        assert elapsed < 2.5  # concurrent on that loop (one after the other: 4 s)

        threads = {t for t, _, _ in seen} | set(built)
        loops = {loop for _, loop, _ in seen}
        assert len(threads) == 1 and len(loops) == 1 and len(built) == 8
        (thread,), (loop,) = threads, loops
        assert thread is not caller[0] and loop is not caller[1]
        assert thread.daemon and _remote_threads() == [thread]
        assert {tag for _, _, tag in seen} == {"from the caller"}  # the caller's context goes along

        clients = {k: v for k, v in litellm.in_memory_llm_clients_cache.cache_dict.items() if "api_base=" + stub.api_base in k}
        assert clients  # the OpenAI client litellm made on the backend's loop
        await b.aclose()
        assert not thread.is_alive() and loop.is_closed()
        assert not set(clients) & set(litellm.in_memory_llm_clients_cache.cache_dict)
        assert all(c.is_closed() for c in clients.values())

        # used again after aclose: a new thread, closed again
        assert (await b.complete(STEP)).message["content"] == "Hello."
        assert len(_remote_threads()) == 1 and _remote_threads()[0] is not thread
        await b.aclose()
        assert not _remote_threads()


@pytest.mark.asyncio(loop_scope="session")
async def test_cancelling_the_caller_cancels_the_call_on_the_backends_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = import_litellm()
    started = threading.Event()
    remote: dict[str, object] = {}
    real = litellm.acompletion

    async def recording(**kw: object) -> object:
        remote["task"] = asyncio.current_task()
        started.set()
        try:
            return await real(**kw)
        except asyncio.CancelledError:
            remote["cancelled_inside"] = True  # the HTTP request itself was interrupted
            raise

    monkeypatch.setattr(litellm, "acompletion", recording)
    async with OpenAIStubServer("Too late.", delay_s=5.0) as stub:
        b = LiteLLMBackend("openai/stub", api_base=stub.api_base, api_key="stand-in", max_retries=0)
        t0 = time.monotonic()
        step = asyncio.create_task(b.complete(STEP))
        assert await asyncio.to_thread(started.wait, 10)
        await asyncio.sleep(0.2)  # the request is on the wire, the stub holds the answer
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        task = remote["task"]
        assert isinstance(task, asyncio.Task)
        while not task.done() and time.monotonic() - t0 < 4:
            await asyncio.sleep(0.01)
        assert task.cancelled() and remote.get("cancelled_inside") is True
        assert time.monotonic() - t0 < 4 and stub.requests == 0  # before the stub ever answered
        await b.aclose()


@pytest.mark.asyncio(loop_scope="session")
async def test_a_typed_error_reaches_the_caller_as_raised_on_the_backends_loop() -> None:
    async with http_server(401) as (api_base, hits):
        b = backend(api_base, max_retries=2)
        with pytest.raises(RemoteAuthError) as err:
            await b.complete(STEP)
        await b.aclose()
    assert len(hits) == 1 and str(err.value).startswith("openai/test: ") and "provider says 401" in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # litellm's unredacted text is not chained


@pytest.mark.asyncio(loop_scope="session")
async def test_a_backend_dropped_without_aclose_ends_its_thread() -> None:
    async with OpenAIStubServer("Hello.") as stub:
        b = LiteLLMBackend("openai/stub", api_base=stub.api_base, api_key="stand-in", max_retries=0)
        await b.complete(STEP)
        (thread,) = _remote_threads()
        del b
        gc.collect()
        await asyncio.to_thread(thread.join, 10)
    assert not thread.is_alive()
