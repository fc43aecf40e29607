"""Skip a tier that keeps passing on steps like this one, and keep probing it.

Every attempt of a gated tier costs energy even when it passes: a local model that reads a
4,000-token agent prompt and then escalates has spent CPU for nothing. When the same kind
of step (same system prompt and tools, same position in the tool loop) has been passed on
by the tier ``window`` times with fewer than ``min_answer_rate`` answered, the guard skips
it without calling it, except every ``probe_every``-th such step, so a change in traffic
(or a better model) is noticed and the tier comes back as soon as it answers again.

A wrapper, not a flag on the cascade: any tier can be guarded, and the decision is logged
as an ordinary pass with its reason.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .tier import Tier
from .types import Message, Step, TierResult


def step_kind(step: Step) -> str:
    """Steps alike for the tier's chances: same instructions, same tools, same kind of turn."""
    last = step.messages[-1]["role"]
    tools = ",".join(sorted(t["function"]["name"] for t in step.tools))
    return hashlib.sha256(f"{step.system_text}\x00{tools}\x00{last}".encode()).hexdigest()[:16]


@dataclass
class _History:
    outcomes: deque[bool]
    skipped: int = 0


@dataclass
class FutilityGuard(Tier):
    inner: Tier
    window: int = 20
    min_answer_rate: float = 0.05
    probe_every: int = 10
    max_kinds: int = 4096  # kinds of step remembered, least recently seen dropped first
    _history: OrderedDict[str, _History] = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1 or self.probe_every < 1 or not 0 <= self.min_answer_rate <= 1:
            raise ValueError("window and probe_every must be >= 1, min_answer_rate in [0, 1]")
        self.name = self.inner.name
        self.token_budget = self.inner.token_budget

    async def attempt(self, step: Step) -> TierResult:
        kind = step_kind(step)
        history = self._history.setdefault(kind, _History(deque(maxlen=self.window)))
        self._history.move_to_end(kind)
        if len(self._history) > self.max_kinds:
            self._history.popitem(last=False)
        full = len(history.outcomes) == self.window
        answered = sum(history.outcomes)
        if full and answered < self.min_answer_rate * self.window:
            history.skipped += 1
            if history.skipped % self.probe_every:
                return TierResult.passed(
                    self.name,
                    f"skipped: answered {answered} of the last {self.window} steps like this "
                    f"(probing every {self.probe_every}th)",
                )
        result = await self.inner.attempt(step)
        history.outcomes.append(result.answered)
        return result

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        await self.inner.remember(step, message, answered_by, model=model)

    async def aclose(self) -> None:
        await self.inner.aclose()
