"""The rule language (issue 11): nested conditions, tool results, turns, routes that forbid,
budgets, result templates; checks that report every problem with line and column; the
ReDoS check; the JSON Schema; hot reload; the prefilter index against the linear walk."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import re
import textwrap
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from milliwatt import Milliwatt
from milliwatt.config import load_settings
from milliwatt.errors import ConfigError, RuleFileError
from milliwatt.examples import SUPPORT_RULES
from milliwatt.registry import build_tier
from milliwatt.rules import RuleSet, RulesTier, check, load_rules
from milliwatt.rules.redos import exponential_risk
from milliwatt.testing import ScriptedTier
from milliwatt.types import Step, StepMeta

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = json.loads((ROOT / "rules" / "schema.json").read_text())
META = StepMeta(agent="air", tenant="acme", session_id="s1", run_id="run-7", user="u-42")


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def rules_from(tmp_path: Path, body: str) -> RuleSet:
    return load_rules(write(tmp_path, "rules.yaml", body))


def position(path: Path, marker: str) -> tuple[int, int]:
    """(line, column), 1-based, of the first occurrence of ``marker``."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if marker in line:
            return i, line.index(marker) + 1
    raise AssertionError(marker)


def tool(name: str, properties: dict, required: list[str] | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {
        "type": "object", "properties": properties, "required": required if required is not None else list(properties)}}}


TOOLS = [
    tool("get_reservation_details", {"reservation_id": {"type": "string"}}),
    tool("get_user_details", {"user_id": {"type": "string"}}),
    tool("cancel_reservation", {"reservation_id": {"type": "string"}, "count": {"type": "integer", "minimum": 1},
                                "options": {"type": "object"}}, required=["reservation_id"]),
]


def user(text: str, *, history=(), meta: StepMeta = META, tools=TOOLS) -> Step:
    return Step.create([{"role": "system", "content": "sys"}, *history, {"role": "user", "content": text}],
                       tools=list(tools), meta=meta)


def after(tool_name: str, content, *, text: str = "look it up", extra=(), call_id: str = "c1", history=()) -> Step:
    """A step whose last message is the result of a call to ``tool_name``."""
    call = {"id": call_id, "type": "function", "function": {"name": tool_name, "arguments": "{}"}}
    body = content if isinstance(content, str) else json.dumps(content)
    return Step.create([{"role": "system", "content": "sys"}, *history, {"role": "user", "content": text},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "tool_call_id": call_id, "content": body}, *extra], tools=TOOLS, meta=META)


# --------------------------------------------------------------------------- all / any / not

def test_all_any_not_nest_and_captures_come_from_the_branch_that_held(tmp_path):
    rs = rules_from(tmp_path, r"""
        pack: p
        rules:
          - id: nested
            when:
              all:
                - keywords: {any: [bag, baggage]}
                - any:
                    - regex: (?i)\bbag\s+(?P<count>\d+)
                    - regex: (?i)(?P<count>\d+)\s+bags?\b
              not:
                any:
                  - keywords: {any: [lost]}
                  - meta: {tenant: other}
            reply: "{count} bags"
    """)
    assert rs.match(user("bag 3 please")).message["content"] == "3 bags"
    assert rs.match(user("I have 2 bags, baggage question")).message["content"] == "2 bags"
    assert rs.match(user("lost bag 3")) is None  # not
    assert rs.match(user("bag 3", meta=StepMeta(tenant="other"))) is None  # not (meta)
    assert rs.match(user("bags galore")) is None  # neither branch of any


def test_template_field_from_a_not_branch_is_a_load_error(tmp_path):
    path = write(tmp_path, "r.yaml", r"""
        pack: p
        rules:
          - id: x
            when:
              keywords: {any: [a]}
              not: {regex: "(?P<n>[0-9]+)"}
            reply: "{n}"
    """)
    (err,) = check(path)
    assert "template field {n} names no capture group" in err.problem
    assert (err.line, err.column) == position(path, '"{n}"')


# --------------------------------------------------------------------------- step shape

