"""Bad input, fuzzed (issue 13, part 4): property-based tests over messages, tools, tool
choices, options, who is asking, rule files and cache keys.

Every input gets an answer or a typed error naming what is wrong (an ``InvalidRequestError``
whose ``field`` is a path into the request, a ``RuleFileError`` with its file and line), never
another exception; the ledger never holds a half-written step, and a refused request writes
nothing. See docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from milliwatt import InvalidRequestError, Milliwatt, Step
from milliwatt.adapters import LiteLLMBackend
from milliwatt.cache.key import situation, step_key
from milliwatt.cache.scope import scope_key, uncacheable_reason
from milliwatt.errors import RemoteError, RuleFileError
from milliwatt.ledger import Ledger
from milliwatt.model_tier import ModelTier
from milliwatt.rules import RulesTier, check, load_rules
from milliwatt.testing import OpenAIStubServer, ScriptedTier
from milliwatt.types import StepMeta, validate_messages

pytestmark = pytest.mark.filterwarnings("ignore:Accessing the 'model_:DeprecationWarning")

_FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is reproducible as is
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)  # fmt: skip



def fuzz(examples: int) -> settings:
    return settings(_FUZZ, max_examples=examples)


# The top-level names a refusal's field may start with: what the caller passed.
REQUEST_FIELDS = {"messages", "tools", "tool_choice", "response_format", "options", "meta"}
TOOL_NAMES = ("get_order", "cancel_order", "lookup")

# --------------------------------------------------------------------------- strategies

ODD_TEXT = st.sampled_from(
    ["", " ", "hello", "hi", "cheap: where is my order 48213?", "\x00\x01\x7f", "\u202e\u200b\ufeff", "🙂" * 40,
     "ß\u0301" * 10, "x" * 20_000, "{{ user }}", "{% raw %}", "null", "[]", "\n\t\r", "' OR 1=1 --", "<script>", "\\"]
)  # fmt: skip
TEXT = st.one_of(st.text(max_size=30), ODD_TEXT)
SCALAR = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True), TEXT
)
JUNK = st.recursive(
    SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TEXT, inner, max_size=3)), max_leaves=6
)
JSON_ARGS = st.dictionaries(st.text(max_size=8), st.one_of(st.integers(), st.text(max_size=10), st.booleans(), st.none()), max_size=3)


@st.composite
def content(draw: Any) -> Any:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return draw(TEXT)
    parts = [{"type": "text", "text": draw(TEXT)} for _ in range(draw(st.integers(1, 2)))]
    if kind == 2:
        parts.append({"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}})
    return parts


@st.composite
def conversation(draw: Any) -> list[dict[str, Any]]:
    """A valid OpenAI conversation: instructions, user turns, tool calls with their results."""
    msgs: list[dict[str, Any]] = []
    if draw(st.booleans()):
        msgs.append({"role": draw(st.sampled_from(["system", "developer"])), "content": draw(TEXT)})
    n = draw(st.integers(1, 3))
    k = 0
    for turn in range(n):
        msgs.append({"role": "user", "content": draw(content())})
        if draw(st.booleans()):
            calls = []
            for _ in range(draw(st.integers(1, 2))):
                calls.append({"id": f"call_{k}", "type": "function",
                              "function": {"name": draw(st.sampled_from(TOOL_NAMES)), "arguments": json.dumps(draw(JSON_ARGS))}})  # fmt: skip
                k += 1
            msgs.append({"role": "assistant", "content": None, "tool_calls": calls})
            msgs += [{"role": "tool", "tool_call_id": c["id"], "content": draw(TEXT)} for c in calls]
        if turn < n - 1:
            msgs.append({"role": "assistant", "content": draw(TEXT)})
    return msgs


def _paths(obj: Any, at: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``obj`` (dict keys and list indexes)."""
    out = [at]
    if isinstance(obj, dict):
        for key, value in obj.items():
            out += _paths(value, (*at, key))
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            out += _paths(value, (*at, i))
    return out


