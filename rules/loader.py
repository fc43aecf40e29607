"""Rule files: YAML in, a validated and compiled RuleSet out.

Files are read with ``yaml.compose`` rather than ``yaml.safe_load`` so every node keeps
its position: each validation error names the file, the line and the column of the
offending value (the regex that does not compile or could backtrack exponentially, the
template field that no condition provides, the second definition of a rule id). Every
problem of every file is collected before anything is reported: ``check`` returns them
all, ``load_rules`` raises the first (saying how many more there are). Validation is
strict: a misspelt key is an error listing the known ones, never a silently ignored
condition that makes a rule match too much. ``rules/schema.json`` describes the same
format as a JSON Schema, for editors.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, NoReturn

import yaml
from jsonschema.exceptions import best_match
from jsonschema.validators import validator_for
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from milliwatt.errors import RuleFileError

from .actions import Action, Budget, Reply, Route, ToolCall, templates_in
from .conditions import META_KEYS, Conditions, FieldTest, KeywordSet, ToolResultTest, words_of
from .engine import Rule, RuleSet
from .redos import exponential_risk
from .templates import Template, TemplateError, path_of

PathsLike = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]

FILE_KEYS = ("pack", "version", "description", "scope", "rules")
RULE_KEYS = ("id", "description", "priority", "when", "reply", "tool_call", "refuse", "route", "budget")
ACTIONS = ("reply", "tool_call", "refuse", "route", "budget")
WHEN_KEYS = ("regex", "flags", "keywords", "meta", "tools", "first_turn", "max_chars", "after_tool",
             "tool_result", "turn", "all", "any", "not")
KEYWORD_KEYS = ("any", "all", "none")
TOOL_CALL_KEYS = ("name", "arguments")
TOOL_RESULT_KEYS = ("tool", "fields")
FIELD_TEST_KEYS = ("equals", "in", "regex", "exists")
TURN_KEYS = ("min", "max")
ROUTE_KEYS = ("to", "forbid")
BUDGET_KEYS = ("max_input_tokens",)
REGEX_FLAGS = {f: getattr(re, f) for f in ("IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE", "ASCII")}
MAX_FILE_BYTES = 1024 * 1024  # a rule file over 1 MB is refused before it is parsed
SCHEMA_PATH = Path(__file__).with_name("schema.json")  # the format as a JSON Schema (draft 2020-12)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_FIELD_PATH = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*")
_CAPTURE_TYPES = {"string", "integer", "number", "boolean"}  # what text from a capture converts to

Entries = dict[str, tuple[Node, Node]]  # key -> (key node, value node)


def load_rules(paths: PathsLike, *, tools: list[dict[str, Any]] | None = None) -> RuleSet:
    """Load rule files and folders of ``*.yaml`` into one RuleSet. Every file is checked
    first; on any problem, raise the first RuleFileError (its message says how many more
    ``check`` would list), so nothing is half loaded."""
    rules, errors, version = _load(paths, tools)
    if errors:
        first = errors[0]
        if len(errors) > 1:
            more = len(errors) - 1
            err = RuleFileError(first.path, first.line, f"{first.problem} (and {more} more problem{'s' if more > 1 else ''})", first.column)
            err.errors = errors  # type: ignore[attr-defined]
            raise err
        first.errors = errors  # type: ignore[attr-defined]
        raise first
    return RuleSet(rules, version=version)


def check(paths: PathsLike, *, tools: list[dict[str, Any]] | None = None) -> list[RuleFileError]:
    """Every problem in the given rule files, in file order and then by line and column
    (then duplicate ids across files); an empty list means ``load_rules(paths)`` will
    succeed. ``tools`` (OpenAI tool dicts): also check each ``tool_call`` against them.
    For ``milliwatt rules check``."""
    return _load(paths, tools)[1]


def _load(paths: PathsLike, tools: list[dict[str, Any]] | None) -> tuple[list[Rule], list[RuleFileError], str]:
    files, errors = _rule_files(paths)
    digest = hashlib.sha256()
    rules: list[Rule] = []
    by_name = {t["function"]["name"]: t for t in tools} if tools is not None else None
    for f in files:
        reader = _FileReader(str(f), by_name)
        found = reader.read()
        digest.update(reader.data)
        if reader.errors:
            errors.extend(sorted(reader.errors, key=lambda e: (e.line or 0, e.column or 0)))
        else:
            rules.extend(found)
    return rules, errors + _duplicates(rules), digest.hexdigest()[:12]


def rule_files(paths: PathsLike) -> list[Path]:
    """The files to load, in load order: each path as given; a folder's ``*.yaml``/``*.yml`` by name
    (not its ``*.tests.yaml``, the rule tests)."""
    files, errors = _rule_files(paths)
    if errors:
        raise errors[0]
    return files


def _rule_files(paths: PathsLike) -> tuple[list[Path], list[RuleFileError]]:
    files: list[Path] = []
    errors: list[RuleFileError] = []
    for item in path_list(paths):
        p = Path(item)
        if p.is_dir():
            found = sorted(x for x in p.iterdir() if _is_pack_file(x))
            if not found:
                errors.append(RuleFileError(str(p), None, "folder holds no *.yaml rule files"))
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            errors.append(RuleFileError(str(p), None, "no such rule file or folder"))
    return files, errors


def _is_pack_file(p: Path) -> bool:
    """A folder's rule files: ``*.yaml``/``*.yml``, but not the rule tests beside them (``*.tests.yaml``)."""
    return p.suffix in (".yaml", ".yml") and not p.name.endswith((".tests.yaml", ".tests.yml")) and p.is_file()


