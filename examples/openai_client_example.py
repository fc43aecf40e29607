"""The raw OpenAI client's agent loop, with milliwatt as the client: ``async_client(mw)`` is a
real ``openai.AsyncOpenAI`` answered in this process by the cascade.

    python -m milliwatt.examples.openai_client_example
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from milliwatt.client import Milliwatt
from milliwatt.examples.offline_cascade import IDENTITY, INSTRUCTIONS, QUESTION, get_order_status, offline_milliwatt
from milliwatt.examples.support_agent import TOOLS

TOOLS_USED = [t for t in TOOLS if t["function"]["name"] == "get_order_status"]


async def run(mw: Milliwatt, question: str = QUESTION, *, session_id: str = "openai-client") -> list[dict[str, Any]]:
    """The ordinary loop: ask, run the tool calls, feed the results back, until a text answer."""
    from milliwatt.integrations.openai import async_client

    client = async_client(mw, session_id=session_id, **IDENTITY)
    messages: list[dict[str, Any]] = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": question}]
    async with client:
        for _ in range(4):
            response = await client.chat.completions.create(model="milliwatt", messages=messages, tools=TOOLS_USED)
            message = response.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                break
            for call in message.tool_calls:
                output = get_order_status(**json.loads(call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(output)})
    return messages


def run_sync(mw: Milliwatt, question: str = QUESTION, *, session_id: str = "openai-sync") -> list[dict[str, Any]]:
    """The same loop with the sync ``openai.OpenAI`` (``client(mw)``): no event loop here."""
    from milliwatt.integrations.openai import client as sync_client

    messages: list[dict[str, Any]] = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": question}]
    with sync_client(mw, session_id=session_id, **IDENTITY) as client:
        for _ in range(4):
            response = client.chat.completions.create(model="milliwatt", messages=messages, tools=TOOLS_USED)
            message = response.choices[0].message
            messages.append(message.model_dump(exclude_none=True))
            if not message.tool_calls:
                break
            for call in message.tool_calls:
                output = get_order_status(**json.loads(call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(output)})
    return messages


async def amain() -> str:
    async with offline_milliwatt("openai-client-example.db") as mw:
        messages = await run(mw)
    return messages[-1]["content"]


def main() -> None:
    print(asyncio.run(amain()))


if __name__ == "__main__":
    main()
