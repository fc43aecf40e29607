"""The product team's rule tools: lint, test, what-if and suggest (rules/testing.py, whatif.py,
suggest.py, and ``milliwatt rules`` in sdk/cli.py), each on small real inputs."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from milliwatt.calibration import split_sessions
from milliwatt.cli import main
from milliwatt.ledger import Ledger
from milliwatt.rules import load_rules
from milliwatt.evaluation.rule_suggest import suggest
from milliwatt.rules.testing import RuleTestError, format_outcomes, run_tests
from milliwatt.rules.whatif import steps_from_ledger, steps_from_trace, what_if
from milliwatt.testing import ScriptedTier
from milliwatt import Milliwatt

TOOLS = [
    {"type": "function", "function": {"name": "get_order_status", "description": "Look up an order.",
                                      "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}}},
    {"type": "function", "function": {"name": "get_invoices", "description": "Invoices of an account.",
                                      "parameters": {"type": "object", "properties": {"account_id": {"type": "string"}}, "required": ["account_id"]}}},
    {"type": "function", "function": {"name": "lookup_account", "description": "An account by its handle.",
                                      "parameters": {"type": "object", "properties": {"handle": {"type": "string"}}, "required": ["handle"]}}},
    {"type": "function", "function": {"name": "get_ticket", "description": "A support ticket.",
                                      "parameters": {"type": "object", "properties": {"ticket_id": {"type": "string"}}, "required": ["ticket_id"]}}},
]  # fmt: skip

PACK = """\
pack: shop
rules:
  - id: order-status
    when:
      regex: order\\s+#?(?P<order_id>\\d{4,8})
      keywords: {any: [where, status]}
    tool_call:
      name: get_order_status
      arguments: {order_id: "{order_id}"}
  - id: greeting
    when:
      keywords: {any: [hello, hi]}
      max_chars: 40
    reply: Hello! How can I help?
  - id: legal
    when:
      keywords: {any: [lawyer]}
    route: remote
"""


def call(name: str, **args: object) -> dict:
    return {"role": "assistant", "content": None,
            "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]}  # fmt: skip


def reply(text: str) -> dict:
    return {"role": "assistant", "content": text}


# --------------------------------------------------------------------------- lint


def test_lint_prints_every_problem_with_its_place_and_check_stays_an_alias(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("pack: t\nrules:\n  - id: a\n    when: {regex: '(unclosed'}\n    reply: hi\n")
    good = tmp_path / "good.yaml"
    good.write_text(PACK)
    assert main(["rules", "lint", str(bad), str(good)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:4" in err and "bad regex" in err and "1 problem(s)" in err
    assert main(["rules", "check", str(bad)]) == 1
    assert f"{bad}:4" in capsys.readouterr().err
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    assert main(["rules", "lint", str(good), "--tools", str(tools)]) == 0
    assert "valid" in capsys.readouterr().out


# --------------------------------------------------------------------------- rule tests


TESTS = """\
tests:
  - name: order status by id
    step:
      messages: [{role: user, content: "where is my order 12345?"}]
      tools_file: tools.json
    expect:
      rule: shop/order-status
      tool_call: {name: get_order_status, arguments: {order_id: "12345"}}
  - name: hello
    step: {messages: [{role: user, content: "hello"}]}
    expect: {rule: shop/greeting, reply: "Hello! How can I help?"}
  - name: lawyer goes remote
    step: {messages: [{role: user, content: "I will call my lawyer"}]}
    expect: {rule: shop/legal, route: remote}
  - name: cancelling is not answered
    step: {messages: [{role: user, content: "cancel order 12345"}], tools_file: tools.json}
    expect: none
  - name: a wrong expectation
    step: {messages: [{role: user, content: "hi"}]}
    expect: {rule: shop/greeting, reply: "Hi there"}
  - name: another wrong expectation
    step: {messages: [{role: user, content: "what is the status of order 777777"}]}
    expect: {rule: shop/order-status}
