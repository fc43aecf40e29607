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

from ..quality import answer_values, context_values
from ..types import Message
from .base import Trimmed


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
