"""The pre-gate: a tier is not asked steps like those it did not answer, and is probed."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from milliwatt import Milliwatt
from milliwatt.config import load_settings
from milliwatt.pregate import PreGate, step_text
from milliwatt.testing import ScriptedTier
from milliwatt.types import Step


async def by_topic(text: str) -> tuple[np.ndarray, float]:
    """Unit vectors that put texts of one topic (their first word) together: the subject here is
    what the pre-gate does with similarities (MiniLM's own: test_cache.py)."""
    topic = int(hashlib.sha256(text.split()[0].encode()).hexdigest(), 16) % 16
    vec = np.full(16, 0.05, dtype=np.float32)
    vec[topic] = 1.0
    return vec / np.linalg.norm(vec), 0.001


def local_tier() -> ScriptedTier:
    # answers the greetings, never the maths
    return ScriptedTier("local", lambda s: {"role": "assistant", "content": "hello"} if s.last_user_text.startswith("hi") else None)


@pytest.mark.asyncio
async def test_steps_like_those_the_tier_passed_on_are_skipped_with_a_probe_now_and_then():
    inner = local_tier()
    gate = PreGate(inner, by_topic, k=4, min_similarity=0.5, min_answer_rate=0.25, probe_every=5)
    remote = ScriptedTier("remote", lambda s: {"role": "assistant", "content": "42"})
    async with Milliwatt([gate, remote]) as mw:
        for i in range(4):
            await mw.step([{"role": "user", "content": f"compute {i} + {i}"}])
        asked_before = len(inner.seen)
        results = [await mw.step([{"role": "user", "content": f"compute {i} * 3"}]) for i in range(10)]
        greeting = await mw.step([{"role": "user", "content": "hi there"}])
    assert asked_before == 4
    skipped = [r for r in results if r.record.attempts[0].reason.startswith("pre-gate: 0 of the 4 most similar")]
    # the 5th would-be skip is a probe; it fails, so the next waits for 10 more; the greeting is asked
    assert len(skipped) == 9 and len(inner.seen) == 4 + 1 + 1
    assert greeting.tier == "local"
    assert all(r.record.attempts[0].energy.point_wh > 0 for r in skipped)  # the embedding is charged


@pytest.mark.asyncio
async def test_a_tier_that_answers_similar_steps_is_always_asked():
    inner = local_tier()
    gate = PreGate(inner, by_topic, k=2)
    for i in range(6):
        assert (await gate.attempt(Step.create([{"role": "user", "content": f"hi {i}"}]))).answered
    assert len(inner.seen) == 6


def test_step_text_is_the_latest_request_and_the_tools():
    tool = {"type": "function", "function": {"name": "get_user", "parameters": {"type": "object", "properties": {}}}}
    step = Step.create([{"role": "user", "content": "first"}, {"role": "assistant", "content": "ok"}, {"role": "user", "content": "look me up"}], tools=[tool])
    assert step_text(step) == "look me up\ntools: get_user"


def test_the_pregate_is_configured_in_place_of_the_futility_guard():
    from milliwatt.futility import FutilityGuard
    from milliwatt.registry import build_tier

    assert isinstance(build_tier("local", load_settings({})), FutilityGuard)
    tier = build_tier("local", load_settings({"local": {"pregate": {"k": 5}}}))
    assert isinstance(tier, PreGate) and tier.k == 5