"""


def _pack_with_tests(tmp_path: Path, tests: str = TESTS) -> Path:
    (tmp_path / "shop.yaml").write_text(PACK)
    (tmp_path / "shop.tests.yaml").write_text(tests)
    (tmp_path / "tools.json").write_text(json.dumps(TOOLS))
    return tmp_path / "shop.yaml"


def test_rule_tests_pass_and_fail_in_a_table(tmp_path, capsys):
    pack = _pack_with_tests(tmp_path)
    outcomes = run_tests(pack)
    assert [(o.test.name, o.passed) for o in outcomes] == [
        ("order status by id", True), ("hello", True), ("lawyer goes remote", True),
        ("cancelling is not answered", True), ("a wrong expectation", False),
        ("another wrong expectation", False),  # no tools offered: the tool call declines
    ]  # fmt: skip
    table = format_outcomes(outcomes)
    assert "PASS" in table and "FAIL" in table and "4 passed, 2 failed" in table
    assert "expected the text 'Hi there'" in table
    assert main(["rules", "test", str(pack)]) == 1
    assert "4 passed, 2 failed" in capsys.readouterr().out
    # A pack folder: its *.tests.yaml are tests, never rule files.
    assert len(run_tests(tmp_path)) == 6


def test_a_bad_tests_file_names_the_file_and_line(tmp_path):
    pack = _pack_with_tests(tmp_path, "tests:\n  - name: x\n    step: {messages: [{role: user, content: hi}]}\n    expect: {rule: shop/greeting, replay: hi}\n")
    with pytest.raises(RuleTestError) as e:
        run_tests(pack)
    assert str(e.value).startswith(f"{tmp_path / 'shop.tests.yaml'}:4:") and "unknown key 'replay'" in str(e.value)
    (tmp_path / "shop.tests.yaml").write_text("tests:\n  - name: x\n    step: {messages: [{role: robot, content: hi}]}\n    expect: none\n")
    with pytest.raises(RuleTestError, match=r"shop.tests.yaml:3: step messages\[0\]"):
        run_tests(pack)


# --------------------------------------------------------------------------- what-if on a ledger


def _agent(step) -> dict:
    """The recorded 'frontier' answers: a lookup for an order id, a greeting reply that differs
    from the rule's on one step in five, a hand-off for the rest."""
    text = step.last_user_text
    if "order" in text and any(c.isdigit() for c in text) and "cancel" not in text:
        return call("get_order_status", order_id="".join(c for c in text if c.isdigit()))
    if text.startswith("hello"):
        n = int(text.split()[-1])
        return reply("Hello! How can I help?" if n % 5 else "Good morning, Dana here: what is your booking number?")
    return reply("Let me pass you to a colleague.")


async def _write_ledger(db: Path) -> None:
    async with Ledger(db) as ledger:
        async with Milliwatt([ScriptedTier("remote", _agent)], ledger=ledger) as mw:
            for i in range(20):
                for text in (f"where is my order {1000 + i}?", f"hello {i}", "I want to speak to my lawyer", f"cancel order {2000 + i}"):
                    await mw.step([{"role": "user", "content": text}], tools=TOOLS, session_id=f"s{i}", agent="shop")
        await ledger.flush()


@pytest.mark.asyncio
async def test_what_if_on_a_ledger_judges_each_rule_and_flags_a_bad_one(tmp_path, capsys):
    db = tmp_path / "run.db"
    await _write_ledger(db)
    steps = steps_from_ledger(db)
    assert len(steps) == 80
    (tmp_path / "shop.yaml").write_text(PACK)
    report = what_if(load_rules(tmp_path / "shop.yaml"), steps)
    by = {r.rule: r for r in report.rules}
    order, greeting, legal = by["shop/order-status"], by["shop/greeting"], by["shop/legal"]
    assert (order.fired, order.agree, order.exact, order.bad) == (20, 20, 20, False)
    assert (greeting.fired, greeting.agree, greeting.proxy, greeting.disagree) == (20, 16, 20, 4)
    assert greeting.bad and greeting.disagreement_upper > greeting.disagreement_rate > 0.02
    assert (legal.fired, legal.routes_to, legal.judged) == (20, "remote", 0)
    assert order.from_tiers == {"remote": 20}
    totals = report.totals()
    assert (totals["answered"], totals["agree"], totals["routed"], totals["bad_rules"]) == (40, 36, 20, ["shop/greeting"])
    text = report.format()
    assert "BAD" in text and "shop/greeting disagrees on step" in text and "routing decisions" in text

    out = tmp_path / "w.json"
    assert main(["rules", "what-if", str(tmp_path / "shop.yaml"), "--ledger", str(db), "--json", str(out)]) == 0
    assert "BAD rules" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["totals"]["bad_rules"] == ["shop/greeting"]
    assert {r["rule"]: r["bad"] for r in data["rules"]} == {"shop/order-status": False, "shop/greeting": True, "shop/legal": False}


# --------------------------------------------------------------------------- traces


def _trace_line(sid: str, session: str, messages: list, answer: dict) -> str:
    calls = answer.get("tool_calls") or []
    reference = ({"kind": "tool_call", "calls": [{"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"])} for c in calls]}
                 if calls else {"kind": "text", "text": answer["content"]})  # fmt: skip
    return json.dumps({"id": sid, "session": session, "messages": messages, "tools": TOOLS, "answer": answer,
                       "model": "gpt-4o", "reference": reference})  # fmt: skip


