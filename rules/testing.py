"""Rule tests in YAML beside the pack: ``milliwatt rules test``.

A pack file ``support.yaml`` takes its tests from ``support.tests.yaml`` next to it; a pack
folder from every ``*.tests.yaml`` in it. Each test is one input step and what the rules
should do with it::

    tests:
      - name: order status by id
        step:
          messages: [{role: user, content: "where is my order 12345?"}]
          tools_file: support_tools.json        # or tools: [...] (OpenAI format)
          meta: {agent: support, tenant: acme}
        expect:
          rule: support/order-status
          tool_call: {name: get_order_status, arguments: {order_id: "12345"}}
      - name: cancelling is not looked up
        step: {messages: [{role: user, content: "cancel order 12345"}], meta: {agent: support, tenant: acme}}
        expect: none

``expect`` is ``none`` (no rule answers or routes) or a mapping with ``rule`` (the qualified
id) and optionally one of ``reply``, ``refuse`` (the exact text), ``tool_call`` (``name`` and
the exact ``arguments``) or ``route`` (the tier). Every problem in a tests file names the file
and line. The tests run against the rules of every path given, loaded together, as they would
be deployed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from milliwatt.errors import InvalidRequestError, MilliwattError
from milliwatt.types import Step, StepMeta, content_text

from .engine import RuleSet
from .loader import PathsLike, load_rules, path_list

TESTS_SUFFIXES = (".tests.yaml", ".tests.yml")
TEST_KEYS = ("name", "step", "expect")
STEP_KEYS = ("messages", "tools", "tools_file", "tool_choice", "response_format", "meta")
META_KEYS = ("agent", "tenant", "session_id", "user", "run_id")
EXPECT_KEYS = ("rule", "reply", "refuse", "tool_call", "route")


class RuleTestError(MilliwattError, ValueError):
    """A rule tests file cannot be read: ``path:line: problem``."""

    def __init__(self, path: str, line: int | None, problem: str) -> None:
        self.path, self.line, self.problem = path, line, problem
        super().__init__(f"{path}:{line}: {problem}" if line else f"{path}: {problem}")


def is_tests_file(path: str | os.PathLike[str]) -> bool:
    return str(path).endswith(TESTS_SUFFIXES)


@dataclass(frozen=True)
class RuleTest:
    name: str
    path: str
    line: int
    step: Step
    expect: dict[str, Any] | None  # None: no rule may answer or route


@dataclass(frozen=True)
class TestOutcome:
    __test__ = False  # not a pytest test class

    test: RuleTest
    passed: bool
    got: str  # what the rules did, in words
    detail: str = ""  # why it failed

    @property
    def expected(self) -> str:
        return describe_expect(self.test.expect)


def pack_and_test_files(paths: PathsLike) -> tuple[list[Path], list[Path]]:
    """The rule files to load and the tests files to run, for the given files and folders."""
    packs: list[Path] = []
    tests: list[Path] = []
    for item in path_list(paths):
        p = Path(item)
        if p.is_dir():
            files = sorted(x for x in p.iterdir() if x.is_file() and x.suffix in (".yaml", ".yml"))
            packs += [x for x in files if not is_tests_file(x)]
            tests += [x for x in files if is_tests_file(x)]
        elif is_tests_file(p):
            tests.append(p)
        else:
            packs.append(p)
            for suffix in TESTS_SUFFIXES:
                beside = p.with_name(p.name[: -len(p.suffix)] + suffix) if p.suffix else p.with_name(p.name + suffix)
                if beside.is_file():
                    tests.append(beside)
    return packs, list(dict.fromkeys(tests))


def load_tests(path: str | os.PathLike[str]) -> list[RuleTest]:
    return _TestsReader(str(path)).tests()


def run_tests(paths: PathsLike, *, rules: RuleSet | None = None) -> list[TestOutcome]:
    """Load the packs (unless ``rules`` is given) and run every tests file found beside them.
    Raises RuleFileError for a bad pack, RuleTestError for a bad tests file."""
    packs, test_files = pack_and_test_files(paths)
    if rules is None:
        rules = load_rules(packs)
    outcomes = []
    for f in test_files:
        for t in load_tests(f):
            outcomes.append(run_test(rules, t))
    return outcomes


def run_test(rules: RuleSet, test: RuleTest) -> TestOutcome:
    evaluation = rules.evaluate(test.step)
    m = evaluation.match
    if m is None:
        got = "no match" + (f" (declined: {'; '.join(evaluation.declined)})" if evaluation.declined else "")
        if test.expect is None:
            return TestOutcome(test, True, got)
        return TestOutcome(test, False, got, f"expected {test.expect['rule']}, no rule answered")
    got = f"{m.rule.qualified_id}: " + describe_answer(m.message, m.skip_to, m.label)
    exp = test.expect
    if exp is None:
        return TestOutcome(test, False, got, "expected no rule to answer")
    if m.rule.qualified_id != exp["rule"]:
        return TestOutcome(test, False, got, f"expected rule {exp['rule']}")
    problem = _compare(exp, m.message, m.skip_to, m.label)
    return TestOutcome(test, problem is None, got, problem or "")


def _compare(exp: dict[str, Any], message: Any, skip_to: str | None, label: str | None) -> str | None:
    from milliwatt.quality import json_equal

    if "route" in exp:
        return None if skip_to == exp["route"] else f"expected a route to {exp['route']}"
    if "reply" in exp or "refuse" in exp:
        kind = "reply" if "reply" in exp else "refuse"
        if message is None or message.get("tool_calls"):
            return f"expected a {kind}"
        if (label == "refusal") != (kind == "refuse"):
            return f"expected a {kind}, got a {'refusal' if label == 'refusal' else 'reply'}"
        text = content_text(message.get("content"))
        return None if text == exp[kind] else f"expected the text {exp[kind]!r}"
    if "tool_call" in exp:
        want = exp["tool_call"]
        calls = (message or {}).get("tool_calls") or []
        if len(calls) != 1:
            return "expected one tool call"
        fn = calls[0]["function"]
        if fn["name"] != want["name"]:
            return f"expected a call to {want['name']}"
        if "arguments" in want and not json_equal(json.loads(fn.get("arguments") or "{}"), want["arguments"]):
            return f"expected arguments {json.dumps(want['arguments'], ensure_ascii=False)}"
    return None


def describe_answer(message: Any, skip_to: str | None, label: str | None) -> str:
    if skip_to is not None:
        return f"route to {skip_to}"
    if message is None:
        return "nothing"
    calls = message.get("tool_calls") or []
    if calls:
        return "; ".join(f"{c['function']['name']}({c['function'].get('arguments') or '{}'})" for c in calls)
    return f"{'refuse' if label == 'refusal' else 'reply'} {content_text(message.get('content'))!r}"


def describe_expect(exp: dict[str, Any] | None) -> str:
    if exp is None:
        return "no match"
    out = exp["rule"]
    if "route" in exp:
        out += f": route to {exp['route']}"
    elif "reply" in exp or "refuse" in exp:
        kind = "reply" if "reply" in exp else "refuse"
        out += f": {kind} {exp[kind]!r}"
    elif "tool_call" in exp:
        args = exp["tool_call"].get("arguments")
        out += f": {exp['tool_call']['name']}({json.dumps(args, ensure_ascii=False) if args is not None else '...'})"
    return out


def format_outcomes(outcomes: Sequence[TestOutcome], *, width: int = 60) -> str:
    """A pass/fail table, then the failures in full and a count."""

    def cut(s: str) -> str:
        return s if len(s) <= width else s[: width - 1] + "…"

    rows = [("", "test", "expected", "got")]
    for o in outcomes:
        rows.append(("PASS" if o.passed else "FAIL", f"{o.test.path}:{o.test.line} {o.test.name}", cut(o.expected), cut(o.got)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    failed = [o for o in outcomes if not o.passed]
    for o in failed:
        lines.append(f"FAIL {o.test.path}:{o.test.line} {o.test.name}: {o.detail}; got {o.got}")
    lines.append(f"{len(outcomes) - len(failed)} passed, {len(failed)} failed")
    return "\n".join(lines)


# --------------------------------------------------------------------------- reading a tests file


class _TestsReader:
    def __init__(self, path: str) -> None:
        self.path = path
        self._constructor = SafeConstructor()

    def fail(self, node: Node | None, problem: str) -> NoReturn:
        raise RuleTestError(self.path, node.start_mark.line + 1 if node is not None else None, problem)

    def data(self, node: Node) -> Any:
        return self._constructor.construct_object(node, deep=True)

    def tests(self) -> list[RuleTest]:
        try:
            text = Path(self.path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RuleTestError(self.path, None, f"cannot read: {e}") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            raise RuleTestError(self.path, mark.line + 1 if mark else None, f"invalid YAML: {e.problem or e.context}") from None
        if root is None:
            raise RuleTestError(self.path, 1, "empty tests file: expected 'tests:'")
        top = self.mapping(root, "a tests file", ("tests",), required=("tests",))
        items = top["tests"][1]
        if not isinstance(items, SequenceNode) or not items.value:
            self.fail(items, "'tests' must be a non-empty list of tests")
        out, names = [], {}
        for node in items.value:
            t = self.test(node)
            if t.name in names:
                self.fail(node, f"duplicate test name {t.name!r} (first on line {names[t.name]})")
            names[t.name] = t.line
            out.append(t)
        return out

    def test(self, node: Node) -> RuleTest:
        f = self.mapping(node, "a test", TEST_KEYS, required=("name", "step", "expect"))
        name = self.data(f["name"][1])
        if not isinstance(name, str) or not name.strip():
            self.fail(f["name"][1], "'name' must be a non-empty string")
        return RuleTest(name, self.path, node.start_mark.line + 1, self.step(f["step"][1]), self.expect(f["expect"][1]))

    def step(self, node: Node) -> Step:
        f = self.mapping(node, "'step'", STEP_KEYS, required=("messages",))
        if "tools" in f and "tools_file" in f:
            self.fail(f["tools_file"][0], "give 'tools' or 'tools_file', not both")
        tools = self.data(f["tools"][1]) if "tools" in f else None
        if "tools_file" in f:
            rel = self.data(f["tools_file"][1])
            if not isinstance(rel, str):
                self.fail(f["tools_file"][1], "'tools_file' must be a path (relative to this file)")
            tools_path = Path(self.path).parent / rel
            try:
                tools = json.loads(tools_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError) as e:
                self.fail(f["tools_file"][1], f"cannot read tools file {tools_path}: {e}")
            except json.JSONDecodeError as e:
                self.fail(f["tools_file"][1], f"tools file {tools_path} is not JSON (line {e.lineno}: {e.msg})")
        meta = StepMeta()
        if "meta" in f:
            m = self.mapping(f["meta"][1], "'meta'", META_KEYS)
            values = {}
            for key, (_, vnode) in m.items():
                v = self.data(vnode)
                if not isinstance(v, str):
                    self.fail(vnode, f"'meta.{key}' must be a string")
                values[key] = v
            meta = StepMeta(**values)
        try:
            return Step.create(
                self.data(f["messages"][1]), tools=tools,
                tool_choice=self.data(f["tool_choice"][1]) if "tool_choice" in f else None,
                response_format=self.data(f["response_format"][1]) if "response_format" in f else None, meta=meta,
            )  # fmt: skip
        except InvalidRequestError as e:
            where = f.get(e.field.split(".")[0].split("[")[0], (None, node))[1]
            self.fail(where, f"step {e.field}: {e.problem}")

    def expect(self, node: Node) -> dict[str, Any] | None:
        if isinstance(node, ScalarNode) and (node.tag.endswith(":null") or node.value.lower() == "none"):
            return None
        f = self.mapping(node, "'expect'", EXPECT_KEYS, required=("rule",))
        out: dict[str, Any] = {}
        rule = self.data(f["rule"][1])
        if not isinstance(rule, str) or "/" not in rule:
            self.fail(f["rule"][1], "'expect.rule' must be the rule's qualified id, 'pack/id'")
        out["rule"] = rule
        given = [k for k in ("reply", "refuse", "tool_call", "route") if k in f]
        if len(given) > 1:
            self.fail(f[given[1]][0], f"'expect' takes one of reply, refuse, tool_call, route; got {given[0]!r} and {given[1]!r}")
        for k in given:
            value = self.data(f[k][1])
            if k == "tool_call":
                tc = self.mapping(f[k][1], "'expect.tool_call'", ("name", "arguments"), required=("name",))
                if not isinstance(value.get("name"), str):
                    self.fail(tc["name"][1], "'expect.tool_call.name' must be a string")
                if "arguments" in value and not isinstance(value["arguments"], dict):
                    self.fail(tc["arguments"][1], "'expect.tool_call.arguments' must be a mapping")
            elif not isinstance(value, str):
                self.fail(f[k][1], f"'expect.{k}' must be a string (quote yes/no/numbers)")
            out[k] = value
        return out

    def mapping(self, node: Node, what: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, tuple[Node, Node]]:
        if not isinstance(node, MappingNode):
            self.fail(node, f"{what} must be a mapping")
        entries: dict[str, tuple[Node, Node]] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, ScalarNode) else None
            if key not in known:
                self.fail(k, f"unknown key {key!r} in {what} (known: {', '.join(known)})")
            if key in entries:
                self.fail(k, f"duplicate key {key!r}")
            entries[key] = (k, v)
        for key in required:
            if key not in entries:
                self.fail(node, f"{what} needs {key!r}")
        return entries
