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
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from milliwatt.types import Message, Step, content_text

from . import copy_values


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
    out["properties"] = {k: _any_if_untyped(v) for k, v in (out.get("properties") or {}).items()}
    return out


_SHAPE_KEYS = {"type", "$ref", "oneOf", "anyOf", "allOf", "const", "enum", "properties", "items"}
_ANY_JSON = ["string", "number", "boolean", "array", "object", "null"]


def _any_if_untyped(schema: Any) -> Any:
    """A property schema that says nothing of its shape ("any value", as BFCL's ``any``
    becomes) made explicit, since llama.cpp's schema-to-grammar converter rejects it."""
    if isinstance(schema, dict) and not _SHAPE_KEYS & schema.keys():
        return {**schema, "type": _ANY_JSON}
    return schema


MAX_CALLS = 8  # calls in one answer, when the step allows parallel calls


@dataclass(frozen=True)
class AnswerShape:
    """What a tool-mode answer may be: a text ``reply`` (None when ``tool_choice`` demands a
    call), or one call, followed by up to ``max_calls - 1`` more, one per line. Each ``call``
    is a tool branch, name before arguments, so the arguments are decoded knowing which tool
    they belong to."""

    call: dict[str, Any]
    reply: dict[str, Any] | None
    max_calls: int