def test_what_if_on_a_trace_charges_the_recorded_model_and_saves_energy(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("\n".join(
        _trace_line(f"x{i}", f"s{i}", [{"role": "user", "content": f"where is order {5000 + i}?"}], call("get_order_status", order_id=str(5000 + i)))
        for i in range(5)
    ) + "\n")  # fmt: skip
    (tmp_path / "shop.yaml").write_text(PACK)
    report = what_if(load_rules(tmp_path / "shop.yaml"), steps_from_trace(trace))
    [order] = report.rules
    assert (order.fired, order.exact_agree) == (5, 5)
    low, point, high = order.saved_wh
    assert 0 < low <= point <= high  # a gpt-4o call each, less the rule's microjoules


def _sessions(n: int, build) -> list[str]:
    lines = []
    for i in range(n):
        lines += build(i, f"sess{i:03d}")
    return lines


def test_suggest_finds_a_planted_move_and_rejects_one_that_holds_only_where_it_was_fitted(tmp_path, capsys):
    """Users give a handle (acct_<digits>) and the agent looks it up: a function of the context,
    everywhere. Users give a ticket (T<digits>X) and the agent opens it, but only in the
    sessions the suggester fits on; in the held-out ones it hands off instead."""
    rng = random.Random(7)
    names = [f"sess{i:03d}" for i in range(60)]
    held = split_sessions(set(names), 0.5, 0)

    def build(i: int, session: str) -> list[str]:
        system = {"role": "system", "content": "You help customers."}
        handle = f"acct_{rng.randint(1000, 9999)}"
        ticket = f"T{rng.randint(100, 999)}X"
        m1 = [system, {"role": "user", "content": f"Hi, my handle is {handle}, can you check my plan?"}]
        lines = [_trace_line(f"{session}-1", session, m1, call("lookup_account", handle=handle))]
        m2 = [*m1, call("lookup_account", handle=handle), {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"plan": "gold"})},
              reply("You are on the gold plan."), {"role": "user", "content": f"Also ticket {ticket} is still open?"}]  # fmt: skip
        answer = call("get_ticket", ticket_id=ticket) if session not in held else reply("I will ask a colleague about that ticket.")
        lines.append(_trace_line(f"{session}-2", session, m2, answer))
        return lines

    trace = tmp_path / "synthetic.jsonl"
    trace.write_text("\n".join(_sessions(60, build)) + "\n")
    result = suggest(steps_from_trace(trace), min_support=5)
    assert [c.shape for c in result.rules] == ["call:lookup_account"]
    [rule] = result.rules
    assert rule.held_out["fired"] == 30 and rule.held_out["agreement"] == 1.0
    assert 0.9 < rule.held_out["agreement_lower_95"] < 1.0
    assert [c.shape for c in result.rejected] == ["call:get_ticket"]
    assert result.rejected[0].held_out["agreement"] == 0.0
    # The pack loads, says its figures, and answers as recorded.
    out = tmp_path / "suggested.yaml"
    assert main(["rules", "suggest", "--trace", str(trace), "--out", str(out), "--json", str(tmp_path / "s.json")]) == 0
    text = out.read_text()
    assert "pack: suggested" in text and "held out: 30/30 agree" in text and "get_ticket" not in text
    rules = load_rules(out)
    m = rules.match_text("hello, my handle is acct_4242, thanks", tools=TOOLS)
    assert m is not None and json.loads(m.message["tool_calls"][0]["function"]["arguments"]) == {"handle": "acct_4242"}
    assert json.loads((tmp_path / "s.json").read_text())["rules"][0]["held_out"]["fired"] == 30


def test_suggest_fills_a_call_from_the_latest_tool_result(tmp_path):
    """Needs the new rule language (after_tool: <tool>, {result.<path>}): after every
    lookup_account result, the agent fetches the invoices of the account id it returned."""
    rng = random.Random(3)

    def build(i: int, session: str) -> list[str]:
        handle, account = f"acct_{rng.randint(1000, 9999)}", f"AC{rng.randint(10000, 99999)}"
        m = [{"role": "user", "content": f"Invoices for {handle} please"}, call("lookup_account", handle=handle),
             {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"account": {"id": account, "plan": rng.choice(["gold", "free"])}})}]  # fmt: skip
        return [_trace_line(f"{session}-1", session, m, call("get_invoices", account_id=account))]

    trace = tmp_path / "synthetic.jsonl"
    trace.write_text("\n".join(_sessions(40, build)) + "\n")
    result = suggest(steps_from_trace(trace), min_support=5)
    [rule] = result.rules
    assert rule.shape == "call:get_invoices" and rule.held_out["agreement"] == 1.0
    assert "{result.account.id}" in result.pack and "after_tool: lookup_account" in result.pack


def test_the_airline_example_pack_passes_its_rule_tests_and_lints_against_the_agents_tools() -> None:
    from milliwatt.examples import AIRLINE_RULES
    from milliwatt.rules import check

    outcomes = run_tests([AIRLINE_RULES])
    assert len(outcomes) >= 7 and all(o.passed for o in outcomes), [(o.test.name, o.detail) for o in outcomes if not o.passed]
    tools = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "tau_airline" / "tools.json"
    if tools.is_file():  # the agent's own schemas, where the workload is at hand
        data = json.loads(tools.read_text())
        assert check([AIRLINE_RULES], tools=data if isinstance(data, list) else data["tools"]) == []
