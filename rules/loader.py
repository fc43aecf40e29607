"""Rule files: YAML in, a validated and compiled RuleSet out.

Files are read with ``yaml.compose`` rather than ``yaml.safe_load`` so every node keeps
its position: each validation error names the file and the line of the offending value
(the regex that does not compile, the template field that names no capture group, the
second definition of a rule id). Validation is strict: a misspelt key is an error listing
the known ones, never a silently ignored condition that makes a rule match too much.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from milliwatt.errors import RuleFileError

from .actions import Action, Reply, Route, ToolCall
from .conditions import META_KEYS, Conditions, KeywordSet, words_of
from .engine import Rule, RuleSet
from .templates import Template, TemplateError

PathsLike = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]

FILE_KEYS = ("pack", "version", "description", "scope", "rules")
RULE_KEYS = ("id", "description", "priority", "when", "reply", "tool_call", "refuse", "route")
ACTIONS = ("reply", "tool_call", "refuse", "route")
WHEN_KEYS = ("regex", "flags", "keywords", "meta", "tools", "first_turn", "max_chars", "after_tool")
KEYWORD_KEYS = ("any", "all", "none")
TOOL_CALL_KEYS = ("name", "arguments")
REGEX_FLAGS = {f: getattr(re, f) for f in ("IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE", "ASCII")}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

Entries = dict[str, tuple[Node, Node]]  # key -> (key node, value node)


def load_rules(paths: PathsLike) -> RuleSet:
    """Load rule files and folders of ``*.yaml`` into one RuleSet; raise the first RuleFileError."""
    rules = [rule for f in rule_files(paths) for rule in load_file(f)]
    duplicates = _duplicates(rules)
    if duplicates:
        raise duplicates[0]
    return RuleSet(rules)


def check(paths: PathsLike) -> list[RuleFileError]:
    """Every problem in the given rule files (the first of each file, then duplicate ids);
    an empty list means ``load_rules(paths)`` will succeed. For ``milliwatt rules check``."""
    try:
        files = rule_files(paths)
    except RuleFileError as e:
        return [e]
    errors: list[RuleFileError] = []
    rules: list[Rule] = []
    for f in files:
        try:
            rules.extend(load_file(f))
        except RuleFileError as e:
            errors.append(e)
    return errors + _duplicates(rules)


def rule_files(paths: PathsLike) -> list[Path]:
    """The files to load, in load order: each path as given; a folder's ``*.yaml``/``*.yml`` by name."""
    files: list[Path] = []
    for item in path_list(paths):
        p = Path(item)
        if p.is_dir():
            found = sorted(x for x in p.iterdir() if x.suffix in (".yaml", ".yml") and x.is_file())
            if not found:
                raise RuleFileError(str(p), None, "folder holds no *.yaml rule files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise RuleFileError(str(p), None, "no such rule file or folder")
    return files


def path_list(paths: PathsLike) -> list[str | os.PathLike[str]]:
    """One path or many, as a list (a str is one path, not a sequence of characters)."""
    return [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)


def load_file(path: str | os.PathLike[str]) -> list[Rule]:
    """The rules of one file, in file order. Raises RuleFileError naming the line."""
    return _FileReader(str(path)).rules()


def _duplicates(rules: list[Rule]) -> list[RuleFileError]:
    # Ids are unique across everything loaded together: the ledger and the pass reasons
    # name a rule by id, and two rules answering to one name cannot be told apart.
    first: dict[str, Rule] = {}
    errors = []
    for r in rules:
        if r.id in first:
            f = first[r.id]
            errors.append(RuleFileError(r.path, r.line, f"duplicate rule id {r.id!r}: already defined at {f.path}:{f.line}"))
        else:
            first[r.id] = r
    return errors


class _FileReader:
    """Validates one file's node tree; every ``fail`` names the line of the node at fault."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._scalars = SafeConstructor()

    def fail(self, node: Node, problem: str) -> NoReturn:
        raise RuleFileError(self.path, node.start_mark.line + 1, problem)

    # ----------------------------------------------------------------- the file

    def rules(self) -> list[Rule]:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise RuleFileError(self.path, None, f"cannot read: {e}") from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            problem = f"invalid YAML: {e.problem or e.context}"
            if e.problem and e.context and e.context_mark and e.context_mark.line != mark.line:
                # The parser notices late (e.g. a missing '}' at the next line); say where it began.
                problem += f" ({e.context} started on line {e.context_mark.line + 1})"
            raise RuleFileError(self.path, mark.line + 1 if mark else None, problem) from None
        except yaml.YAMLError as e:
            raise RuleFileError(self.path, None, f"invalid YAML: {e}") from None
        if root is None:
            raise RuleFileError(self.path, 1, "empty rule file: expected 'pack:' and 'rules:'")
        top = self.mapping(root, "a rule file", FILE_KEYS, required=("pack", "rules"))
        pack = self.name(top["pack"][1], "pack")
        if "version" in top:
            self.scalar(top["version"][1], "version", (str, int, float))
        if "description" in top:
            self.scalar(top["description"][1], "description", (str,))
        scope = self.meta(top["scope"][1], "scope") if "scope" in top else ()
        items = self.sequence(top["rules"][1], "rules")
        if not items:
            self.fail(top["rules"][1], "'rules' must list at least one rule")
        return [self.rule(n, pack, scope) for n in items]

    # ----------------------------------------------------------------- one rule

    def rule(self, node: Node, pack: str, scope: tuple[tuple[str, frozenset[str]], ...]) -> Rule:
        fields = self.mapping(node, "a rule", RULE_KEYS, required=("id",))
        id_node = fields["id"][1]
        rule_id = self.name(id_node, "id")
        actions = sorted((k for k in ACTIONS if k in fields), key=lambda k: fields[k][0].start_mark.line)
        if not actions:
            self.fail(node, f"rule {rule_id!r} needs one action: {', '.join(ACTIONS)}")
        if len(actions) > 1:
            self.fail(fields[actions[1]][0], f"rule {rule_id!r} has both {actions[0]!r} and {actions[1]!r}: a rule takes exactly one action")
        if "when" not in fields:
            self.fail(node, f"rule {rule_id!r} needs a 'when' with at least one condition")
        when, groups = self.when(fields["when"][1], scope)
        kind = actions[0]
        key_node, value_node = fields[kind]
        action: Action
        if kind == "reply":
            action = Reply(self.template(value_node, kind, groups))
        elif kind == "refuse":
            action = Reply(self.template(value_node, kind, groups), label="refusal")
        elif kind == "route":
            tier = self.name(value_node, "route")
            if tier == "rules":
                self.fail(value_node, "a rule cannot route to the rules tier itself")
            action = Route(tier)
        else:
            if when.after_tool:
                self.fail(key_node, "a tool_call rule cannot set 'after_tool: true': it would call the tool again after every result")
            action = self.tool_call(value_node, groups)
        return Rule(
            id=rule_id,
            pack=pack,
            when=when,
            action=action,
            priority=self.integer(fields["priority"][1], "priority") if "priority" in fields else 0,
            description=self.scalar(fields["description"][1], "description", (str,)) if "description" in fields else "",
            path=self.path,
            line=id_node.start_mark.line + 1,
        )

    def when(self, node: Node, scope: tuple[tuple[str, frozenset[str]], ...]) -> tuple[Conditions, frozenset[str]]:
        """The compiled conditions, and the regex's capture-group names (for the templates)."""
        f = self.mapping(node, "'when'", WHEN_KEYS)
        if not set(f) - {"after_tool", "flags"}:
            self.fail(node, f"'when' needs at least one condition (known: {', '.join(k for k in WHEN_KEYS if k not in ('flags', 'after_tool'))})")
        flags = 0
        if "flags" in f:
            if "regex" not in f:
                self.fail(f["flags"][0], "'flags' applies to 'regex', and this rule has none")
            for item, name in self.strings(f["flags"][1], "flags"):
                if name not in REGEX_FLAGS:
                    self.fail(item, f"unknown regex flag {name!r} (known: {', '.join(REGEX_FLAGS)})")
                flags |= REGEX_FLAGS[name]
        regex = None
        if "regex" in f:
            regex_node = f["regex"][1]
            pattern = self.scalar(regex_node, "regex", (str,))
            try:
                regex = re.compile(pattern, flags)
            except re.error as e:
                self.fail(regex_node, f"bad regex {pattern!r}: {e}")
        keywords: dict[str, KeywordSet] = {}
        if "keywords" in f:
            kw = self.mapping(f["keywords"][1], "'keywords'", KEYWORD_KEYS)
            if not kw:
                self.fail(f["keywords"][1], f"'keywords' needs one of {', '.join(KEYWORD_KEYS)}")
            for key, (_, value) in kw.items():
                words = []
                for item, word in self.strings(value, f"keywords.{key}"):
                    if not words_of(word):
                        self.fail(item, f"keyword {word!r} has no letters or digits to match")
                    words.append(word)
                keywords[key] = KeywordSet.of(words)
        conditions = Conditions(
            regex=regex,
            any_keywords=keywords.get("any"),
            all_keywords=keywords.get("all"),
            no_keywords=keywords.get("none"),
            meta=scope + (self.meta(f["meta"][1], "meta") if "meta" in f else ()),
            tools=frozenset(name for _, name in self.strings(f["tools"][1], "tools")) if "tools" in f else frozenset(),
            first_turn=self.boolean(f["first_turn"][1], "first_turn") if "first_turn" in f else None,
            max_chars=self.positive(f["max_chars"][1], "max_chars") if "max_chars" in f else None,
            after_tool=self.boolean(f["after_tool"][1], "after_tool") if "after_tool" in f else False,
        )
        return conditions, frozenset(regex.groupindex) if regex is not None else frozenset()

    def meta(self, node: Node, what: str) -> tuple[tuple[str, frozenset[str]], ...]:
        f = self.mapping(node, f"'{what}'", META_KEYS)
        if not f:
            self.fail(node, f"'{what}' needs one of {', '.join(META_KEYS)}")
        return tuple((k, frozenset(v for _, v in self.strings(value, f"{what}.{k}"))) for k, (_, value) in f.items())

    def tool_call(self, node: Node, groups: frozenset[str]) -> ToolCall:
        f = self.mapping(node, "'tool_call'", TOOL_CALL_KEYS, required=("name",))
        name = self.scalar(f["name"][1], "tool_call.name", (str,))
        arguments: dict[str, Any] = {}
        if "arguments" in f:
            args_node = f["arguments"][1]
            if not isinstance(args_node, MappingNode):
                self.fail(args_node, f"'tool_call.arguments' must be a mapping of parameter: value, got {_kind(args_node)}")
            arguments = self.arguments(args_node, groups)
        return ToolCall(name, arguments)

    def arguments(self, node: Node, groups: frozenset[str]) -> Any:
        """Literal YAML data whose strings become Templates, each checked at its own line."""
        if isinstance(node, MappingNode):
            return {self.key(k): self.arguments(v, groups) for k, v in node.value}
        if isinstance(node, SequenceNode):
            return [self.arguments(v, groups) for v in node.value]
        value = self._scalars.construct_object(node, deep=True)
        return self.template(node, "tool_call.arguments", groups) if isinstance(value, str) else value

    def template(self, node: Node, what: str, groups: frozenset[str]) -> Template:
        source = self.scalar(node, what, (str,))
        try:
            template = Template.parse(source)
        except TemplateError as e:
            self.fail(node, str(e))
        for name in template.captures:
            if name not in groups:
                defined = f"the regex defines: {', '.join(sorted(groups))}" if groups else "the rule's regex defines no named groups"
                self.fail(node, f"template field {{{name}}} names no capture group ({defined})")
        return template

    # ----------------------------------------------------------------- node shapes

    def mapping(self, node: Node, what: str, known: tuple[str, ...], required: tuple[str, ...] = ()) -> Entries:
        if not isinstance(node, MappingNode):
            self.fail(node, f"{what} must be a mapping, got {_kind(node)}")
        entries: Entries = {}
        for key_node, value_node in node.value:
            key = self.key(key_node)
            if key in entries:
                self.fail(key_node, f"duplicate key {key!r} (first on line {entries[key][0].start_mark.line + 1})")
            if key not in known:
                self.fail(key_node, f"unknown key {key!r} in {what} (known: {', '.join(known)})")
            entries[key] = (key_node, value_node)
        for key in required:
            if key not in entries:
                self.fail(node, f"{what} needs {key!r}")
        return entries

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
