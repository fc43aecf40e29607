"""Trimming: each strategy does what docs/trimming.md says, the pipeline keeps its promises
(system prompt and first request kept, tool calls with their results), and the audit and
prefix counts are right."""

from __future__ import annotations

import json

import pytest

from milliwatt import InvalidRequestError, Milliwatt, Step
from milliwatt.config import TrimSettings, load_settings
from milliwatt.errors import ConfigError
from milliwatt.testing import RecordingSink, ScriptedTier
from milliwatt.tokens import TokenCounter, count_request
from milliwatt.trimming import (
    DEFAULT_REMOTE,
    INDEX_TOOL,
    CompactJSON,
    DedupeOutputs,
    MaskObservations,
    PrefixTracker,
    SelectTools,
    Trimmer,
    TruncateOutputs,
    build_trimmer,
    lost_content,
    wanted,
)
from milliwatt.types import StepMeta


def call(i: int, name: str = "lookup", **args: object) -> dict:
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args or {"n": i})}}


def conversation(turns: int, tool_output_size: int = 200, *, session: str | None = None) -> Step:
    msgs = [{"role": "system", "content": "You are a helpful airline agent. " * 5},
            {"role": "user", "content": "My reservation is ZFA04Y; I want to change it."}]  # fmt: skip
    for i in range(turns):
        msgs.append({"role": "assistant", "content": None, "tool_calls": [call(i)]})
        msgs.append({"role": "tool", "tool_call_id": f"c{i}", "content": json.dumps({"id": f"RES{i:03d}X", "data": "x " * tool_output_size})})
        msgs.append({"role": "assistant", "content": f"answer {i}"})
        msgs.append({"role": "user", "content": f"question number {i} about my booking"})
    return Step.create(msgs, meta=StepMeta(session_id=session))


def tool(name: str, params: int = 1) -> dict:
    props = {f"p{k}": {"type": "string", "description": f"parameter {k} of {name}, such as 'X{k}'"} for k in range(params)}
    return {"type": "function", "function": {"name": name, "description": f"Do {name}.", "parameters": {"type": "object", "properties": props}}}


TOOLS = [tool("lookup"), tool("book", params=12), tool("cancel", params=2), tool("think")]


def with_tools(step: Step, tools: list[dict] = TOOLS) -> Step:
    return Step.create(list(step.messages), tools=tools, meta=step.meta)


# --------------------------------------------------------------------------- the pipeline


def test_without_strategies_and_under_budget_the_step_is_untouched():
    step = conversation(2)
    t = Trimmer().trim(step, 100_000)
    assert t.step is step and t.tokens_before == t.tokens_after and t.fits and t.stages == ()


def test_the_token_count_after_trimming_is_the_count_of_what_is_sent():
    step = with_tools(conversation(12, session="s"))
    t = build_trimmer(DEFAULT_REMOTE, TrimSettings(), TokenCounter()).trim(step)
    assert t.tokens_after == count_request(t.step.messages, t.step.tools)
    assert t.tokens_before - t.tokens_after == sum(s.saved for s in t.stages) > 0


def test_a_budget_masks_old_observations_first_keeping_their_ids():
    step = conversation(6)
    trimmer = Trimmer(keep_tool_results=2)
    full = trimmer.count(step)
    t = trimmer.trim(step, full - 300)
    outputs = [m for m in t.step.messages if m["role"] == "tool"]
    assert t.fits and len(t.step.messages) == len(step.messages)  # masked, nothing dropped
    assert outputs[0]["content"].startswith("[older output of lookup omitted") and "RES000X" in outputs[0]["content"]
    assert all(not m["content"].startswith("[older") for m in outputs[-2:])
    assert t.tokens_after <= full - 300 and t.tokens_before == full


