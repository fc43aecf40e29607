"""The semantic cache tier, on the real MiniLM model and real FAISS indexes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from milliwatt.errors import ConfigError
from milliwatt.types import Step, StepMeta

from milliwatt.cache import CacheFileError, CacheTier, Embedder, literal_tokens, scope_key

pytestmark = pytest.mark.slow

SYSTEM = {"role": "system", "content": "You are the customer service agent of an airline."}
LOOKUP = {
    "type": "function",
    "function": {
        "name": "get_reservation",
        "description": "Look a reservation up",
        "parameters": {"type": "object", "properties": {"reservation_id": {"type": "string"}}},
    },
}
OTHER_TOOL = {"type": "function", "function": {"name": "cancel_reservation", "parameters": {"type": "object"}}}
ANSWER = {"role": "assistant", "content": "You may check two bags of up to 23 kg each."}


def ask(text: str, *, system: dict = SYSTEM, tools: list | None = None, tenant: str | None = "acme", **kw) -> Step:
    return Step.create([system, {"role": "user", "content": text}], tools=tools, meta=StepMeta(tenant=tenant), **kw)


@pytest.fixture(scope="session")
def embedder() -> Embedder:
    return Embedder()  # MiniLM loads once for the whole suite, on first use


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tier(embedder: Embedder, clock: Clock) -> CacheTier:
    return CacheTier(embedder=embedder, clock=clock)


def test_import_is_light() -> None:
    code = "import sys, milliwatt.cache; print([m for m in ('torch', 'faiss', 'sentence_transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.asyncio
async def test_paraphrase_hits_with_the_stored_answer(tier: CacheTier) -> None:
    await tier.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    r = await tier.attempt(ask("How many bags can I check with an economy ticket?"))
    assert r.answered and r.message == ANSWER
    assert r.signal is not None and r.signal >= tier.threshold
    assert r.reason.startswith("similarity ") and ">= 0.920 in scope" in r.reason
    assert r.model == "cache:remote" and r.cacheable is False
    assert r.energy.method == "cpu-time" and r.energy.point_wh > 0


@pytest.mark.asyncio
async def test_unrelated_question_misses(tier: CacheTier) -> None:
    await tier.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    r = await tier.attempt(ask("Can I bring my dog on board?"))
    assert not r.answered
    assert r.reason.startswith("best similarity ") and "< 0.920" in r.reason


@pytest.mark.parametrize(
    "other",
    [
        {"system": {"role": "system", "content": "You are the customer service agent of a bank."}},
        {"tools": [LOOKUP]},
        {"tenant": "globex"},
        {"tenant": None},
        {"response_format": {"type": "json_object"}},
        {"options": {"max_tokens": 5}},
    ],
    ids=["system", "tools", "tenant", "no-tenant", "response_format", "max_tokens"],
)
@pytest.mark.asyncio
async def test_no_hit_crosses_scopes(tier: CacheTier, other: dict) -> None:
    question = "How many bags can I check on an economy ticket?"
    await tier.remember(ask(question), ANSWER, "remote")
    r = await tier.attempt(ask(question, **other))
    assert not r.answered and r.reason.startswith("no entry in scope ")


def test_scope_key_is_canonical() -> None:
    a = Step.create([SYSTEM, {"role": "user", "content": "hi"}], tools=[LOOKUP, OTHER_TOOL])
    reordered = json.loads(json.dumps(LOOKUP["function"]["parameters"]), object_pairs_hook=lambda p: dict(reversed(p)))
    lookup2 = {"type": "function", "function": {**LOOKUP["function"], "parameters": reordered}}
    b = Step.create(
        [SYSTEM, {"role": "user", "content": "something else"}],
        tools=[OTHER_TOOL, lookup2],
        options={"temperature": 0},
    )
    assert scope_key(a) == scope_key(b)  # tool order, key order, the question and sampling do not scope
    assert scope_key(a) != scope_key(a.with_messages([{"role": "system", "content": "other"}, a.messages[1]]))


def test_literal_tokens() -> None:
    assert literal_tokens("Order #124, shipped 2024-05-01 for $1,200.50.") == {"124", "2024-05-01", "$1,200.50"}
    assert literal_tokens('{"user_id":"mia_li_3668","n":3}') == {"mia_li_3668", "3"}
    assert literal_tokens("no digits here") == frozenset()


@pytest.mark.asyncio
async def test_a_different_number_misses(tier: CacheTier) -> None:
    await tier.remember(ask("What is the status of order 123?"), {"role": "assistant", "content": "Order 123 shipped."}, "remote")
    r = await tier.attempt(ask("What is the status of order 124?"))
    assert not r.answered and r.reason.startswith("literal mismatch: 124 (step) vs 123 (entry)")
    assert (await tier.attempt(ask("What's the status of order 123?"))).answered


def tool_step(output: str, call_id: str = "call_a", args: str = '{"reservation_id": "ZFA04Y"}') -> Step:
    return Step.create(
        [
            SYSTEM,
            {"role": "user", "content": "What is on my reservation ZFA04Y?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": call_id, "type": "function", "function": {"name": "get_reservation", "arguments": args}}
            ]},
            {"role": "tool", "tool_call_id": call_id, "content": output},
        ],
        tools=[LOOKUP],
        meta=StepMeta(tenant="acme"),
    )


@pytest.mark.asyncio
async def test_tool_output_since_the_last_user_message_must_match_exactly(tier: CacheTier) -> None:
    answer = {"role": "assistant", "content": "Your reservation is a one-way flight to Boston."}
    await tier.remember(tool_step('{"destination": "BOS", "legs": 1}'), answer, "remote")
    # Call ids are random per run and argument key order is cosmetic: both are normalised.
    same = await tier.attempt(tool_step('{"destination": "BOS", "legs": 1}', call_id="call_b", args='{"reservation_id":"ZFA04Y"}'))
    assert same.answered and same.message == answer
    other = await tier.attempt(tool_step('{"destination": "JFK", "legs": 1}'))
    assert not other.answered and other.reason.startswith("no entry with these tool calls and outputs in scope")


@pytest.mark.asyncio
async def test_a_confirmation_only_hits_a_conversation_that_got_as_far(tier: CacheTier) -> None:
    def confirm(tools_called: list[str]) -> Step:
        msgs: list[dict] = [SYSTEM, {"role": "user", "content": "I want to change my booking ZFA04Y."}]
        for i, name in enumerate(tools_called):
            msgs += [
                {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": f"c{i}", "content": "{}"},
            ]
        msgs += [{"role": "assistant", "content": "Shall I go ahead?"}, {"role": "user", "content": "Yes, please go ahead."}]
        return Step.create(msgs, tools=[LOOKUP], meta=StepMeta(tenant="acme"))

    await tier.remember(confirm(["get_reservation"]), {"role": "assistant", "content": "Done."}, "remote")
    assert (await tier.attempt(confirm(["get_reservation"]))).answered
    assert not (await tier.attempt(confirm([]))).answered


@pytest.mark.asyncio
async def test_short_reply_is_keyed_with_the_question_before_it(tier: CacheTier) -> None:
    def reply(question: str) -> Step:
        return Step.create(
            [SYSTEM, {"role": "user", "content": "hello"}, {"role": "assistant", "content": question}, {"role": "user", "content": "yes"}],
            meta=StepMeta(tenant="acme"),
        )

    await tier.remember(reply("Would you like me to add travel insurance to your booking?"), {"role": "assistant", "content": "Insurance added."}, "remote")
    r = await tier.attempt(reply("Should I cancel your whole trip now?"))
    assert not r.answered


@pytest.mark.asyncio
async def test_answer_using_an_earlier_identifier_needs_it_in_the_new_step(tier: CacheTier) -> None:
    def step(user_id: str) -> Step:
        return Step.create(
            [
                SYSTEM,
                {"role": "user", "content": f"Hi, my user id is {user_id}."},
                {"role": "assistant", "content": "Thanks! How can I help you today?"},
                {"role": "user", "content": "Please show me all the reservations on my account."},
            ],
            tools=[LOOKUP],
            meta=StepMeta(tenant="acme"),
        )

    call = {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_reservation", "arguments": '{"reservation_id": "mia_li_3668"}'}}
    ]}
    await tier.remember(step("mia_li_3668"), call, "remote")
    miss = await tier.attempt(step("noah_kim_1024"))
    assert not miss.answered and "answer uses mia_li_3668, absent from this step" in miss.reason
    hit = await tier.attempt(step("mia_li_3668"))
    assert hit.answered
    assert hit.message["tool_calls"][0]["function"] == call["tool_calls"][0]["function"]
    assert hit.message["tool_calls"][0]["id"] != "call_1"  # fresh id per replay


@pytest.mark.asyncio
async def test_entries_expire_after_their_ttl(embedder: Embedder, clock: Clock) -> None:
    tier = CacheTier(embedder=embedder, clock=clock, ttl_s=60)
    await tier.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    short = Step.create(ask("Can I change my seat after booking?").messages, meta=StepMeta(tenant="acme", extra={"cache_ttl_s": 5}))
    await tier.remember(short, {"role": "assistant", "content": "Yes, online."}, "remote")
    clock.now += 10
    assert (await tier.attempt(ask("How many bags can I check on an economy ticket?"))).answered
    expired = await tier.attempt(ask("Can I change my seat after booking?"))
    assert not expired.answered and expired.reason.startswith("expired")
    clock.now += 60
    assert (await tier.attempt(ask("How many bags can I check on an economy ticket?"))).reason.startswith("expired")
    assert tier.store.purge_expired(clock.now) == 2 and len(tier.store) == 0


@pytest.mark.parametrize(
    ("step", "message", "by"),
    [
        (ask("Write me a poem about luggage", options={"temperature": 0.8}), ANSWER, "remote"),
        (ask("How many bags can I check?"), {"role": "assistant", "content": "  "}, "remote"),
        (ask("How many bags can I check?"), {"role": "assistant", "content": None, "refusal": "no"}, "remote"),
        (ask("How many bags can I check?"), ANSWER, "cache"),
        (Step.create(ask("x").messages, meta=StepMeta(tenant="acme", extra={"cache_ttl_s": 0})), ANSWER, "remote"),
    ],
    ids=["sampling", "empty", "refusal", "own-hit", "ttl-0"],
)
@pytest.mark.asyncio
async def test_remember_skips_what_must_not_be_replayed(tier: CacheTier, step: Step, message: dict, by: str) -> None:
    await tier.remember(step, message, by)
    assert len(tier.store) == 0


@pytest.mark.asyncio
async def test_sampling_with_a_seed_is_cacheable_and_without_is_not(tier: CacheTier) -> None:
    await tier.remember(ask("How many bags can I check?", options={"temperature": 0.7, "seed": 1}), ANSWER, "remote")
    assert (await tier.attempt(ask("How many bags can I check?"))).answered
    r = await tier.attempt(ask("How many bags can I check?", options={"temperature": 0.7}))
    assert r.reason == "not cacheable: sampling requested (temperature 0.7, no seed)"


@pytest.mark.asyncio
async def test_a_step_ending_with_an_assistant_message_is_not_cacheable(tier: CacheTier) -> None:
    step = Step.create([SYSTEM, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    r = await tier.attempt(step)
    assert not r.answered and r.reason == "not cacheable: last message is assistant, not user or tool"


@pytest.mark.asyncio
async def test_saved_cache_answers_after_a_restart(embedder: Embedder, clock: Clock, tmp_path: Path) -> None:
    first = CacheTier(path=str(tmp_path / "c"), embedder=embedder, clock=clock)
    await first.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    await first.remember(tool_step('{"destination": "BOS"}'), {"role": "assistant", "content": "Boston."}, "local")
    await first.aclose()
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["entries.json", "index.faiss"]

    second = CacheTier(path=str(tmp_path / "c"), embedder=embedder, clock=clock)
    assert len(second.store) == 2
    r = await second.attempt(ask("How many bags can I check with an economy ticket?"))
    assert r.answered and r.message == ANSWER
    assert (await second.attempt(tool_step('{"destination": "BOS"}'))).model == "cache:local"
    # A later entry gets a fresh id after reload.
    await second.remember(ask("Can I bring my dog on board?"), {"role": "assistant", "content": "Small dogs, yes."}, "remote")
    assert len({e.id for e in second.store.entries.values()}) == 3


@pytest.fixture
def saved_folder(embedder: Embedder, clock: Clock, tmp_path: Path) -> Path:
    tier = CacheTier(path=str(tmp_path / "c"), embedder=embedder, clock=clock)
    asyncio.run(tier.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote"))
    tier.save()
    return tmp_path / "c"


@pytest.mark.parametrize(
    ("damage", "file", "problem"),
    [
        (lambda d: (d / "entries.json").write_text("{not json"), "entries.json", "not valid JSON"),
        (lambda d: (d / "index.faiss").write_bytes(b"garbage"), "index.faiss", "does not match entries.json"),
        (lambda d: (d / "index.faiss").unlink(), "index.faiss", "missing, but entries.json is there"),
        (
            lambda d: (d / "entries.json").write_text((d / "entries.json").read_text().replace("all-MiniLM-L6-v2", "other-model")),
            "entries.json",
            "made with embeddings of",
        ),
    ],
    ids=["bad-json", "bad-index", "missing-index", "other-model"],
)
def test_a_damaged_folder_fails_naming_the_file(embedder: Embedder, saved_folder: Path, damage, file: str, problem: str) -> None:
    damage(saved_folder)
    with pytest.raises(CacheFileError) as err:
        CacheTier(path=str(saved_folder), embedder=embedder)
    assert err.value.where == str(saved_folder / file)
    assert problem in str(err.value)


@pytest.mark.asyncio
async def test_concurrent_lookups_are_embedded_in_few_batches(embedder: Embedder, tier: CacheTier) -> None:
    await tier.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    before = embedder.batches
    questions = [f"Is bag allowance {i} different on connecting flights?" for i in range(16)]
    results = await asyncio.gather(*(tier.attempt(ask(q)) for q in questions))
    assert all(not r.answered and r.energy.point_wh > 0 for r in results)
    assert embedder.batches - before < 16


@pytest.mark.asyncio
async def test_max_entries_evicts_the_least_hit(embedder: Embedder, clock: Clock) -> None:
    tier = CacheTier(embedder=embedder, clock=clock, max_entries=3)
    keep = "How many bags can I check on an economy ticket?"
    await tier.remember(ask(keep), ANSWER, "remote")
    assert (await tier.attempt(ask(keep))).answered  # one hit: kept over unhit entries
    for q in ("Can I bring my dog on board?", "Where is my refund?", "Is there wifi on the plane?"):
        clock.now += 1
        await tier.remember(ask(q), {"role": "assistant", "content": "..."}, "remote")
    assert len(tier.store) <= 3
    assert (await tier.attempt(ask(keep))).answered


def test_from_settings_validates(embedder: Embedder) -> None:
    tier = CacheTier.from_settings({"threshold": 0.95, "ttl_s": None, "max_entries": 10})
    assert (tier.threshold, tier.ttl_s, tier.max_entries, tier.token_budget) == (0.95, None, 10, None)
    with pytest.raises(ConfigError, match=r"cache\.treshold: unknown setting"):
        CacheTier.from_settings({"treshold": 0.9})
    with pytest.raises(ConfigError, match=r"cache\.threshold: must be in \(0, 1\]"):
        CacheTier.from_settings({"threshold": 92})
    with pytest.raises(ConfigError, match=r"cache\.max_entries: must be a whole number"):
        CacheTier.from_settings({"max_entries": "many"})