def test_after_tool_names_hold_only_right_after_a_result_of_those_tools(tmp_path):
    rs = rules_from(tmp_path, """
        pack: p
        rules:
          - id: after-res
            when: {after_tool: get_reservation_details}
            reply: seen a reservation
          - id: after-any
            when: {after_tool: true, keywords: {any: [lawyer]}}
            route: remote
    """)
    assert rs.match(after("get_reservation_details", {"a": 1})).rule.id == "after-res"
    assert rs.match(after("get_user_details", {"a": 1})) is None
    # the call is found by tool_call_id, not by position
    two = Step.create([
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_reservation_details", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "get_user_details", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "b", "content": "{}"},
        {"role": "tool", "tool_call_id": "a", "content": "{}"}], tools=TOOLS, meta=META)
    assert rs.match(two).rule.id == "after-res"
    # the last message a user message: not "after" a tool, even with a tool result earlier
    later = after("get_reservation_details", {"a": 1}, extra=[{"role": "assistant", "content": "ok"},
                                                               {"role": "user", "content": "thanks"}])
    assert rs.match(later) is None
    # after_tool: true keeps its meaning: may act mid tool loop
    assert rs.match(after("get_user_details", "{}", text="my lawyer")).rule.id == "after-any"
    assert rs.match(user("my lawyer")).rule.id == "after-any"


