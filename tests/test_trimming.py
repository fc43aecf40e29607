"""Trimming keeps the system prompt and newest turns and never splits a tool call from its result."""

import json

from milliwatt import Step
from milliwatt.trimming import MASK, Trimmer


def conversation(turns: int, tool_output_size: int = 200):
    msgs = [{"role": "system", "content": "You are a helpful airline agent. " * 5}]
    for i in range(turns):
        msgs.append({"role": "user", "content": f"question number {i} about my booking"})
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{i}", "type": "function", "function": {"name": "lookup", "arguments": json.dumps({"n": i})}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"data": "x " * tool_output_size})})
        msgs.append({"role": "assistant", "content": f"answer {i}"})
    msgs.append({"role": "user", "content": "and the last question?"})
    return Step.create(msgs)


def test_under_budget_is_untouched():
    step = conversation(2)
    t = Trimmer().trim(step, 100_000)
    assert t.step is step and t.tokens_before == t.tokens_after and t.fits


def test_masks_old_observations_first_and_keeps_the_newest():
    step = conversation(6)
    trimmer = Trimmer(keep_tool_results=2)
    full = trimmer.count(step)
    t = trimmer.trim(step, full - 300)
    tools = [m for m in t.step.messages if m["role"] == "tool"]
    assert t.masked >= 1 and t.dropped == 0 and t.fits
    assert tools[0]["content"] == MASK
    assert all(m["content"] != MASK for m in tools[-2:])
    assert t.tokens_after <= full - 300 and t.tokens_before == full


def test_drops_oldest_units_but_never_splits_tool_calls_and_keeps_system():
    step = conversation(8)
    t = Trimmer(keep_tool_results=0).trim(step, 150)
    msgs = t.step.messages
    assert msgs[0]["role"] == "system"
    assert msgs[-1]["content"] == "and the last question?"
    call_ids = {c["id"] for m in msgs if m["role"] == "assistant" for c in m.get("tool_calls") or []}
    result_ids = {m["tool_call_id"] for m in msgs if m["role"] == "tool"}
    assert call_ids == result_ids  # every kept call has its result and vice versa
    first_turn = next(m for m in msgs if m["role"] != "system")
    assert first_turn["role"] == "user"
    assert t.dropped > 0 and t.tokens_after < t.tokens_before
    Step.create(list(msgs))  # what is sent is still a valid conversation


def test_reports_when_even_the_minimum_does_not_fit():
    step = conversation(1)
    t = Trimmer().trim(step, 10)
    assert not t.fits
    assert t.step.messages[-1]["content"] == "and the last question?"