def test_a_budget_drops_oldest_units_but_keeps_system_first_request_and_call_result_pairs():
    step = conversation(8)
    t = Trimmer(keep_tool_results=0).trim(step, 150)
    msgs = t.step.messages
    assert msgs[0]["role"] == "system"
    assert msgs[1]["content"] == "My reservation is ZFA04Y; I want to change it."  # the user's first request
    assert msgs[-1]["content"] == "question number 7 about my booking"
    call_ids = {c["id"] for m in msgs if m["role"] == "assistant" for c in m.get("tool_calls") or []}
    assert call_ids == {m["tool_call_id"] for m in msgs if m["role"] == "tool"}
    assert len(msgs) < len(step.messages) and t.fits and t.tokens_after <= 150
    assert not Trimmer(keep_tool_results=0).trim(step, 60).fits  # what must stay exceeds 60 tokens: said so


def test_strategies_run_in_one_order_whatever_the_configuration_lists():
    names = [s.name for s in build_trimmer(["select_tools", "mask", "compact_json"], TrimSettings()).strategies]
    assert names == ["compact_json", "mask", "select_tools"]
    with pytest.raises(ValueError, match="unknown trimming strategy 'summarise'"):
        build_trimmer(["summarise"], TrimSettings())


# --------------------------------------------------------------------------- strategies


def test_compact_json_is_lossless_and_leaves_other_outputs_alone():
    result = {"reservation_id": "XEWRD9", "flights": [{"flight_number": "HAT030", "price": 92.5}], "note": "café"}
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call(0), call(1)]},
            {"role": "tool", "tool_call_id": "c0", "content": json.dumps(result, indent=2)},
            {"role": "tool", "tool_call_id": "c1", "content": "Error: flight HAT030 not available"}]  # fmt: skip
    t = Trimmer([CompactJSON()]).trim(Step.create(msgs))
    assert json.loads(t.step.messages[2]["content"]) == result and ", " not in t.step.messages[2]["content"]
    assert t.step.messages[3]["content"] == "Error: flight HAT030 not available"
    assert t.tokens_after < t.tokens_before


def test_a_10_mb_tool_output_is_cut_to_its_head_and_tail_with_a_marker():
    big = "HEAD " + "filler " * 1_500_000 + " TAIL"
    msgs = [{"role": "user", "content": "fetch it"}, {"role": "assistant", "content": None, "tool_calls": [call(0)]},
            {"role": "tool", "tool_call_id": "c0", "content": big}]  # fmt: skip
    t = Trimmer([TruncateOutputs(max_tokens=500)]).trim(Step.create(msgs))
    out = t.step.messages[2]["content"]
    assert out.startswith("HEAD") and out.endswith("TAIL") and "tokens of this output cut to save tokens" in out
    assert t.tokens_after < 700 < t.tokens_before


def test_masking_keeps_the_newest_outputs_and_advances_in_blocks():
    step = conversation(7)

    def masked_count(trimmer: Trimmer, s: Step) -> int:
        return sum(m["role"] == "tool" and m["content"].startswith("[older") for m in trimmer.trim(s).step.messages)

    assert masked_count(Trimmer([MaskObservations(keep=3, block=1)]), step) == 4
    # In blocks of 3: 4 outputs over the limit mask 3; the masked prefix changes every 3rd output.
    assert masked_count(Trimmer([MaskObservations(keep=3, block=3)]), step) == 3
    assert masked_count(Trimmer([MaskObservations(keep=3, block=3)]), conversation(8)) == 3
    assert masked_count(Trimmer([MaskObservations(keep=3, block=3)]), conversation(9)) == 6


def test_a_repeated_output_becomes_a_pointer_to_the_first():
    same = json.dumps({"reservation_id": "XEWRD9", "flights": ["HAT030", "HAT223"], "status": "confirmed"})
    msgs = [{"role": "user", "content": "check twice"},
            {"role": "assistant", "content": None, "tool_calls": [call(0, "get_reservation")]},
            {"role": "tool", "tool_call_id": "c0", "content": same},
            {"role": "assistant", "content": None, "tool_calls": [call(1, "get_reservation")]},
            {"role": "tool", "tool_call_id": "c1", "content": same}]  # fmt: skip
    t = Trimmer([DedupeOutputs()]).trim(Step.create(msgs))
    assert t.step.messages[2]["content"] == same
    assert t.step.messages[4]["content"] == "[same output as the earlier call c0 of get_reservation]"


