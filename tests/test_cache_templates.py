"""The cache tier with templated answers, a calibrated gate and feedback, on the real MiniLM
model and FAISS: a templated hit is re-bound to the new step's values, refused when a slot
does not bind, held back by a gate not calibrated on templates, never served for a tool that
may write; held-back candidates learn from the next tier's answer; hits can be shadow-checked."""

from __future__ import annotations

import json

import pytest

from milliwatt.cache import CacheTier, Embedder
from milliwatt.testing import cosine_gate
from milliwatt.types import Step

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "You are an airline agent."}
ASK = {"role": "assistant", "content": "Could you please provide your user id?"}
TOOLS = [
    {"type": "function", "function": {"name": "get_user_details", "parameters": {"type": "object", "properties": {"user_id": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "cancel_reservation", "parameters": {"type": "object", "properties": {"reservation_id": {"type": "string"}}}}},
]
POLICY = {"get_user_details": "read_only", "cancel_reservation": "never"}


def conversation(opening: str, reply: str) -> Step:
    return Step.create([SYSTEM, {"role": "user", "content": opening}, ASK, {"role": "user", "content": reply}], tools=TOOLS)


def call(name: str, **args: str) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder()


def args_of(message: dict) -> dict:
    return json.loads(message["tool_calls"][0]["function"]["arguments"])


@pytest.mark.asyncio
async def test_a_templated_tool_call_is_rebound_to_the_new_users_id(embedder: Embedder) -> None:
    tier = CacheTier(embedder=embedder, gate=cosine_gate(0.8), tool_policy=POLICY, shadow_share=0.0)
    first = conversation("I want to change my flight.", "Sure, my user id is mia_li_3668.")
    await tier.remember(first, call("get_user_details", user_id="mia_li_3668"), "remote")

    later = conversation("I need to change a flight.", "My user id is omar_davis_3817.")
    hit = await tier.attempt(later)
    assert hit.answered, hit.reason
    assert args_of(hit.message) == {"user_id": "omar_davis_3817"}
    assert hit.message["tool_calls"][0]["id"] != "c1"  # a fresh call id
    assert "template" in hit.reason and "1 slots re-bound" in hit.reason
    [served] = [c for c in hit.evidence["candidates"] if c["served"]]
    assert served["templated"] and served["answer"]["tool_calls"][0]["function"]["name"] == "get_user_details"


@pytest.mark.asyncio
async def test_a_slot_that_does_not_bind_is_a_miss_with_the_reason(embedder: Embedder) -> None:
    tier = CacheTier(embedder=embedder, gate=cosine_gate(0.8), tool_policy=POLICY)
    await tier.remember(conversation("I want to change my flight.", "Sure, my user id is mia_li_3668."), call("get_user_details", user_id="mia_li_3668"), "remote")

    none = await tier.attempt(conversation("I want to change my flight.", "Sorry, I don't have it at hand."))
    assert not none.answered and "binds to nothing" in none.reason
    two = await tier.attempt(conversation("I want to change my flight.", "It is omar_davis_3817 or omar_davis_3818."))
    assert not two.answered and "binds to 2 values" in two.reason


@pytest.mark.asyncio
async def test_templates_wait_for_a_gate_calibrated_on_them_and_their_candidates_learn(embedder: Embedder) -> None:
    tier = CacheTier(embedder=embedder, tool_policy=POLICY)  # the shipped gate: text evidence only
    await tier.remember(conversation("I want to change my flight.", "Sure, my user id is mia_li_3668."), call("get_user_details", user_id="mia_li_3668"), "remote")

    later = conversation("I want to change my flight.", "My user id is omar_davis_3817.")
    miss = await tier.attempt(later)
    assert not miss.answered and "not calibrated on templates" in miss.reason
    [candidate] = miss.evidence["candidates"]
    assert candidate["templated"] and not candidate["served"] and args_of(candidate["answer"]) == {"user_id": "omar_davis_3817"}

    # The next tier answers the step as the template would have: the template's entry learns it.
    await tier.remember(later, call("get_user_details", user_id="omar_davis_3817"), "remote")
    template = next(e for e in tier.store.entries.values() if e.template is not None and e.agree)
    assert (template.agree, template.disagree) == (1, 0)
    third = conversation("I want to change my flight.", "user id: noah_lee_1234")
    await tier.attempt(third)
    await tier.remember(third, {"role": "assistant", "content": "Which flight?"}, "remote")
    assert (template.agree, template.disagree) == (1, 1)


@pytest.mark.asyncio
async def test_a_template_calling_a_tool_that_may_write_is_neither_stored_nor_served(embedder: Embedder) -> None:
    tier = CacheTier(embedder=embedder, gate=cosine_gate(0.8), tool_policy=POLICY)
    step = Step.create([SYSTEM, {"role": "user", "content": "Cancel reservation ZFA04Y please."}], tools=TOOLS)
    await tier.remember(step, call("cancel_reservation", reservation_id="ZFA04Y"), "remote")
    assert tier.store.entries == {}
    other = Step.create([SYSTEM, {"role": "user", "content": "Cancel reservation 8JX2WO please."}], tools=TOOLS)
    assert not (await tier.attempt(other)).answered


@pytest.mark.asyncio
async def test_a_share_of_hits_asks_for_a_shadow_check(embedder: Embedder) -> None:
    tier = CacheTier(embedder=embedder, gate=cosine_gate(0.8), tool_policy=POLICY, shadow_share=1.0)
    await tier.remember(conversation("I want to change my flight.", "Sure, my user id is mia_li_3668."), call("get_user_details", user_id="mia_li_3668"), "remote")
    later = conversation("I want to change my flight.", "My user id is omar_davis_3817.")
    hit = await tier.attempt(later)
    assert hit.answered and hit.shadow
    # The check's answer disagrees: the served entry counts it.
    await tier.remember(later, {"role": "assistant", "content": "Let me transfer you."}, "remote")
    template = next(e for e in tier.store.entries.values() if e.template is not None and e.hits)
    assert (template.agree, template.disagree) == (0, 1)


@pytest.mark.asyncio
async def test_an_empty_query_is_served_only_as_an_exact_repeat_and_a_huge_one_is_not_cached(embedder: Embedder) -> None:
    tier = CacheTier(embedder=embedder)  # the shipped gate at the default 2%
    empty = Step.create([SYSTEM, {"role": "user", "content": "  "}])
    await tier.remember(empty, {"role": "assistant", "content": "How can I help?"}, "remote")
    again = await tier.attempt(empty)
    assert again.answered and "an exact repeat" in again.reason  # the same request, the same state
    other = Step.create([SYSTEM, {"role": "user", "content": "What is my baggage allowance?"}])
    assert not (await tier.attempt(other)).answered  # an empty question answers nothing else

    huge = Step.create([SYSTEM, {"role": "user", "content": "order 1234 " * 2000}])
    await tier.remember(huge, {"role": "assistant", "content": "Noted."}, "remote")
    r = await tier.attempt(huge)
    assert not r.answered and r.reason == "not cacheable: the last user message has 22,000 characters, the cache compares at most 16,000"
    assert len(tier.store) == 1


@pytest.mark.asyncio
async def test_an_entry_whose_own_record_breaks_the_bound_is_retired(embedder: Embedder) -> None:
    tier = CacheTier(embedder=embedder, gate=cosine_gate(0.8, max_wrong=0.02), tool_policy=POLICY, shadow_share=0.0)
    await tier.remember(conversation("I want to change my flight.", "Sure, my user id is mia_li_3668."), call("get_user_details", user_id="mia_li_3668"), "remote")
    later = conversation("I want to change my flight.", "My user id is omar_davis_3817.")
    [template] = [e for e in tier.store.entries.values() if e.template is not None]

    template.agree, template.disagree = 0, 9  # as a far candidate the gate turned down: does not count
    template.checks, template.failed_checks = 61, 1  # as a hit, one miss in 61 checks: within a 2% bound
    assert (await tier.attempt(later)).answered
    template.checks, template.failed_checks = 4, 2  # at least ~19% wrong as a hit, with 95% confidence
    r = await tier.attempt(later)
    assert not r.answered and "retired: as a hit, disagreed with the next tier 2 of 4 times" in r.reason

    # Checks come from shadow checks of hits: one that disagrees retires the entry at 2%.
    template.checks = template.failed_checks = 0
    shadowed = CacheTier(embedder=embedder, gate=cosine_gate(0.8, max_wrong=0.02), tool_policy=POLICY, shadow_share=1.0)
    await shadowed.remember(conversation("I want to change my flight.", "Sure, my user id is mia_li_3668."), call("get_user_details", user_id="mia_li_3668"), "remote")
    hit = await shadowed.attempt(later)
    assert hit.answered and hit.shadow
    await shadowed.remember(later, {"role": "assistant", "content": "Let me transfer you."}, "remote")
    # The template is retired; the check's own answer, stored for this very request, serves it now.
    again = await shadowed.attempt(later)
    assert again.message["content"] == "Let me transfer you." and "an exact repeat" in again.reason
    [template] = [e for e in shadowed.store.entries.values() if e.template is not None]
    assert (template.checks, template.failed_checks) == (1, 1) and "retired" in (await shadowed.attempt(conversation("I want to change my flight.", "user id omar_davis_9999"))).reason


@pytest.mark.asyncio
async def test_templates_and_their_record_survive_a_restart(embedder: Embedder, tmp_path) -> None:
    first = CacheTier(path=str(tmp_path / "c"), embedder=embedder, gate=cosine_gate(0.8), tool_policy=POLICY)
    await first.remember(conversation("I want to change my flight.", "Sure, my user id is mia_li_3668."), call("get_user_details", user_id="mia_li_3668"), "remote")
    [template] = [e for e in first.store.entries.values() if e.template is not None]
    template.agree, template.disagree, template.checks, template.failed_checks = 5, 1, 3, 0
    await first.aclose()

    second = CacheTier(path=str(tmp_path / "c"), embedder=embedder, gate=cosine_gate(0.8), tool_policy=POLICY)
    [loaded] = [e for e in second.store.entries.values() if e.template is not None]
    assert loaded.template == template.template
    assert (loaded.agree, loaded.disagree, loaded.checks, loaded.failed_checks) == (5, 1, 3, 0)
    hit = await second.attempt(conversation("I want to change my flight.", "My user id is omar_davis_3817."))
    assert hit.answered and args_of(hit.message) == {"user_id": "omar_davis_3817"}
    await second.aclose()
