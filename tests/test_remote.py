"""The remote tier: litellm against a real OpenAI-compatible server on loopback, and
tiny local servers that misbehave on purpose (no answer, HTTP errors, nothing listening)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from conftest_models import loopback  # noqa: F401 - session fixture

from milliwatt.adapters import LiteLLMBackend, LoopbackServer
from milliwatt.adapters.loopback import free_port
from milliwatt.errors import RemoteAuthError, RemoteBadRequest, RemoteRateLimited, RemoteTimeout, RemoteUnavailable
from milliwatt.model_tier import ModelTier
from milliwatt.types import Step

STEP = Step.create([{"role": "user", "content": "Say hello."}], options={"max_tokens": 12})


def backend(api_base: str, **kw: object) -> LiteLLMBackend:
    return LiteLLMBackend("openai/test", api_base=api_base, api_key="sk-test", backoff_base_s=0.001, backoff_cap_s=0.01, **kw)


@asynccontextmanager
async def http_server(status: int | None) -> AsyncIterator[tuple[str, list[int]]]:
    """A one-route HTTP server answering every request with ``status`` (None: never answers)."""
    hits: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
        await reader.readexactly(length)
        hits.append(1)
        if status is None:
            await asyncio.sleep(3600)
        body = json.dumps({"error": {"message": f"provider says {status}", "type": "test_error", "code": status}}).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode() + body
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
    import litellm

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