def test_tool_result_fields(tmp_path):
    rs = rules_from(tmp_path, r"""
        pack: p
        rules:
          - id: cancelled
            priority: 5
            when:
              after_tool: [get_reservation_details]
              tool_result:
                tool: get_reservation_details
                fields:
                  status: cancelled
                  flights.0.origin: {in: [SFO, LAX]}
                  reservation_id: {regex: '^(?P<rid>[A-Z0-9]{6})$'}
                  refund: {exists: false}
            reply: "{rid} from {result.flights.0.origin} is cancelled ({result.passengers})"
          - id: gold
            when:
              tool_result: {fields: {membership: {equals: gold}, "points": 1200}}
            reply: "gold {result.name}"
    """)
    res = {"reservation_id": "ABC123", "status": "cancelled", "flights": [{"origin": "SFO"}], "passengers": 2}
    assert rs.match(after("get_reservation_details", res)).message["content"] == "ABC123 from SFO is cancelled (2)"
    assert rs.match(after("get_reservation_details", {**res, "refund": None})) is None  # exists: false
    assert rs.match(after("get_reservation_details", {**res, "flights": [{"origin": "JFK"}]})) is None
    assert rs.match(after("get_reservation_details", {**res, "reservation_id": "ABC1234"})) is None
    assert rs.match(after("get_reservation_details", "not json")) is None  # no fields
    # tool_result reads the latest tool result even when the user has spoken since
    gold = {"membership": "gold", "points": 1200.0, "name": "Mia"}
    spoke = after("get_user_details", gold, extra=[{"role": "assistant", "content": "Hi Mia"},
                                                    {"role": "user", "content": "thanks"}])
    assert rs.match(spoke).message["content"] == "gold Mia"
    assert rs.match(after("get_user_details", {**gold, "points": "1200"}, extra=[
        {"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}])) is None  # JSON-equal: "1200" != 1200
    assert rs.match(user("no tool result at all")) is None


def test_turn_and_meta_user_and_run_id(tmp_path):
    rs = rules_from(tmp_path, """
        pack: p
        rules:
          - id: early
            when: {turn: {max: 2}, meta: {user: u-42, run_id: [run-7, run-8]}}
            reply: early
          - id: later
            when: {turn: {min: 3}}
            reply: later
    """)
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert rs.match(user("x")).rule.id == "early"
    assert rs.match(user("x", history=turn)).rule.id == "early"  # turn 2
    assert rs.match(user("x", history=turn * 2)).rule.id == "later"  # turn 3
    assert rs.match(user("x", meta=StepMeta(user="someone"))) is None


# --------------------------------------------------------------------------- actions and the tier

ACTIONS = """
    pack: p
    rules:
      - id: no-cheap
        when: {keywords: {any: [legal]}}
        route: {forbid: [cache, local]}
      - id: to-remote
        when: {keywords: {any: [lawyer]}}
        route: {to: remote, forbid: [cache]}
      - id: plain-route
        when: {keywords: {any: [court]}}
        route: {to: local}
      - id: small
        when: {keywords: {any: [essay]}}
        budget: {max_input_tokens: 50}
      - id: lookup
        when:
          after_tool: get_reservation_details
        tool_call:
          name: get_user_details
          arguments: {user_id: "{result.owner.id}"}
"""


@pytest.mark.asyncio
async def test_tier_decisions_and_evidence(tmp_path):
    path = write(tmp_path, "a.yaml", ACTIONS)
    tier = RulesTier([path])
    version = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    assert tier.ruleset.version == tier.version == version

    r = await tier.attempt(user("a legal question"))
    assert not r.answered and r.skip_to is None and r.token_budget is None
    assert r.forbid == {"cache": "forbidden by rule p/no-cheap", "local": "forbidden by rule p/no-cheap"}
    assert r.evidence == {"rule": "p/no-cheap", "pack_version": version}
    r = await tier.attempt(user("my lawyer"))
    assert r.skip_to == "remote" and set(r.forbid) == {"cache"} and "routes to remote and forbids cache" in r.reason
    r = await tier.attempt(user("the court"))
    assert r.skip_to == "local" and not r.forbid and r.reason == "rule p/plain-route routes to local"
    r = await tier.attempt(user("write an essay"))
    assert r.token_budget == 50 and "budget" in r.reason
    r = await tier.attempt(user("nothing"))
    assert r.evidence == {"rule": None, "pack_version": version} and r.reason == "no rule matched"

    # a result field renders with its JSON type; a missing one declines the step, never breaks it
    r = await tier.attempt(after("get_reservation_details", {"owner": {"id": "mia_7"}}))
    assert json.loads(r.message["tool_calls"][0]["function"]["arguments"]) == {"user_id": "mia_7"}
    assert r.evidence["rule"] == "p/lookup"
    r = await tier.attempt(after("get_reservation_details", {"owner": {}}))
    assert not r.answered and "p/lookup (the latest tool result has no field 'owner.id'" in r.reason


@pytest.mark.asyncio
async def test_a_template_that_renders_an_invalid_call_at_run_time_passes_with_the_reason(tmp_path):
    tier = RulesTier([write(tmp_path, "a.yaml", r"""
        pack: p
        rules:
          - id: cancel
            when: {regex: 'cancel (?P<rid>\w+) x(?P<n>-?\d+)'}
            tool_call:
              name: cancel_reservation
              arguments: {reservation_id: "{rid}", count: "{n}"}
    """)])
    r = await tier.attempt(user("cancel ABC x-3"))
    assert not r.answered and "p/cancel (cancel_reservation count: -3 is less than the minimum of 1)" in r.reason
    r = await tier.attempt(user("cancel ABC x3"))
    assert json.loads(r.message["tool_calls"][0]["function"]["arguments"]) == {"reservation_id": "ABC", "count": 3}


def test_a_reply_renders_a_missing_result_field_empty(tmp_path):
    rs = rules_from(tmp_path, """
        pack: p
        rules:
          - id: r
            when: {after_tool: get_user_details}
            reply: "[{result.name}] [{result.tags}] [{result.vip}]"
    """)
    m = rs.match(after("get_user_details", {"tags": ["a", 1], "vip": True}))
    assert m.message["content"] == '[] [["a", 1]] [true]'


@pytest.mark.asyncio
async def test_cascade_honours_forbid_and_budget():
    class Rules(ScriptedTier):
        def __init__(self, **decision):
            super().__init__("rules", lambda s: None)
            self.decision = decision

        async def attempt(self, step):
            from milliwatt.types import TierResult

            return TierResult.passed("rules", "rule p/x decides", **self.decision)

    cache, local, remote = (ScriptedTier(n, lambda s, n=n: {"role": "assistant", "content": f"from {n}"}) for n in ("cache", "local", "remote"))
    async with Milliwatt([Rules(forbid={"cache": "forbidden by rule p/x", "local": "forbidden by rule p/x"}), cache, local, remote]) as mw:
        result = await mw.step([{"role": "user", "content": "hi"}])
    assert result.content == "from remote" and cache.seen == [] and local.seen == []
    assert [(a.tier, a.outcome, a.reason) for a in result.record.attempts[1:3]] == [
        ("cache", "skipped", "forbidden by rule p/x"), ("local", "skipped", "forbidden by rule p/x")]

    # the last resort is asked whatever a tier forbids
    remote2 = ScriptedTier("remote", lambda s: {"role": "assistant", "content": "last"})
    async with Milliwatt([Rules(forbid={"remote": "forbidden by rule p/x"}), remote2]) as mw:
        assert (await mw.step([{"role": "user", "content": "hi"}])).content == "last"

    # a budget: later tiers are trimmed to it; one that cannot fit is not asked
    long = [{"role": "user", "content": "word " * 400}]
    local2 = ScriptedTier("local", lambda s: {"role": "assistant", "content": "local"})
    remote3 = ScriptedTier("remote", lambda s: {"role": "assistant", "content": "remote"}, token_budget=100_000)
    async with Milliwatt([Rules(token_budget=50), local2, remote3]) as mw:
        with pytest.raises(Exception, match="exceed the step's"):
            await mw.step(long)
    assert local2.seen == [] and remote3.seen == []
    local3 = ScriptedTier("local", lambda s: {"role": "assistant", "content": "local"})
    async with Milliwatt([Rules(token_budget=5000), local3]) as mw:
        assert (await mw.step(long)).content == "local"


# --------------------------------------------------------------------------- priorities, first match, the index

def test_priority_then_load_order_and_the_first_rule_that_answers_wins(tmp_path):
    rs = rules_from(tmp_path, """
        pack: p
        rules:
          - id: low
            when: {keywords: {any: [order]}}
            reply: low
          - id: high-declines
            priority: 9
            when: {keywords: {any: [order]}}
            tool_call: {name: not_offered}
          - id: mid-a
            priority: 5
            when: {regex: \\border\\b}
            reply: a
          - id: mid-b
            priority: 5
            when: {keywords: {any: [order]}}
            reply: b
    """)
    e = rs.evaluate(user("my order"))
    assert e.match.rule.id == "mid-a" and e.declined == ("p/high-declines (tool 'not_offered' is not offered)",)
    assert rs.evaluate(user("my order"), linear=True) == e


WORDS = ["order", "refund", "bag", "seat", "flight", "hello", "status", "cancel", "pet", "meal", "talk", "human"]


def _random_when(rnd: random.Random, depth: int = 0) -> dict:
    kinds = ["any", "all", "none", "regex", "regex_alt", "meta", "first_turn", "after_tool", "tool_result", "turn"]
    if depth < 2:
        kinds += ["nest_any", "nest_all", "not"]
    when: dict = {}
    for kind in rnd.sample(kinds, rnd.randint(1, 3)):
        w = rnd.choice(WORDS)
        if kind in ("any", "all", "none"):
            when.setdefault("keywords", {})[kind] = rnd.sample(WORDS, rnd.randint(1, 2)) + ([f"{w} please"] if rnd.random() < .2 else [])
        elif kind == "regex":
            when["regex"] = rnd.choice([rf"\b{w}\b", rf"(?i)^{w}\b", rf"{w}s?\s+(?P<n>\d+)", rf"\b{w}(?:ed|s)?\b", r"\d{3}"])
        elif kind == "regex_alt":
            a, b = rnd.sample(WORDS, 2)
            when["regex"] = rnd.choice([rf"(?i)\b(?:{a}|{b})\b", rf"^\W*(?:{a}|{b})\W*$", rf"\b{a} (?:to|for) {b}\b"])
        elif kind == "meta":
            when["meta"] = {"tenant": rnd.choice(["acme", "other"])}
        elif kind == "first_turn":
            when["first_turn"] = rnd.random() < .5
        elif kind == "after_tool":
            when["after_tool"] = rnd.choice([True, "get_user_details", ["get_reservation_details"]])
        elif kind == "tool_result":
            when["tool_result"] = rnd.choice([{"tool": "get_user_details"}, {"fields": {"status": rnd.choice(["ok", "no"])}}])
        elif kind == "turn":
            when["turn"] = {"max": rnd.randint(1, 3)}
        elif kind == "nest_any":
            when["any"] = [_random_when(rnd, depth + 1) for _ in range(rnd.randint(1, 3))]
        elif kind == "nest_all":
            when["all"] = [_random_when(rnd, depth + 1) for _ in range(rnd.randint(1, 2))]
        else:
            when["not"] = _random_when(rnd, depth + 1)
    if set(when) == {"after_tool"} and when["after_tool"] is True:
        when["max_chars"] = 60
    return when


def _random_step(rnd: random.Random) -> Step:
    words = rnd.sample(WORDS + ["the", "my", "Order's", "ORDER", "bags", "pın", "123", "4567", "to", "for"], rnd.randint(0, 6))
    text = rnd.choice([" ", ", ", "! ", "-"]).join(words) + rnd.choice(["", "?", " 42"])
    history = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}] if rnd.random() < .4 else []
    meta = StepMeta(tenant=rnd.choice(["acme", "other"]))
    if rnd.random() < .4:
        name = rnd.choice(["get_user_details", "get_reservation_details"])
        extra = [{"role": "assistant", "content": "z"}, {"role": "user", "content": text}] if rnd.random() < .3 else []
        step = after(name, {"status": rnd.choice(["ok", "no"])}, text=text, history=history, extra=extra)
        return Step(step.messages, step.tools, meta=meta)
    return user(text, history=history, meta=meta)


def test_the_index_finds_the_same_winner_as_the_linear_walk(tmp_path):
    rnd = random.Random(1234)
    for round_ in range(12):
        rules = []
        for i in range(60):
            rule = {"id": f"r{i}", "priority": rnd.choice([0, 0, 1, 5]), "when": _random_when(rnd)}
            rule["reply"] = "hit"
            rules.append(rule)
        path = tmp_path / f"gen{round_}.yaml"
        path.write_text(yaml.safe_dump({"pack": "gen", "rules": rules}))
        rs = load_rules(path)
        assert rs.index.keyed > 0
        for _ in range(150):
            step = _random_step(rnd)
            indexed, linear = rs.evaluate(step), rs.evaluate(step, linear=True)
            assert (indexed.match and indexed.match.rule.id) == (linear.match and linear.match.rule.id), step.messages[-1]
            assert indexed.declined == linear.declined


def test_the_index_narrows_the_candidates(tmp_path):
    rules = [{"id": f"k{i}", "when": {"keywords": {"any": [f"word{i}"]}}, "reply": "x"} for i in range(500)]
    rules.append({"id": "regex", "when": {"regex": r"(?i)\bcancel(?:led)?\s+(?P<n>\d+)"}, "reply": "{n}"})
    rules.append({"id": "always", "when": {"max_chars": 5}, "reply": "short"})
    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump({"pack": "big", "rules": rules}))
    rs = load_rules(path)
    from milliwatt.rules.conditions import StepView

    assert len(rs.index.candidates(StepView(user("word7 and word9, Cancelled 12")))) == 4
    assert rs.match(user("Cancelled 12")).message["content"] == "12"


# --------------------------------------------------------------------------- checks

def test_check_reports_every_problem_with_line_and_column(tmp_path):
    path = write(tmp_path, "bad.yaml", r"""
        pack: p
        rules:
          - id: one
            when:
              keyword: {any: [x]}
              regex: a
            reply: y
          - id: two
            when: {regex: "(a+)+$"}
            reply: y
          - id: three
            when: {regex: "order (?P<id>\\d+"}
            reply: y
          - id: four
            when: {regex: "order (?P<oid>\\d+)"}
            reply: "{id}"
          - id: one
            when: {keywords: {any: [z]}, colour: red}
            reply: y
    """)
    errors = check(path)
    expected = [
        (*position(path, "keyword:"), "unknown key 'keyword' in 'when'"),
        (*position(path, '"(a+)+$"'), "regex '(a+)+$' can backtrack exponentially"),
        (*position(path, '"order (?P<id>'), "bad regex 'order (?P<id>"),
        (*position(path, '"{id}"'), "template field {id} names no capture group"),
        (*position(path, "colour:"), "unknown key 'colour' in 'when'"),
    ]
    assert [(e.line, e.column) for e in errors] == [(line, col) for line, col, _ in expected]
    for e, (_, _, start) in zip(errors, expected):
        assert e.problem.startswith(start), e
    assert "(known: regex, flags, keywords, meta, tools, first_turn, max_chars, after_tool, tool_result, turn, all, any, not)" in errors[0].problem
    assert str(errors[0]) == f"{path}:{errors[0].line}:{errors[0].column}: {errors[0].problem}"
    with pytest.raises(RuleFileError) as info:
        load_rules(path)
    assert info.value.line == errors[0].line and info.value.column == errors[0].column
    assert info.value.problem.endswith("(and 4 more problems)") and len(info.value.errors) == 5


def test_duplicate_ids_across_files_are_reported_with_the_rest(tmp_path):
    write(tmp_path, "a.yaml", "pack: a\nrules:\n  - id: x\n    when: {max_chars: 3}\n    reply: y\n")
    b = write(tmp_path, "b.yaml", "pack: b\nrules:\n  - id: x\n    when: {max_chars: 3}\n    reply: y\n")
    (err,) = check(tmp_path)
    assert err.path == str(b) and (err.line, err.column) == (3, 9) and "duplicate rule id 'x'" in err.problem


@pytest.mark.parametrize("pattern", [r"(a+)+", r"(a*)*", r"(\w+\s?)+$", r"(a|a)*", r"(a|ab)*", r"(x+x+)+y", r"(.*a){12}",
                                     r"^(\d+|\d)+$", r"(?i)(A|a)+b"])
def test_exponential_regexes_are_refused(pattern):
    assert exponential_risk(pattern)


@pytest.mark.parametrize("pattern", [r"(\w+,)*", r"(\d+\.)+\d", r"(\w+\s)+", r"(?:cat|car)+", r"a+b+c+", r"^\W*(?:hi|hello|hey)\W*$",
                                     r"[a-z]+(?:\s+[a-z]+)*", r"(a++)+", r"\border\b[^0-9#\n]{0,20}?(?:#\s*)?(?P<order_id>(?:[A-Z]{1,3}-)?\d{4,12})\b"])
def test_ordinary_regexes_are_accepted(pattern):
    assert exponential_risk(pattern) is None


def test_the_bundled_pack_passes_every_check():
    assert check(SUPPORT_RULES) == []


def test_tool_calls_are_checked_against_the_tools_given(tmp_path):
    path = write(tmp_path, "t.yaml", r"""
        pack: p
        rules:
          - id: a
            when: {regex: '(?P<rid>\w+) (?P<n>\d+)'}
            tool_call:
              name: cancel_reservation
              arguments:
                reservation_id: "{rid}"
                count: "no. {n}"
                options: "{n}"
                colour: red
          - id: b
            when: {regex: '(?P<rid>\w+)'}
            tool_call:
              name: cancel_reservation
              arguments: {count: 0}
          - id: c
            when: {keywords: {any: [x]}}
            tool_call: {name: book_flight}
          - id: d
            when: {after_tool: get_user_details}
            tool_call:
              name: cancel_reservation
              arguments: {reservation_id: "{result.reservations.0}", count: "{result.count}", options: "{result.opts}"}
    """)
    assert check(path) == []  # without tools: nothing to check them against
    problems = [(e.line, e.problem) for e in check(path, tools=TOOLS)]
    assert problems == [
        (position(path, 'count: "no.')[0], "argument 'count' of cancel_reservation is of type integer: a template with text around its field cannot convert to it (write only {field})"),
        (position(path, 'options: "{n}"')[0], "argument 'options' of cancel_reservation is of type object: a template renders text, which cannot convert to it"),
        (position(path, "colour:")[0], "cancel_reservation has no parameter 'colour' (parameters: reservation_id, count, options)"),
        (position(path, "arguments: {count: 0}")[0] - 1, "tool_call of cancel_reservation does not give its required parameter reservation_id"),
        (position(path, "arguments: {count: 0}")[0], "argument 'count' of cancel_reservation does not validate: 0 is less than the minimum of 1"),
        (position(path, "name: book_flight")[0], "tool_call names 'book_flight', which is not one of the tools given (known: cancel_reservation, get_reservation_details, get_user_details)"),
    ]


BAD_FILES = {
    "result field without a tool result": ("""
        pack: p
        rules:
          - id: a
            when: {keywords: {any: [x]}}
            reply: "{result.name}"
    """, "reads the latest tool result, but the rule has no 'tool_result' or 'after_tool' condition"),
    "tool_call after its own tool": ("""
        pack: p
        rules:
          - id: a
            when: {after_tool: [get_user_details]}
            tool_call: {name: get_user_details}
    """, "cannot call 'get_user_details' after 'get_user_details'"),
    "route forbids the rules tier": ("""
        pack: p
        rules:
          - id: a
            when: {keywords: {any: [x]}}
            route: {forbid: [rules]}
    """, "cannot forbid the rules tier"),
    "route to a forbidden tier": ("""
        pack: p
        rules:
          - id: a
            when: {keywords: {any: [x]}}
            route: {to: local, forbid: [local]}
    """, "goes to 'local' and forbids it"),
    "budget not positive": ("""
        pack: p
        rules:
          - id: a
            when: {keywords: {any: [x]}}
            budget: {max_input_tokens: 0}
    """, "must be a positive integer"),
    "turn min over max": ("""
        pack: p
        rules:
          - id: a
            when: {turn: {min: 3, max: 2}}
            reply: x
    """, "min 3 is more than max 2"),
    "a field value that is a list": ("""
        pack: p
        rules:
          - id: a
            when: {tool_result: {fields: {tags: [a, b]}}}
            reply: x
    """, "for a list value, write equals"),
    "empty nested condition": ("""
        pack: p
        rules:
          - id: a
            when: {any: [{}]}
            reply: x
    """, "a nested condition needs at least one condition"),
    "two actions": ("""
        pack: p
        rules:
          - id: a
            when: {keywords: {any: [x]}}
            reply: x
            budget: {max_input_tokens: 5}
    """, "takes exactly one action"),
    "unknown key in a rule": ("""
        pack: p
        rules:
          - id: a
            when: {keywords: {any: [x]}}
            replies: x
    """, "unknown key 'replies' in a rule"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_rules_are_load_errors(tmp_path, case):
    body, problem = BAD_FILES[case]
    with pytest.raises(RuleFileError) as info:
        load_rules(write(tmp_path, "bad.yaml", body))
    assert problem in info.value.problem and info.value.line and info.value.column


def test_files_that_are_not_rule_files(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# padding\n" * 1_048_576)  # 10 MB
    (err,) = check(big)
    assert err.problem == "rule file is 10.0 MB, over the limit of 1.0 MB: not read" and err.line is None
    (tmp_path / "bin.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    assert "not a YAML rule file: not UTF-8 text" in check(tmp_path / "bin.yaml")[0].problem
    write(tmp_path, "text.yaml", "just some words, not rules")
    assert "a rule file must be a mapping, got 'just some words, not rules'" in check(tmp_path / "text.yaml")[0].problem
    write(tmp_path, "empty.yaml", "# nothing yet\n")
    assert check(tmp_path / "empty.yaml")[0].problem.startswith("empty rule file")
    write(tmp_path, "broken.yaml", "pack: p\nrules: [\n")
    err = check(tmp_path / "broken.yaml")[0]
    assert err.problem.startswith("invalid YAML") and err.line and err.column
    assert len(check(tmp_path)) == 5  # every file's problem at once


def test_rule_file_error_keeps_its_old_constructor():
    e = RuleFileError("a.yaml", 3, "bad")
    assert str(e) == "a.yaml:3: bad" and e.column is None
    assert str(RuleFileError("a.yaml", 3, "bad", 7)) == "a.yaml:3:7: bad"
    assert str(RuleFileError("a.yaml", None, "bad", 7)) == "a.yaml: bad"
    import pickle

    assert str(pickle.loads(pickle.dumps(RuleFileError("a.yaml", 3, "bad", 7)))) == "a.yaml:3:7: bad"


# --------------------------------------------------------------------------- the JSON Schema

def _docs_examples() -> list[tuple[str, object]]:
    text = (ROOT / "docs" / "rules.md").read_text()
    out = []
    for block in re.findall(r"```yaml\n(.*?)```", text, re.S):
        data = yaml.safe_load(block)
        if isinstance(data, dict) and "pack" in data:
            out.append(("file", data))
        elif isinstance(data, list):
            out.extend(("rule", r) for r in data)
    return out


def test_schema_is_valid_and_accepts_every_example_pack_and_docs_example():
    Draft202012Validator.check_schema(SCHEMA)
    validator = Draft202012Validator(SCHEMA)
    validator.validate(yaml.safe_load(Path(SUPPORT_RULES).read_text()))
    rule_validator = Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/rule"})
    examples = _docs_examples()
    assert len(examples) >= 5
    for kind, data in examples:
        (validator if kind == "file" else rule_validator).validate(data)


def test_docs_examples_load(tmp_path):
    for i, (kind, data) in enumerate(_docs_examples()):
        body = data if kind == "file" else {"pack": "docs", "rules": [data]}
        load_rules(write(tmp_path, f"d{i}.yaml", yaml.safe_dump(body)))


@pytest.mark.parametrize("body", [
    {"pack": "p", "rules": [{"id": "a", "when": {"keyword": {"any": ["x"]}}, "reply": "y"}]},
    {"pack": "p", "rules": [{"id": "a", "when": {"max_chars": 3}}]},
    {"pack": "p", "rules": [{"id": "a", "when": {"max_chars": 3}, "reply": "y", "route": "remote"}]},
    {"pack": "p", "rules": [{"id": "a", "when": {"max_chars": "3"}, "reply": "y"}]},
    {"pack": "p", "rules": [{"id": "a", "when": {"turn": {"min": 0}}, "reply": "y"}]},
    {"pack": "p", "rules": [{"id": "a", "when": {"max_chars": 3}, "budget": {"tokens": 3}}]},
    {"pack": "p", "rules": []},
])
def test_invalid_files_fail_the_schema_and_the_loader(tmp_path, body):
    assert not Draft202012Validator(SCHEMA).is_valid(body)
    assert check(write(tmp_path, "x.yaml", yaml.safe_dump(body)))


def test_schema_ships_with_the_package():
    text = (ROOT / "pyproject.toml").read_text()
    assert '"milliwatt.rules" = ["schema.json"]' in text


# --------------------------------------------------------------------------- hot reload

PING = """
    pack: live
    rules:
      - id: ping
        when: {keywords: {any: [ping]}}
        reply: "{reply}"
"""


async def _answer(tier: RulesTier, text: str = "ping") -> str | None:
    r = await tier.attempt(user(text))
    return r.message["content"] if r.answered else None


async def _until(tier: RulesTier, want: str, text: str = "ping") -> None:
    for _ in range(200):
        if await _answer(tier, text) == want:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never answered {want!r}; reload_error={tier.reload_error}")


@pytest.mark.asyncio
async def test_hot_reload_swaps_good_edits_and_keeps_the_last_good_rules(tmp_path, caplog):
    path = write(tmp_path, "live.yaml", PING.replace("{reply}", "pong 1"))
    tier = RulesTier([path], watch=True, reload_interval_s=0.01)
    first = tier.version
    assert await _answer(tier) == "pong 1"

    path.write_text(path.read_text().replace("pong 1", "pong 2"))
    await _until(tier, "pong 2")
    assert tier.version != first and tier.reload_error is None

    # a broken edit: reported with file:line:column, the last good rules keep answering
    good = tier.version
    with caplog.at_level(logging.WARNING, logger="milliwatt"):
        path.write_text(path.read_text().replace("reply:", "replyy:"))
        for _ in range(100):
            await _answer(tier)
            if tier.reload_error is not None:
                break
            await asyncio.sleep(0.01)
    err = tier.reload_error
    assert err is not None and (err.line, err.column) == position(path, "replyy:")
    assert f"{path}:{err.line}:{err.column}: unknown key 'replyy'" in caplog.text
    assert await _answer(tier) == "pong 2" and tier.version == good

    # retried when the file changes again
    path.write_text(PING.replace("{reply}", "pong 3").replace("\n    ", "\n"))
    await _until(tier, "pong 3")
    assert tier.reload_error is None

    # a new file in a watched folder counts too
    folder = tmp_path / "packs"
    folder.mkdir()
    write(folder, "a.yaml", PING.replace("{reply}", "a"))
    tier2 = RulesTier([folder], watch=True, reload_interval_s=0.01)
    write(folder, "b.yaml", PING.replace("{reply}", "b").replace("id: ping", "id: pong").replace("[ping]", "[pong]").replace("pack: live", "pack: other"))
    await _until(tier2, "b", "pong")


@pytest.mark.asyncio
async def test_refresh_and_no_watch(tmp_path):
    path = write(tmp_path, "live.yaml", PING.replace("{reply}", "one"))
    tier = RulesTier([path], reload_interval_s=0.01)  # watch off: files are not polled
    path.write_text(path.read_text().replace("one", "two"))
    await asyncio.sleep(0.02)
    assert await _answer(tier) == "one"
    assert await tier.refresh() is True and await _answer(tier) == "two"
    assert await tier.refresh() is False


@pytest.mark.asyncio
async def test_concurrent_steps_during_reloads_never_see_a_mix(tmp_path):
    body = """
        pack: live
        rules:
          - id: a
            priority: 1
            when: {keywords: {any: [ping]}}
            reply: "a{n}"
          - id: b
            when: {keywords: {any: [ping]}}
            reply: "b{n}"
    """
    path = write(tmp_path, "live.yaml", body.replace("{n}", "0"))
    tier = RulesTier([path], watch=True, reload_interval_s=0.001)
    versions: dict[str, str] = {tier.version: "0"}
    seen: list[tuple[str, str]] = []
    done = asyncio.Event()

    async def stepper():
        while not done.is_set():
            r = await tier.attempt(user("ping"))
            seen.append((r.evidence["pack_version"], r.message["content"]))
            await asyncio.sleep(0.0005)  # leave the reload thread the GIL now and then

    async def editor():
        for n in range(1, 8):
            text = textwrap.dedent(body).lstrip("\n").replace("{n}", str(n))
            if n % 2:  # odd versions swap the priorities: a mix would answer "b" with a's number
                text = text.replace("priority: 1", "priority: 0").replace("id: b\n", "id: b\n    priority: 2\n")
            path.write_text(text)
            versions[hashlib.sha256(text.encode()).hexdigest()[:12]] = str(n)
            await tier.refresh()
            await asyncio.sleep(0.002)
        await asyncio.sleep(0.01)
        done.set()

    await asyncio.gather(editor(), *(stepper() for _ in range(8)))
    assert len({v for v, _ in seen}) > 2
    for version, content in seen:
        n = versions[version]
        assert content == (f"b{n}" if int(n) % 2 else f"a{n}")


def test_reload_settings_are_validated_and_wired(tmp_path):
    assert load_settings().rules.reload is True and load_settings().rules.reload_interval_s == 1.0
    with pytest.raises(ConfigError, match="reload_interval_s"):
        load_settings({"rules": {"reload_interval_s": 0}})
    path = write(tmp_path, "p.yaml", PING.replace("{reply}", "x"))
    settings = load_settings({"rules": {"packs": [str(path)], "reload_interval_s": 5}})
    tier = build_tier("rules", settings)
    assert tier.watch is True and tier.reload_interval_s == 5
    assert build_tier("rules", load_settings({"rules": {"packs": [str(path)], "reload": False}})).watch is False