# --------------------------------------------------------------------------- tool selection


DONE = {"role": "assistant", "content": "done"}


def trained(sessions: int = 60, *, agent: str | None = None, **kw: object) -> SelectTools:
    """A selector that has seen ``sessions`` conversations of an agent that only ever looks up."""
    select = SelectTools(**kw)  # type: ignore[arg-type]
    for i in range(sessions):
        select.learn(Step.create(list(conversation(2).messages), tools=TOOLS, meta=StepMeta(session_id=f"t{i}", agent=agent)), DONE)
    return select


def names(step: Step) -> list[str]:
    return [t["function"]["name"] for t in step.tools]


def test_tool_selection_offers_every_tool_until_it_has_seen_the_agents_conversations():
    step = with_tools(conversation(2, session="s1"))
    # Nothing learned, every tool counts as needed: nothing is withheld, whatever the risk.
    assert Trimmer([SelectTools(risk=0.9)]).trim(step).step.tools == step.tools
    t = Trimmer([trained()]).trim(with_tools(conversation(2, session="s2")))
    offered = names(t.step)
    assert "lookup" in offered and "book" not in offered  # the 12-parameter schema goes first
    assert offered[:-1] == [n for n in ("lookup", "book", "cancel", "think") if n in offered]  # the agent's order
    assert offered[-1] == INDEX_TOOL and "book" in t.step.tools[-1]["function"]["description"]
    assert set(t.withheld) == {"lookup", "book", "cancel", "think"} - set(offered)
    assert t.tokens_after < t.tokens_before


def test_tool_selection_keeps_used_always_offered_and_tool_choice_tools():
    select = trained(always=["cancel"], risk=5.0)
    base = conversation(2)
    step = Step.create(list(base.messages), tools=TOOLS, tool_choice={"type": "function", "function": {"name": "think"}})
    assert set(names(Trimmer([select]).trim(step).step)) == {"lookup", "cancel", "think", INDEX_TOOL}


def test_a_conversations_tools_are_decided_at_its_first_step_and_only_grow():
    select = trained()
    trimmer = Trimmer([select])
    first = trimmer.trim(with_tools(conversation(0, session="live")))
    for i in range(60):  # meanwhile the agent's other conversations start booking
        select.learn(Step.create(list(conversation(2).messages), tools=TOOLS, meta=StepMeta(session_id=f"b{i}")),
                     {"role": "assistant", "content": None, "tool_calls": [call(9, "book")]})  # fmt: skip
    later = trimmer.trim(with_tools(conversation(1, session="live")))
    assert names(later.step) == names(first.step)  # the same list: the prompt cache keeps serving it
    assert "book" in names(trimmer.trim(with_tools(conversation(0, session="other"))).step)
    revealed = trimmer.trim(with_tools(conversation(1, session="live")), reveal={"book"})
    assert "book" in names(revealed.step)
    assert "book" in names(trimmer.trim(with_tools(conversation(2, session="live"))).step)  # and stays


def test_what_is_learned_is_kept_per_agent():
    select = trained(agent="a")
    other = Step.create(list(conversation(2).messages), tools=TOOLS, meta=StepMeta(agent="b"))
    assert len(Trimmer([select]).trim(other).step.tools) == 4