@st.composite
def mutated(draw: Any, base: Any) -> Any:
    """``base`` with one to three values replaced by junk, deleted, or duplicated."""
    obj = copy.deepcopy(draw(base))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(obj) if p]
        if not paths:
            return draw(JUNK)
        path = draw(st.sampled_from(paths))
        parent = obj
        for step in path[:-1]:
            parent = parent[step]
        how = draw(st.sampled_from(["junk", "junk", "delete", "rename", "duplicate"]))
        last = path[-1]
        if how == "junk":
            parent[last] = draw(JUNK)
        elif how == "delete":
            del parent[last]
        elif how == "rename" and isinstance(parent, dict):
            parent[draw(st.sampled_from(["role", "content", "tool_calls", "tool_call_id", "id", "type", "name",
                                         "function", "arguments", "parameters", "properties", "text"]))] = parent.pop(last)  # fmt: skip
        elif how == "duplicate" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
    return obj


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": f"{name} an order",
            "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}}  # fmt: skip


VALID_TOOLS = st.lists(st.sampled_from(TOOL_NAMES), unique=True, max_size=3).map(lambda names: [tool(n) for n in names])
TOOLS = st.one_of(st.none(), VALID_TOOLS, mutated(VALID_TOOLS.filter(bool)), JUNK)
TOOL_CHOICE = st.one_of(
    st.none(),
    st.sampled_from(["auto", "none", "required", "any", ""]),
    st.sampled_from(TOOL_NAMES + ("nope",)).map(lambda n: {"type": "function", "function": {"name": n}}),
    st.just({"type": "function", "function": "get_order"}),
    st.just({"type": "function"}),
    JUNK,
)
RESPONSE_FORMAT = st.one_of(st.none(), st.sampled_from([{"type": "text"}, {"type": "json_object"}]), JUNK)
KNOWN_OPTIONS = {
    "temperature": st.one_of(st.floats(0, 2), st.integers(0, 2)),
    "top_p": st.floats(0, 1),
    "max_tokens": st.integers(1, 512),
    "max_completion_tokens": st.integers(1, 512),
    "seed": st.integers(0, 2**31),
    "stop": st.one_of(st.text(min_size=1, max_size=5), st.lists(st.text(min_size=1, max_size=5), max_size=2)),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "parallel_tool_calls": st.booleans(),
    "reasoning_effort": st.sampled_from(["low", "medium", "high"]),
    "extra_body": st.dictionaries(st.text(min_size=1, max_size=5), st.integers(), max_size=2),
}
OPTIONS = st.one_of(
    st.fixed_dictionaries({}, optional=KNOWN_OPTIONS),  # well typed
    st.dictionaries(st.sampled_from(sorted(KNOWN_OPTIONS) + ["n", "logprobs", "user", "extra_headers"]), JUNK, max_size=2),
    st.dictionaries(TEXT, JUNK, max_size=2),  # unknown names
)
WHO = st.one_of(st.none(), st.text(max_size=12), JUNK)
MESSAGES = st.one_of(conversation(), conversation(), mutated(conversation()), JUNK)


@st.composite
def request(draw: Any) -> dict[str, Any]:
    if draw(st.integers(0, 2)) == 0:  # a third well formed throughout, so many reach the tiers and the ledger
        tools = draw(VALID_TOOLS)
        return {
            "messages": draw(conversation()),
            "tools": tools or None,
            "tool_choice": draw(st.sampled_from([None, "auto", "none"] + (["required"] if tools else []))),
            "response_format": draw(st.sampled_from([None, {"type": "text"}])),
            "options": draw(st.fixed_dictionaries({}, optional=KNOWN_OPTIONS)),
            "meta": {k: draw(st.one_of(st.none(), st.text(max_size=12))) for k in ("tenant", "user", "session_id", "run_id", "agent")},
            "metadata": draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=5), JSON_ARGS, max_size=2))),
        }
    return {
        "messages": draw(MESSAGES),
        "tools": draw(TOOLS),
        "tool_choice": draw(TOOL_CHOICE),
        "response_format": draw(RESPONSE_FORMAT),
        "options": draw(OPTIONS),
        "meta": {k: draw(WHO) for k in ("tenant", "user", "session_id", "run_id", "agent")},
        "metadata": draw(st.one_of(st.none(), st.dictionaries(st.text(max_size=5), JUNK, max_size=2), JUNK)),
    }


