"""The cascade's order, write-back, routing and records, with the shipped ScriptedTier double."""

import pytest

from milliwatt import (
    Completion,
    Milliwatt,
    ModelBackend,
    NoTierAnswered,
    RemoteUnavailable,
    TierResult,
)
from milliwatt.energy import CpuTimer, cpu_energy
from milliwatt.gates import GateDecision
from milliwatt.model_tier import ModelTier
from milliwatt.testing import RecordingSink as Sink
from milliwatt.testing import ScriptedTier
from milliwatt.tier import Tier

USER = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]


def reply(text):
    return lambda step: {"role": "assistant", "content": text}


def never(step):
    return None


class Router(Tier):
    name = "router"

    async def attempt(self, step):
        return TierResult.passed(self.name, "rule says remote", skip_to="remote")


@pytest.mark.asyncio
async def test_first_answering_tier_wins_and_later_ones_are_not_called():
    a, b, c = ScriptedTier("a", never), ScriptedTier("b", reply("from b")), ScriptedTier("c", reply("from c"))
    async with Milliwatt([a, b, c]) as mw:
        result = await mw.step(USER, session_id="s1")
    assert result.tier == "b" and result.content == "from b"
    assert [x.tier for x in result.record.attempts] == ["a", "b"]
    assert [x.outcome for x in result.record.attempts] == ["passed", "answered"]
    assert c.seen == []
    assert a.closed and b.closed and c.closed


@pytest.mark.asyncio
async def test_answers_are_written_back_to_earlier_tiers_only_when_cacheable():
    cache, model = ScriptedTier("cache", never), ScriptedTier("model", reply("x"))
    async with Milliwatt([cache, model]) as mw:
        await mw.step(USER)
    assert [(m["content"], by) for _, m, by in cache.remembered] == [("x", "model")]

    cache2, rules = ScriptedTier("cache", never), ScriptedTier("rules", reply("y"), cacheable=False)
    async with Milliwatt([cache2, rules]) as mw:
        await mw.step(USER)
    assert cache2.remembered == []


@pytest.mark.asyncio
async def test_a_routing_decision_skips_to_the_named_tier():
    local, remote = ScriptedTier("local", reply("local")), ScriptedTier("remote", reply("remote"))
    async with Milliwatt([Router(), local, remote]) as mw:
        result = await mw.step(USER)
    assert result.tier == "remote"
    assert [(x.tier, x.outcome) for x in result.record.attempts] == [("router", "passed"), ("local", "skipped"), ("remote", "answered")]
    assert local.seen == []


@pytest.mark.asyncio
async def test_each_tier_gets_the_step_trimmed_to_its_budget():
    long = [{"role": "system", "content": "sys"}]
    for i in range(30):
        long += [{"role": "user", "content": f"question {i} " * 20}, {"role": "assistant", "content": f"answer {i} " * 20}]
    long.append({"role": "user", "content": "last"})
    small, big = ScriptedTier("small", never, token_budget=100), ScriptedTier("big", reply("ok"))
    async with Milliwatt([small, big]) as mw:
        result = await mw.step(long)
    assert len(small.seen[0].messages) < len(long) and small.seen[0].messages[-1]["content"] == "last"
    assert len(big.seen[0].messages) == len(long)
    rec = result.record
    assert rec.input_tokens_raw == rec.input_tokens_sent > 1000
    assert rec.attempts[0].input_tokens < 200


@pytest.mark.asyncio
async def test_record_carries_energy_ranges_and_the_frontier_counterfactual():
    async with Milliwatt([ScriptedTier("rules", reply("hi there"))], frontier_model="openai/gpt-4o") as mw:
        rec = (await mw.step(USER)).record
    assert rec.energy.method == "cpu-time"
    assert rec.baseline_energy.method == "estimate" and rec.baseline_model == "openai/gpt-4o"
    assert 0 < rec.baseline_energy.low_wh < rec.baseline_energy.point_wh < rec.baseline_energy.high_wh
    assert rec.energy.high_wh < rec.baseline_energy.low_wh
    assert rec.baseline_cost_usd > 0 and rec.cost_usd == 0
    assert rec.step_id and len(rec.step_id) == 26  # a ULID


@pytest.mark.asyncio
async def test_every_tier_passing_is_an_error_naming_the_reasons():
    async with Milliwatt([ScriptedTier("a", never)]) as mw:
        with pytest.raises(NoTierAnswered, match="a: script passed"):
            await mw.step(USER)


def test_cpu_energy_uses_the_per_vcpu_range_and_the_facility_factors():
    e = cpu_energy(3600.0)
    # 1.5/2.5/4.0 W per vCPU x server overhead 1.3 x site PUE 1.2 (coefficients mw-2026.12)
    assert (e.low_wh, e.point_wh, e.high_wh) == pytest.approx((1.5 * 1.56, 2.5 * 1.56, 4.0 * 1.56)) and e.method == "cpu-time"
    assert e.observed.cpu_seconds == 3600.0 and e.version == "mw-2026.12" and "facility 1.56" in e.basis
    timer = CpuTimer()
    with timer.measure():
        sum(range(100000))
    assert timer.seconds > 0


@pytest.mark.asyncio
async def test_a_route_to_an_unknown_tier_is_ignored():
    local = ScriptedTier("local", reply("local"))
    async with Milliwatt([Router(), local]) as mw:
        result = await mw.step(USER)
    assert result.tier == "local"


class Down(Tier):
    name = "remote"

    async def attempt(self, step):
        raise RemoteUnavailable("connection refused", backend="litellm", model="openai/gpt-4o")




@pytest.mark.asyncio
async def test_a_failing_last_resort_is_logged_then_raised():
    sink = Sink()
    async with Milliwatt([ScriptedTier("local", never), Down()], ledger=sink) as mw:
        with pytest.raises(RemoteUnavailable):
            await mw.step(USER)
    (rec,) = sink.records
    assert rec.tier == "error"
    assert [(a.tier, a.outcome) for a in rec.attempts] == [("local", "passed"), ("remote", "error")]
    assert "RemoteUnavailable: connection refused" in rec.attempts[1].reason


# ------------------------------------------------------------------ write-back of model answers


class FixedBackend(ModelBackend):
    model = "m"

    async def complete(self, step, *, abort=None) -> Completion:
        return Completion({"role": "assistant", "content": "model says"}, "m", 10, 3, token_logprobs=(-0.01,) * 3, cpu_seconds=0.01)


class AcceptAll:
    def check(self, step, completion):
        return GateDecision(True, 0.99, "confident")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "gate, write_back, stored",
    [(AcceptAll(), None, False), (AcceptAll(), True, True), (None, None, True), (None, False, False)],
    ids=["local-default", "local-opt-in", "remote-default", "remote-opt-out"],
)
async def test_local_answers_are_not_written_back_unless_configured(gate, write_back, stored):
    cache = ScriptedTier("cache", never)
    tier = ModelTier("model", FixedBackend(), gate=gate, write_back=write_back)
    async with Milliwatt([cache, tier]) as mw:
        result = await mw.step(USER)
    assert result.tier == "model" and result.content == "model says"
    assert bool(cache.remembered) is stored
