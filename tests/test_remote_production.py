"""The remote tier for real traffic (issue 10, part 6): streaming, retries, timeouts, fallbacks,
per-tenant limits and session pinning, each driven through litellm over real HTTP against
``OpenAIStubServer`` on 127.0.0.1, told to fail (``Scripted``) where the test needs it."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from milliwatt import (
    Completion,
    ConfigError,
    Milliwatt,
    ModelBackend,
    RemoteAuthError,
    RemoteBadRequest,
    RemoteStreamError,
    RemoteTimeout,
    RemoteUnavailable,
)
from milliwatt._offline import import_litellm
from milliwatt.adapters import LiteLLMBackend
from milliwatt.model_tier import ModelTier
from milliwatt.registry import register_tier
from milliwatt.remote import FallbackBackend, PinnedTier, TenantLimiter
from milliwatt.streaming import ChunkAssembler
from milliwatt.testing import OpenAIStubServer, RecordingSink, Scripted, ScriptedTier
from milliwatt.types import Step

aio = pytest.mark.asyncio(loop_scope="session")
# litellm's stream handler reads pydantic attributes pydantic 2.11 deprecates: not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning")

KEY = "sk-live-Zx9QmT4vB7nR2kLw8pYc5sHd"  # must never be written anywhere
USER = [{"role": "system", "content": "You are Acme's support agent."}, {"role": "user", "content": "Where is my order 48213?"}]
TOOLS = [{"type": "function", "function": {"name": "get_order_status", "description": "Look an order up.",
          "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}]  # fmt: skip
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_order_status", "arguments": json.dumps({"order_id": "48213"})}}
TEXT = "Your order 48213 shipped yesterday and should arrive on Friday."


def provider(request: dict[str, Any]) -> dict[str, Any]:
    """The stub's answer: a tool call when offered tools and no result yet, else text."""
    if request.get("tools") and not any(m.get("role") == "tool" for m in request["messages"]):
        return {"role": "assistant", "content": None, "tool_calls": [CALL]}
    return {"role": "assistant", "content": TEXT}


def cheap(step: Step) -> dict[str, Any] | None:
    """A cheap tier that answers steps whose last message starts with "cheap:"."""
    text = step.last_user_text
    return {"role": "assistant", "content": f"cheap answer to {text[6:].strip()}"} if text.startswith("cheap:") else None


register_tier("cheap", lambda section, settings: ScriptedTier("cheap", cheap))


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": "You are Acme's support agent."}, {"role": "user", "content": text}]


def remote(stub: OpenAIStubServer, model: str = "openai/a", **kw: Any) -> LiteLLMBackend:
    settings: dict[str, Any] = {"backoff_base_s": 0.001, "backoff_cap_s": 0.01, "energy_model": "openai/gpt-4o", "label": "stand-in", **kw}
    return LiteLLMBackend(model, api_base=stub.api_base, api_key=KEY, **settings)


def client(*tiers: Any, sink: RecordingSink | None = None) -> Milliwatt:
    return Milliwatt(list(tiers), ledger=sink)


def config(stub: OpenAIStubServer, ledger: str | None = None, tiers: tuple[str, ...] = ("cheap", "remote"), **remote_kw: Any) -> dict:
    section = {"model": "openai/a", "api_base": stub.api_base, "api_key": KEY, "energy_model": "openai/gpt-4o",
               "label": "stand-in", "backoff_base_s": 0.001, "backoff_cap_s": 0.01, "trim": [], **remote_kw}  # fmt: skip
    return {"tiers": list(tiers), "ledger": ledger, "remote": section}


def fallback(stub: OpenAIStubServer, model: str = "openai/b") -> dict[str, Any]:
    return {"model": model, "api_base": stub.api_base, "api_key": KEY, "energy_model": "openai/gpt-4o"}


async def collect(stream: Any) -> list[dict[str, Any]]:
    async with stream as s:
        return [chunk async for chunk in s]


