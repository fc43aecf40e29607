"""A small customer-support agent: Python tools, an OpenAI-format loop, milliwatt in the middle.

This is the agent ``milliwatt demo`` runs. The loop is the ordinary one an agent already
has; the only change is that ``mw.step(...)`` stands where ``client.chat.completions.create``
stood. Tools run here, in the agent, exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from milliwatt import StepResult

SYSTEM_PROMPT = (
    "You are the support assistant of Acme, an online shop. Be brief and friendly. "
    "Use the tools to look up orders and customer accounts; never invent order data. "
    "Returns are free within 30 days of delivery; refunds reach the card in 5 to 7 business days. "
    "Shipping inside the EU takes 2 to 4 business days."
)

TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_order_status",
            "description": "Get the status of an order by its order id.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string", "description": "The order id, digits only, e.g. '48213'."}},
                "required": ["order_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_user_details",
            "description": "Get a customer's account details by user id.",
            "parameters": {
                "type": "object",
                "properties": {"user_id": {"type": "string", "description": "The user id, e.g. 'mia_li_3668'."}},
                "required": ["user_id"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "cancel_order",
            "description": "Cancel an order that has not shipped yet.",
            "parameters": {
                "type": "object",
                "properties": {
                    "order_id": {"type": "string"},
                    "reason": {"type": "string", "enum": ["no_longer_needed", "ordered_by_mistake", "other"]},
                },
                "required": ["order_id", "reason"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "search_help_center",
            "description": "Search the help-center articles.",
            "parameters": {
                "type": "object",
                "properties": {"query": {"type": "string"}},
                "required": ["query"],
            },
        },
    },
]

# What the agent's owner declares (configuration ``tools:``): which tools only read. The cache
# may replay, and the local model propose, calls to these; cancel_order writes, so neither may.
TOOL_POLICY: dict[str, dict[str, str]] = {
    "get_order_status": {"cache": "read_only"},
    "get_user_details": {"cache": "read_only"},
    "search_help_center": {"cache": "read_only"},
    "cancel_order": {"cache": "never"},
}

# A tiny back office, so the tools return real data.
ORDERS = {
    "48213": {"status": "shipped", "carrier": "DHL", "eta": "2026-12-02", "items": ["kettle"]},
    "51877": {"status": "processing", "eta": "2026-12-05", "items": ["desk lamp", "bulbs"]},
}
USERS = {
    "mia_li_3668": {"name": "Mia Li", "email": "mia.li@example.com", "orders": ["48213"], "member_since": "2021"},
}
ARTICLES = {
    "returns": "Returns are free within 30 days of delivery. Print the label from your account page.",
    "shipping": "EU shipping takes 2-4 business days; tracking is e-mailed when the parcel leaves.",
}


def get_order_status(order_id: str) -> dict[str, Any]:
    return ORDERS.get(order_id, {"error": f"no order {order_id}"})


def get_user_details(user_id: str) -> dict[str, Any]:
    return USERS.get(user_id, {"error": f"no user {user_id}"})


def cancel_order(order_id: str, reason: str) -> dict[str, Any]:
    order = ORDERS.get(order_id)
    if order is None:
        return {"error": f"no order {order_id}"}
    if order["status"] != "processing":
        return {"error": f"order {order_id} has {order['status']} and cannot be cancelled"}
    order["status"] = "cancelled"
    return {"ok": True, "order_id": order_id, "reason": reason}


def search_help_center(query: str) -> dict[str, Any]:
    hits = [text for key, text in ARTICLES.items() if key in query.lower()]
    return {"results": hits or list(ARTICLES.values())[:1]}


TOOL_FUNCTIONS: dict[str, Callable[..., dict[str, Any]]] = {
    "get_order_status": get_order_status,
    "get_user_details": get_user_details,
    "cancel_order": cancel_order,
    "search_help_center": search_help_center,
}

# The scripted traffic: each conversation is one session, each string one user turn.
# Repeats and paraphrases across sessions are what real support traffic looks like.
CONVERSATIONS: list[list[str]] = [
    ["Hi!", "Where is my order 48213?", "Thanks, that's all."],
    ["What is your return policy?"],
    ["What's your returns policy?"],
    ["Check order 51877 for me."],
    ["Please cancel my order 51877, I ordered it by mistake."],
    ["What are your opening hours?"],
    ["I want to file a chargeback for my last order, and I will involve a lawyer."],
    ["How long does shipping take inside the EU?"],
    ["How long does shipping take within the EU?"],
]

MAX_STEPS_PER_TURN = 4  # an agent loop should bound its tool loop


@dataclass
class Turn:
    session: str
    user: str
    result: StepResult


StepFn = Callable[..., Awaitable[StepResult]]


async def run_conversation(step: StepFn, session: str, user_turns: list[str], on_step: Callable[[Turn], None] | None = None) -> list[dict[str, Any]]:
    """The agent loop: ask, run any tool calls, feed the results back, until a text answer."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    for text in user_turns:
        messages.append({"role": "user", "content": text})
        for _ in range(MAX_STEPS_PER_TURN):
            result = await step(messages, tools=TOOLS, session_id=session, agent="support", tenant="acme", temperature=0)
            messages.append(result.message)
            if on_step:
                on_step(Turn(session, text, result))
            if not result.tool_calls:
                break
            for call in result.tool_calls:
                fn = TOOL_FUNCTIONS.get(call["function"]["name"])
                args = json.loads(call["function"]["arguments"] or "{}")
                try:
                    output = fn(**args) if fn else {"error": "unknown tool"}
                except TypeError as e:  # the model got the arguments wrong: tell it, as a real agent would
                    output = {"error": str(e)}
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.dumps(output)})
    return messages
