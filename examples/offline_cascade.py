"""The cascade the framework examples run, offline: the support agent's rule pack, then a
remote tier pointed at a loopback stand-in (``milliwatt.testing.OpenAIStubServer``) that plays
the frontier model with scripted answers.

Each ``*_example.py`` asks the same question through its framework's front door::

    async with offline_milliwatt("example.db") as mw:
        ...   # the framework's agent, with milliwatt as its model

The rule ``order-status`` (examples/support_rules.yaml) answers "Where is my order 48213?"
with a ``get_order_status`` call; once the tool result is in, the stand-in answers from it.
So every front door gives the same tiers: ``rules`` then ``remote``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from milliwatt.client import Milliwatt
from milliwatt.testing import OpenAIStubServer

from . import SUPPORT_RULES
from .support_agent import ORDERS, TOOL_POLICY

QUESTION = "Where is my order 48213?"
INSTRUCTIONS = "You are the support assistant of Acme, an online shop. Be brief. Use the tools to look up orders."
# The support pack's rules answer agent "support" of tenant "acme" only: each front door names them.
IDENTITY = {"agent": "support", "tenant": "acme"}


def get_order_status(order_id: str) -> dict[str, Any]:
    """Get the status of an order by its order id (digits only, e.g. '48213')."""
    return ORDERS.get(order_id, {"error": f"no order {order_id}"})


def stand_in(request: dict[str, Any]) -> dict[str, Any]:
    """The frontier model's part, scripted: answer from the last tool result, or look the order up."""
    results = [m for m in request["messages"] if m["role"] == "tool"]
    if results:
        content = results[-1]["content"]
        text = content if isinstance(content, str) else "".join(p.get("text", "") for p in content)
        try:
            status = json.loads(text).get("status", "unknown")
        except (json.JSONDecodeError, AttributeError):
            status = text
        return {"role": "assistant", "content": f"Your order is {status}."}
    call = {"id": "call_stand_in_1", "type": "function", "function": {"name": "get_order_status", "arguments": '{"order_id": "48213"}'}}
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def config(api_base: str, ledger: str | Path | None) -> dict[str, Any]:
    """Rules, then the remote tier at the stand-in (labelled ``stand-in``, charged as gpt-4o)."""
    return {
        "tiers": ["rules", "remote"],
        "rules": {"packs": [str(SUPPORT_RULES)]},
        "tools": TOOL_POLICY,
        "remote": {"model": "openai/gpt-4o", "api_base": api_base, "api_key": "stand-in-needs-no-key", "label": "stand-in"},
        "ledger": f"sqlite:///{ledger}" if ledger else None,
    }


@contextlib.asynccontextmanager
async def offline_milliwatt(ledger: str | Path | None = "milliwatt-example.db") -> AsyncIterator[Milliwatt]:
    """A ``Milliwatt`` over the offline cascade, the stand-in running for the duration."""
    with OpenAIStubServer(stand_in) as server:
        async with await Milliwatt.open(config(server.api_base, ledger)) as mw:
            yield mw
