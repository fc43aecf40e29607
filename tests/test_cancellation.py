"""A step the caller cancels (a timeout, ``task.cancel()``) is recorded with outcome ``cancelled``
and the energy spent until then; the ``CancelledError`` reaches the caller; a cancelled llama.cpp
decode stops, so the next step gets the model at once."""

from __future__ import annotations

import asyncio
import re
import time

import pytest
from conftest_models import local_backend  # noqa: F401 - session fixture

from milliwatt import Completion, Milliwatt, ModelBackend, Step, Tier, TierResult
from milliwatt.adapters import LlamaCppBackend
from milliwatt.energy import CpuCoefficients, cpu_energy
from milliwatt.model_tier import ModelTier
from milliwatt.testing import ScriptedTier
from milliwatt.tier import current_spend

USER = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]


@pytest.fixture(autouse=True, scope="module")
def _tokenizer_loaded():
    """Load tiktoken's encoding first (a second), so a 0.1 s timeout lands inside a tier."""
    from milliwatt.tokens import encoding

    encoding()


class Sink:
    def __init__(self, delay_s: float = 0.0):
        self.records = []
        self.delay_s = delay_s

    async def write(self, record):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.records.append(record)


class Metered(Tier):
    """Passes, having spent a known amount of CPU time."""

    def __init__(self, name: str, cpu_s: float) -> None:
        self.name = name
        self.cpu_s = cpu_s

    async def attempt(self, step):
        return TierResult.passed(self.name, "not mine", energy=cpu_energy(self.cpu_s))


class Stuck(Tier):
    """Works for a while (says so through the attempt's Spend), then hangs until cancelled."""

    def __init__(self, name: str, cpu_s: float = 0.0) -> None:
        self.name = name
        self.cpu_s = cpu_s
        self.started = asyncio.Event()

    async def attempt(self, step):
        spend = current_spend()
        assert spend is not None  # the cascade opens one per attempt
        spend.cpu_seconds += self.cpu_s
        self.started.set()
        await asyncio.sleep(60)
        raise AssertionError("not cancelled")


@pytest.mark.asyncio
async def test_a_timed_out_step_is_recorded_as_cancelled_with_the_energy_spent():
    sink = Sink()
    async with Milliwatt([Metered("rules", 1.0), Stuck("remote", cpu_s=0.5)], ledger=sink) as mw:
        t0 = time.perf_counter()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(mw.step(USER, session_id="s1"), 0.1)
        assert time.perf_counter() - t0 < 1.0
    (rec,) = sink.records
    assert rec.tier == "cancelled" and rec.model is None and rec.output_tokens == 0
    assert [(a.tier, a.outcome) for a in rec.attempts] == [("rules", "passed"), ("remote", "cancelled")]
    assert re.fullmatch(r"cancelled by the caller after 0\.\d{3} s in this tier", rec.attempts[1].reason)
    assert rec.attempts[1].energy == cpu_energy(0.5)  # what the tier said it had spent
    assert rec.energy.point_wh == pytest.approx(cpu_energy(1.5).point_wh)
    assert rec.meta.session_id == "s1" and rec.input_tokens_raw > 0 and rec.baseline_energy.point_wh > 0
    assert 0.1 <= rec.latency_s < 1.0


@pytest.mark.asyncio
async def test_task_cancel_propagates_and_the_step_is_still_recorded():
    sink = Sink()
    stuck = Stuck("local")
    async with Milliwatt([ScriptedTier("rules", lambda s: None), stuck, ScriptedTier("remote", lambda s: {"role": "assistant", "content": "x"})], ledger=sink) as mw:
        task = asyncio.create_task(mw.step(USER))
        await stuck.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    (rec,) = sink.records
    assert rec.tier == "cancelled"
    assert [(a.tier, a.outcome) for a in rec.attempts] == [("rules", "passed"), ("local", "cancelled")]
    assert rec.attempts[1].energy.method == "none"  # the tier could not tell: nothing charged


@pytest.mark.asyncio
async def test_a_slow_record_write_is_not_cut_off_and_close_waits_for_it():
    sink = Sink(delay_s=0.2)
    mw = Milliwatt([Stuck("remote")], ledger=sink)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(mw.step(USER), 0.05)
    await mw.aclose()
    assert [r.tier for r in sink.records] == ["cancelled"]


class HangingBackend(ModelBackend):
    """A backend that, like llama.cpp, reports the CPU time of a call cut off by a cancel."""

    model = "smol"

    async def complete(self, step, *, abort=None) -> Completion:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            current_spend().cpu_seconds += 2.0
            raise
        raise AssertionError("not cancelled")


@pytest.mark.asyncio
async def test_a_model_tier_charges_a_cut_off_call_at_its_own_cpu_coefficients():
    sink = Sink()
    coeff = CpuCoefficients(1.0, 2.0, 3.0)
    async with Milliwatt([ModelTier("local", HangingBackend(), cpu=coeff)], ledger=sink) as mw:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(mw.step(USER), 0.05)
    (attempt,) = sink.records[0].attempts
    assert attempt.outcome == "cancelled" and attempt.energy == cpu_energy(2.0, coeff)


# ------------------------------------------------------------------ the real model

COUNT = [{"role": "user", "content": "Count from 1 to 1000, one number after another, separated by commas."}]


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="session")
async def test_a_cancelled_llama_decode_stops_and_frees_the_model(local_backend: LlamaCppBackend) -> None:  # noqa: F811
    sink = Sink()
    saved = local_backend.max_tokens
    local_backend.max_tokens = 1500  # a decode of many seconds, unless it is stopped
    try:
        mw = Milliwatt([ModelTier("local", local_backend)], ledger=sink)  # ungated: it would answer
        await local_backend.complete(Step.create([{"role": "user", "content": "Hi."}], options={"max_tokens": 1}))  # loaded
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(mw.step(COUNT, max_tokens=1500), 1.5)
        t0 = time.perf_counter()
        nxt = await local_backend.complete(Step.create([{"role": "user", "content": "Say hi."}], options={"max_tokens": 2}))
        waited = time.perf_counter() - t0
    finally:
        local_backend.max_tokens = saved
    print(f"next step after the cancel took {waited:.2f}s")
    assert nxt.output_tokens > 0
    assert waited < 1.5  # the cancelled decode stopped at its next token, not after 1500
    (rec,) = sink.records
    (attempt,) = rec.attempts
    assert rec.tier == "cancelled" and attempt.outcome == "cancelled"
    assert attempt.energy.method == "cpu-time" and attempt.energy.point_wh > 0  # the CPU it used so far
