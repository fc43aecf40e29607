"""Shadow checks: a cheap tier's answer checked by the next tier off the critical path."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from milliwatt.cascade import Cascade
from milliwatt.ledger import Ledger
from milliwatt.testing import RecordingSink, ScriptedTier
from milliwatt.types import Step, TierResult

CHEAP = {"role": "assistant", "content": "Your bag allowance is two bags."}
REFERENCE = {"role": "assistant", "content": "You may check two bags of 23 kg."}


class CheckedTier(ScriptedTier):
    """Answers and asks for a shadow check of every answer."""

    async def attempt(self, step: Step) -> TierResult:
        return replace(await super().attempt(step), shadow=True)


class GatedTier(ScriptedTier):
    """Answers only once the test opens its gate: proof that nobody waits for it."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.open = asyncio.Event()

    async def attempt(self, step: Step) -> TierResult:
        await self.open.wait()
        return await super().attempt(step)


def step() -> Step:
    return Step.create([{"role": "user", "content": "How many bags can I check?"}])


@pytest.mark.asyncio
async def test_the_caller_gets_the_cheap_answer_at_once_and_the_check_is_recorded_with_its_cost() -> None:
    cheap = CheckedTier("cache", lambda s: CHEAP)
    remote = GatedTier("remote", lambda s: REFERENCE)
    sink = RecordingSink()
    cascade = Cascade([cheap, remote], frontier_model="openai/gpt-4o", sink=sink)

    result = await cascade.run(step())  # returns while the check waits: off the critical path
    assert result.message["content"] == CHEAP["content"] and result.record.tier == "cache"
    assert sink.records == []  # recorded once the check is in

    remote.open.set()
    await cascade.aclose()  # waits for writes in flight, the check included
    [record] = sink.records
    assert [(a.tier, a.outcome) for a in record.attempts] == [("cache", "answered"), ("remote", "shadow")]
    assert record.tier == "cache" and record.response == CHEAP  # the step's answer is still the cheap one
    shadow = record.attempts[1]
    assert shadow.evidence == {"checks": "cache", "answer": REFERENCE}
    assert record.energy.point_wh == pytest.approx(record.attempts[0].energy.point_wh + shadow.energy.point_wh)
    assert [(m, by) for _, m, by in cheap.remembered] == [(REFERENCE, "remote")]  # the checked tier learns
    assert remote.remembered == []


@pytest.mark.asyncio
async def test_a_failing_check_is_recorded_and_never_costs_the_answer(tmp_path) -> None:
    def broken(s: Step) -> None:
        raise RuntimeError("provider down")

    cheap = CheckedTier("cache", lambda s: CHEAP)
    async with Ledger(tmp_path / "l.db") as ledger:
        cascade = Cascade([cheap, ScriptedTier("remote", broken)], frontier_model="openai/gpt-4o", sink=ledger)
        result = await cascade.run(step())
        await cascade.aclose()
        await ledger.flush()
        [row] = ledger.read_steps()
    assert result.message == CHEAP and cheap.remembered == []
    assert [(a["tier"], a["outcome"]) for a in row["attempts"]] == [("cache", "answered"), ("remote", "shadow")]
    assert row["attempts"][1]["reason"].startswith("shadow check of cache failed: RuntimeError: provider down")


@pytest.mark.asyncio
async def test_an_unverified_answer_is_no_reference_for_the_check() -> None:
    """A gated local model's answer (not written back) is skipped: the frontier's is the reference."""
    cheap = CheckedTier("cache", lambda s: CHEAP)
    local = ScriptedTier("local", lambda s: {"role": "assistant", "content": "Maybe one bag."}, cacheable=False)
    remote = ScriptedTier("remote", lambda s: REFERENCE)
    sink = RecordingSink()
    cascade = Cascade([cheap, local, remote], frontier_model="openai/gpt-4o", sink=sink)
    await cascade.run(step())
    await cascade.aclose()
    [record] = sink.records
    assert [(a.tier, a.outcome) for a in record.attempts] == [("cache", "answered"), ("local", "shadow"), ("remote", "shadow")]
    assert record.attempts[1].reason.startswith("shadow check of cache: not a reference: ")
    assert [m for _, m, _ in cheap.remembered] == [REFERENCE]