def assembled(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    assembler = ChunkAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.message()


async def settled(sink: RecordingSink, n: int) -> None:
    """Wait for the n-th record (a cancelled step is recorded in the background)."""
    for _ in range(200):
        if len(sink.records) >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{len(sink.records)} records, expected {n}")


# --------------------------------------------------------------------------- streaming


@aio
@pytest.mark.parametrize("tools", [None, TOOLS], ids=["text", "tool_call"])
async def test_a_streamed_answer_is_the_unstreamed_one_and_recorded_alike(tools: list | None) -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider) as stub:
        async with client(ScriptedTier("cheap", cheap), ModelTier("remote", remote(stub)), sink=sink) as mw:
            whole = await mw.step(USER, tools=tools, session_id="s1")
            stream = mw.stream(USER, tools=tools, session_id="s1")
            chunks = await collect(stream)
        assert [c["stream"] for c in stub.calls] == [False, True]
    assert len(chunks) > 3  # the provider's chunks, as they came
    assert all(len(c["choices"]) == 1 for c in chunks) and chunks[-1]["choices"][0]["finish_reason"] == ("tool_calls" if tools else "stop")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert assembled(chunks) == whole.message == stream.result.message
    a, b = whole.record, stream.record
    assert b is sink.records[-1] and len(sink.records) == 2
    for field in ("tier", "model", "label", "input_tokens_raw", "input_tokens_sent", "output_tokens", "cost_usd", "response"):
        assert getattr(a, field) == getattr(b, field), field
    assert [(x.tier, x.outcome, x.input_tokens, x.output_tokens) for x in a.attempts] == [
        (x.tier, x.outcome, x.input_tokens, x.output_tokens) for x in b.attempts
    ]
    assert a.attempts[-1].energy.method == b.attempts[-1].energy.method == "estimate"
    assert b.attempts[-1].energy.point_wh > 0 and "streamed" in b.attempts[-1].reason


@aio
async def test_usage_the_provider_does_not_stream_is_counted() -> None:
    async with OpenAIStubServer(provider, stream_usage=False) as stub:
        async with client(ModelTier("remote", remote(stub))) as mw:
            stream = mw.stream(USER)
            await collect(stream)
    assert stream.record.output_tokens > 0 and stream.record.attempts[-1].input_tokens > 0


@aio
async def test_a_cheap_tiers_answer_is_one_chunk() -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider) as stub:
        async with client(ScriptedTier("cheap", cheap), ModelTier("remote", remote(stub)), sink=sink) as mw:
            stream = mw.stream(ask("cheap: opening hours"))
            chunks = await collect(stream)
        assert stub.calls == []
    (chunk,) = chunks
    assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": "cheap answer to opening hours"}
    assert chunk["choices"][0]["finish_reason"] == "stop" and chunk["object"] == "chat.completion.chunk"
    assert stream.result.tier == "cheap" and sink.records == [stream.record]


def test_a_bad_request_to_stream_is_refused_at_the_call() -> None:
    from milliwatt import InvalidRequestError

    mw = client(ScriptedTier("cheap", cheap))
    with pytest.raises(InvalidRequestError) as err:
        mw.stream([{"role": "wizard", "content": "hi"}])
    assert err.value.field.startswith("messages[0]")


class Whole(ModelBackend):
    """A backend that cannot stream."""

    model = "whole"

    async def complete(self, step: Step, *, abort: Any = None) -> Completion:
        return Completion({"role": "assistant", "content": None, "tool_calls": [CALL]}, "whole", 10, 5)


@aio
async def test_a_backend_that_cannot_stream_answers_in_one_chunk() -> None:
    async with client(ModelTier("remote", Whole(), energy_model="openai/gpt-4o")) as mw:
        stream = mw.stream(USER, tools=TOOLS)
        (chunk,) = await collect(stream)
    assert chunk["choices"][0]["delta"]["tool_calls"][0]["function"] == CALL["function"]
    assert chunk["choices"][0]["finish_reason"] == "tool_calls" and stream.result.tool_calls == [CALL]