def refused_naming_the_field(e: InvalidRequestError) -> None:
    """A refusal names a path into the request, and its message starts with that path."""
    head = re.split(r"[.\[]", e.field, maxsplit=1)[0]
    assert head in REQUEST_FIELDS or head in {"tenant", "user", "session_id", "run_id", "agent", "metadata"}, e.field
    assert str(e).startswith(f"{e.field}: ") and e.problem, str(e)


def downstream(step: Step) -> None:
    """What every tier reads of a valid step works on it: its texts, its request, its cache keys."""
    assert isinstance(step.last_user_text, str) and isinstance(step.system_text, str)
    json.dumps(step.to_openai(), default=str)
    scope_key(step)
    if uncacheable_reason(step) is None:
        step_key(step)
        situation(step)


# --------------------------------------------------------------------------- Step.create


@fuzz(300)
@given(request())
def test_every_request_is_a_step_or_a_refusal_naming_the_field(req: dict[str, Any]) -> None:
    try:
        step = Step.create(req["messages"], tools=req["tools"], tool_choice=req["tool_choice"],
                           response_format=req["response_format"], options=req["options"],
                           meta=StepMeta(**req["meta"], extra={} if req["metadata"] is None else req["metadata"]))  # fmt: skip
    except InvalidRequestError as e:
        refused_naming_the_field(e)
        return
    downstream(step)


@fuzz(150)
@given(conversation(), VALID_TOOLS, st.fixed_dictionaries({}, optional=KNOWN_OPTIONS))
def test_every_valid_conversation_is_accepted(messages: list, tools: list, options: dict) -> None:
    step = Step.create(messages, tools=tools or None, options=options)
    assert list(step.messages) == messages
    downstream(step)


def test_arguments_nested_too_deeply_are_refused_named() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": "[" * 100_000}}
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "{}"}]  # fmt: skip
    with pytest.raises(InvalidRequestError) as err:
        Step.create(messages)
    assert err.value.field == "messages[1].tool_calls[0].function.arguments"


# --------------------------------------------------------------------------- through the cascade

PACK = """
pack: fuzz
rules:
  - id: greeting
    when:
      regex: ^\\W*(?:hi|hello)\\W*$
      flags: [IGNORECASE]
    reply: Hello! How can I help?
  - id: order
    when:
      regex: order\\s+(?P<order_id>\\d{4,})
    reply: "Order {{ order_id }} is on its way."
"""


def cheap(step: Step) -> dict[str, Any] | None:
    text = step.last_user_text
    return {"role": "assistant", "content": f"cheap answer to {text[6:40]}"} if text.startswith("cheap:") else None


def provider(request: dict[str, Any]) -> dict[str, Any]:
    return {"role": "assistant", "content": f"remote answer to {len(request.get('messages', []))} messages"}


