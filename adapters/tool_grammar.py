"""Tool calls from a model that has no tool-call format of its own.

SmolLM2 (and most small GGUF chat models) answer a "look this user up" request with
chat, never with an OpenAI tool call. So the local backend describes the tools in the
system text and decodes under a JSON-schema grammar of a union: one branch per tool,
``{"name": <const>, "arguments": <the tool's parameters>}``, plus ``{"reply": string}``
when a text answer is allowed. One constrained pass decides tool-or-text and fills the
arguments; a first "should I call a tool?" pass would cost a second decode for a
decision the grammar's first branch token already makes.

Pure Python (no llama_cpp import), so the format is testable without a model.
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from milliwatt.types import Message, Step, content_text


def tool_mode(step: Step) -> bool:
    """Decode under the tool grammar? Only when tools are offered and not switched off."""
    return bool(step.tools) and step.tool_choice != "none"


def allows_reply(step: Step) -> bool:
    return step.tool_choice in (None, "auto")


def offered_tools(step: Step) -> list[dict[str, Any]]:
    """The tools the answer may call: all of them, or the one ``tool_choice`` forces."""
    forced = step.tool_choice.get("function", {}).get("name") if isinstance(step.tool_choice, dict) else None
    return [t["function"] for t in step.tools if forced is None or t["function"]["name"] == forced]


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A copy that forbids undeclared keys, as OpenAI's strict mode does: otherwise the
    grammar lets a small model wander into invented arguments until max_tokens."""
    out = dict(schema)
    if out.get("type", "object") == "object" and "additionalProperties" not in out:
        out["additionalProperties"] = False
    out.setdefault("type", "object")
    out.setdefault("properties", {})
    return out


def answer_schema(step: Step) -> dict[str, Any]:
    """The union the grammar is built from. Tool branches come first, name before
    arguments, so the arguments are decoded knowing which tool they belong to."""
    branches: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": _strict(fn.get("parameters") or {})},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for fn in offered_tools(step)
    ]
    if allows_reply(step):
        branches.append(
            {"type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"], "additionalProperties": False}
        )
    return branches[0] if len(branches) == 1 else {"anyOf": branches}


def tools_prompt(step: Step) -> str:
    """The system text naming what the model may call, as compact signatures.

    Measured on SmolLM2-135M: with the full JSON schemas and a format instruction it
    invents argument values ("1234567890"); with one signature line per tool it copies
    "mia_li_3668" from the request. The grammar already enforces the JSON format, so
    the prompt need not describe it, and signatures keep the shared prefix short.
    """
    return "You can call these tools:\n" + "\n".join(f"- {_signature(fn)}" for fn in offered_tools(step))


def _signature(fn: dict[str, Any]) -> str:
    params = fn.get("parameters") or {}
    required = set(params.get("required") or ())
    args = ", ".join(
        f"{name}{'' if name in required else '?'}: {spec.get('type', 'any') if isinstance(spec, dict) else 'any'}"
        for name, spec in (params.get("properties") or {}).items()
    )
    description = f": {fn['description']}" if fn.get("description") else ""
    return f"{fn['name']}({args}){description}"


def chat_messages(step: Step) -> list[Message]:
    """The step as plain role/content messages any GGUF chat template can render.

    System and developer texts (and the tools text) are merged into one leading system
    message, so the long, stable part of an agent's prompt is a token prefix the KV cache
    can reuse across steps. Earlier tool calls are rendered in the same JSON the grammar
    produces, and tool results as user turns (ChatML templates know no "tool" role).
    """
    system = [step.system_text] if step.system_text else []
    if tool_mode(step):
        system.append(tools_prompt(step))
    out: list[Message] = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    for m in step.messages:
        role = m["role"]
        if role in ("system", "developer"):
            continue
        text = content_text(m.get("content"))
        if role == "assistant":
            calls = [
                json.dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")})
                for c in m.get("tool_calls") or []
            ]
            text = "\n".join(p for p in [text, *calls] if p)
        elif role == "tool":
            role, text = "user", f"Tool result: {text}"
        out.append({"role": role, "content": text})
    return out


def parse_answer(text: str) -> Message:
    """The grammar's JSON as an OpenAI assistant message (raises ValueError if malformed)."""
    data = json.loads(text, strict=False)  # the grammar admits raw control characters in strings
    if "reply" in data:
        return {"role": "assistant", "content": data["reply"]}
    call = {
        "id": f"call_{secrets.token_hex(12)}",
        "type": "function",
        "function": {"name": data["name"], "arguments": json.dumps(data["arguments"])},
    }
    return {"role": "assistant", "content": None, "tool_calls": [call]}


def decision_mask(text: str, *, branch_key: bool) -> list[bool]:
    """Which characters of the generated JSON the model actually chose.

    Values (string contents, numbers, literals) carry the decision; braces, quotes,
    colons and argument keys are mostly forced by the grammar, and their near-certain
    probabilities would only dilute the confidence quantile. With ``branch_key`` the
    first top-level key counts too: "name" versus "reply" is the tool-or-text choice.
    """
    mask = [False] * len(text)
    stack: list[str] = []
    expect_key = False
    seen_top_key = False
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            is_key = bool(stack) and stack[-1] == "o" and expect_key
            top_key = is_key and len(stack) == 1 and not seen_top_key
            if not is_key or (branch_key and top_key):
                mask[i + 1 : min(j, len(text))] = [True] * (min(j, len(text)) - i - 1)
            seen_top_key = seen_top_key or top_key
            i = j + 1
            continue
        if c == "{":
            stack.append("o")
            expect_key = True
        elif c == "[":
            stack.append("a")
        elif c in "}]":
            if stack:
                stack.pop()
            expect_key = False
        elif c == ":":
            expect_key = False
        elif c == ",":
            expect_key = bool(stack) and stack[-1] == "o"
        elif not c.isspace():
            mask[i] = True  # a digit or a letter of true/false/null
        i += 1
    return mask


def decision_tokens(pieces: list[str], text_mask: list[bool]) -> list[int]:
    """Indices of the generated tokens (given as their text pieces) that overlap chosen characters."""
    out, pos = [], 0
    for k, piece in enumerate(pieces):
        if any(text_mask[pos : pos + len(piece)]):
            out.append(k)
        pos += len(piece)
    return out