def path_list(paths: PathsLike) -> list[str | os.PathLike[str]]:
    """One path or many, as a list (a str is one path, not a sequence of characters)."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def load_file(path: str | os.PathLike[str]) -> list[Rule]:
    """The rules of one file, in file order. Raises the file's first RuleFileError."""
    reader = _FileReader(str(path))
    rules = reader.read()
    if reader.errors:
        raise min(reader.errors, key=lambda e: (e.line or 0, e.column or 0))
    return rules


def _duplicates(rules: list[Rule]) -> list[RuleFileError]:
    # Ids are unique across everything loaded together: the ledger and the pass reasons
    # name a rule by id, and two rules answering to one name cannot be told apart.
    first: dict[str, Rule] = {}
    errors = []
    for r in rules:
        if r.id in first:
            f = first[r.id]
            errors.append(RuleFileError(r.path, r.line, f"duplicate rule id {r.id!r}: already defined at {f.path}:{f.line}", r.column))
        else:
            first[r.id] = r
    return errors


class _When:
    """What the loader learns of a ``when`` beside its Conditions: the captures it provides,
    whether it reads a tool result (``tool_result``/``after_tool``) and lets the rule act mid
    tool loop (``after_tool``), and the tools ``after_tool`` names at the top."""

    def __init__(self) -> None:
        self.groups: set[str] = set()
        self.reads_result = False
        self.mid_loop = False
        self.after_names: frozenset[str] = frozenset()
        self.after_true = False
        self.complete = True  # False when a part failed (then templates are not checked against it)


