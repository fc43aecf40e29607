"""The rules tier: matching, actions, priorities, the demo's pack, and rule-file errors
that name the file and the line."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path

import pytest

from milliwatt.config import load_settings
from milliwatt.errors import ConfigError, RuleFileError
from milliwatt.examples import SUPPORT_RULES
from milliwatt.rules import RuleSet, RulesTier, check, load_rules
from milliwatt.registry import build_tier
from milliwatt.types import Step, StepMeta

SUPPORT = StepMeta(agent="support", tenant="acme", session_id="s1")


def tool(name: str, properties: dict, required: list[str] | None = None) -> dict:
    params = {"type": "object", "properties": properties, "required": required or list(properties)}
    return {"type": "function", "function": {"name": name, "parameters": params}}


SUPPORT_TOOLS = [
    tool("get_order_status", {"order_id": {"type": "string"}}),
    tool("get_user_details", {"user_id": {"type": "string"}}),
    tool("cancel_order", {"order_id": {"type": "string"},
                          "reason": {"type": "string", "enum": ["no_longer_needed", "ordered_by_mistake", "other"]}}),
    tool("search_help_center", {"query": {"type": "string"}}),
]


def user_step(text: str, *, tools=(), meta: StepMeta = SUPPORT, history=(), **kw) -> Step:
    return Step.create([{"role": "system", "content": "You help."}, *history, {"role": "user", "content": text}],
                       tools=list(tools), meta=meta, **kw)


def write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def line_of(path: Path, marker: str) -> int:
    """The 1-based line of the first line containing ``marker`` (so tests state lines by content)."""
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if marker in line)


def rules_from(tmp_path: Path, body: str, name: str = "rules.yaml") -> RuleSet:
    return load_rules(write(tmp_path, name, body))


EARLIER_REPLY = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}]


def test_public_api_is_small_and_pinned():
    import milliwatt.rules

    assert sorted(milliwatt.rules.__all__) == [
        "Evaluation", "Rule", "RuleMatch", "RuleSet", "RulesTier", "check", "load_rules"]


# --------------------------------------------------------------------------- conditions

def test_regex_captures_fill_a_reply_template_with_meta(tmp_path):
    rs = rules_from(tmp_path, r"""
        pack: demo
        rules:
          - id: refund-days
            when:
              regex: (?i)refund\s+for\s+(?P<item>\w+)
            reply: "Refunds for {item} take 5 days at {meta.tenant} (agent {meta.agent})."
    """)
    m = rs.match(user_step("Can I get a REFUND for shoes?"))
    assert m is not None and m.rule.qualified_id == "demo/refund-days"
    assert m.captures == {"item": "shoes"}
    assert m.message == {"role": "assistant", "content": "Refunds for shoes take 5 days at acme (agent support)."}
    assert rs.match(user_step("refunds are slow")) is None


def test_regex_flags_by_name(tmp_path):
    rs = rules_from(tmp_path, """
        pack: demo
        rules:
          - id: shout
            when: {regex: "^hello$", flags: [IGNORECASE, MULTILINE]}
            reply: hi
    """)
    assert rs.match_text("first line\nHELLO\nlast") is not None


def test_keywords_any_all_none_are_whole_word_and_case_insensitive(tmp_path):
    rs = rules_from(tmp_path, """
        pack: demo
        rules:
          - id: kw
            when:
              keywords:
                any: [invoice, "talk to a human"]
                all: [please]
                none: [cancel]
            reply: ok
    """)
    assert rs.match_text("INVOICE please") is not None
    assert rs.match_text("Please, let me TALK to   a HUMAN!") is not None  # phrases ignore spacing/punctuation
    assert rs.match_text("invoices please") is None  # whole words only
    assert rs.match_text("invoice") is None  # 'all' not satisfied
    assert rs.match_text("please cancel the invoice") is None  # 'none' present


def test_meta_conditions_and_pack_scope(tmp_path):
    rs = rules_from(tmp_path, """
        pack: demo
        scope: {tenant: acme}
        rules:
          - id: for-two-agents
            when:
              meta: {agent: [support, billing]}
              keywords: {any: [hello]}
            reply: hi
    """)
    assert rs.match(user_step("hello", meta=StepMeta(agent="billing", tenant="acme"))) is not None
    assert rs.match(user_step("hello", meta=StepMeta(agent="sales", tenant="acme"))) is None
    assert rs.match(user_step("hello", meta=StepMeta(agent="support", tenant="other"))) is None  # the pack's scope
    assert rs.match(user_step("hello", meta=StepMeta())) is None


def test_tools_first_turn_and_max_chars(tmp_path):
    rs = rules_from(tmp_path, """
        pack: demo
        rules:
          - id: only-with-search
            when: {tools: [search_help_center], first_turn: true, max_chars: 20}
            reply: searchable
    """)
    assert rs.match(user_step("how do returns work", tools=SUPPORT_TOOLS)) is not None
    assert rs.match(user_step("how do returns work")) is None  # tool not offered
    assert rs.match(user_step("how do returns work", tools=SUPPORT_TOOLS, history=EARLIER_REPLY)) is None  # not first turn
    assert rs.match(user_step("how do returns work, in detail?", tools=SUPPORT_TOOLS)) is None  # too long


def _mid_tool_loop(text: str) -> Step:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_order_status", "arguments": '{"order_id": "1"}'}}
    return Step.create([
        {"role": "user", "content": text},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "shipped"},
    ], tools=SUPPORT_TOOLS, meta=SUPPORT)


def test_rules_pass_mid_tool_loop_unless_after_tool(tmp_path):
    rs = rules_from(tmp_path, """
        pack: demo
        rules:
          - id: escalate
            when: {keywords: {any: [lawyer]}, after_tool: true}
            route: remote
          - id: greet
            when: {keywords: {any: [hello]}}
            reply: hi
    """)
    m = rs.match(_mid_tool_loop("hello, my lawyer asks"))
    assert m is not None and m.rule.id == "escalate"
    assert rs.match(_mid_tool_loop("hello")) is None  # 'greet' does not act on a tool result


# --------------------------------------------------------------------------- actions

TYPED_TOOL = tool("set_quantity", {
    "sku": {"type": "string"},
    "count": {"type": "integer", "minimum": 1},
    "price": {"type": "number"},
    "gift": {"type": "boolean"},
    "note": {"type": "string"},
}, required=["sku", "count"])

TOOL_CALL_RULES = r"""
    pack: shop
    rules:
      - id: set-qty
        when:
          regex: (?i)set\s+(?P<sku>[A-Z]+-\d+)\s+to\s+(?P<count>-?\d+)(?:\s+at\s+(?P<price>[\d.]+))?(?P<gift>\s+as\s+gift)?
        tool_call:
          name: set_quantity
          arguments:
            sku: "{sku}"
            count: "{count}"
            price: "{price}"
            gift: "yes"
            note: "for {meta.session_id}: {sku}"
      - id: fallback
        when: {keywords: {any: [set]}}
        reply: I could not read that.