@aio
async def test_a_reader_stopping_at_the_finish_reason_leaves_a_complete_record() -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider) as stub:
        async with client(ModelTier("remote", remote(stub)), sink=sink) as mw:
            async with mw.stream(USER) as stream:
                async for chunk in stream:
                    if chunk["choices"][0]["finish_reason"]:
                        break
    assert [r.tier for r in sink.records] == ["remote"] and stream.result.content == TEXT


@aio
async def test_the_stream_is_read_on_the_backends_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = import_litellm()
    seen: list[threading.Thread] = []
    real = litellm.acompletion

    async def recording(**kw: Any) -> Any:
        seen.append(threading.current_thread())
        return await real(**kw)

    monkeypatch.setattr(litellm, "acompletion", recording)
    async with OpenAIStubServer(provider) as stub:
        async with client(ModelTier("remote", remote(stub))) as mw:
            await collect(mw.stream(USER))
    assert seen and seen[0] is not threading.current_thread() and seen[0].name.startswith("milliwatt-remote")


@aio
@pytest.mark.parametrize("preamble", ["", "Let me check. "], ids=["calls_only", "content_first"])
async def test_a_streamed_answer_asking_for_withheld_schemas_is_asked_again(preamble: str) -> None:
    """Trimming withheld schemas: tool-call deltas wait for the end of the stream; an answer
    asking for withheld schemas is not handed on, and the tier is asked again with them."""
    from milliwatt.trimming import INDEX_TOOL, Trimmer
    from test_trimming import TOOLS as AIRLINE_TOOLS
    from test_trimming import call, conversation, trained

    def model(request: dict[str, Any]) -> dict[str, Any]:
        offered = [t["function"]["name"] for t in request.get("tools") or []]
        if "book" in offered:
            return {"role": "assistant", "content": None, "tool_calls": [call(7, "book", p0="RES001X")]}
        index = {"id": "x", "type": "function", "function": {"name": INDEX_TOOL, "arguments": json.dumps({"names": ["book"]})}}
        return {"role": "assistant", "content": preamble or None, "tool_calls": [index]}

    sink = RecordingSink()
    async with OpenAIStubServer(model) as stub:
        tier = ModelTier("remote", remote(stub))
        async with Milliwatt([tier], ledger=sink, trimmers={"remote": Trimmer([trained()])}) as mw:
            stream = mw.stream(list(conversation(2).messages), tools=AIRLINE_TOOLS, session_id="s")
            chunks = await collect(stream)
        assert [c["stream"] for c in stub.calls] == [True, False]  # asked again whole
    calls = [d["function"].get("name") for c in chunks for d in c["choices"][0]["delta"].get("tool_calls") or []]
    assert calls == ["book"]  # the reader never sees the index
    got = assembled(chunks)
    assert got == stream.result.message and got["content"] == (preamble or None) and got["tool_calls"][0]["function"]["name"] == "book"
    record = sink.records[0]
    assert [(a.outcome, a.tier) for a in record.attempts] == [("passed", "remote"), ("answered", "remote")]
    assert record.response == got


# --------------------------------------------------------------------------- a stream cut short


@aio
async def test_a_reader_closing_the_stream_records_it_cancelled_with_the_partial_answer() -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider, chunk_delay_s=0.05) as stub:
        async with client(ScriptedTier("cheap", cheap), ModelTier("remote", remote(stub)), sink=sink) as mw:
            got = []
            async with mw.stream(USER) as stream:
                async for chunk in stream:
                    got.append(chunk)
                    if len(got) == 3:
                        break
            await settled(sink, 1)
            await asyncio.sleep(0.3)
        assert stub.calls[-1]["chunks"] < 10  # the provider's stream was closed, not read to its end
    (record,) = sink.records
    assert record.tier == "cancelled" and stream.result is None
    cut = record.attempts[-1]
    assert cut.tier == "remote" and cut.outcome == "cancelled" and "closed the stream" in cut.reason
    assert cut.evidence["partial"] == assembled(got) and cut.evidence["partial"]["content"] == "Your order "
    assert cut.output_tokens > 0 and cut.input_tokens > 0 and cut.energy.point_wh > 0 and cut.energy.method == "estimate"
    assert record.energy.point_wh >= cut.energy.point_wh


