"""The books of a step kept apart from the cascade, and off the event loop: token counts are
memoised (an agent resends its context every step) and equal milliwatt.tokens' counts; counting
and building the record run in worker threads."""

from __future__ import annotations

import threading

import pytest

from milliwatt import Energy, Milliwatt, Step, TierResult, energy, tokens
from milliwatt.accounting import Accountant
from milliwatt.testing import ScriptedTier
from milliwatt.tokens import count_completion, count_request

TOOLS = [
    {"type": "function", "function": {"name": f"tool_{i}", "description": "Look something up. " * 20,
     "parameters": {"type": "object", "properties": {"id": {"type": "string"}}}}}
    for i in range(8)
]  # fmt: skip


def conversation(turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": "You are a support agent. " * 200}]
    for i in range(turns):
        msgs += [
            {"role": "user", "content": [{"type": "text", "text": f"question {i} " * 30}]},
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {"name": "tool_1", "arguments": f'{{"id": "{i}"}}'}}]},
            {"role": "tool", "tool_call_id": f"c{i}", "content": f"result {i} " * 50},
            {"role": "assistant", "content": f"answer {i} " * 20, "name": "bot"},
        ]
    return msgs + [{"role": "user", "content": "and now?"}]


def test_memoised_counts_equal_the_plain_count():
    acc = Accountant("openai/gpt-4o")
    for turns in (0, 3, 4):
        step = Step.create(conversation(turns), tools=TOOLS)
        expected = count_request(step.messages, step.tools)
        assert acc.cached_tokens_raw(step) in (None, expected)
        assert acc.tokens_raw(step) == expected
        assert acc.cached_tokens_raw(step) == acc.tokens_raw(step) == expected


def test_a_growing_context_tokenises_only_its_new_messages_and_the_tools_once(monkeypatch):
    counted: list[str] = []
    real_message, real_tools = tokens.message_tokens, tokens.tools_tokens
    monkeypatch.setattr(tokens, "message_tokens", lambda m, enc: counted.append(m["role"]) or real_message(m, enc))
    monkeypatch.setattr(tokens, "tools_tokens", lambda t, enc: counted.append("tools") or real_tools(t, enc))
    acc = Accountant("openai/gpt-4o")
    first = Step.create(conversation(3), tools=TOOLS)
    acc.tokens_raw(first)
    assert len(counted) == len(first.messages) + 1
    counted.clear()
    grown = conversation(4)  # one more turn of four messages; same tools (as new dicts)
    acc.tokens_raw(Step.create(grown, tools=[dict(t) for t in TOOLS]))
    assert sorted(counted) == ["assistant", "assistant", "tool", "user"]


@pytest.mark.asyncio
async def test_the_cascade_tokenises_and_estimates_off_the_event_loop(monkeypatch):
    loop_thread = threading.get_ident()
    where: dict[str, set[int]] = {}

    def spy(name, fn):
        def wrapped(*a, **kw):
            where.setdefault(name, set()).add(threading.get_ident())
            return fn(*a, **kw)

        return wrapped

    for name in ("message_tokens", "tools_tokens"):
        monkeypatch.setattr(tokens, name, spy(name, getattr(tokens, name)))
    ecologits = energy._ecologits_output
    ecologits.cache_clear()

    def estimate_new(*a):  # only EcoLogits' own work (a memoised estimate costs microseconds)
        misses = ecologits.cache_info().misses
        out = ecologits(*a)
        if ecologits.cache_info().misses > misses:
            where.setdefault("ecologits", set()).add(threading.get_ident())
        return out

    monkeypatch.setattr(energy, "_ecologits_output", estimate_new)
    async with Milliwatt([ScriptedTier("remote", lambda s: {"role": "assistant", "content": "done " * 50})]) as mw:
        for turns in (3, 4, 4):
            result = await mw.step(conversation(turns), tools=TOOLS)
    assert set(where) == {"message_tokens", "tools_tokens", "ecologits"}
    assert all(loop_thread not in threads for threads in where.values()), where
    assert result.record.input_tokens_raw == count_request(Step.create(conversation(4), tools=TOOLS).messages, TOOLS)
    assert result.record.output_tokens > 0 and result.record.baseline_energy.point_wh > 0


def test_a_record_is_built_inline_only_when_everything_it_needs_is_memoised():
    acc = Accountant("openai/gpt-4o")
    step = Step.create(conversation(1))
    answer = TierResult("remote", {"role": "assistant", "content": "a fresh answer"}, "ok", Energy.zero())
    assert not acc.can_record_inline(None, answer.message)  # the step is not counted yet
    tokens = acc.tokens_raw(step)
    assert not acc.can_record_inline(tokens, answer.message)  # the answer is not counted yet
    rec = acc.record(step, started_at=1.7e9, t0=0.0, tokens_raw=tokens, attempts=[], answer=answer, message=answer.message)
    assert rec.output_tokens == count_completion(answer.message)
    assert acc.can_record_inline(tokens + 100, {"role": "assistant", "content": "a fresh answer"})
    assert not acc.can_record_inline(tokens, {"role": "assistant", "content": "another answer, longer than the first"})


def test_the_record_of_a_step_no_tier_answered():
    acc = Accountant("openai/gpt-4o")
    step = Step.create(conversation(1))
    rec = acc.record(step, started_at=1.7e9, t0=0.0, tokens_raw=None, attempts=[], outcome="cancelled")
    assert rec.tier == "cancelled" and rec.input_tokens_raw == acc.tokens_raw(step)
    assert rec.output_tokens == rec.input_tokens_sent == 0 and rec.response == {} and rec.energy.method == "none"
    assert rec.baseline_model == "openai/gpt-4o" and rec.baseline_energy.point_wh > 0