class _FileReader:
    """Validates one file's node tree. ``fail`` raises the problem, naming the line and column
    of the node at fault; ``collecting`` catches it, so that independent parts (each rule,
    each condition, each action) are all checked and every problem is reported."""

    def __init__(self, path: str, tools: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.path = path
        self.tools = tools
        self.errors: list[RuleFileError] = []
        self.data = b""
        self._scalars = SafeConstructor()

    def fail(self, node: Node, problem: str) -> NoReturn:
        raise self.error(node, problem)

    def error(self, node: Node, problem: str) -> RuleFileError:
        return RuleFileError(self.path, node.start_mark.line + 1, problem, node.start_mark.column + 1)

    def report(self, node: Node, problem: str) -> None:
        self.errors.append(self.error(node, problem))

    @contextlib.contextmanager
    def collecting(self, state: _When | None = None) -> Iterator[None]:
        try:
            yield
        except RuleFileError as e:
            self.errors.append(e)
            if state is not None:
                state.complete = False

    # ----------------------------------------------------------------- the file

    def read(self) -> list[Rule]:
        """The file's rules; its problems are in ``self.errors`` (then the rules are not to be used)."""
        try:
            return self._read()
        except RuleFileError as e:
            self.errors.append(e)
            return []

    def _read(self) -> list[Rule]:
        try:
            size = os.path.getsize(self.path)
            if size > MAX_FILE_BYTES:
                raise RuleFileError(self.path, None, f"rule file is {_size(size)}, over the limit of {_size(MAX_FILE_BYTES)}: not read")
            with open(self.path, "rb") as f:
                self.data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise RuleFileError(self.path, None, f"cannot read: {e}") from None
        if len(self.data) > MAX_FILE_BYTES:  # it grew since the stat
            raise RuleFileError(self.path, None, f"rule file is over the limit of {_size(MAX_FILE_BYTES)}: not read")
        try:
            text = self.data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RuleFileError(self.path, None, f"not a YAML rule file: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            problem = f"invalid YAML: {e.problem or e.context}"
            if e.problem and e.context and e.context_mark and e.context_mark.line != mark.line:
                # The parser notices late (e.g. a missing '}' at the next line); say where it began.
                problem += f" ({e.context} started on line {e.context_mark.line + 1})"
            raise RuleFileError(self.path, mark.line + 1 if mark else None, problem, mark.column + 1 if mark else None) from None
        except yaml.YAMLError as e:
            raise RuleFileError(self.path, None, f"invalid YAML: {e}") from None
        if root is None:
            raise RuleFileError(self.path, 1, "empty rule file: expected 'pack:' and 'rules:'", 1)
        top = self.mapping(root, "a rule file", FILE_KEYS, required=("pack", "rules"))
        pack = "?"
        with self.collecting():
            pack = self.name(top["pack"][1], "pack")
        if "version" in top:
            with self.collecting():
                self.scalar(top["version"][1], "version", (str, int, float))
        if "description" in top:
            with self.collecting():
                self.scalar(top["description"][1], "description", (str,))
        scope: tuple[tuple[str, frozenset[str]], ...] = ()
        if "scope" in top:
            with self.collecting():
                scope = self.meta(top["scope"][1], "scope")
        items = self.sequence(top["rules"][1], "rules")
        if not items:
            self.fail(top["rules"][1], "'rules' must list at least one rule")
        rules = []
        for n in items:
            with self.collecting():
                rule = self.rule(n, pack, scope)
                if rule is not None:
                    rules.append(rule)
        return rules

    # ----------------------------------------------------------------- one rule

    def rule(self, node: Node, pack: str, scope: tuple[tuple[str, frozenset[str]], ...]) -> Rule | None:
        before = len(self.errors)
        fields, unknown = self.entries(node, "a rule", RULE_KEYS, required=("id",))
        id_node = fields["id"][1]
        rule_id = self.name(id_node, "id")
        actions = sorted((k for k in ACTIONS if k in fields), key=lambda k: _position(fields[k][0]))
        if not actions and not unknown:
            self.report(node, f"rule {rule_id!r} needs one action: {', '.join(ACTIONS)}")
        if len(actions) > 1:
            self.report(fields[actions[1]][0], f"rule {rule_id!r} has both {actions[0]!r} and {actions[1]!r}: a rule takes exactly one action")
        state = _When()
        when = Conditions()
        if "when" not in fields:
            self.report(node, f"rule {rule_id!r} needs a 'when' with at least one condition")
            state.complete = False
        else:
            with self.collecting(state):
                when = self.when(fields["when"][1], scope, state, top=True)
        priority, description = 0, ""
        if "priority" in fields:
            with self.collecting():
                priority = self.integer(fields["priority"][1], "priority")
        if "description" in fields:
            with self.collecting():
                description = self.scalar(fields["description"][1], "description", (str,))
        action: Action | None = None
        if len(actions) == 1:
            with self.collecting():
                action = self.action(actions[0], fields[actions[0]], state)
        if len(self.errors) > before or action is None:
            return None
        return Rule(id=rule_id, pack=pack, when=when, action=action, priority=priority, description=description,
                    path=self.path, line=id_node.start_mark.line + 1, column=id_node.start_mark.column + 1)

    def action(self, kind: str, nodes: tuple[Node, Node], state: _When) -> Action:
        key_node, value_node = nodes
        if kind == "reply":
            return Reply(self.template(value_node, kind, state))
        if kind == "refuse":
            return Reply(self.template(value_node, kind, state), label="refusal")
        if kind == "route":
            return self.route(value_node)
        if kind == "budget":
            f = self.mapping(value_node, "'budget'", BUDGET_KEYS, required=("max_input_tokens",))
            return Budget(self.positive(f["max_input_tokens"][1], "budget.max_input_tokens"))
        if state.after_true:
            self.fail(key_node, "a tool_call rule cannot set 'after_tool: true': it would call the tool again after every result")
        call = self.tool_call(value_node, state)
        if call.name in state.after_names:
            self.fail(key_node, f"a tool_call rule cannot call {call.name!r} after {call.name!r}: it would call it again after every result")
        return call

    def route(self, node: Node) -> Route:
        if isinstance(node, ScalarNode):
            tier = self.name(node, "route")
            if tier == "rules":
                self.fail(node, "a rule cannot route to the rules tier itself")
            return Route(tier)
        f = self.mapping(node, "'route'", ROUTE_KEYS)
        if not f:
            self.fail(node, "'route' needs 'to' (a tier to go straight to) or 'forbid' (tiers not to ask), or both")
        tier = None
        if "to" in f:
            tier = self.name(f["to"][1], "route.to")
            if tier == "rules":
                self.fail(f["to"][1], "a rule cannot route to the rules tier itself")
        forbid: set[str] = set()
        if "forbid" in f:
            for item, name in self.strings(f["forbid"][1], "route.forbid"):
                if not _NAME.fullmatch(name):
                    self.fail(item, f"'route.forbid' {name!r} must be a tier name")
                if name == "rules":
                    self.fail(item, "a rule cannot forbid the rules tier: it is already answering")
                if name == tier:
                    self.fail(item, f"'route' goes to {tier!r} and forbids it")
                forbid.add(name)
        return Route(tier, frozenset(forbid))

    # ----------------------------------------------------------------- conditions

    def when(self, node: Node, scope: tuple[tuple[str, frozenset[str]], ...], state: _When, *, top: bool = False) -> Conditions:
        """The compiled conditions; what they provide to templates goes into ``state``."""
        what = "'when'" if top else "a nested condition"
        f, unknown = self.entries(node, what, WHEN_KEYS)
        given = set(f) - {"flags"}
        if "after_tool" in f and isinstance(f["after_tool"][1], ScalarNode) and self._is_bool(f["after_tool"][1]):
            given.discard("after_tool")  # after_tool: true only widens where a rule may act
        if not given and not unknown:
            self.fail(node, f"{what} needs at least one condition (known: {', '.join(k for k in WHEN_KEYS if k != 'flags')})")
        kw: dict[str, Any] = {}

        def part(key: str) -> contextlib.AbstractContextManager[None]:
            return self.collecting(state)

        flags = 0
        if "flags" in f:
            with part("flags"):
                if "regex" not in f:
                    self.fail(f["flags"][0], "'flags' applies to 'regex', and this condition has none")
                for item, name in self.strings(f["flags"][1], "flags"):
                    if name not in REGEX_FLAGS:
                        self.fail(item, f"unknown regex flag {name!r} (known: {', '.join(REGEX_FLAGS)})")
                    flags |= REGEX_FLAGS[name]
        if "regex" in f:
            with part("regex"):
                kw["regex"] = self.regex(f["regex"][1], "regex", flags)
                state.groups |= set(kw["regex"].groupindex)
        if "keywords" in f:
            with part("keywords"):
                words = self.mapping(f["keywords"][1], "'keywords'", KEYWORD_KEYS)
                if not words:
                    self.fail(f["keywords"][1], f"'keywords' needs one of {', '.join(KEYWORD_KEYS)}")
                for key, (_, value) in words.items():
                    found = []
                    for item, word in self.strings(value, f"keywords.{key}"):
                        if not words_of(word):
                            self.fail(item, f"keyword {word!r} has no letters or digits to match")
                        found.append(word)
                    kw[{"any": "any_keywords", "all": "all_keywords", "none": "no_keywords"}[key]] = KeywordSet.of(found)
        meta = scope if top else ()
        if "meta" in f:
            with part("meta"):
                meta = meta + self.meta(f["meta"][1], "meta")
        kw["meta"] = meta
        if "tools" in f:
            with part("tools"):
                kw["tools"] = frozenset(name for _, name in self.strings(f["tools"][1], "tools"))
        if "first_turn" in f:
            with part("first_turn"):
                kw["first_turn"] = self.boolean(f["first_turn"][1], "first_turn")
        if "max_chars" in f:
            with part("max_chars"):
                kw["max_chars"] = self.positive(f["max_chars"][1], "max_chars")
        if "after_tool" in f:
            with part("after_tool"):
                value = f["after_tool"][1]
                if isinstance(value, ScalarNode) and self._is_bool(value):
                    kw["after_tool"] = self.boolean(value, "after_tool")
                    if kw["after_tool"]:
                        state.mid_loop = state.reads_result = True
                        state.after_true = state.after_true or top
                else:
                    names = frozenset(name for _, name in self.strings(value, "after_tool"))
                    kw["after_tools"] = names
                    state.mid_loop = state.reads_result = True
                    if top:
                        state.after_names = names
        if "tool_result" in f:
            with part("tool_result"):
                kw["tool_result"] = self.tool_result(f["tool_result"][1], state)
                state.reads_result = True
        if "turn" in f:
            with part("turn"):
                t = self.mapping(f["turn"][1], "'turn'", TURN_KEYS)
                if not t:
                    self.fail(f["turn"][1], "'turn' needs 'min' or 'max' (turns count user messages: 1 is the first)")
                if "min" in t:
                    kw["turn_min"] = self.positive(t["min"][1], "turn.min")
                if "max" in t:
                    kw["turn_max"] = self.positive(t["max"][1], "turn.max")
                if kw.get("turn_min", 0) > kw.get("turn_max", kw.get("turn_min", 0)):
                    self.fail(f["turn"][1], f"'turn' min {kw['turn_min']} is more than max {kw['turn_max']}")
        for key, attr in (("all", "all_of"), ("any", "any_of")):
            if key in f:
                with part(key):
                    items = self.sequence(f[key][1], key)
                    if not items:
                        self.fail(f[key][1], f"'{key}' must list at least one condition")
                    subs = []
                    for item in items:
                        with self.collecting(state):
                            subs.append(self.when(item, scope, state))
                    kw[attr] = tuple(subs)
        if "not" in f:
            with part("not"):
                inner = _When()  # what 'not' matches provides nothing: it must not hold
                kw["none_of"] = self.when(f["not"][1], scope, inner)
                state.complete = state.complete and inner.complete
        conditions = Conditions(**kw)
        if top and state.mid_loop and not conditions.mid_loop:
            conditions = Conditions(**kw, mid_loop=True)
        return conditions

    def regex(self, node: Node, what: str, flags: int) -> re.Pattern[str]:
        pattern = self.scalar(node, what, (str,))
        try:
            compiled = re.compile(pattern, flags)
        except re.error as e:
            self.fail(node, f"bad regex {pattern!r}: {e}")
        risk = exponential_risk(pattern, flags)
        if risk:
            self.fail(node, f"regex {pattern!r} can backtrack exponentially (refused: a user message could stall the agent): {risk}")
        return compiled

    def tool_result(self, node: Node, state: _When) -> ToolResultTest:
        f = self.mapping(node, "'tool_result'", TOOL_RESULT_KEYS)
        if not f:
            self.fail(node, "'tool_result' needs 'tool' (which tools' results) or 'fields' (what they hold), or both")
        tools = frozenset(name for _, name in self.strings(f["tool"][1], "tool_result.tool")) if "tool" in f else None
        fields: list[FieldTest] = []
        if "fields" in f:
            fields_node = f["fields"][1]
            if not isinstance(fields_node, MappingNode) or not fields_node.value:
                self.fail(fields_node, f"'tool_result.fields' must be a mapping of field path: value, got {_kind(fields_node)}")
            seen: dict[str, Node] = {}
            for key_node, value_node in fields_node.value:
                with self.collecting(state):
                    fields.append(self.field_test(key_node, value_node, seen, state))
        return ToolResultTest(tools, tuple(fields))

    def field_test(self, key_node: Node, value_node: Node, seen: dict[str, Node], state: _When) -> FieldTest:
        if not isinstance(key_node, ScalarNode) or not _FIELD_PATH.fullmatch(str(key_node.value)):
            self.fail(key_node, f"a field path is keys and list positions joined by dots (reservations.0.status), got {_kind(key_node)}")
        dotted = str(key_node.value)
        if dotted in seen:
            self.fail(key_node, f"duplicate field {dotted!r} (first on line {seen[dotted].start_mark.line + 1})")
        seen[dotted] = key_node
        path = path_of(dotted)
        if isinstance(value_node, ScalarNode):
            return FieldTest(path, equals=(self._scalars.construct_object(value_node),))
        if isinstance(value_node, SequenceNode):
            self.fail(value_node, f"field {dotted!r}: give a value, or a mapping of {', '.join(FIELD_TEST_KEYS)} (for a list value, write equals: [...])")
        t = self.mapping(value_node, f"field {dotted!r}", FIELD_TEST_KEYS)
        if not t:
            self.fail(value_node, f"field {dotted!r} needs one of {', '.join(FIELD_TEST_KEYS)}")
        kw: dict[str, Any] = {}
        if "equals" in t:
            kw["equals"] = (self.data_of(t["equals"][1]),)
        if "in" in t:
            kw["one_of"] = tuple(self.data_of(n) for n in self.sequence(t["in"][1], f"{dotted}.in"))
            if not kw["one_of"]:
                self.fail(t["in"][1], f"'{dotted}.in' must list at least one value")
        if "regex" in t:
            kw["regex"] = self.regex(t["regex"][1], f"{dotted}.regex", 0)
            state.groups |= set(kw["regex"].groupindex)
        if "exists" in t:
            kw["exists"] = self.boolean(t["exists"][1], f"{dotted}.exists")
        return FieldTest(path, **kw)

    def data_of(self, node: Node) -> Any:
        """Plain YAML data (for values compared with a tool result's JSON)."""
        if isinstance(node, MappingNode):
            return {str(k.value): self.data_of(v) for k, v in node.value}
        if isinstance(node, SequenceNode):
            return [self.data_of(v) for v in node.value]
        return self._scalars.construct_object(node)

    def meta(self, node: Node, what: str) -> tuple[tuple[str, frozenset[str]], ...]:
        f = self.mapping(node, f"'{what}'", META_KEYS)
        if not f:
            self.fail(node, f"'{what}' needs one of {', '.join(META_KEYS)}")
        return tuple((k, frozenset(v for _, v in self.strings(value, f"{what}.{k}"))) for k, (_, value) in f.items())

    # ----------------------------------------------------------------- tool calls and templates

    def tool_call(self, node: Node, state: _When) -> ToolCall:
        f = self.mapping(node, "'tool_call'", TOOL_CALL_KEYS, required=("name",))
        name_node = f["name"][1]
        name = self.scalar(name_node, "tool_call.name", (str,))
        arguments: dict[str, Any] = {}
        args_node: MappingNode | None = None
        if "arguments" in f:
            node_ = f["arguments"][1]
            if not isinstance(node_, MappingNode):
                self.fail(node_, f"'tool_call.arguments' must be a mapping of parameter: value, got {_kind(node_)}")
            args_node = node_
            for key_node, value_node in node_.value:
                with self.collecting(state):
                    arguments[self.key(key_node)] = self.arguments(value_node, state)
        call = ToolCall(name, arguments)
        if self.tools is not None:
            self.check_call(call, name_node, args_node)
        return call

    def arguments(self, node: Node, state: _When) -> Any:
        """Literal YAML data whose strings become Templates, each checked at its own line."""
        if isinstance(node, MappingNode):
            return {self.key(k): self.arguments(v, state) for k, v in node.value}
        if isinstance(node, SequenceNode):
            return [self.arguments(v, state) for v in node.value]
        value = self._scalars.construct_object(node, deep=True)
        return self.template(node, "tool_call.arguments", state) if isinstance(value, str) else value

    def check_call(self, call: ToolCall, name_node: Node, args_node: MappingNode | None) -> None:
        """The call against the tool's schema (``check(..., tools=...)``): the tool exists, each
        literal argument validates, each templated one names a parameter that text converts
        to, and every required parameter is given."""
        assert self.tools is not None
        tool = self.tools.get(call.name)
        if tool is None:
            self.fail(name_node, f"tool_call names {call.name!r}, which is not one of the tools given (known: {', '.join(sorted(self.tools)) or 'none'})")
        schema = tool["function"].get("parameters") or {"type": "object", "properties": {}}
        properties: dict[str, Any] = schema.get("properties") or {}
        nodes = {str(k.value): v for k, v in args_node.value} if args_node is not None else {}
        for key, value in call.arguments.items():
            at = nodes.get(key, name_node)
            if properties and key not in properties and schema.get("additionalProperties") is not True:
                self.report(at, f"{call.name} has no parameter {key!r} (parameters: {', '.join(properties)})")
                continue
            sub = properties.get(key, {})
            if not templates_in(value):
                error = best_match(validator_for(sub)(sub).iter_errors(value)) if isinstance(sub, dict) else None
                if error is not None:
                    self.report(at, f"argument {key!r} of {call.name} does not validate: {error.message}")
            elif isinstance(value, Template) and not (value.lone_field and value.lone_field.startswith("result.")):
                declared = sub.get("type") if isinstance(sub, dict) else None
                types = {declared} if isinstance(declared, str) else set(declared or ())
                if types and not types & _CAPTURE_TYPES:
                    self.report(at, f"argument {key!r} of {call.name} is of type {'/'.join(sorted(types))}: "
                                    f"a template renders text, which cannot convert to it")
                elif types and "string" not in types and value.lone_field is None:
                    self.report(at, f"argument {key!r} of {call.name} is of type {'/'.join(sorted(types))}: "
                                    f"a template with text around its field cannot convert to it (write only {{field}})")
        missing = [k for k in schema.get("required", []) if k not in call.arguments]
        if missing:
            self.report(name_node, f"tool_call of {call.name} does not give its required parameter{'s' if len(missing) > 1 else ''} {', '.join(missing)}")

    def template(self, node: Node, what: str, state: _When) -> Template:
        source = self.scalar(node, what, (str,))
        try:
            template = Template.parse(source)
        except TemplateError as e:
            self.fail(node, str(e))
        if state.complete:
            for name in template.captures:
                if name not in state.groups:
                    groups = sorted(state.groups)
                    defined = f"the regex defines: {', '.join(groups)}" if groups else "the rule's regex defines no named groups"
                    self.fail(node, f"template field {{{name}}} names no capture group ({defined})")
        for name in template.result_fields:
            if not state.reads_result:
                self.fail(node, f"template field {{{name}}} reads the latest tool result, but the rule has no "
                                f"'tool_result' or 'after_tool' condition")
        return template

    # ----------------------------------------------------------------- node shapes

    def mapping(self, node: Node, what: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> Entries:
        return self.entries(node, what, known, required)[0]

    def entries(self, node: Node, what: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> tuple[Entries, bool]:
        """The known keys' entries, and whether there were unknown ones (each reported, not raised,
        so that every misspelt key of a file is listed at once)."""
        if not isinstance(node, MappingNode):
            self.fail(node, f"{what} must be a mapping, got {_kind(node)}")
        entries: Entries = {}
        unknown = False
        for key_node, value_node in node.value:
            key = self.key(key_node)
            if key in entries:
                self.report(key_node, f"duplicate key {key!r} (first on line {entries[key][0].start_mark.line + 1})")
            elif key not in known:
                self.report(key_node, f"unknown key {key!r} in {what} (known: {', '.join(known)})")
                unknown = True
            else:
                entries[key] = (key_node, value_node)
        for key in required:
            if key not in entries:
                self.fail(node, f"{what} needs {key!r}")
        return entries, unknown

    def _is_bool(self, node: ScalarNode) -> bool:
        return isinstance(self._scalars.construct_object(node), bool)

    def key(self, node: Node) -> str:
        if not isinstance(node, ScalarNode) or not isinstance(self._scalars.construct_object(node), str):
            self.fail(node, f"keys must be plain strings, got {_kind(node)}")
        return node.value

    def sequence(self, node: Node, what: str) -> list[Node]:
        if not isinstance(node, SequenceNode):
            self.fail(node, f"'{what}' must be a list, got {_kind(node)}")
        return node.value

    def scalar(self, node: Node, what: str, types: tuple[type, ...]) -> Any:
        value = self._scalars.construct_object(node, deep=True) if isinstance(node, ScalarNode) else None
        wrong_bool = isinstance(value, bool) and bool not in types  # YAML's yes/no are booleans, and bool is an int
        if not isinstance(node, ScalarNode) or wrong_bool or not isinstance(value, types):
            expected = " or ".join(_TYPE_NAMES[t] for t in types)
            self.fail(node, f"'{what}' must be {expected}, got {_kind(node, value)}")
        return value

    def strings(self, node: Node, what: str) -> list[tuple[Node, str]]:
        """A string or a non-empty list of strings, each with its node (for its line)."""
        if isinstance(node, ScalarNode):
            return [(node, self.scalar(node, what, (str,)))]
        items = self.sequence(node, what)
        if not items:
            self.fail(node, f"'{what}' must not be empty")
        return [(item, self.scalar(item, what, (str,))) for item in items]

    def name(self, node: Node, what: str) -> str:
        value = self.scalar(node, what, (str,))
        if not _NAME.fullmatch(value):
            self.fail(node, f"'{what}' {value!r} must be letters, digits, '_', '-' or '.', starting with a letter or digit")
        return value

    def integer(self, node: Node, what: str) -> int:
        return self.scalar(node, what, (int,))

    def positive(self, node: Node, what: str) -> int:
        value = self.integer(node, what)
        if value <= 0:
            self.fail(node, f"'{what}' must be a positive integer, got {value}")
        return value

    def boolean(self, node: Node, what: str) -> bool:
        return self.scalar(node, what, (bool,))


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def _position(node: Node) -> tuple[int, int]:
    return node.start_mark.line, node.start_mark.column


def _size(n: int) -> str:
    return f"{n / 1024 / 1024:.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.1f} kB"


def _kind(node: Node, value: Any = None) -> str:
    """How a node reads to someone editing YAML: 'a list', 'a mapping', 'the number 3'."""
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if value is None:
        return "nothing (null)" if node.tag.endswith(":null") else f"{node.value!r}"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean; quote it for text)"
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the text {value!r}"
    return f"{type(value).__name__} {value!r}"