@aio
async def test_a_stream_dropped_unfinished_is_recorded_when_let_go() -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider, chunk_delay_s=0.05) as stub:
        async with client(ModelTier("remote", remote(stub)), sink=sink) as mw:
            async for _chunk in mw.stream(USER):  # no async with, no aclose
                break
            await settled(sink, 1)
    assert sink.records[0].tier == "cancelled" and sink.records[0].attempts[-1].evidence["partial"]["content"] == ""


@aio
async def test_a_cancelled_reader_is_recorded_cancelled_with_the_partial_answer() -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider, chunk_delay_s=0.1) as stub:
        async with client(ModelTier("remote", remote(stub)), sink=sink) as mw:
            got: list[dict] = []

            async def read() -> None:
                async for chunk in mw.stream(USER):
                    got.append(chunk)

            with pytest.raises(TimeoutError):
                await asyncio.wait_for(read(), 0.35)
            await settled(sink, 1)
    (record,) = sink.records
    assert record.tier == "cancelled" and record.attempts[-1].outcome == "cancelled"
    assert 1 <= len(got) < 10 and record.attempts[-1].evidence["partial"] == assembled(got)


@aio
@pytest.mark.parametrize("fault", [Scripted(cut_after=4), Scripted(malformed_after=4)], ids=["cut", "malformed"])
async def test_a_stream_the_provider_breaks_raises_typed_and_records_the_partial_answer(fault: Scripted) -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider) as stub:
        stub.script(fault)
        async with client(ModelTier("remote", remote(stub, max_retries=3)), sink=sink) as mw:
            got = []
            with pytest.raises(RemoteStreamError) as err:
                async with mw.stream(USER) as stream:
                    async for chunk in stream:
                        got.append(chunk)
        assert len(stub.calls) == 1  # chunks were handed on: no retry
    assert isinstance(err.value, RemoteUnavailable) and err.value.model == "openai/a"
    assert "broke after 4 chunks" in str(err.value) and KEY not in str(err.value)
    assert err.value.partial == assembled(got) == {"role": "assistant", "content": "Your order 48213 "}
    (record,) = sink.records
    assert record.tier == "error" and stream.result is None
    broken = record.attempts[-1]
    assert broken.outcome == "error" and broken.reason.startswith("RemoteStreamError: ")
    assert broken.evidence["partial"] == err.value.partial
    assert broken.output_tokens > 0 and broken.energy.method == "estimate" and broken.energy.point_wh > 0


# --------------------------------------------------------------------------- retries and timeouts


@aio
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_rate_limits_and_5xx_are_retried_before_the_first_chunk(streamed: bool) -> None:
    async with OpenAIStubServer(provider) as stub:
        stub.script(Scripted(status=503), Scripted(status=429, retry_after=0.2), Scripted(status=500))
        async with client(ModelTier("remote", remote(stub, max_retries=3, backoff_cap_s=1.0))) as mw:
            t0 = time.monotonic()
            if streamed:
                stream = mw.stream(USER)
                await collect(stream)
                result = stream.result
            else:
                result = await mw.step(USER)
            elapsed = time.monotonic() - t0
    assert [c["status"] for c in stub.calls] == [503, 429, 500, 200] and all(c["stream"] is streamed for c in stub.calls)
    assert result.content == TEXT and result.tier == "remote"
    assert elapsed >= 0.2  # the Retry-After was honoured (the jitter alone waits a few ms)


@aio
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_a_slow_call_times_out_then_is_retried(streamed: bool) -> None:
    async with OpenAIStubServer(provider) as stub:
        stub.script(Scripted(delay_s=0.8))
        async with client(ModelTier("remote", remote(stub, timeout_s=0.3, max_retries=1))) as mw:
            if streamed:
                stream = mw.stream(USER)
                await collect(stream)
                assert stream.result.content == TEXT
            else:
                assert (await mw.step(USER)).content == TEXT
        stub.script(Scripted(delay_s=0.8, times=2))
        async with client(ModelTier("remote", remote(stub, timeout_s=0.3, max_retries=1))) as mw:
            with pytest.raises(RemoteTimeout):
                await (collect(mw.stream(USER)) if streamed else mw.step(USER))