"""


def test_templated_tool_call_coerces_types_to_the_schema(tmp_path):
    rs = rules_from(tmp_path, TOOL_CALL_RULES)
    m = rs.match(user_step("please set AB-12 to 3 at 9.50", tools=[TYPED_TOOL]))
    assert m is not None and m.rule.id == "set-qty"
    (call,) = m.message["tool_calls"]
    assert m.message["role"] == "assistant" and m.message["content"] is None
    assert re.fullmatch(r"call_[0-9a-f]{24}", call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "set_quantity"
    assert json.loads(call["function"]["arguments"]) == {
        "sku": "AB-12", "count": 3, "price": 9.5, "gift": True, "note": "for s1: AB-12"}


def test_optional_capture_that_did_not_take_part_leaves_the_argument_out(tmp_path):
    m = rules_from(tmp_path, TOOL_CALL_RULES).match(user_step("set AB-12 to 3", tools=[TYPED_TOOL]))
    assert "price" not in json.loads(m.message["tool_calls"][0]["function"]["arguments"])


def test_tool_call_failing_the_schema_declines_and_the_next_rule_answers(tmp_path):
    rs = rules_from(tmp_path, TOOL_CALL_RULES)
    m = rs.match(user_step("set AB-12 to -2", tools=[TYPED_TOOL]))  # count below the minimum
    assert m is not None and m.rule.id == "fallback"
    evaluation = rs.evaluate(user_step("set AB-12 to -2", tools=[TYPED_TOOL]))
    assert "shop/set-qty" in evaluation.declined[0] and "minimum" in evaluation.declined[0]


def test_tool_call_rule_does_not_match_when_the_tool_is_not_offered(tmp_path):
    rs = rules_from(tmp_path, TOOL_CALL_RULES)
    m = rs.match(user_step("set AB-12 to 3", tools=SUPPORT_TOOLS))
    assert m is not None and m.rule.id == "fallback"


def test_actions_respect_tool_choice_and_response_format(tmp_path):
    rs = rules_from(tmp_path, TOOL_CALL_RULES)
    assert rs.match(user_step("set AB-12 to 3", tools=[TYPED_TOOL], tool_choice="none")).rule.id == "fallback"
    assert rs.match(user_step("set it", tools=[TYPED_TOOL], tool_choice="required")) is None  # no text reply
    assert rs.match(user_step("set it", response_format={"type": "json_object"})) is None


def test_priority_wins_and_ties_keep_file_order(tmp_path):
    a = write(tmp_path, "a.yaml", """
        pack: a
        rules:
          - id: low
            when: {keywords: {any: [order]}}
            reply: low
          - id: tie-first
            priority: 5
            when: {keywords: {any: [order]}}
            reply: first
    """)
    b = write(tmp_path, "b.yaml", """
        pack: b
        rules:
          - id: tie-second
            priority: 5
            when: {keywords: {any: [order]}}
            reply: second
          - id: high
            priority: 9
            when: {keywords: {any: [urgent]}}
            reply: high
    """)
    rs = load_rules([a, b])
    assert [r.id for r in rs.rules] == ["high", "tie-first", "tie-second", "low"]
    assert rs.match_text("order").rule.id == "tie-first"
    assert rs.match_text("urgent order").rule.id == "high"
    assert load_rules([b, a]).match_text("order").rule.id == "tie-second"  # file order decides ties
    assert load_rules(tmp_path).match_text("order").rule.id == "tie-first"  # a folder loads by file name


# --------------------------------------------------------------------------- the tier

@pytest.mark.asyncio
async def test_tier_answers_with_the_rule_as_model_and_cpu_energy():
    tier = RulesTier(SUPPORT_RULES)
    r = await tier.attempt(user_step("Where is my order #12345?", tools=SUPPORT_TOOLS))
    assert r.answered and r.tier == "rules"
    assert r.reason == "rule support/order-status matched" and r.model == "rules:support/order-status"
    assert r.signal == 1.0 and r.cacheable is False and r.skip_to is None
    assert json.loads(r.message["tool_calls"][0]["function"]["arguments"]) == {"order_id": "12345"}
    assert r.energy.method == "cpu-time" and 0 < r.energy.point_wh < 1e-6


@pytest.mark.asyncio
async def test_tier_route_passes_with_skip_to():
    r = await RulesTier(SUPPORT_RULES).attempt(user_step("I'm filing a chargeback with my bank", tools=SUPPORT_TOOLS))
    assert not r.answered
    assert r.skip_to == "remote" and r.reason == "rule support/legal-to-remote routes to remote"


@pytest.mark.asyncio
async def test_tier_passes_when_no_rule_matches():
    r = await RulesTier(SUPPORT_RULES).attempt(user_step("Can I swap the blue sweater for a medium?", tools=SUPPORT_TOOLS))
    assert not r.answered and r.skip_to is None and r.reason == "no rule matched"
    assert r.energy.method == "cpu-time"


@pytest.mark.asyncio
async def test_tier_refusal_is_labelled():
    r = await RulesTier(SUPPORT_RULES).attempt(user_step("Tell me the password for john@example.com", tools=SUPPORT_TOOLS))
    assert r.answered and r.label == "refusal" and "can't share" in r.message["content"]


def test_rules_tier_from_configuration(tmp_path):
    path = write(tmp_path, "p.yaml", """
        pack: p
        rules:
          - id: x
            when: {keywords: {any: [ping]}}
            reply: pong
    """)
    settings = load_settings({"rules": {"packs": str(path)}, "energy": {"cpu_watts_low": 1.0, "cpu_watts_point": 2.0, "cpu_watts_high": 3.0}})
    tier = build_tier("rules", settings)
    assert tier.packs == (str(path),) and tier.ruleset.match_text("ping").message["content"] == "pong"
    with pytest.raises(ConfigError, match="rules.pack"):
        load_settings({"rules": {"pack": "x"}})


@pytest.mark.asyncio
async def test_default_configuration_answers_nothing_from_demo_data():
    # The README's agent-loop example: the demo's pack used to answer it by default.
    tier = build_tier("rules", load_settings())
    assert tier.packs == ()
    step = user_step("Where is my order 48213?", tools=SUPPORT_TOOLS)
    for text in ("Where is my order 48213?", "Hello!", "What are your opening hours?"):
        r = await tier.attempt(user_step(text, tools=SUPPORT_TOOLS))
        assert not r.answered and r.reason == "no rule matched"
    assert not (await tier.attempt(step)).answered


# --------------------------------------------------------------------------- the demo's pack

def test_demo_pack_is_valid():
    assert check(SUPPORT_RULES) == []


@pytest.mark.parametrize(("text", "history", "expected"), [
    ("Hello!", (), "greeting"),
    ("hello", EARLIER_REPLY, None),  # a greeting only opens a conversation
    ("hello, I need help with my order", (), None),
    ("status of order 12345", (), "order-status"),
    ("Can you track order A-99812 for me?", (), "order-status"),
    ("I want to cancel order 12345", (), None),
    ("What are your opening hours?", (), "opening-hours"),
    ("How can I contact you?", (), "contact"),
    ("How do I change the email address on my account?", (), None),
    ("Can I speak to a real person please", (), "human-handoff"),
    ("I'm a travel agent", (), None),
    ("What is the password of my neighbour's account?", (), "refuse-credentials"),
    ("How do I reset my password?", (), None),
    ("Show me another customer's orders", (), "refuse-others-data"),
    ("My lawyer will hear about this", (), "legal-to-remote"),
    ("thank you so much!", EARLIER_REPLY, "thanks"),
])
def test_support_pack(text, history, expected):
    m = load_rules(SUPPORT_RULES).match(user_step(text, tools=SUPPORT_TOOLS, history=history))
    assert (m.rule.id if m else None) == expected


def test_support_pack_answers_only_its_own_agent():
    assert load_rules(SUPPORT_RULES).match(user_step("Hello!", meta=StepMeta(agent="airline", tenant="acme"))) is None


def test_support_order_status_call():
    m = load_rules(SUPPORT_RULES).match(user_step("where is my order? it's #778899", tools=SUPPORT_TOOLS))
    assert json.loads(m.message["tool_calls"][0]["function"]["arguments"]) == {"order_id": "778899"}


# --------------------------------------------------------------------------- rule-file errors

GOOD = """
    pack: good
    rules:
      - id: ping
        when: {keywords: {any: [ping]}}
        reply: pong
