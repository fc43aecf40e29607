"""The futility guard skips a tier that keeps passing on steps alike, and keeps probing it."""

import pytest

from milliwatt import Step
from milliwatt.futility import FutilityGuard
from milliwatt.testing import ScriptedTier


def ask(system="sys", text="q"):
    return Step.create([{"role": "system", "content": system}, {"role": "user", "content": text}])


@pytest.mark.asyncio
async def test_skips_after_a_window_of_passes_and_probes_every_nth():
    inner = ScriptedTier("local", lambda s: None)
    guard = FutilityGuard(inner, window=5, min_answer_rate=0.2, probe_every=3, max_probe_every=3)
    results = [await guard.attempt(ask(text=f"q{i}")) for i in range(5 + 9)]
    assert len(inner.seen) == 5 + 3  # the window, then every 3rd of the next 9
    skipped = [r for r in results if r.reason.startswith("skipped")]
    assert len(skipped) == 6 and skipped[0].energy.point_wh == 0
    assert "answered 0 of the last 5" in skipped[0].reason


@pytest.mark.asyncio
async def test_each_failed_probe_doubles_the_wait_for_the_next_up_to_a_bound():
    inner = ScriptedTier("local", lambda s: None)
    guard = FutilityGuard(inner, window=5, min_answer_rate=0.2, probe_every=2, max_probe_every=8)
    results = [await guard.attempt(ask(text=f"q{i}")) for i in range(5 + 30)]
    asked = [i - 5 + 1 for i, r in enumerate(results) if i >= 5 and not r.reason.startswith("skipped")]
    assert asked == [2, 6, 14, 22, 30]  # after 2 skips, then 4, then 8 (the bound) each time
    assert "probing every 8th" in results[-2].reason
    with pytest.raises(ValueError, match="max_probe_every"):
        FutilityGuard(inner, probe_every=10, max_probe_every=5)


@pytest.mark.asyncio
async def test_other_kinds_of_step_are_not_affected_and_answers_bring_the_tier_back():
    answers = {"now": False}
    inner = ScriptedTier("local", lambda s: {"role": "assistant", "content": "ok"} if answers["now"] else None)
    guard = FutilityGuard(inner, window=3, min_answer_rate=0.5, probe_every=2)
    for i in range(3):
        await guard.attempt(ask(text=str(i)))
    assert (await guard.attempt(ask())).reason.startswith("skipped")
    assert not (await guard.attempt(ask(system="another agent"))).reason.startswith("skipped")
    answers["now"] = True
    # Window F,F,F: every 2nd step is a probe; each answered probe shifts the window.
    outcomes = [(await guard.attempt(ask())).answered for _ in range(6)]
    assert outcomes == [True, False, True, True, True, True]  # probe, skip, probe, then back for good
    assert guard.name == "local"