@aio
async def test_a_stream_that_stalls_part_way_breaks_typed() -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider) as stub:
        stub.script(Scripted(chunk_delay_s=1.0))
        async with client(ModelTier("remote", remote(stub, timeout_s=0.3, max_retries=2)), sink=sink) as mw:
            with pytest.raises(RemoteStreamError, match=r"timeout 0.3s.*broke after 1 chunk"):
                await collect(mw.stream(USER))
        assert len(stub.calls) == 1
    assert sink.records[0].tier == "error" and sink.records[0].attempts[-1].evidence["partial"]["content"] == ""


# --------------------------------------------------------------------------- fallbacks


@aio
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
async def test_a_failing_model_falls_back_to_the_next(streamed: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="milliwatt")
    async with OpenAIStubServer(provider) as stub:
        stub.script(Scripted(status=503, model="a", times=None))
        async with await Milliwatt.open(config(stub, max_retries=1, fallbacks=[fallback(stub)])) as mw:
            if streamed:
                stream = mw.stream(USER)
                await collect(stream)
                result = stream.result
            else:
                result = await mw.step(USER)
    assert [(c["model"], c["status"]) for c in stub.calls] == [("a", 503), ("a", 503), ("b", 200)]
    assert result.content == TEXT and result.record.model == "b"
    answered = result.record.attempts[-1]
    assert answered.outcome == "answered" and answered.evidence["route"]["model"] == "openai/b"
    (failed,) = answered.evidence["route"]["failed"]
    assert failed["model"] == "openai/a" and failed["error"].startswith("RemoteUnavailable: ") and "told to fail" in failed["error"]
    assert any("openai/a failed" in r.getMessage() and "falling back to openai/b" in r.getMessage() for r in caplog.records)


@aio
async def test_a_bad_request_does_not_fall_back_but_an_unknown_model_does() -> None:
    async with OpenAIStubServer(provider) as stub:
        async with await Milliwatt.open(config(stub, tiers=("remote",), fallbacks=[fallback(stub)])) as mw:
            stub.script(Scripted(status=400, message="messages are malformed", model="a"))
            with pytest.raises(RemoteBadRequest, match="malformed"):
                await mw.step(USER)
            assert [c["model"] for c in stub.calls] == ["a"]
            stub.script(Scripted(status=404, message="no such model", model="a"))
            assert (await mw.step(USER)).record.model == "b"


@aio
async def test_when_every_model_fails_the_last_error_names_the_others() -> None:
    async with OpenAIStubServer(provider) as stub:
        stub.script(Scripted(status=503, model="a", times=None), Scripted(status=401, message="key revoked", model="b", times=None))
        async with await Milliwatt.open(config(stub, tiers=("remote",), max_retries=0, fallbacks=[fallback(stub)])) as mw:
            with pytest.raises(RemoteAuthError) as err:
                await mw.step(USER)
    assert err.value.model == "openai/b" and err.value.status_code == 401
    assert "key revoked" in str(err.value) and "openai/a: RemoteUnavailable" in str(err.value)


@aio
async def test_a_stream_falls_back_only_before_its_first_chunk() -> None:
    async with OpenAIStubServer(provider) as stub:
        stub.script(Scripted(cut_after=2, model="a"))
        async with await Milliwatt.open(config(stub, tiers=("remote",), fallbacks=[fallback(stub)])) as mw:
            with pytest.raises(RemoteStreamError):
                await collect(mw.stream(USER))
    assert [c["model"] for c in stub.calls] == ["a"]


# --------------------------------------------------------------------------- per-tenant limits