def answer_shape(step: Step, *, copy: bool = False, parallel: bool = False) -> AnswerShape:
    """The shape the grammar is built from. With ``copy``, string and number arguments are
    closed to the values the conversation holds (``copy_values``).

    Further calls are allowed when the request sets ``parallel_tool_calls`` true, or says
    nothing and ``parallel`` is true. After a complete call the model ends the answer unless
    it prefers a line break and another call, as for "the weather in Paris and in London".
    Not by default, because a small model also goes on where one call was asked for:
    measured on 40 BFCL "multiple" requests (one call each, 2-4 tools offered), SmolLM2-135M
    added a call to another tool on 4, 2 of them answers that were right alone.
    """
    found = copy_values.candidates(step.messages) if copy else None

    def parameters(fn: dict[str, Any]) -> dict[str, Any]:
        schema = fn.get("parameters") or {}
        return _strict(copy_values.constrain(schema, found) if found is not None else schema)

    branches: list[dict[str, Any]] = [
        {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, "arguments": parameters(fn)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for fn in offered_tools(step)
    ]
    reply = (
        {"type": "object", "properties": {"reply": {"type": "string"}}, "required": ["reply"], "additionalProperties": False}
        if allows_reply(step)
        else None
    )
    several = step.options.get("parallel_tool_calls", parallel) is True
    return AnswerShape(branches[0] if len(branches) == 1 else {"anyOf": branches}, reply, MAX_CALLS if several else 1)


def answer_schema(step: Step, *, copy: bool = False) -> dict[str, Any]:
    """The JSON schema of an answer's first object: one call, or the reply."""
    shape = answer_shape(step, copy=copy)
    if shape.reply is None:
        return shape.call
    return {"anyOf": [*shape.call.get("anyOf", [shape.call]), shape.reply]}


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
    can reuse across steps.
    """
    extra = [tools_prompt(step)] if tool_mode(step) else []
    return flatten_messages(step.messages, extra)


def flatten_messages(messages: Iterable[Message], system_extra: Iterable[str] = ()) -> list[Message]:
    """OpenAI agent messages as plain role/content turns: earlier tool calls in the JSON the
    grammar produces, tool results as user turns (ChatML templates know no "tool" role)."""
    messages = list(messages)
    system = [content_text(m.get("content")) for m in messages if m["role"] in ("system", "developer")]
    system = [t for t in [*system, *system_extra] if t]
    out: list[Message] = [{"role": "system", "content": "\n\n".join(system)}] if system else []
    for m in messages:
        role = m["role"]
        if role in ("system", "developer"):
            continue
        text = content_text(m.get("content"))
        if role == "assistant":
            calls = [
                json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"].get("arguments"))})
                for c in m.get("tool_calls") or []
            ]
            text = "\n".join(p for p in [text, *calls] if p)
        elif role == "tool":
            role, text = "user", f"Tool result: {text}"
        out.append({"role": role, "content": text})
    return out


def _arguments(raw: str | None) -> Any:
    try:
        return json.loads(raw or "{}")
    except json.JSONDecodeError:
        return raw


_DECODER = json.JSONDecoder(strict=False)  # the grammar admits raw control characters in strings


def parse_answer(text: str) -> Message:
    """The grammar's JSON as an OpenAI assistant message: a reply, or one call per JSON object
    (one per line). Raises ValueError if malformed."""
    found, rest = _objects(text)
    if rest or not found:
        raise ValueError(f"not one JSON object per line: {rest[:40] or 'empty'!r}")
    objects = [data for data, _ in found]
    if not all(isinstance(o, dict) for o in objects):
        raise ValueError("an answer line that is not an object")
    if "reply" in objects[0]:
        if len(objects) > 1:
            raise ValueError("a reply followed by more")
        return {"role": "assistant", "content": objects[0]["reply"]}
    calls = [
        {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": data["name"], "arguments": json.dumps(data["arguments"])},
        }
        for data in objects
    ]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def _objects(text: str) -> tuple[list[tuple[Any, str]], str]:
    """The complete JSON objects of ``text`` with their text, one after the other, and what
    follows the last of them (a cut-off object, or nothing)."""
    out: list[tuple[Any, str]] = []
    pos, end = 0, len(text.rstrip())
    while pos < end:
        while text[pos].isspace():
            pos += 1
        try:
            data, stop = _DECODER.raw_decode(text, pos)
        except ValueError:
            break
        out.append((data, text[pos:stop]))
        pos = stop
    return out, text[pos:].strip()


def repeats_a_call(text: str) -> bool:
    """Whether the answer's last complete call repeats an earlier one of it: the model loops
    (measured: SmolLM2 repeats a single call until max_tokens once further calls are allowed)."""
    if not text.rstrip().endswith("}"):
        return False
    objects, _ = _objects(text)
    return len(objects) > 1 and objects[-1][0] in [data for data, _ in objects[:-1]]


def without_repeats(text: str) -> str:
    """A tool answer up to its first call that repeats an earlier one (``repeats_a_call``
    stops decoding there): what is before it is the whole answer. Without a repeat, the text
    as it is. A call cut off at ``max_tokens`` is left to fail the gate even when it began like
    an earlier one: "Paris" and "Prague" begin alike."""
    objects, _ = _objects(text)
    for k, (data, _) in enumerate(objects):
        if any(data == earlier for earlier, _ in objects[:k]):
            return "\n".join(raw for _, raw in objects[:k])
    return text


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


def choice_spans(text: str, tools: list[dict[str, Any]], *, branch_key: bool) -> list[tuple[int, int, list[str]]]:
    """Where the answer picks among a closed set: ``(start, end, candidates)`` character spans.

    The grammar allows only a few strings at the first key ("name" or "reply", the
    tool-or-text choice), the tool name, and top-level string enum arguments of the chosen
    tool. There the model's raw probabilities mislead:
    SmolLM2 puts most of its mass on prose, which the grammar forbids, so a correct choice
    can look improbable. The confidence of a closed choice is its probability among the
    allowed candidates, which ``LlamaCppBackend`` computes for the tokens in these spans.
    """
    spans: list[tuple[int, int, list[str]]] = []
    key_open = text.find('"')
    if key_open < 0:
        return spans
    key_close = text.find('"', key_open + 1)
    if key_close < 0:
        return spans
    if branch_key:
        spans.append((key_open + 1, key_close, ["name", "reply"]))
    if text[key_open + 1 : key_close] != "name":
        return spans
    value = _string_after(text, key_close + 1)
    if value is None:
        return spans
    spans.append((*value, [fn["name"] for fn in tools]))
    chosen = next((fn for fn in tools if fn["name"] == text[value[0] : value[1]]), None)
    properties = ((chosen or {}).get("parameters") or {}).get("properties") or {}
    args_at = text.find('"arguments"', value[1])
    for arg, schema in properties.items():
        options = schema.get("enum") if isinstance(schema, dict) else None
        if args_at < 0 or not options or not all(isinstance(o, str) for o in options):
            continue
        key_at = text.find(f'"{arg}"', args_at)
        found = _string_after(text, key_at + len(arg) + 2) if key_at >= 0 else None
        if found:
            spans.append((*found, list(options)))
    return spans


def _string_after(text: str, pos: int) -> tuple[int, int] | None:
    """The character span of the next JSON string's contents after ``pos`` (no escapes:
    tool names and enum values have none)."""
    start = text.find('"', pos)
    end = text.find('"', start + 1) if start >= 0 else -1
    return (start + 1, end) if end > start >= 0 else None


def allowed_continuations(partial: str, candidates: list[str]) -> list[str]:
    """The strings a token may start with after ``partial`` inside a closed-choice span:
    what remains of each candidate that ``partial`` begins, closing quote included."""
    return [f"{c}\""[len(partial) :] for c in candidates if c.startswith(partial)]