def test_an_answer_asks_for_withheld_tools_through_the_index_or_by_calling_them():
    t = Trimmer([trained(risk=5.0)]).trim(with_tools(conversation(2)))
    assert set(t.withheld) == {"book", "cancel", "think"}

    def answer(*calls: dict) -> dict:
        return {"role": "assistant", "content": None, "tool_calls": list(calls)}

    index = {"id": "i", "type": "function", "function": {"name": INDEX_TOOL, "arguments": json.dumps({"names": ["book", "nope"]})}}
    assert wanted(answer(index), t) == {"book"}
    assert wanted(answer({**index, "function": {"name": INDEX_TOOL, "arguments": "{}"}}), t) == {"book", "cancel", "think"}
    assert wanted(answer(call(1, "cancel")), t) == {"cancel"}
    assert wanted(answer(call(1, "lookup")), t) == frozenset() and wanted(DONE, t) == frozenset()
    without_index = Trimmer([trained(risk=5.0, index=False)]).trim(with_tools(conversation(2)))
    assert wanted(answer(call(1, "cancel")), without_index) == frozenset()  # withheld means withheld


@pytest.mark.asyncio
async def test_the_cascade_asks_again_with_the_schemas_the_model_asked_for():
    def model(step: Step) -> dict:
        offered = names(step)
        if "book" in offered:
            return {"role": "assistant", "content": None, "tool_calls": [call(7, "book", p0="RES001X")]}
        args = json.dumps({"names": ["book"]})
        return {"role": "assistant", "content": None, "tool_calls": [{"id": "x", "type": "function", "function": {"name": INDEX_TOOL, "arguments": args}}]}

    remote = ScriptedTier("remote", model)
    sink = RecordingSink()
    mw = Milliwatt([remote], ledger=sink, trimmers={"remote": Trimmer([trained()])})
    result = await mw.step(list(conversation(2).messages), tools=TOOLS, session_id="s")
    await mw.aclose()
    assert result.tool_calls[0]["function"]["name"] == "book"  # the agent never sees the index
    first, second = remote.seen
    assert "book" not in names(first) and "book" in names(second)
    record = sink.records[0]
    assert [(a.outcome, a.tier) for a in record.attempts] == [("passed", "remote"), ("answered", "remote")]
    assert "asked for tool schemas trimming withheld (book)" in record.attempts[0].reason
    assert record.attempts[0].evidence["asked_for"] == ["book"]
    assert record.input_tokens_sent == record.attempts[1].input_tokens < record.input_tokens_raw


# --------------------------------------------------------------------------- prefix and audit


def test_the_prefix_counts_what_repeats_the_sessions_previous_request():
    counter = TokenCounter()
    tracker = PrefixTracker()
    first, second = conversation(3, session="s"), conversation(4, session="s")
    assert tracker.observe(first, counter) == 0
    repeated = tracker.observe(second, counter)
    assert repeated == counter.request(first.messages) - 3  # every message of the first (the reply framing is not a message)
    assert tracker.observe(with_tools(conversation(5, session="s")), counter) == 0  # the tool list changed: no prefix
    assert tracker.observe(conversation(3), counter) == 0  # no session: nothing to compare


def test_the_audit_finds_a_value_masking_removed_and_a_withheld_tool_the_answer_called():
    step = with_tools(conversation(4))
    masked = Trimmer([MaskObservations(keep=1, block=1)]).trim(step)
    needs_old = {"role": "assistant", "content": "Your old booking had data x and the total 4,321."}
    assert lost_content(masked, needs_old) == {}  # 4321 is in no context: computed, not lost
    msgs = list(step.messages)
    msgs[3] = {**msgs[3], "content": json.dumps({"id": "RES000X", "price": 4321, "data": "x " * 100})}
    masked = Trimmer([MaskObservations(keep=1, block=1)]).trim(Step.create(msgs, tools=TOOLS))
    assert lost_content(masked, needs_old) == {"mask": ["value 4321"]}
    assert lost_content(masked, {"role": "assistant", "content": "Reservation RES000X it is."}) == {}  # the id was kept

    t = Trimmer([CompactJSON(), trained(risk=5.0, index=False)]).trim(with_tools(conversation(2)))
    assert "book" in t.withheld
    answer = {"role": "assistant", "content": None, "tool_calls": [call(9, "book", p0="RES001X")]}
    assert lost_content(t, answer) == {"select_tools": ["tool book"]}