@aio
async def test_a_tenant_at_its_limit_waits_without_holding_up_another() -> None:
    async with OpenAIStubServer(provider, delay_s=0.4) as stub:
        async with await Milliwatt.open(config(stub, tiers=("remote",), max_concurrency_per_tenant=1)) as mw:
            await mw.step(USER, tenant="warm-up")  # the HTTP client is made
            done: dict[str | None, list[float]] = {}
            t0 = time.monotonic()

            async def step(tenant: str | None) -> None:
                await mw.step(USER, tenant=tenant)
                done.setdefault(tenant, []).append(time.monotonic() - t0)

            await asyncio.gather(step("A"), step("A"), step("B"), step(None), step(None))
    (a1, a2), (b1,), (n1, n2) = done["A"], done["B"], done[None]
    assert a1 < 0.75 and b1 < 0.75 and n1 < 0.75  # one call of each tenant ran at once, side by side
    assert a2 >= 0.75 and n2 >= 0.75  # A's second waited for its first; no tenant is a tenant of its own


@aio
async def test_a_stream_holds_its_tenants_slot_until_it_ends() -> None:
    async with OpenAIStubServer(provider, chunk_delay_s=0.05) as stub:
        async with await Milliwatt.open(config(stub, tiers=("remote",), max_concurrency_per_tenant=1)) as mw:
            limiter = mw.tier("remote").backend.limiter
            async with mw.stream(USER, tenant="A") as stream:
                await stream.__anext__()
                assert limiter.in_flight("A") == 1
                waiting = asyncio.create_task(mw.step(USER, tenant="A"))
                await asyncio.sleep(0.1)
                assert limiter.waiting("A") == 1 and not waiting.done()
            assert (await waiting).content == TEXT  # closing the stream let it in
            assert limiter.in_flight("A") == 0


@aio
async def test_the_tenant_limiter_is_first_come_first_served_and_survives_cancellation() -> None:
    limiter = TenantLimiter(1)
    order: list[int] = []
    await limiter.acquire("t")

    async def waiter(n: int) -> None:
        await limiter.acquire("t")
        order.append(n)
        await asyncio.sleep(0.01)
        limiter.release("t")

    tasks = [asyncio.create_task(waiter(n)) for n in range(4)]
    await asyncio.sleep(0.01)
    tasks[1].cancel()  # a waiter that gives up leaves its place
    limiter.release("t")
    await asyncio.gather(*tasks, return_exceptions=True)
    assert order == [0, 2, 3] and limiter.in_flight("t") == 0 and limiter.waiting("t") == 0
    assert not limiter._active and not limiter._waiting  # nothing kept for an idle tenant


# --------------------------------------------------------------------------- session pinning


@aio
async def test_a_session_that_escalated_stays_on_the_remote_tier_for_pin_steps() -> None:
    sink = RecordingSink()
    async with OpenAIStubServer(provider) as stub:
        cfg = config(stub, pin_steps=2)
        async with await Milliwatt.open(cfg, wrap_ledger=None) as mw:
            mw.cascade.sink = sink
            tiers = [(await mw.step(ask(text), session_id="s1")).tier for text in ("hard one", "cheap: a", "cheap: b", "cheap: c")]
            other = (await mw.step(ask("cheap: d"), session_id="s2")).tier
            unsessioned = [(await mw.step(ask(text))).tier for text in ("hard one", "cheap: e")]
    assert tiers == ["remote", "remote", "remote", "cheap"] and other == "cheap" and unsessioned == ["remote", "cheap"]
    pinned = sink.records[1].attempts[0]
    assert pinned.tier == "cheap" and pinned.outcome == "skipped" and "pinned to remote" in pinned.reason and "prefix cache" in pinned.reason
    assert sink.records[1].attempts[-1].evidence["pinned"] == {"model": None, "left": 1}
    assert sink.records[2].attempts[-1].evidence["pinned"] == {"model": None, "left": 0}


@aio
async def test_a_pinned_session_stays_on_the_model_that_answered() -> None:
    async with OpenAIStubServer(provider) as stub:
        stub.script(Scripted(status=503, model="a", times=2))  # a fails the first step (with its retry), then recovers
        cfg = config(stub, max_retries=1, pin_steps=2, fallbacks=[fallback(stub)])
        async with await Milliwatt.open(cfg) as mw:
            first = await mw.step(ask("hard one"), session_id="s1")
            second = mw.stream(ask("cheap: next"), session_id="s1")
            await collect(second)
            other = await mw.step(ask("hard too"), session_id="s2")
    assert first.record.model == "b" and second.result.record.model == "b" and other.record.model == "a"
    assert [c["model"] for c in stub.calls] == ["a", "a", "b", "b", "a"]
    assert second.result.record.attempts[-1].evidence["pinned"]["model"] == "openai/b"


