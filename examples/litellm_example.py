"""A litellm agent loop with milliwatt as a litellm provider (``model="milliwatt/support"``),
and a direct provider call recorded in the same ledger by milliwatt's litellm callback.

    python -m milliwatt.examples.litellm_example
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from milliwatt.client import Milliwatt
from milliwatt.examples.offline_cascade import IDENTITY, INSTRUCTIONS, QUESTION, get_order_status, offline_milliwatt
from milliwatt.examples.support_agent import TOOLS

TOOLS_USED = [t for t in TOOLS if t["function"]["name"] == "get_order_status"]


async def run(mw: Milliwatt, question: str = QUESTION, *, session_id: str = "litellm") -> list[dict[str, Any]]:
    """The ordinary litellm loop, its model id changed to ``milliwatt/support``."""
    from milliwatt.integrations.litellm import register

    litellm = _litellm()
    register(mw)
    metadata = {"session_id": session_id, **IDENTITY}
    messages: list[dict[str, Any]] = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": question}]
    for _ in range(4):
        response = await litellm.acompletion(model="milliwatt/support", messages=messages, tools=TOOLS_USED, metadata=metadata)
        message = response.choices[0].message
        messages.append(message.model_dump(exclude_none=True, include={"role", "content", "tool_calls"}))
        if not message.tool_calls:
            break
        for call in message.tool_calls:
            output = get_order_status(**json.loads(call.function.arguments))
            messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(output)})
    return messages


async def observe(mw: Milliwatt, api_base: str, question: str = QUESTION, *, session_id: str = "litellm-observed") -> Any:
    """A call the agent makes to a provider directly (here the stand-in), recorded in ``mw``'s
    ledger as a remote step by ``LedgerCallback``."""
    from milliwatt.integrations.litellm import LedgerCallback

    litellm = _litellm()
    callback = LedgerCallback(mw)
    litellm.callbacks = [*litellm.callbacks, callback]
    try:
        messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": question}]
        response = await litellm.acompletion(
            model="openai/gpt-4o", api_base=api_base, api_key="stand-in-needs-no-key", messages=messages, tools=TOOLS_USED,
            metadata={"session_id": session_id, **IDENTITY},
        )  # fmt: skip
        for _ in range(100):  # litellm runs its callbacks in the background
            if callback.recorded:
                break
            await asyncio.sleep(0.02)
        await callback.aclose()
        return response
    finally:
        litellm.callbacks = [c for c in litellm.callbacks if c is not callback]


def _litellm() -> Any:
    from milliwatt._offline import import_litellm

    return import_litellm()  # offline: litellm's bundled price map, never a download


async def amain() -> str:
    from milliwatt.examples.offline_cascade import stand_in
    from milliwatt.testing import OpenAIStubServer

    async with offline_milliwatt("litellm-example.db") as mw:
        messages = await run(mw)
        with OpenAIStubServer(stand_in) as provider:
            await observe(mw, provider.api_base)
    return messages[-1]["content"]


def main() -> None:
    print(asyncio.run(amain()))


if __name__ == "__main__":
    main()