def test_every_request_through_the_cascade_is_answered_or_refused_and_the_ledger_is_whole(tmp_path: Path) -> None:
    db = tmp_path / "ledger.db"
    (tmp_path / "pack.yaml").write_text(PACK)
    seen = {"answered": 0, "refused": 0, "failed": 0}
    with OpenAIStubServer(provider) as stub, asyncio.Runner() as runner:
        backend = LiteLLMBackend("openai/stub", api_base=stub.api_base, api_key="sk-fuzz-not-a-real-key", label="stand-in",
                                 energy_model="openai/gpt-4o", max_retries=0, timeout_s=10)  # fmt: skip
        tiers = [RulesTier([tmp_path / "pack.yaml"]), ScriptedTier("cheap", cheap), ModelTier("remote", backend)]
        mw = Milliwatt(tiers, ledger=Ledger(f"sqlite:///{db}"))

        @fuzz(80)
        @given(request())
        def ask(req: dict[str, Any]) -> None:
            meta = req["meta"]
            try:
                result = runner.run(mw.step(req["messages"], tools=req["tools"], tool_choice=req["tool_choice"],
                                            response_format=req["response_format"], metadata=req["metadata"], **meta, **req["options"]))  # fmt: skip
            except InvalidRequestError as e:
                refused_naming_the_field(e)
                seen["refused"] += 1
                return
            except TypeError as e:  # an option named like one of step()'s own keywords: Python's own refusal
                assert "multiple values for keyword argument" in str(e)
                seen["refused"] += 1
                return
            except RemoteError:  # the provider refused a valid request: typed, and recorded
                seen["failed"] += 1
                return
            seen["answered"] += 1
            validate_messages([result.message], answered=False)
            assert result.tier in ("rules", "cheap", "remote")

        ask()
        runner.run(mw.aclose())
    assert seen["answered"] >= 10 and seen["refused"] >= 10, seen
    ledger_is_whole(db, seen["answered"] + seen["failed"])


def ledger_is_whole(db: Path, steps: int) -> None:
    """Every step the caller was answered (or failed) for is one row, with its attempts in
    order, the answering tier's among them; a refused request wrote nothing; nothing spooled."""
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM steps").fetchone()[0] == steps
        assert conn.execute("SELECT count(*) FROM attempts WHERE step_id NOT IN (SELECT id FROM steps)").fetchone()[0] == 0
        for step_id, tier in conn.execute("SELECT id, tier FROM steps").fetchall():
            attempts = conn.execute("SELECT ordinal, tier, outcome FROM attempts WHERE step_id = ? ORDER BY ordinal", (step_id,)).fetchall()
            assert [a[0] for a in attempts] == list(range(len(attempts))) and attempts, (step_id, attempts)
            if tier != "error":
                assert (tier, "answered") in {(a[1], a[2]) for a in attempts}, (tier, attempts)
        assert conn.execute("SELECT count(*) FROM ledger_faults").fetchone()[0] == 0
    assert not list(db.parent.glob("*.spool.jsonl")) or all(p.stat().st_size == 0 for p in db.parent.glob("*.spool.jsonl"))


# --------------------------------------------------------------------------- rule files

GOOD_PACK = yaml.safe_load(PACK)
REGEXES = st.one_of(
    st.sampled_from([r"(a+)+$", r"(a|aa)*b", r"(.*a){25}", r"^(\w+\s?)*$", r"(x+x+)+y", r"[", r"(?P<1>a)", r"(?<=a+)b",
                     r"\\", r"a{99999}", r"(?i)hello", r"(?P<order_id>\d+)", "", r"\p{L}", r"(?", r"*"]),
    st.text(alphabet="()[]{}*+?|\\^$.:=!<>PaZ09w-", max_size=16),
)  # fmt: skip


@st.composite
def rule_document(draw: Any) -> str:
    kind = draw(st.integers(0, 4))
    if kind == 0:  # any YAML at all
        return yaml.safe_dump(draw(JUNK), allow_unicode=True)
    if kind == 1:  # any text at all
        return draw(st.text(max_size=200))
    pack = copy.deepcopy(GOOD_PACK)
    if kind == 2:  # a valid pack with a random regex
        pack["rules"][draw(st.integers(0, 1))]["when"]["regex"] = draw(REGEXES)
        return yaml.safe_dump(pack, allow_unicode=True)
    if kind == 3:  # a valid pack with random keys and values
        return yaml.safe_dump(draw(mutated(st.just(pack))), allow_unicode=True)
    text = yaml.safe_dump(pack)  # a valid pack, its text cut or spliced
    cut = draw(st.integers(0, len(text)))
    return text[:cut] + draw(st.text(max_size=20)) + text[cut + draw(st.integers(0, 20)) :]