@aio
async def test_pinning_keeps_the_rules_and_forgets_the_least_recent_sessions() -> None:
    rules = ScriptedTier("rules", lambda s: {"role": "assistant", "content": "policy"} if "password" in s.last_user_text else None)
    tier = PinnedTier(ModelTier("remote", Whole(), energy_model="openai/gpt-4o"), 5, keep=["rules"], max_sessions=2)
    async with client(rules, ScriptedTier("cheap", cheap), tier) as mw:
        await mw.step(ask("hard"), session_id="s1")
        assert (await mw.step(ask("cheap: tell me the password"), session_id="s1")).tier == "rules"
        assert tier.pinned("s1") == (None, 5)  # a step the rules answered does not use up the pin
        await mw.step(ask("hard"), session_id="s2")
        await mw.step(ask("hard"), session_id="s3")
        assert tier.pinned("s1") is None and tier.pinned("s3") == (None, 5)


class Checked(ScriptedTier):
    """A cheap tier whose answers ask for a shadow check by the later tiers."""

    async def attempt(self, step: Step) -> Any:
        result = await super().attempt(step)
        return replace(result, shadow=True) if result.answered else result


@aio
async def test_only_the_steps_own_answer_pins_never_a_shadow_check() -> None:
    tier = PinnedTier(ModelTier("remote", Whole(), energy_model="openai/gpt-4o"), 2)
    sink = RecordingSink()
    async with client(Checked("cheap", cheap), tier, sink=sink) as mw:
        assert (await mw.step(ask("cheap: a"), session_id="s1")).tier == "cheap"
        await settled(sink, 1)
    assert [a.outcome for a in sink.records[0].attempts] == ["answered", "shadow"]  # the remote tier checked it
    assert tier.pinned("s1") is None


@aio
async def test_a_pinned_step_asked_again_for_withheld_schemas_uses_one_pinned_step() -> None:
    from test_trimming import TOOLS as AIRLINE_TOOLS
    from test_trimming import call, conversation, trained

    from milliwatt.trimming import INDEX_TOOL, Trimmer

    def model(step: Step) -> dict[str, Any]:
        if not step.tools:
            return {"role": "assistant", "content": "Let me see."}
        if step.tool("book"):
            return {"role": "assistant", "content": None, "tool_calls": [call(7, "book", p0="RES001X")]}
        index = {"id": "x", "type": "function", "function": {"name": INDEX_TOOL, "arguments": json.dumps({"names": ["book"]})}}
        return {"role": "assistant", "content": None, "tool_calls": [index]}

    inner = ScriptedTier("remote", model)
    tier = PinnedTier(inner, 3)
    async with Milliwatt([ScriptedTier("cheap", cheap), tier], trimmers={"remote": Trimmer([trained()])}) as mw:
        messages = list(conversation(2).messages)
        first = await mw.step(messages, tools=AIRLINE_TOOLS, session_id="other")
        assert len(inner.seen) == 2 and first.tool_calls[0]["function"]["name"] == "book"
        assert tier.pinned("other") == (None, 3)  # pinned once, though the tier was asked twice
        await mw.step(messages, session_id="s")
        assert tier.pinned("s") == (None, 3)
        second = await mw.step(messages, tools=AIRLINE_TOOLS, session_id="s")
        assert len(inner.seen) == 5 and second.tool_calls[0]["function"]["name"] == "book"
        assert tier.pinned("s") == (None, 2)  # one pinned step, though the tier was asked twice
    assert [a.outcome for a in second.record.attempts] == ["skipped", "passed", "answered"]
    assert second.record.attempts[-1].evidence["pinned"] == {"model": None, "left": 2}


# --------------------------------------------------------------------------- credentials


