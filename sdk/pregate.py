"""Skip a tier on steps like those it did not answer: its earlier steps, nearest by meaning.

A gated tier (the local model) spends its CPU time whether its answer stands or not: on
traffic it cannot serve (grade-school maths for a 135M model) every attempt is a loss. The
futility guard (``milliwatt.futility``) skips a kind of step defined exactly (same
instructions, tools and turn); the pre-gate generalises it by meaning. Each step is embedded
(the last user message and the tools on offer, by the cache's MiniLM); when the ``k`` most
similar earlier steps the tier was asked (cosine at least ``min_similarity``) include fewer
than ``min_answer_rate`` answered, the tier is not asked, but for probes
(``milliwatt.futility.Probes``), so a change in traffic, or a better model, is noticed.

The embedding's own CPU time is charged to the attempt, asked or skipped. It is small next to
what it saves (a few milliseconds against about a second of local decoding on 2 cores).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import replace

import numpy as np

from .energy import CpuCoefficients, cpu_energy
from .futility import Probes
from .tier import Tier
from .types import Message, Step, TierResult, content_text

Embed = Callable[[str], Awaitable[tuple[np.ndarray, float]]]  # text -> (unit vector, CPU seconds)
_TEXT_CHARS = 2000


def step_text(step: Step) -> str:
    """What a step asks, for similarity: the latest user message and the tools on offer."""
    user = next((content_text(m.get("content")) for m in reversed(step.messages) if m["role"] == "user"), "")
    tools = ", ".join(t["function"]["name"] for t in step.tools)
    return f"{user[-_TEXT_CHARS:]}\ntools: {tools}" if tools else user[-_TEXT_CHARS:]


class PreGate(Tier):
    def __init__(
        self,
        inner: Tier,
        embed: Embed,
        *,
        k: int = 8,
        min_similarity: float = 0.0,
        min_answer_rate: float = 0.1,
        probe_every: int = 10,
        max_probe_every: int = 160,
        history: int = 4096,
        cpu: CpuCoefficients | None = None,
        close: Callable[[], None] | None = None,
    ) -> None:
        if k < 1 or history < k:
            raise ValueError("pregate: k must be >= 1, history >= k")
        self.inner = inner
        self.name = inner.name
        self.token_budget = inner.token_budget
        self.embed = embed
        self.k, self.min_similarity, self.min_answer_rate = k, min_similarity, min_answer_rate
        self.probes = Probes(probe_every, max_probe_every)
        self.cpu = cpu or CpuCoefficients.of()
        self._close = close
        self._vectors: np.ndarray | None = None  # (history, dim), a ring
        self._answered = np.zeros(history, dtype=bool)
        self._size = self._next = 0
        self._lock = threading.Lock()

    def _neighbours(self, vec: np.ndarray) -> tuple[int, int]:
        """(similar earlier steps among the k nearest, how many of them were answered)."""
        with self._lock:
            if self._vectors is None or self._size == 0:
                return 0, 0
            sims = self._vectors[: self._size] @ vec
            answered = self._answered[: self._size]
        nearest = np.argsort(-sims)[: self.k]
        close = nearest[sims[nearest] >= self.min_similarity]
        return len(close), int(answered[close].sum())

    def _add(self, vec: np.ndarray, answered: bool) -> None:
        with self._lock:
            if self._vectors is None:
                self._vectors = np.zeros((len(self._answered), len(vec)), dtype=np.float32)
            self._vectors[self._next] = vec
            self._answered[self._next] = answered
            self._next = (self._next + 1) % len(self._answered)
            self._size = min(self._size + 1, len(self._answered))

    async def attempt(self, step: Step) -> TierResult:
        vec, cpu_s = await self.embed(step_text(step))
        spent = cpu_energy(cpu_s, self.cpu)
        similar, answered = self._neighbours(vec)
        probe = similar >= self.k and answered < self.min_answer_rate * similar
        if probe and self.probes.skip():
            reason = (
                f"pre-gate: {answered} of the {similar} most similar earlier steps answered "
                f"(cosine >= {self.min_similarity}); probing every {self.probes.interval}th"
            )
            return TierResult.passed(self.name, reason, energy=spent)
        result = await self.inner.attempt(step)
        self._add(vec, result.answered)
        if probe:
            self.probes.probed(result.answered)
        return replace(result, energy=result.energy + spent)

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        await self.inner.remember(step, message, answered_by, model=model)

    async def aclose(self) -> None:
        try:
            await self.inner.aclose()
        finally:
            if self._close is not None:
                self._close()
