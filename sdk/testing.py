"""Test doubles shipped with the package (as pydantic-ai ships TestModel).

``ScriptedTier`` answers from a function of the step, so agent code can test its loop,
its tool handling and its ledger queries without loading any model.
"""

from __future__ import annotations

from collections.abc import Callable

from .energy import CpuTimer, cpu_energy
from .tier import Tier
from .types import Message, Step, TierResult


class ScriptedTier(Tier):
    """A tier whose answer is ``script(step)``: a message to answer, or None to pass.

    ``remembered`` records write-backs, so tests can assert what a cache would have stored.
    """

    def __init__(self, name: str, script: Callable[[Step], Message | None], *, token_budget: int | None = None, cacheable: bool = True) -> None:
        self.name = name
        self.script = script
        self.token_budget = token_budget
        self.cacheable = cacheable
        self.seen: list[Step] = []
        self.remembered: list[tuple[Step, Message, str]] = []
        self.closed = False

    async def attempt(self, step: Step) -> TierResult:
        self.seen.append(step)
        timer = CpuTimer()
        with timer.measure():
            message = self.script(step)
        energy = cpu_energy(timer.seconds)
        if message is None:
            return TierResult.passed(self.name, "script passed", energy=energy)
        return TierResult(self.name, message, "script answered", energy, signal=1.0, model=f"scripted:{self.name}", cacheable=self.cacheable)

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        self.remembered.append((step, message, answered_by))

    async def aclose(self) -> None:
        self.closed = True
