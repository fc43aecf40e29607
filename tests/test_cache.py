"""The semantic cache tier, on the real MiniLM model and real FAISS indexes."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from milliwatt.errors import ConfigError, InvalidRequestError
from milliwatt.types import Step, StepMeta

from milliwatt.cache import CacheFileError, CacheTier, Embedder, literal_tokens, scope_key
from milliwatt.cache.evidence import load_gate

import conftest_pg

pg_cluster = conftest_pg.pg_cluster  # the throwaway PostgreSQL (tests/conftest_pg.py)
pg_url = conftest_pg.pg_url

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


# These tests are about exact entries: templates are off (tests/test_cache_templates.py covers
# them), and the gate is the shipped one re-certified at a 10% bound, since at the default 2%
# it serves no paraphrase (docs/cache.md) and these tests are about what a served hit is.
EXACT = {"templates": False, "gate": load_gate(None, 0.10)}


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


@pytest.fixture(params=["memory", "postgresql"])
def tier(request: pytest.FixtureRequest, embedder: Embedder, clock: Clock) -> Iterator[CacheTier]:
    """The tier in memory, and shared on PostgreSQL (cache/shared.py): the same behaviour."""
    # The shipped gate re-certified at a 10% bound: at the default 2% it serves no
    # paraphrase (docs/cache.md), and these tests are about what a served hit looks like.
    path = request.getfixturevalue("pg_url") if request.param == "postgresql" else None
    tier = CacheTier(embedder=embedder, clock=clock, path=path, **EXACT)
    yield tier
    tier.store.close()  # a shared store stops syncing (the embedder is the session's)


def test_import_is_light() -> None:
    code = "import sys, milliwatt.cache; print([m for m in ('torch', 'faiss', 'sentence_transformers') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.asyncio
async def test_paraphrase_hits_with_the_stored_answer(tier: CacheTier) -> None:
    await tier.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    r = await tier.attempt(ask("How many bags can I check with an economy ticket?"))
    assert r.answered and r.message == ANSWER
    assert r.signal is not None and r.signal >= tier.gate.threshold.score
    assert re.match(r"entry \d+: gate score 0\.\d+, >= 0\.\d+ \(similarity 0\.9\d+\) in scope ", r.reason), r.reason
    assert r.model == "cache:remote" and r.cacheable is False
    assert r.energy.method == "cpu-time" and r.energy.point_wh > 0


@pytest.mark.asyncio
async def test_unrelated_question_misses(tier: CacheTier) -> None:
    await tier.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    r = await tier.attempt(ask("Can I bring my dog on board?"))
    assert not r.answered
    assert re.match(r"entry \d+: gate score 0\.\d+, < 0\.\d+ \(similarity 0\.\d+\)$", r.reason), r.reason


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
    # Now covered by the exact history (every turn before the last user message).
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
    r = await tier.attempt(confirm([]))
    assert not r.answered and r.reason.startswith("no entry with these earlier turns in scope")


@pytest.mark.asyncio
async def test_short_reply_is_keyed_with_the_question_before_it(tier: CacheTier) -> None:
    # The question before "yes" is part of the exact history now (it used to be prepended to
    # the embedded text, where "Add insurance? yes" and "Add insurance? no" are close).
    def reply(question: str) -> Step:
        return Step.create(
            [SYSTEM, {"role": "user", "content": "hello"}, {"role": "assistant", "content": question}, {"role": "user", "content": "yes"}],
            meta=StepMeta(tenant="acme"),
        )

    await tier.remember(reply("Would you like me to add travel insurance to your booking?"), {"role": "assistant", "content": "Insurance added."}, "remote")
    r = await tier.attempt(reply("Should I cancel your whole trip now?"))
    assert not r.answered and r.reason.startswith("no entry with these earlier turns in scope")


@pytest.mark.asyncio
async def test_an_identifier_from_an_earlier_turn_must_match_exactly(embedder: Embedder, clock: Clock) -> None:
    # This used to be the "grounding" guard (an answer literal taken from the context must be
    # in the new step). The exact history now compares every earlier turn, which covers it:
    # the miss is decided before anything is embedded.
    tier = CacheTier(**EXACT, embedder=embedder, clock=clock, tool_policy={"get_reservation": "read_only"})

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
    assert not miss.answered and miss.reason.startswith("no entry with these earlier turns in scope")
    hit = await tier.attempt(step("mia_li_3668"))
    assert hit.answered
    assert hit.message["tool_calls"][0]["function"] == call["tool_calls"][0]["function"]
    assert hit.message["tool_calls"][0]["id"] != "call_1"  # fresh id per replay


@pytest.mark.asyncio
async def test_entries_expire_after_their_ttl(embedder: Embedder, clock: Clock) -> None:
    tier = CacheTier(**EXACT, embedder=embedder, clock=clock, ttl_s=60)
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
    first = CacheTier(**EXACT, path=str(tmp_path / "c"), embedder=embedder, clock=clock)
    await first.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    await first.remember(tool_step('{"destination": "BOS"}'), {"role": "assistant", "content": "Boston."}, "local")
    await first.aclose()
    # The two files of the cache, beside the lock an open cache holds (.lock, .lock.owner).
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if not p.name.startswith(".")) == ["entries.json", "index.faiss"]

    second = CacheTier(**EXACT, path=str(tmp_path / "c"), embedder=embedder, clock=clock)
    assert len(second.store) == 2
    r = await second.attempt(ask("How many bags can I check with an economy ticket?"))
    assert r.answered and r.message == ANSWER
    assert (await second.attempt(tool_step('{"destination": "BOS"}'))).model == "cache:local"
    # A later entry gets a fresh id after reload.
    await second.remember(ask("Can I bring my dog on board?"), {"role": "assistant", "content": "Small dogs, yes."}, "remote")
    assert len({e.id for e in second.store.entries.values()}) == 3


@pytest.fixture
def saved_folder(embedder: Embedder, clock: Clock, tmp_path: Path) -> Path:
    tier = CacheTier(**EXACT, path=str(tmp_path / "c"), embedder=embedder, clock=clock)
    asyncio.run(tier.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote"))
    asyncio.run(tier.aclose())  # saves, and lets the folder go
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
        CacheTier(**EXACT, path=str(saved_folder), embedder=embedder)
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
    tier = CacheTier(**EXACT, embedder=embedder, clock=clock, max_entries=3)
    keep = "How many bags can I check on an economy ticket?"
    await tier.remember(ask(keep), ANSWER, "remote")
    assert (await tier.attempt(ask(keep))).answered  # one hit: kept over unhit entries
    for q in ("Can I bring my dog on board?", "Where is my refund?", "Is there wifi on the plane?"):
        clock.now += 1
        await tier.remember(ask(q), {"role": "assistant", "content": "..."}, "remote")
    assert len(tier.store) <= 3
    assert (await tier.attempt(ask(keep))).answered


def test_the_configured_cache_section_and_tool_policy_reach_the_tier() -> None:
    # Key and value errors of the section are config.py's (tests/test_config.py); this checks
    # that what was validated is what the tier runs with.
    from milliwatt.config import load_settings
    from milliwatt.registry import build_tier

    settings = load_settings({
        "cache": {"path": None, "max_wrong": 0.05, "ttl_s": None, "max_entries": 10},
        "tools": {"get_reservation": {"cache": "read_only"}},
    })  # fmt: skip
    tier = build_tier("cache", settings)
    assert (tier.gate.threshold.target_error, tier.ttl_s, tier.max_entries, tier.token_budget) == (0.05, None, 10, None)
    assert tier.read_only.policy == {"get_reservation": "read_only"}
    with pytest.raises(ConfigError, match=r"cache\.tool_policy: cancel_reservation: must be 'read_only' or 'never'"):
        CacheTier(tool_policy={"cancel_reservation": "sometimes"})


# ---------------------------------------------------------------------------- tool calls with side effects

CANCEL = {
    "type": "function",
    "function": {"name": "cancel_reservation", "parameters": {"type": "object", "properties": {"reservation_id": {"type": "string"}}}},
}


def calling(name: str, args: str = '{"reservation_id": "ZFA04Y"}') -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": args}}]}


def with_annotation(tool: dict, where: str) -> dict:
    tool = json.loads(json.dumps(tool))
    (tool["function"] if where == "function" else tool)["annotations"] = {"readOnlyHint": True}
    return tool


def act(text: str, tools: list) -> Step:
    return Step.create([SYSTEM, {"role": "user", "content": text}], tools=tools, meta=StepMeta(tenant="acme"))


@pytest.mark.parametrize(
    ("policy", "tools", "stored"),
    [
        (None, [LOOKUP, CANCEL], False),  # the default: a tool not declared read-only is never replayed
        ({"get_reservation": "read_only"}, [LOOKUP, CANCEL], True),
        ({"get_reservation": "never"}, [LOOKUP, CANCEL], False),
        (None, [with_annotation(LOOKUP, "function"), CANCEL], True),  # MCP readOnlyHint, under "function"
        (None, [with_annotation(LOOKUP, "top"), CANCEL], True),  # ... or on the tool object
        ({"get_reservation": "never"}, [with_annotation(LOOKUP, "function"), CANCEL], False),  # the policy wins
    ],
    ids=["default-never", "read_only", "never", "annotation-function", "annotation-top", "never-beats-annotation"],
)
@pytest.mark.asyncio
async def test_a_tool_call_is_stored_and_served_only_for_read_only_tools(
    embedder: Embedder, clock: Clock, policy: dict | None, tools: list, stored: bool
) -> None:
    tier = CacheTier(**EXACT, embedder=embedder, clock=clock, tool_policy=policy)
    question = "Please look up my reservation ZFA04Y for me."
    await tier.remember(act(question, tools), calling("get_reservation"), "remote")
    assert len(tier.store) == int(stored)
    r = await tier.attempt(act(question, tools))
    assert r.answered is stored
    if stored:
        assert r.message["tool_calls"][0]["function"]["name"] == "get_reservation"


@pytest.mark.asyncio
async def test_a_side_effect_is_never_stored_even_when_other_tools_are_read_only(embedder: Embedder, clock: Clock) -> None:
    tier = CacheTier(**EXACT, embedder=embedder, clock=clock, tool_policy={"get_reservation": "read_only", "cancel_reservation": "never"})
    both = calling("get_reservation")
    both["tool_calls"].append({"id": "call_2", "type": "function", "function": {"name": "cancel_reservation", "arguments": '{"reservation_id": "ZFA04Y"}'}})
    await tier.remember(act("Cancel my reservation ZFA04Y, please.", [LOOKUP, CANCEL]), both, "remote")
    await tier.remember(act("Cancel reservation ZFA04Y now.", [LOOKUP, CANCEL]), calling("cancel_reservation"), "remote")
    assert len(tier.store) == 0
    # Text answers are not affected by the policy.
    await tier.remember(act("Can I cancel a basic economy ticket?", [LOOKUP, CANCEL]), ANSWER, "remote")
    assert len(tier.store) == 1


@pytest.mark.asyncio
async def test_the_policy_is_checked_again_at_lookup(embedder: Embedder, clock: Clock, tmp_path: Path) -> None:
    # A persisted cache outlives its policy: an entry stored while a tool was read-only must
    # not be served once the tool is not (declared never, or no longer declared at all).
    question = "Please look up my reservation ZFA04Y for me."
    first = CacheTier(**EXACT, path=str(tmp_path / "c"), embedder=embedder, clock=clock, tool_policy={"get_reservation": "read_only"})
    await first.remember(act(question, [LOOKUP]), calling("get_reservation"), "remote")
    await first.aclose()
    for policy in ({"get_reservation": "never"}, None):
        later = CacheTier(**EXACT, path=str(tmp_path / "c"), embedder=embedder, clock=clock, tool_policy=policy)
        assert len(later.store) == 1
        r = await later.attempt(act(question, [LOOKUP]))
        assert not r.answered and r.reason.startswith("tool get_reservation is not declared read-only (similarity 1.000)")
        await later.aclose()


@pytest.mark.parametrize("policy", [{"get_reservation": "sometimes"}, {"get_reservation": None}, ["get_reservation"]])
def test_a_bad_tool_policy_is_a_config_error(embedder: Embedder, policy: object) -> None:
    with pytest.raises(ConfigError, match=r"cache\.tool_policy: ") as err:
        CacheTier(**EXACT, embedder=embedder, tool_policy=policy)  # type: ignore[arg-type]
    assert err.value.where == "cache.tool_policy"


# ---------------------------------------------------------------------------- per-step TTL

@pytest.mark.asyncio
async def test_cache_ttl_0_is_neither_stored_nor_served(embedder: Embedder, tier: CacheTier) -> None:
    question = "How many bags can I check on an economy ticket?"
    await tier.remember(ask(question), ANSWER, "remote")
    no_cache = Step.create(ask(question).messages, meta=StepMeta(tenant="acme", extra={"cache_ttl_s": 0}))
    before = embedder.batches
    r = await tier.attempt(no_cache)
    assert not r.answered and r.reason == "cache_ttl_s is 0 for this step"
    assert embedder.batches == before  # nothing embedded
    await tier.remember(no_cache, {"role": "assistant", "content": "Other."}, "remote")
    assert len(tier.store) == 1


@pytest.mark.parametrize("ttl", ["60", True, -1, float("nan")])
@pytest.mark.asyncio
async def test_a_bad_cache_ttl_is_named(tier: CacheTier, ttl: object) -> None:
    step = Step.create(ask("How many bags can I check?").messages, meta=StepMeta(tenant="acme", extra={"cache_ttl_s": ttl}))
    for call in (tier.attempt(step), tier.remember(step, ANSWER, "remote")):
        with pytest.raises(InvalidRequestError, match=r"meta\.extra\.cache_ttl_s: must be a number of seconds >= 0") as err:
            await call
        assert err.value.field == "meta.extra.cache_ttl_s"
    assert len(tier.store) == 0


@pytest.mark.asyncio
async def test_cache_ttl_null_means_no_expiry(tier: CacheTier, clock: Clock) -> None:
    step = Step.create(ask("How many bags can I check?").messages, meta=StepMeta(tenant="acme", extra={"cache_ttl_s": None}))
    await tier.remember(step, ANSWER, "remote")
    clock.now += 10 * 365 * 86400
    assert (await tier.attempt(ask("How many bags can I check?"))).answered


# ---------------------------------------------------------------------------- store integrity

def _consistent(store) -> bool:  # noqa: ANN001
    """Entries, partitions and the ids inside the FAISS indexes all agree."""
    import faiss

    in_parts = set().union(*(p.ids for p in store._parts.values())) if store._parts else set()
    in_faiss: set[int] = set()
    for p in store._parts.values():
        in_faiss |= set(faiss.vector_to_array(p.index.id_map).tolist())
    return set(store.entries) == in_parts == in_faiss and all(p.ids for p in store._parts.values())


class _Boom(RuntimeError):
    pass


@pytest.mark.asyncio
async def test_a_failed_add_leaves_the_store_unchanged(tier: CacheTier, monkeypatch: pytest.MonkeyPatch) -> None:
    class BadIndex:
        ntotal = 0

        def add_with_ids(self, *a: object) -> None:
            raise _Boom("faiss refused the vector")

    monkeypatch.setattr(tier.store, "_new_index", lambda dim: BadIndex())
    step = ask("How many bags can I check on an economy ticket?")
    with pytest.raises(_Boom):
        await tier.remember(step, ANSWER, "remote")
    assert len(tier.store) == 0 and _consistent(tier.store)
    r = await tier.attempt(step)  # no empty partition left behind
    assert not r.answered and r.reason.startswith("no entry in scope")
    monkeypatch.undo()
    await tier.remember(step, ANSWER, "remote")
    assert (await tier.attempt(step)).answered


@pytest.mark.asyncio
async def test_a_failed_eviction_leaves_entries_and_vectors_in_step(embedder: Embedder, clock: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = CacheTier(**EXACT, embedder=embedder, clock=clock, max_entries=3)
    questions = ["How many bags can I check on an economy ticket?", "Can I bring my dog on board?", "Is there wifi on the plane?"]
    for q in questions:
        clock.now += 1
        await tier.remember(ask(q), {"role": "assistant", "content": q.upper()}, "remote")

    def fail(dim: int) -> object:
        raise _Boom("rebuild failed")

    monkeypatch.setattr(tier.store, "_new_index", fail)  # the index rebuild of the eviction fails
    clock.now += 1
    with pytest.raises(_Boom):
        await tier.remember(ask("Where is my refund?"), {"role": "assistant", "content": "On its way."}, "remote")
    assert _consistent(tier.store) and len(tier.store) == 4  # the add happened; the eviction did not, at all
    for q in questions:  # every entry still answers with its own answer (no id without its entry)
        r = await tier.attempt(ask(q))
        assert r.answered and r.message["content"] == q.upper()


def test_partition_checks_do_not_wait_for_the_store_lock(tier: CacheTier) -> None:
    import threading

    # A rebuild holds the lock in a worker thread; the checks made on the event loop must not wait.
    held, release = threading.Event(), threading.Event()

    def rebuild() -> None:
        with tier.store._lock:
            held.set()
            release.wait(10)

    worker = threading.Thread(target=rebuild)
    worker.start()
    held.wait(5)
    done: list[bool] = []
    probe = threading.Thread(target=lambda: done.append(not tier.store.has_partition("p") and not tier.store.has_scope("s") and not tier.store.has_history("h")))
    probe.start()
    probe.join(1.0)
    release.set()
    worker.join()
    probe.join()
    assert done == [True]
    assert probe.is_alive() is False


@pytest.mark.parametrize("stale", [{"version": 1}, {"key": "mw-cache-scope/1"}], ids=["format-1", "key-1"])
@pytest.mark.asyncio
async def test_entries_keyed_under_an_older_key_are_dropped_at_load(
    embedder: Embedder, clock: Clock, tmp_path: Path, stale: dict, caplog: pytest.LogCaptureFixture
) -> None:
    first = CacheTier(**EXACT, path=str(tmp_path / "c"), embedder=embedder, clock=clock)
    await first.remember(ask("How many bags can I check on an economy ticket?"), ANSWER, "remote")
    await first.aclose()
    doc = json.loads((tmp_path / "c" / "entries.json").read_text())
    (tmp_path / "c" / "entries.json").write_text(json.dumps({**doc, **stale}))
    second = CacheTier(**EXACT, path=str(tmp_path / "c"), embedder=embedder, clock=clock)
    assert len(second.store) == 0  # they could never match: a new cache, not a start-up failure
    assert "can never match and are dropped" in caplog.text
