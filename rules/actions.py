"""What a matched rule does: reply, refuse, call a tool, route the step (to another tier, or
away from some), or set the step's token budget.

An action may still decline a step its conditions matched (the tool is not offered, the
rendered arguments fail the tool's schema, ``tool_choice`` forbids a text reply): it raises
``Declined`` and the engine tries the next rule. A rule never sends the agent a message
the agent's own request rules out.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for

from milliwatt.types import Message, Step

from .templates import MISSING, Template, lookup


class Declined(Exception):
    """The rule matched but cannot answer this step; the message says why."""


@dataclass(frozen=True)
class Reply:
    """A fixed or templated text reply; ``refuse`` is a reply labelled ``refusal``."""

    text: Template
    label: str | None = None

    @property
    def uses_result(self) -> bool:
        return bool(self.text.result_fields)

    def render(self, step: Step, captures: Mapping[str, str | None], result: Any = MISSING) -> Message:
        if step.tool_choice == "required" or isinstance(step.tool_choice, dict):
            raise Declined("tool_choice requires a tool call, not a text reply")
        if step.response_format is not None and step.response_format.get("type") != "text":
            raise Declined(f"response_format {step.response_format['type']!r} asks for structured output")
        return {"role": "assistant", "content": self.text.render(captures, step.meta, result)}


@dataclass(frozen=True)
class ToolCall:
    """A templated call of a tool the step offers, its arguments checked against the tool's schema.

    ``arguments`` is plain YAML data whose strings are Templates. An argument that is
    exactly one ``{capture}`` whose group did not take part is left out, so optional
    groups map to optional parameters.
    """

    name: str
    arguments: Mapping[str, Any]

    @property
    def uses_result(self) -> bool:
        return any(t.result_fields for t in templates_in(self.arguments))

    def render(self, step: Step, captures: Mapping[str, str | None], result: Any = MISSING) -> Message:
        if step.tool_choice == "none":
            raise Declined("tool_choice is 'none'")
        if isinstance(step.tool_choice, dict) and step.tool_choice["function"]["name"] != self.name:
            raise Declined(f"tool_choice forces {step.tool_choice['function']['name']!r}")
        tool = step.tool(self.name)
        if tool is None:
            raise Declined(f"tool {self.name!r} is not offered")
        schema = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        args = _render(self.arguments, captures, step, result)
        properties = schema.get("properties", {})
        args = {k: coerce(v, properties.get(k, {})) for k, v in args.items()}
        error = best_match(validator_for(schema)(schema).iter_errors(args))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "arguments"
            raise Declined(f"{self.name} {where}: {error.message}")
        call = {"id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(args, ensure_ascii=False)}}
        return {"role": "assistant", "content": None, "tool_calls": [call]}


@dataclass(frozen=True)
class Route:
    """A routing decision: the rules tier passes, and the cascade goes straight to ``tier``
    (if given), not asking the ``forbid`` tiers for this step."""

    tier: str | None
    forbid: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Budget:
    """The rules tier passes, and every later tier of the step gets at most this many input tokens."""

    max_input_tokens: int


Action = Reply | ToolCall | Route | Budget

_ABSENT = object()


def templates_in(value: Any) -> list[Template]:
    """Every template in a tool call's arguments."""
    if isinstance(value, Template):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in templates_in(v)]
    if isinstance(value, list):
        return [t for v in value for t in templates_in(v)]
    return []


def _render(value: Any, captures: Mapping[str, str | None], step: Step, result: Any) -> Any:
    if isinstance(value, Template):
        for f in value.result_fields:  # a tool call is never sent with a hole where a result field was
            if lookup(f, captures, step.meta, result) is MISSING:
                raise Declined(f"the latest tool result has no field {f[7:]!r} (template {value.source!r})")
        field = value.lone_field
        if field is not None:
            v = lookup(field, captures, step.meta, result)
            return _ABSENT if v is None and not field.startswith("result.") else v  # a result field keeps its JSON type
        return value.render(captures, step.meta, result)
    if isinstance(value, Mapping):
        rendered = {k: _render(v, captures, step, result) for k, v in value.items()}
        return {k: v for k, v in rendered.items() if v is not _ABSENT}
    if isinstance(value, list):
        return [v for v in (_render(x, captures, step, result) for x in value) if v is not _ABSENT]
    return value


_INT = re.compile(r"[+-]?\d+")
_TRUE = {"true", "yes", "y", "on", "1"}
_FALSE = {"false", "no", "n", "off", "0"}


def coerce(value: Any, schema: Mapping[str, Any]) -> Any:
    """Convert a rendered string to the JSON type the tool's schema declares for it.

    Captures are always strings; "12" for an integer parameter must become 12. A value
    that does not convert is left as it is, and schema validation then rejects it.
    """
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else set(declared or ())
    if isinstance(value, str):
        if not types or "string" in types:
            return value
        text = value.strip()
        if "integer" in types and _INT.fullmatch(text):
            return int(text)
        if "number" in types:
            if _INT.fullmatch(text):
                return int(text)
            try:
                number = float(text)
            except ValueError:
                number = math.nan
            if math.isfinite(number):  # JSON has no NaN or Infinity
                return number
        if "boolean" in types and text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and types == {"string"}:
        return str(value)
    return value
