"""``Milliwatt``: the one object agent code holds. One async call per agent step.

    async with await Milliwatt.open("milliwatt.yaml") as mw:
        result = await mw.step(messages, tools=tools, session_id="s1", agent="support")
        messages.append(result.message)   # an OpenAI assistant message

(``Milliwatt.from_config`` builds the same client for code without an event loop.)

``Milliwatt.stream`` answers the same step as a stream of OpenAI chunks (``milliwatt.streaming``).

One instance serves many concurrent agents: the cascade keeps no per-step state, and each
tier serialises only what must be (a llama.cpp context, the ledger's writer thread).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .cascade import Cascade, RecordSink, snapshot
from .energy import RemoteEnergyModel
from .tier import Tier
from .tokens import TokenCounter
from .trimming import Trimmer, build_trimmer
from .streaming import StepStream
from .types import Step, StepMeta, StepResult


class Milliwatt:
    """The cascade with its ledger, as an async context manager that releases both."""

    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        frontier_model: str = "openai/gpt-4o",
        ledger: RecordSink | None = None,
        trimmers: Mapping[str, Trimmer] | None = None,
        energy_model: RemoteEnergyModel | None = None,
    ) -> None:
        """``trimmers``: each tier's trimming pipeline by tier name (``milliwatt.trimming``); a
        tier not named is trimmed only to its token budget. ``from_config`` builds them from
        the configuration, with the default pipeline for the remote tier."""
        self.ledger = ledger
        counter = next(iter(trimmers.values())).counter if trimmers else None
        self.cascade = Cascade(
            tiers, frontier_model=frontier_model, trimmers=trimmers, counter=counter, energy_model=energy_model, sink=ledger
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
        from .pricing import require_price
        from .registry import build_tier, check_energy_model

        settings = load_settings(config)
        # Every step's counterfactual needs these: check them now, and load them off the loop.
        require_price(settings.frontier_model, "frontier_model")
        check_energy_model(settings.frontier_model, "frontier_model", settings)
        # Tiers load their models on first use, so a failure here leaves nothing to release.
        tiers = [build_tier(name, settings) for name in settings.tiers]
        ledger: RecordSink | None = None
        if settings.ledger:
            from .ledger import Ledger

            ledger = Ledger(settings.ledger)
            if wrap_ledger is not None:
                ledger = wrap_ledger(ledger)
        counter = TokenCounter(settings.trim.encoding)
        trimmers = {
            name: build_trimmer(getattr(settings.section(name), "trim", ()), settings.trim, counter)
            for name in settings.tiers
        }  # fmt: skip
        energy_model = RemoteEnergyModel(settings.energy.resolve())
        return cls(tiers, frontier_model=settings.frontier_model, ledger=ledger, trimmers=trimmers, energy_model=energy_model)

    @classmethod
    async def open(
        cls,
        config: str | os.PathLike[str] | dict[str, Any] | None = None,
        *,
        wrap_ledger: Callable[[RecordSink], RecordSink] | None = None,
    ) -> Milliwatt:
        """``from_config`` for async code: the blocking parts (reading the settings, checking
        the EcoLogits model, loading prices, migrating the ledger, loading a saved cache) run
        in a worker thread, so the event loop keeps serving while the client opens.

        Await it, then use the client as an async context manager that closes it::

            async with await Milliwatt.open("milliwatt.yaml") as mw:
                ...

        or ``mw = await Milliwatt.open(cfg)`` and ``await mw.aclose()`` when done.
        """
        return await asyncio.to_thread(cls.from_config, config, wrap_ledger=wrap_ledger)

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
        user: str | None = None,
        metadata: dict[str, Any] | None = None,
        **options: Any,
    ) -> StepResult:
        """Answer one agent step with the cheapest tier that answers it well.

        ``messages``, ``tools``, ``tool_choice`` and ``response_format`` are OpenAI chat
        format; ``options`` are sampling options (temperature, max_tokens, seed, ...).
        Raises ``InvalidRequestError`` (a ValueError) naming the bad field.

        The request is copied as the coroutine starts, before its first suspension: once
        ``await mw.step(...)`` is under way the caller may change its message list or dicts
        (another agent's turn, a retry loop) without changing what the tiers see or what
        the ledger records. (A task made with ``asyncio.create_task(mw.step(...))`` starts
        at the next turn of the loop: do not change the request before yielding to it.)
        The returned ``message`` is the caller's own copy too.
        """
        step = self._step(messages, tools, tool_choice, response_format, session_id, run_id, tenant, agent, user, metadata, options)
        return await self.cascade.run(step)

    def stream(
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
        user: str | None = None,
        metadata: dict[str, Any] | None = None,
        **options: Any,
    ) -> StepStream:
        """``step``, streamed: an async iterator of OpenAI ``chat.completion.chunk`` dicts (and
        an async context manager that closes it), whose ``result`` is the ``StepResult`` once
        it has ended (``milliwatt.streaming.StepStream``)::

            async with mw.stream(messages, tools=tools, session_id="s1") as stream:
                async for chunk in stream:
                    print(chunk["choices"][0]["delta"].get("content") or "", end="")
            messages.append(stream.result.message)

        The remote tier streams as its provider sends; a cheaper tier's whole answer is one
        chunk. The step is recorded when the stream ends, exactly as ``step`` records it; a
        stream closed early is recorded ``cancelled``, one the provider breaks raises
        ``RemoteStreamError``, both with the partial answer and its energy in the ledger.
        The request is validated and copied now (``InvalidRequestError`` is raised here).
        """
        step = self._step(messages, tools, tool_choice, response_format, session_id, run_id, tenant, agent, user, metadata, options)
        return self.cascade.stream(step)

    def _step(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        tool_choice: Any,
        response_format: dict[str, Any] | None,
        session_id: str | None,
        run_id: str | None,
        tenant: str | None,
        agent: str | None,
        user: str | None,
        metadata: dict[str, Any] | None,
        options: dict[str, Any],
    ) -> Step:
        """The validated step, made of copies of the caller's request."""
        if self._closed:
            raise RuntimeError("this Milliwatt instance is closed")
        messages, tools, tool_choice, response_format, options, metadata = snapshot(
            (messages, tools, tool_choice, response_format, options, metadata)
        )
        extra = dict(metadata) if isinstance(metadata, dict) else metadata or {}  # anything else: refused, named
        meta = StepMeta(session_id, run_id, tenant, agent, extra, user)
        return Step.create(
            messages, tools=tools, tool_choice=tool_choice, response_format=response_format, options=options, meta=meta
        )

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

