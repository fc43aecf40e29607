"""Which tool calls are free of side effects: one answer for every cheap tier.

An agent executes the tool calls it is given. A call replayed from the cache runs again; a
call proposed by a small local model runs unverified. Both are safe only for tools that only
read. Which tools those are is the agent owner's declaration (``tools:`` in the
configuration, ``{name: {cache: read_only | never}}``); a tool the declaration does not name
counts as read-only only when its schema carries MCP's annotation ``readOnlyHint: true``
(under ``function.annotations`` or the tool's own ``annotations``). Anything else (a tool
not named and not annotated, a tool the step does not offer) is assumed to write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError
from .types import Message, Step

POLICIES = ("read_only", "never")


class ReadOnlyTools:
    """The declared side-effect policy of an agent's tools."""

    def __init__(self, policy: Mapping[str, str] | None = None, *, where: str = "tools") -> None:
        self.policy = _checked(policy, where)

    def allows(self, name: str, step: Step) -> bool:
        """Is a call to ``name`` free of side effects (may it be replayed or run unverified)?"""
        declared = self.policy.get(name)
        if declared is not None:
            return declared == "read_only"
        tool = step.tool(name)
        return tool is not None and (
            _annotations(tool.get("function")).get("readOnlyHint") is True or _annotations(tool).get("readOnlyHint") is True
        )

    def first_unsafe(self, message: Message, step: Step) -> str | None:
        """The first tool called in ``message`` that is not free of side effects, or None."""
        for call in message.get("tool_calls") or []:
            name = (call.get("function") or {}).get("name")
            if not isinstance(name, str) or not self.allows(name, step):
                return str(name)
        return None


def _checked(policy: Mapping[str, str] | None, where: str) -> dict[str, str]:
    if policy is None:
        return {}
    if not isinstance(policy, Mapping):
        raise ConfigError(where, f"must map tool names to 'read_only' or 'never', got {policy!r}")
    for name, value in policy.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(where, f"tool names must be non-empty strings, got {name!r}")
        if value not in POLICIES:
            raise ConfigError(where, f"{name}: must be 'read_only' or 'never', got {value!r}")
    return dict(policy)


def _annotations(obj: Any) -> Mapping[str, Any]:
    ann = obj.get("annotations") if isinstance(obj, Mapping) else None
    return ann if isinstance(ann, Mapping) else {}
