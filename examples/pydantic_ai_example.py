"""A pydantic-ai agent with milliwatt as its model: ``OpenAIChatModel`` with an
``OpenAIProvider`` over ``async_client(mw)``, a real ``openai.AsyncOpenAI`` answered in this
process by the cascade.

    python -m milliwatt.examples.pydantic_ai_example
"""

from __future__ import annotations

import asyncio
from typing import Any

from milliwatt.client import Milliwatt
from milliwatt.examples.offline_cascade import IDENTITY, INSTRUCTIONS, QUESTION, offline_milliwatt
from milliwatt.examples.offline_cascade import get_order_status as lookup


async def run(mw: Milliwatt, question: str = QUESTION, *, session_id: str = "pydantic-ai") -> Any:
    """Run the agent on ``question``; returns pydantic-ai's ``AgentRunResult``."""
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    from milliwatt.integrations.openai import async_client

    client = async_client(mw, session_id=session_id, **IDENTITY)
    model = OpenAIChatModel("milliwatt", provider=OpenAIProvider(openai_client=client))
    agent = Agent(model, instructions=INSTRUCTIONS)

    @agent.tool_plain
    def get_order_status(order_id: str) -> dict[str, Any]:
        """Get the status of an order by its order id.

        Args:
            order_id: The order id, digits only, e.g. '48213'.
        """
        return lookup(order_id)

    async with client:
        return await agent.run(question)


async def amain() -> str:
    async with offline_milliwatt("pydantic-ai-example.db") as mw:
        result = await run(mw)
    return str(result.output)


def main() -> None:
    print(asyncio.run(amain()))


if __name__ == "__main__":
    main()
