"""``Milliwatt``: the one object agent code holds. One async call per agent step.

    async with Milliwatt.from_config("milliwatt.yaml") as mw:
        result = await mw.step(messages, tools=tools, session_id="s1", agent="support")
        messages.append(result.message)   # an OpenAI assistant message

One instance serves many concurrent agents: the cascade keeps no per-step state, and each
tier serialises only what must be (a llama.cpp context, the ledger's writer thread).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from .cascade import Cascade, RecordSink
from .energy import RemoteEnergyModel
from .tier import Tier
from .trimming import Trimmer
from .types import Step, StepMeta, StepResult


class Milliwatt:
    """The cascade with its ledger, as an async context manager that releases both."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        frontier_model: str = "openai/gpt-4o",
        ledger: RecordSink | None = None,
        trimmer: Trimmer | None = None,
        energy_model: RemoteEnergyModel | None = None,
    ) -> None:
        self.ledger = ledger
        self.cascade = Cascade(
            tiers, frontier_model=frontier_model, trimmer=trimmer, energy_model=energy_model, sink=ledger
        )
        self._closed = False

    @classmethod
    def from_config(
        cls,
        config: str | os.PathLike[str] | dict[str, Any] | None = None,
        *,
        wrap_ledger: Callable[[RecordSink], RecordSink] | None = None,
    ) -> Milliwatt:
        """Build every configured tier (models load lazily, on first use) and the ledger.

        ``wrap_ledger`` wraps the configured ledger in another sink (a replay adds each
        step's quality before the record is written), keeping the cascade unaware of it.
        """
        from .config import load_settings
        from .pricing import price
        from .registry import build_tier, check_energy_model

        settings = load_settings(config)
        # Every step's counterfactual needs these: check them now, and load them off the loop.
        check_energy_model(settings.frontier_model, "frontier_model")
        price(settings.frontier_model)
        # Tiers load their models on first use, so a failure here leaves nothing to release.
        tiers = [build_tier(name, settings) for name in settings.tiers]
        ledger: RecordSink | None = None
        if settings.ledger:
            from .ledger import Ledger

            ledger = Ledger(settings.ledger)
            if wrap_ledger is not None:
                ledger = wrap_ledger(ledger)
        return cls(
            tiers,
            frontier_model=settings.frontier_model,
            ledger=ledger,
            trimmer=Trimmer(settings.trim.keep_tool_results, settings.trim.encoding),
        )

    @property
    def tiers(self) -> list[Tier]:
        return self.cascade.tiers

    def tier(self, name: str) -> Tier:
        for t in self.cascade.tiers:
            if t.name == name:
                return t
        raise KeyError(f"no tier named {name!r} (tiers: {[t.name for t in self.cascade.tiers]})")

    async def step(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        response_format: dict[str, Any] | None = None,
        session_id: str | None = None,
        run_id: str | None = None,
        tenant: str | None = None,
        agent: str | None = None,
        metadata: dict[str, Any] | None = None,
        **options: Any,
    ) -> StepResult:
        """Answer one agent step with the cheapest tier that answers it well.

        ``messages``, ``tools``, ``tool_choice`` and ``response_format`` are OpenAI chat
        format; ``options`` are sampling options (temperature, max_tokens, seed, ...).
        Raises ``InvalidRequestError`` (a ValueError) naming the bad field.
        """
        if self._closed:
            raise RuntimeError("this Milliwatt instance is closed")
        meta = StepMeta(session_id, run_id, tenant, agent, dict(metadata or {}))
        step = Step.create(
            messages, tools=tools, tool_choice=tool_choice, response_format=response_format, options=options, meta=meta
        )
        return await self.cascade.run(step)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            await self.cascade.aclose()
        finally:
            if self.ledger is not None and hasattr(self.ledger, "aclose"):
                await self.ledger.aclose()

    async def __aenter__(self) -> Milliwatt:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

