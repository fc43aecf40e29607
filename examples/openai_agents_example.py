"""An OpenAI Agents SDK agent with milliwatt as its model: ``OpenAIChatCompletionsModel`` over
``async_client(mw)``, a real ``openai.AsyncOpenAI`` answered in this process by the cascade.

    python -m milliwatt.examples.openai_agents_example

The SDK sends its own request shape (the agent's instructions as the system message, its
function tools with ``strict`` schemas); tool calls, their ids and results go back and forth
as over OpenAI's chat-completions API. Tracing is turned off: it would export to OpenAI.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from milliwatt.client import Milliwatt
from milliwatt.examples.offline_cascade import IDENTITY, INSTRUCTIONS, QUESTION, offline_milliwatt
from milliwatt.examples.offline_cascade import get_order_status as lookup


async def run(mw: Milliwatt, question: str = QUESTION, *, session_id: str = "openai-agents") -> Any:
    """Run the agent on ``question``; returns the SDK's ``RunResult``."""
    from agents import Agent, OpenAIChatCompletionsModel, Runner, function_tool, set_tracing_disabled

    from milliwatt.integrations.openai import async_client

    set_tracing_disabled(True)

    @function_tool
    def get_order_status(order_id: str) -> str:
        """Get the status of an order by its order id.

        Args:
            order_id: The order id, digits only, e.g. '48213'.
        """
        return json.dumps(lookup(order_id))  # the SDK would send a dict as its Python repr

    client = async_client(mw, session_id=session_id, **IDENTITY)
    agent = Agent(
        name="support",
        instructions=INSTRUCTIONS,
        tools=[get_order_status],
        model=OpenAIChatCompletionsModel(model="milliwatt", openai_client=client),
    )
    async with client:
        return await Runner.run(agent, question, max_turns=4)


async def amain() -> str:
    async with offline_milliwatt("openai-agents-example.db") as mw:
        result = await run(mw)
    return str(result.final_output)


def main() -> None:
    print(asyncio.run(amain()))


if __name__ == "__main__":
    main()