def test_every_rule_file_loads_or_is_refused_with_its_place_and_the_old_rules_stay(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.yaml", tmp_path / "fuzzed.yaml"
    good.write_text(PACK)
    greeting = Step.create([{"role": "user", "content": "hello"}])
    probe = Step.create([{"role": "user", "content": "a" * 40 + "!" + " order 48213 " + "x" * 40}])
    seen = {"loaded": 0, "refused": 0}

    @fuzz(200)
    @given(rule_document())
    def load(text: str) -> None:
        bad.write_text(text, encoding="utf-8", errors="surrogatepass")
        errors = check([bad])
        for e in errors:
            assert isinstance(e, RuleFileError) and e.path == str(bad) and e.problem, e
            assert e.line is None or (isinstance(e.line, int) and e.line >= 1), e
        tier = RulesTier([good])
        before = tier.ruleset
        if errors:
            seen["refused"] += 1
            with pytest.raises(RuleFileError):
                tier.load([bad])
            assert tier.ruleset is before and tier.packs == (str(good),)  # the old rules stay in force
            assert asyncio.run(tier.attempt(greeting)).message == {"role": "assistant", "content": "Hello! How can I help?"}
            return
        seen["loaded"] += 1
        ruleset = load_rules([bad])
        tier.load([bad])
        assert tier.ruleset.version == ruleset.version
        for step in (greeting, probe):  # a loaded rule answers or passes, in bounded time
            result = asyncio.run(asyncio.wait_for(tier.attempt(step), 5))
            assert result.tier == "rules"

    load()
    assert seen["loaded"] >= 5 and seen["refused"] >= 20, seen


def test_a_missing_or_empty_rule_path_is_a_rule_file_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing.yaml", tmp_path / "empty"):
        [e] = check([path])
        assert isinstance(e, RuleFileError) and e.path == str(path)


# --------------------------------------------------------------------------- cache keys

CACHEABLE = st.builds(
    lambda msgs, tools: Step.create(msgs, tools=tools or None), conversation(), VALID_TOOLS
).filter(lambda s: uncacheable_reason(s) is None)
WHO_TEXT = st.one_of(st.none(), st.text(max_size=12))


@fuzz(150)
@given(CACHEABLE, WHO_TEXT, WHO_TEXT, WHO_TEXT, WHO_TEXT)
def test_cache_keys_are_deterministic_and_never_cross_tenants_or_users(step: Step, t1: Any, t2: Any, u1: Any, u2: Any) -> None:
    mine = replace(step, meta=StepMeta(tenant=t1, user=u1))
    again = Step.create(copy.deepcopy(list(step.messages)), tools=copy.deepcopy(list(step.tools)) or None,
                        meta=StepMeta(tenant=t1, user=u1))  # fmt: skip
    assert step_key(mine) == step_key(again) and scope_key(mine) == scope_key(again)
    assert situation(mine) == situation(again)
    other_tenant = replace(step, meta=StepMeta(tenant=t2, user=u1))
    other_user = replace(step, meta=StepMeta(tenant=t1, user=u2))
    if t1 != t2:
        assert scope_key(mine) != scope_key(other_tenant)
        assert step_key(mine).partition != step_key(other_tenant).partition
        assert situation(mine).partition != situation(other_tenant).partition
    if u1 != u2:
        assert scope_key(mine) != scope_key(other_user)
        assert step_key(mine).partition != step_key(other_user).partition


@fuzz(100)
@given(CACHEABLE)
def test_a_tool_calls_ids_and_argument_spacing_do_not_change_the_key(step: Step) -> None:
    ids: dict[str, str] = {}

    def renamed(m: dict[str, Any]) -> dict[str, Any]:
        m = copy.deepcopy(m)
        for c in m.get("tool_calls") or []:
            c["id"] = ids.setdefault(c["id"], f"other_{len(ids)}")
            c["function"]["arguments"] = json.dumps(json.loads(c["function"]["arguments"]), indent=2)
        if m["role"] == "tool":
            m["tool_call_id"] = ids[m["tool_call_id"]]
        return m

    other = Step.create([renamed(m) for m in step.messages], tools=list(step.tools) or None)
    assert step_key(other) == step_key(step)

