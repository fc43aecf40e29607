"""Skip a tier that keeps passing on steps like this one, and keep probing it.

Every attempt of a gated tier costs energy even when it passes: a local model that reads a
4,000-token agent prompt and then escalates has spent CPU for nothing. When the same kind
of step (same system prompt and tools, same position in the tool loop) has been passed on
by the tier ``window`` times with fewer than ``min_answer_rate`` answered, the guard skips
it without calling it, except for probes (``Probes``), so a change in traffic (or a better
model) is noticed and the tier comes back as soon as it answers again.

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
class Probes:
    """When a tier that would be skipped is asked anyway: at the ``every``-th skip, then after
    twice as many skips each time a probe fails too, up to ``max_every``; a probe that is
    answered brings the interval back to ``every``.

    The backoff of a circuit breaker probing a failing service: on traffic the tier never
    serves, the probes' cost falls towards nothing (on GSM8K's 660 steps, 7 probes instead of
    64), and a tier that answers again is noticed within ``max_every`` skips.
    """

    every: int = 10
    max_every: int = 160
    _interval: int = field(default=0, init=False)
    _since: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.every <= self.max_every:
            raise ValueError(f"probes: need 1 <= probe_every ({self.every}) <= max_probe_every ({self.max_every})")
        self._interval = self.every

    @property
    def interval(self) -> int:
        return self._interval

    def skip(self) -> bool:
        """One more step that would be skipped: skip it (True) or probe it (False)?"""
        self._since += 1
        if self._since < self._interval:
            return True
        self._since = 0
        return False

    def probed(self, answered: bool) -> None:
        self._interval = self.every if answered else min(self._interval * 2, self.max_every)


@dataclass
class _History:
    outcomes: deque[bool]
    probes: Probes


@dataclass
class FutilityGuard(Tier):
    inner: Tier
    window: int = 20
    min_answer_rate: float = 0.05
    probe_every: int = 10
    max_probe_every: int = 160
    max_kinds: int = 4096  # kinds of step remembered, least recently seen dropped first
    _history: OrderedDict[str, _History] = field(default_factory=OrderedDict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.window < 1 or not 0 <= self.min_answer_rate <= 1:
            raise ValueError("window must be >= 1, min_answer_rate in [0, 1]")
        Probes(self.probe_every, self.max_probe_every)  # checks them
        self.name = self.inner.name
        self.token_budget = self.inner.token_budget

    async def attempt(self, step: Step) -> TierResult:
        kind = step_kind(step)
        history = self._history.get(kind) or self._history.setdefault(
            kind, _History(deque(maxlen=self.window), Probes(self.probe_every, self.max_probe_every))
        )
        self._history.move_to_end(kind)
        if len(self._history) > self.max_kinds:
            self._history.popitem(last=False)
        full = len(history.outcomes) == self.window
        answered = sum(history.outcomes)
        probe = full and answered < self.min_answer_rate * self.window
        if probe and history.probes.skip():
            return TierResult.passed(
                self.name,
                f"skipped: answered {answered} of the last {self.window} steps like this "
                f"(probing every {history.probes.interval}th)",
            )
        result = await self.inner.attempt(step)
        history.outcomes.append(result.answered)
        if probe:
            history.probes.probed(result.answered)
        return result

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        await self.inner.remember(step, message, answered_by, model=model)

    async def aclose(self) -> None:
        await self.inner.aclose()
