"""The in-process drop-ins (milliwatt.integrations), each driven by its real framework package:
the same conversation ("Where is my order 48213?" -> a get_order_status call -> its result ->
the answer) through every front door gives the same tiers and the same ledger rows.

The cascade is the examples' (examples/offline_cascade.py): the support rule pack, then a
remote tier at a scripted loopback stand-in. What is compared: per step, the tier, the
model, the tool calls (names and arguments; ids are generated per call), the answer's text,
the output tokens (the same answers) and the identity (agent, tenant, session). What is not:
input tokens, since each framework sends its own prompt (the Agents SDK's strict tool
schemas, pydantic-ai's and LangChain's tool descriptions from docstrings): they are checked
to be counted, within a few dozen tokens of the direct call's.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from milliwatt.client import Milliwatt
from milliwatt.examples.offline_cascade import IDENTITY, INSTRUCTIONS, QUESTION, config, get_order_status, stand_in
from milliwatt.testing import OpenAIStubServer

pytest.importorskip("openai")


async def direct(mw: Milliwatt, session_id: str) -> None:
    """The reference: the loop calling ``mw.step`` itself."""
    from milliwatt.examples.openai_client_example import TOOLS_USED

    messages: list[dict[str, Any]] = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    for _ in range(4):
        result = await mw.step(messages, tools=TOOLS_USED, session_id=session_id, **IDENTITY)
        messages.append(result.message)
        if not result.tool_calls:
            return
        for call in result.tool_calls:
            output = get_order_status(**json.loads(call["function"]["arguments"]))
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(output)})


async def openai_async(mw: Milliwatt, session_id: str) -> None:
    from milliwatt.examples import openai_client_example

    messages = await openai_client_example.run(mw, session_id=session_id)
    assert messages[-1]["content"] == "Your order is shipped."


async def openai_sync(mw: Milliwatt, session_id: str) -> None:
    from milliwatt.examples import openai_client_example

    # Sync code: the client runs the cascade on its own loop thread; this loop only waits.
    messages = await asyncio.to_thread(openai_client_example.run_sync, mw, session_id=session_id)
    assert messages[-1]["content"] == "Your order is shipped."


async def openai_agents(mw: Milliwatt, session_id: str) -> None:
    pytest.importorskip("agents")
    from milliwatt.examples import openai_agents_example

    result = await openai_agents_example.run(mw, session_id=session_id)
    assert result.final_output == "Your order is shipped."


async def pydantic_ai(mw: Milliwatt, session_id: str) -> None:
    pytest.importorskip("pydantic_ai")
    from milliwatt.examples import pydantic_ai_example

    result = await pydantic_ai_example.run(mw, session_id=session_id)
    assert result.output == "Your order is shipped."
    usage = result.usage
    assert usage.requests == 2 and usage.input_tokens > 0 and usage.output_tokens == 28


async def langchain(mw: Milliwatt, session_id: str) -> None:
    pytest.importorskip("langchain")
    pytest.importorskip("langchain_openai")
    from milliwatt.examples import langchain_example

    state = await langchain_example.run(mw, session_id=session_id)
    call, result, answer = state["messages"][1:4]
    assert call.tool_calls[0]["name"] == "get_order_status" and call.tool_calls[0]["args"] == {"order_id": "48213"}
    assert call.tool_calls[0]["id"] and result.tool_call_id == call.tool_calls[0]["id"]
    assert call.response_metadata["finish_reason"] == "tool_calls" and answer.response_metadata["finish_reason"] == "stop"
    assert call.usage_metadata["output_tokens"] == 14 and call.usage_metadata["input_tokens"] > 0
    assert answer.content == "Your order is shipped."


async def litellm_provider(mw: Milliwatt, session_id: str) -> None:
    from milliwatt.examples import litellm_example

    messages = await litellm_example.run(mw, session_id=session_id)
    assert messages[-1]["content"] == "Your order is shipped."


DOORS: dict[str, Callable[[Milliwatt, str], Awaitable[None]]] = {
    "openai-async": openai_async,
    "openai-sync": openai_sync,
    "openai-agents": openai_agents,
    "pydantic-ai": pydantic_ai,
    "langchain": langchain,
    "litellm": litellm_provider,
}


def rows(ledger: Path, session_id: str) -> list[dict[str, Any]]:
    with sqlite3.connect(ledger) as db:
        db.row_factory = sqlite3.Row
        found = db.execute(
            "SELECT tier, model, label, agent, tenant, input_tokens_sent, output_tokens, response_json FROM steps "
            "WHERE session_id = ? ORDER BY started_at, id", (session_id,),
        ).fetchall()  # fmt: skip
    out = []
    for r in found:
        response = json.loads(r["response_json"])
        calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in response.get("tool_calls") or []]
        out.append({**dict(r), "response_json": None, "calls": calls, "content": response.get("content")})
    return out


def comparable(row: dict[str, Any]) -> tuple[Any, ...]:
    return (row["tier"], row["model"], row["label"], row["agent"], row["tenant"], row["calls"], row["content"], row["output_tokens"])


async def run_door(tmp_path: Path, door: Callable[[Milliwatt, str], Awaitable[None]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    ledger = tmp_path / "ledger.db"
    with OpenAIStubServer(stand_in) as server:
        async with await Milliwatt.open(config(server.api_base, ledger)) as mw:
            await direct(mw, "direct")
            await door(mw, "door")
    return rows(ledger, "direct"), rows(ledger, "door")


@pytest.mark.asyncio
@pytest.mark.parametrize("name", list(DOORS))
async def test_every_front_door_gives_the_same_tiers_and_ledger_rows(tmp_path: Path, name: str) -> None:
    reference, through_door = await run_door(tmp_path, DOORS[name])
    assert [r["tier"] for r in reference] == ["rules", "remote"]
    assert reference[0]["calls"] == [("get_order_status", {"order_id": "48213"})]
    assert reference[1]["content"] == "Your order is shipped."
    assert [comparable(r) for r in through_door] == [comparable(r) for r in reference]
    for ours, theirs in zip(through_door, reference, strict=True):
        # Each framework words its own request (tool descriptions, strict schemas): counted, close.
        assert ours["input_tokens_sent"] > 0 and abs(ours["input_tokens_sent"] - theirs["input_tokens_sent"]) < 80


@pytest.mark.asyncio
async def test_the_openai_drop_in_streams_and_reports_tier_usage_and_finish_reasons(tmp_path: Path) -> None:
    from milliwatt.integrations.openai import async_client

    with OpenAIStubServer(stand_in) as server:
        async with await Milliwatt.open(config(server.api_base, None)) as mw:
            client = async_client(mw, session_id="s", **IDENTITY)
            messages = [{"role": "user", "content": QUESTION}]
            tools = [{"type": "function", "function": {"name": "get_order_status", "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}}}}]
            raw = await client.chat.completions.with_raw_response.create(model="milliwatt", messages=messages, tools=tools)
            assert raw.headers["x-milliwatt-tier"] == "rules"
            response = raw.parse()
            assert response.choices[0].finish_reason == "tool_calls" and response.usage.completion_tokens == 14
            call = response.choices[0].message.tool_calls[0]
            assert call.id and call.function.name == "get_order_status" and json.loads(call.function.arguments) == {"order_id": "48213"}
            stream = await client.chat.completions.create(
                model="milliwatt", messages=messages, tools=tools, stream=True, stream_options={"include_usage": True}
            )
            chunks = [c async for c in stream]
            assert chunks[0].choices[0].delta.tool_calls[0].function.name == "get_order_status"
            assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
            assert chunks[-1].usage.completion_tokens == 14
            # Without the rules' agent and tenant, the rules pass: the stand-in answers.
            other = async_client(mw)
            response = await other.chat.completions.create(model="milliwatt", messages=messages, tools=tools)
            assert response.choices[0].message.tool_calls[0].id == "call_stand_in_1"
            await client.close()
            await other.close()


@pytest.mark.asyncio
async def test_litellm_streams_and_its_callback_records_direct_calls(tmp_path: Path) -> None:
    from milliwatt._offline import import_litellm
    from milliwatt.examples import litellm_example
    from milliwatt.integrations.litellm import register

    litellm = import_litellm()
    ledger = tmp_path / "ledger.db"
    with OpenAIStubServer(stand_in) as server:
        async with await Milliwatt.open(config(server.api_base, ledger)) as mw:
            register(mw)
            stream = await litellm.acompletion(
                model="milliwatt/support", messages=[{"role": "user", "content": QUESTION}], stream=True,
                tools=litellm_example.TOOLS_USED, metadata={"session_id": "streamed", **IDENTITY},
            )  # fmt: skip
            chunks = [c async for c in stream]
            calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
            assert calls[0].function.name == "get_order_status" and json.loads(calls[0].function.arguments) == {"order_id": "48213"}
            assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
            response = await litellm_example.observe(mw, server.api_base, session_id="observed")
            assert response.choices[0].message.tool_calls[0].function.name == "get_order_status"
            served = server.requests
    assert served == 1  # the observed call only: the streamed step was the rules'
    assert [r["tier"] for r in rows(ledger, "streamed")] == ["rules"]
    (observed,) = rows(ledger, "observed")
    assert (observed["tier"], observed["label"], observed["model"], observed["agent"]) == ("remote", "observed", "openai/gpt-4o", "support")
    assert observed["calls"] == [("get_order_status", {"order_id": "48213"})] and observed["output_tokens"] > 0


def test_importing_milliwatt_imports_no_framework() -> None:
    import subprocess

    code = "import sys, milliwatt; print(sorted(m for m in ('openai', 'agents', 'pydantic_ai', 'langchain_core', 'litellm', 'milliwatt.integrations') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