# --------------------------------------------------------------------------- bad input and configuration


def test_a_tool_call_without_its_result_is_refused_naming_the_message():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [call(0), call(1)]},
            {"role": "tool", "tool_call_id": "c0", "content": "{}"}, {"role": "user", "content": "and?"}]  # fmt: skip
    with pytest.raises(InvalidRequestError, match=r"messages\[1\]\.tool_calls\[1\].*'c1' has no tool result"):
        Step.create(msgs)


def test_empty_and_non_json_outputs_and_empty_messages_pass_every_strategy():
    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": ""},
            {"role": "assistant", "content": None, "tool_calls": [call(0), call(1)]},
            {"role": "tool", "tool_call_id": "c0", "content": ""},
            {"role": "tool", "tool_call_id": "c1", "content": "{not json"},
            {"role": "assistant", "content": ""}, {"role": "user", "content": "ok"}]  # fmt: skip
    step = Step.create(msgs, tools=TOOLS)
    t = build_trimmer(DEFAULT_REMOTE, TrimSettings(mask={"keep": 0})).trim(step)
    assert [m["role"] for m in t.step.messages] == [m["role"] for m in msgs]
    assert t.step.messages[4]["content"] == "{not json"


def test_each_tier_names_its_strategies_and_a_wrong_name_is_refused():
    s = load_settings({})
    assert s.remote.trim == list(DEFAULT_REMOTE) and s.local.trim == []
    s = load_settings({"remote": {"trim": ["mask"]}, "trim": {"mask": {"keep": 4}}})
    assert s.remote.trim == ["mask"] and s.trim.mask.keep == 4
    with pytest.raises(ConfigError, match=r"remote\.trim\.0"):
        load_settings({"remote": {"trim": ["summarise"]}})
    with pytest.raises(ConfigError, match=r"trim\.select_tools\.risk"):
        load_settings({"trim": {"select_tools": {"risk": -0.5}}})
    with pytest.raises(ConfigError, match=r"local.*token_budget \(8000\) \+ max_tokens \(128\) exceed n_ctx \(4096\)"):
        load_settings({"local": {"token_budget": 8000}})


@pytest.mark.asyncio
async def test_a_step_that_cannot_fit_a_tiers_budget_is_not_sent_to_it():
    small, big = ScriptedTier("small", lambda s: DONE, token_budget=20), ScriptedTier("big", lambda s: DONE)
    async with Milliwatt([small, big]) as mw:
        result = await mw.step(list(conversation(3).messages))  # its system prompt alone is over 20 tokens
    assert small.seen == [] and result.tier == "big"
    first = result.record.attempts[0]
    assert first.outcome == "passed" and "exceed the tier's token budget of 20" in first.reason


@pytest.mark.asyncio
async def test_concurrent_steps_of_many_sessions_are_trimmed_off_the_event_loop():
    import asyncio
    import threading

    loop_thread = threading.get_ident()
    trimmed_in: set[int] = set()
    select = trained()
    apply = select.apply

    def spying(draft):  # noqa: ANN001, ANN202
        trimmed_in.add(threading.get_ident())
        return apply(draft)

    select.apply = spying  # type: ignore[method-assign]
    remote = ScriptedTier("remote", lambda s: DONE)
    sink = RecordingSink()
    async with Milliwatt([remote], ledger=sink, trimmers={"remote": Trimmer([CompactJSON(), select])}) as mw:
        steps = [mw.step(list(conversation(2).messages), tools=TOOLS, session_id=f"s{i % 5}") for i in range(20)]
        results = await asyncio.gather(*steps)
    assert len(results) == len(sink.records) == 20 and loop_thread not in trimmed_in
    assert all("book" not in names(seen) for seen in remote.seen)  # every session got the narrowed list
    assert all(r.record.input_tokens_sent < r.record.input_tokens_raw for r in results)
