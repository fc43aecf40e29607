"""A LangChain agent (``langchain.agents.create_agent``, a LangGraph graph) with milliwatt as
its chat model: ``chat_model(mw)``, LangChain's ``ChatOpenAI`` answered in this process by the
cascade.

    python -m milliwatt.examples.langchain_example
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from milliwatt.client import Milliwatt
from milliwatt.examples.offline_cascade import IDENTITY, INSTRUCTIONS, QUESTION, offline_milliwatt
from milliwatt.examples.offline_cascade import get_order_status as lookup


async def run(mw: Milliwatt, question: str = QUESTION, *, session_id: str = "langchain") -> dict[str, Any]:
    """Run the agent on ``question``; returns LangGraph's final state (its ``messages``)."""
    from langchain_core.tools import tool
    from langchain.agents import create_agent

    from milliwatt.integrations.langchain import chat_model

    @tool
    def get_order_status(order_id: str) -> str:
        """Get the status of an order by its order id.

        Args:
            order_id: The order id, digits only, e.g. '48213'.
        """
        return json.dumps(lookup(order_id))

    llm = chat_model(mw, session_id=session_id, **IDENTITY)
    agent = create_agent(llm, tools=[get_order_status], system_prompt=INSTRUCTIONS)
    return await agent.ainvoke({"messages": [{"role": "user", "content": question}]}, {"recursion_limit": 8})


async def amain() -> str:
    async with offline_milliwatt("langchain-example.db") as mw:
        state = await run(mw)
    return str(state["messages"][-1].content)


def main() -> None:
    print(asyncio.run(amain()))


if __name__ == "__main__":
    main()
