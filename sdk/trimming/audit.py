"""What trimming cost a step, measured against the answer it got.

In an open-loop replay the frontier's recorded answer was produced from the full context and
cannot be re-run on the trimmed one. What can be measured is whether trimming removed
something that answer needed: a step **lost content** when its answer uses a value (an id,
a flight number, an amount, a date, a name: ``milliwatt.quality.salient_values``) that the
full context holds and the trimmed one does not, or calls a tool whose schema was not
offered. Each loss is charged to the first strategy after which the value (or tool) was gone.

Values the full context does not hold (a total the model computed) are not losses: trimming
could not have removed them.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Iterator
from typing import Any

from ..quality import salient_values
from ..types import Message, content_text
from .base import Trimmed


@functools.lru_cache(maxsize=16384)
def _values(text: str) -> frozenset[str]:
    """The salient values of a text; of a JSON text, those of its leaves (so that the same
    values written compactly or spaced, as ``compact_json`` rewrites them, are the same)."""
    if not text:
        return frozenset()
    if text.lstrip()[:1] in ("{", "["):
        try:
            parsed = json.loads(text)
        except ValueError:
            pass
        else:
            return frozenset().union(*(salient_values(leaf) for leaf in _leaves(parsed)))
    return frozenset(salient_values(text))


def _leaves(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        yield str(value)


def _call_values(message: Message) -> set[str]:
    out: set[str] = set()
    for call in message.get("tool_calls") or []:
        try:
            args = json.loads(call["function"].get("arguments") or "{}")
        except ValueError:
            args = call["function"].get("arguments") or ""
        for leaf in _leaves(args):
            out |= _values(leaf)
    return out


def answer_values(answer: Message) -> set[str]:
    """The values an answer states or passes to a tool (argument values, not their names)."""
    return set(_values(content_text(answer.get("content")))) | _call_values(answer)


def context_values(messages: Iterable[Message]) -> set[str]:
    out: set[str] = set()
    for m in messages:
        out |= _values(content_text(m.get("content")))
        out |= _call_values(m)
    return out


def lost_content(trimmed: Trimmed, answer: Message) -> dict[str, list[str]]:
    """By strategy, what ``answer`` needed that the strategy removed from the request ({}:
    nothing). Entries read ``tool <name>`` or ``value <value>``."""
    if trimmed.raw is None:
        return {}
    lost: dict[str, list[str]] = {}
    called = {c["function"]["name"] for c in answer.get("tool_calls") or []}
    for name in sorted(called & set(trimmed.withheld)):
        stage = next(s for s in trimmed.stages if name not in {t["function"]["name"] for t in s.step.tools})
        lost.setdefault(stage.strategy, []).append(f"tool {name}")
    needed = answer_values(answer)
    missing = (needed & context_values(trimmed.raw.messages)) - context_values(trimmed.step.messages)
    for value in sorted(missing):
        stage = next(s for s in trimmed.stages if value not in context_values(s.step.messages))
        lost.setdefault(stage.strategy, []).append(f"value {value.split(':', 1)[-1]}")
    return lost
