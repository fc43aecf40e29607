"""Context trimming: fit a step into a tier's token budget without breaking the conversation.

Two moves, cheapest loss first:

1. Observation masking ("The Complexity Trap", 2025): tool outputs older than the newest
   ``keep_tool_results`` are replaced by a short placeholder. Agents rarely need stale
   observations verbatim, and this alone halves agent input at equal task success.
2. Dropping the oldest turns. Messages are grouped into units first, so an assistant
   message with tool calls always travels with the tool results that answer it (providers
   reject one without the other). System and developer prompts are always kept, and so is
   the newest unit (the one being answered).

If the kept minimum still exceeds the budget, the result says ``fits=False`` and the step is
sent as trimmed as it can be: the tier decides (llama.cpp reports the overflow of its window
and the local tier passes; rules and cache read only the tail anyway).
"""

from __future__ import annotations

from dataclasses import dataclass

from .tokens import count_request, message_tokens
from .types import Message, Step

MASK = "[older tool output omitted to save tokens]"


@dataclass(frozen=True)
class Trimmed:
    step: Step
    tokens_before: int
    tokens_after: int
    masked: int  # tool outputs replaced by the placeholder
    dropped: int  # messages removed
    fits: bool


def _units(messages: list[Message]) -> list[list[int]]:
    """Indices of non-system messages grouped so a tool call and its results stay together."""
    units: list[list[int]] = []
    for i, m in enumerate(messages):
        if m["role"] in ("system", "developer"):
            continue
        if m["role"] == "tool" and units and (messages[units[-1][0]].get("tool_calls")):
            units[-1].append(i)
        else:
            units.append([i])
    return units


class Trimmer:
    """Trims steps to token budgets."""

    def __init__(self, keep_tool_results: int = 3, encoding: str = "o200k_base") -> None:
        if keep_tool_results < 0:
            raise ValueError("keep_tool_results must be >= 0")
        self.keep_tool_results = keep_tool_results
        self.encoding = encoding

    def count(self, step: Step) -> int:
        return count_request(step.messages, step.tools, self.encoding)

    def trim(self, step: Step, budget: int | None, *, tokens_before: int | None = None) -> Trimmed:
        before = tokens_before if tokens_before is not None else self.count(step)
        if budget is None or before <= budget:
            return Trimmed(step, before, before, 0, 0, True)

        messages = list(step.messages)
        sizes = [message_tokens(m, self.encoding) for m in messages]
        total = before

        # 1. Mask old observations, oldest first, until it fits.
        tool_idx = [i for i, m in enumerate(messages) if m["role"] == "tool"]
        maskable = tool_idx[: max(len(tool_idx) - self.keep_tool_results, 0)]
        masked = 0
        for i in maskable:
            if total <= budget:
                break
            new = {**messages[i], "content": MASK}
            new_size = message_tokens(new, self.encoding)
            if new_size < sizes[i]:
                total -= sizes[i] - new_size
                messages[i], sizes[i] = new, new_size
                masked += 1

        # 2. Drop the oldest units (never the newest one).
        units = _units(messages)
        drop: set[int] = set()
        for unit in units[:-1]:
            if total <= budget:
                break
            drop.update(unit)
            total -= sum(sizes[i] for i in unit)
        # Chat templates expect the conversation to open on a user turn, so a plain
        # assistant turn left first by the cut goes too.
        rest = [u for u in units if u[0] not in drop]
        while len(rest) > 1 and messages[rest[0][0]]["role"] == "assistant" and not messages[rest[0][0]].get("tool_calls"):
            drop.update(rest.pop(0))
        kept = [m for i, m in enumerate(messages) if i not in drop]
        after = count_request(kept, step.tools, self.encoding)
        return Trimmed(step.with_messages(kept), before, after, masked, len(drop), after <= budget)