"""

BAD_FILES = {
    "bad YAML syntax": ("""
        pack: bad
        rules:
          - id: one
            when: {keywords: {any: [x]}
            reply: y
    """, "reply: y", "invalid YAML"),
    "unknown key": ("""
        pack: bad
        rules:
          - id: one
            when:
              keyword: {any: [x]}
            reply: y
    """, "keyword:", "unknown key 'keyword' in 'when' (known: regex, flags, keywords"),
    "bad regex": ("""
        pack: bad
        rules:
          - id: one
            description: fine
            when:
              max_chars: 10
              regex: order (?P<id>\\d+
            reply: y
    """, "regex:", "bad regex"),
    "template names an unknown group": ("""
        pack: bad
        rules:
          - id: one
            when:
              regex: order (?P<order_id>\\d+)
            tool_call:
              name: get_order_status
              arguments:
                order_id: "{orderid}"
    """, '"{orderid}"', "template field {orderid} names no capture group (the regex defines: order_id)"),
    "template reaches past meta": ("""
        pack: bad
        rules:
          - id: one
            when: {keywords: {any: [x]}}
            reply: "{meta.__class__}"
    """, "reply:", "must name a regex capture group"),
    "missing action": ("""
        pack: bad
        rules:
          - id: one
            when: {keywords: {any: [x]}}
          - id: two
            when: {keywords: {any: [x]}}
            reply: y
    """, "id: one", "needs one action"),
    "two actions": ("""
        pack: bad
        rules:
          - id: one
            when: {keywords: {any: [x]}}
            reply: y
            route: remote
    """, "route:", "takes exactly one action"),
    "unknown flag": ("""
        pack: bad
        rules:
          - id: one
            when:
              regex: x
              flags:
                - IGNORECASE
                - CASELESS
            reply: y
    """, "CASELESS", "unknown regex flag 'CASELESS'"),
    "wrong type": ("""
        pack: bad
        rules:
          - id: one
            priority: high
            when: {keywords: {any: [x]}}
            reply: y
    """, "priority:", "'priority' must be an integer, got the text 'high'"),
    "yes is not text": ("""
        pack: bad
        rules:
          - id: one
            when: {keywords: {any: [x]}}
            reply: yes
    """, "reply:", "got true (a boolean; quote it for text)"),
    "duplicate id in one file": ("""
        pack: bad
        rules:
          - id: one
            when: {keywords: {any: [x]}}
            reply: y
          - id: one  # again
            when: {keywords: {any: [z]}}
            reply: y
    """, "# again", "duplicate rule id 'one': already defined at"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_invalid_file_names_file_and_line(tmp_path, case):
    body, marker, problem = BAD_FILES[case]
    path = write(tmp_path, "bad.yaml", body)
    with pytest.raises(RuleFileError) as info:
        load_rules(path)
    err = info.value
    expected_line = line_of(path, marker)
    assert Path(err.path).name == "bad.yaml"
    assert err.line == expected_line, f"{err} (expected line {expected_line})"
    assert problem in err.problem
    assert isinstance(err.column, int) and err.column >= 1  # errors name the column too
    assert str(err).startswith(f"{path}:{expected_line}:{err.column}: ")


def test_duplicate_id_across_files_names_the_second_file_and_the_first(tmp_path):
    first = write(tmp_path, "a.yaml", GOOD)
    second = write(tmp_path, "b.yaml", """
        pack: other
        rules:
          - id: pong
            when: {keywords: {any: [pong]}}
            reply: ping
          - id: ping
            when: {keywords: {any: [ping]}}
            reply: again
    """)
    with pytest.raises(RuleFileError) as info:
        load_rules(tmp_path)
    assert info.value.path == str(second) and info.value.line == line_of(second, "id: ping")
    assert f"already defined at {first}:{line_of(first, 'id: ping')}" in info.value.problem


def test_check_reports_every_broken_file(tmp_path):
    write(tmp_path, "a.yaml", BAD_FILES["unknown key"][0])
    write(tmp_path, "b.yaml", BAD_FILES["bad regex"][0])
    write(tmp_path, "c.yaml", GOOD)
    errors = check(tmp_path)
    assert [(Path(e.path).name, e.line) for e in errors] == [
        ("a.yaml", line_of(tmp_path / "a.yaml", "keyword:")), ("b.yaml", line_of(tmp_path / "b.yaml", "regex:"))]
    assert check(tmp_path / "missing.yaml")[0].problem == "no such rule file or folder"


@pytest.mark.asyncio
async def test_failed_reload_keeps_the_old_rules(tmp_path):
    path = write(tmp_path, "live.yaml", GOOD)
    tier = RulesTier([path])
    assert (await tier.attempt(user_step("ping"))).message["content"] == "pong"

    path.write_text(path.read_text().replace("reply: pong", "reply: pong\n    route: remote"))
    with pytest.raises(RuleFileError) as info:
        tier.reload()
    assert info.value.path == str(path) and info.value.line == line_of(path, "route: remote")
    assert (await tier.attempt(user_step("ping"))).message["content"] == "pong"

    with pytest.raises(RuleFileError):
        tier.load([path, tmp_path / "missing.yaml"])
    assert tier.packs == (str(path),)

    path.write_text(GOOD.replace("reply: pong", "reply: PONG"))
    tier.reload()
    assert (await tier.attempt(user_step("ping"))).message["content"] == "PONG"