@aio
async def test_credentials_are_never_in_errors_logs_or_the_ledger(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="milliwatt")
    db = tmp_path / "ledger.db"
    async with OpenAIStubServer(provider) as stub:
        stub.script(
            Scripted(status=503, echo_key=True, model="a", times=None),
            Scripted(status=401, message="Incorrect API key provided", echo_key=True, model="b", times=None),
        )
        cfg = config(stub, ledger=f"sqlite:///{db}", tiers=("remote",), max_retries=1, fallbacks=[fallback(stub)])
        async with await Milliwatt.open(cfg) as mw:
            errors = []
            for streamed in (False, True):
                with pytest.raises(RemoteAuthError) as err:
                    await (collect(mw.stream(USER, session_id="s")) if streamed else mw.step(USER, session_id="s"))
                errors.append(err.value)
    assert any("Bearer" in str(e) and "Incorrect API key" in str(e) for e in errors)  # the provider's message, redacted
    for e in errors:
        assert KEY not in str(e) and KEY not in repr(e.__dict__)
    assert KEY not in caplog.text and "you sent: Bearer" in caplog.text
    assert db.exists() and KEY.encode() not in db.read_bytes()
    for extra in db.parent.iterdir():
        assert KEY.encode() not in extra.read_bytes()


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("remote", "key"),
    [
        ({"pin_steps": -1}, "remote.pin_steps"),
        ({"max_concurrency_per_tenant": 0}, "remote.max_concurrency_per_tenant"),
        ({"pin_sessions": 0}, "remote.pin_sessions"),
        ({"fallbacks": "openai/b"}, "remote.fallbacks"),
        ({"fallbacks": ["openai/b", "openai/b"]}, "remote.fallbacks"),
        ({"model": "openai/a", "fallbacks": ["openai/a"]}, "remote.fallbacks"),
        ({"fallbacks": [{"model": "openai/b", "retries": 2}]}, "remote.fallbacks.0.retries"),
        ({"fallbacks": [{"model": ""}]}, "remote.fallbacks.0.model"),
    ],
)
def test_bad_production_settings_are_named(remote: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        Milliwatt.from_config({"tiers": ["remote"], "ledger": None, "remote": {"api_base": "http://127.0.0.1:9/v1", **remote}})
    assert err.value.where == f"settings: {key}"


def test_a_fallback_without_credentials_is_named_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ConfigError) as err:
        Milliwatt.from_config(
            {"tiers": ["remote"], "ledger": None,
             "remote": {"model": "openai/a", "api_base": "http://127.0.0.1:9/v1", "energy_model": "openai/gpt-4o",
                        "fallbacks": ["anthropic/claude-3-5-sonnet-20240620"]}}
        )
    assert err.value.where == "remote.fallbacks[0].model" and "ANTHROPIC_API_KEY" in err.value.problem


def test_the_production_wrappers_are_built_from_the_configuration() -> None:
    mw = Milliwatt.from_config(
        {"tiers": ["remote"], "ledger": None,
         "remote": {"model": "openai/a", "api_base": "http://127.0.0.1:9/v1", "api_key": KEY, "energy_model": "openai/gpt-4o",
                    "fallbacks": [{"model": "openai/b", "api_base": "http://127.0.0.1:9/v1", "energy_model": "openai/gpt-4o"}],
                    "max_concurrency_per_tenant": 4, "pin_steps": 3}}
    )
    tier = mw.tier("remote")
    assert isinstance(tier, PinnedTier) and tier.steps == 3 and tier.keep == {"rules"}
    limited = tier.tier.backend
    assert limited.limiter.limit == 4 and isinstance(limited.backend, FallbackBackend)
    primary, second = limited.backend.backends
    assert (primary.model, second.model) == ("openai/a", "openai/b")
    assert second.api_key is None and second.timeout_s == primary.timeout_s  # the primary's key is not lent
    plain = Milliwatt.from_config({"tiers": ["remote"], "ledger": None, "remote": {"model": "openai/a", "api_base": "http://127.0.0.1:9/v1", "energy_model": "openai/gpt-4o"}})
    assert isinstance(plain.tier("remote").backend, LiteLLMBackend)  # nothing wrapped unless asked
