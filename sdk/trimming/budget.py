"""Fit a step into a tier's token budget (a local model's context window), cheapest loss first.

1. Mask old observations: tool outputs older than the newest ``keep`` are replaced by the
   masking placeholder (ids kept), oldest first, until the step fits.
2. Drop the oldest units (a message, or a tool call with its results), never a protected
   message (system prompts, the user's first request, so the conversation still opens on
   it) and never the newest unit (the one being answered).

If what must stay still exceeds the budget, ``Trimmed.fits`` is False and the cascade does not
ask the tier: the step passes to the next one with the reason.
"""

from __future__ import annotations

from .base import Draft, units
from .outputs import masked


def fit(draft: Draft, budget: int, keep: int) -> None:
    outputs = draft.tool_outputs()
    names = draft.call_names()
    for i in outputs[: max(len(outputs) - keep, 0)]:
        if draft.tokens <= budget:
            return
        replacement = masked(draft.messages[i], names)  # type: ignore[arg-type]
        if replacement is not None:
            draft.replace(i, replacement)

    for unit in units(draft.step.messages)[:-1]:
        if draft.tokens <= budget:
            return
        if not draft.protected.intersection(unit):
            draft.drop(unit)
