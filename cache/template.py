"""Templated answers: an answer whose values were copied from the step's context, stored with
the place each value came from, and re-bound to a later step's values.

Agent answers rarely repeat verbatim; the same move recurs with new values: call
``get_reservation_details`` with the id the user just gave, confirm "reservation X is cancelled,
the refund of $Y goes to Z" with values from the tool result. A template keeps the move and
replaces each copied value by a **slot** that says where it came from:

* ``user``: a token of the same kind (``Source.shape``: its classes of characters, so
  ``ZFA04Y`` and ``8JX2WO`` are one kind, ``mia_li_3668`` another) in a user message, counted
  from the latest;
* ``result``: a field (a JSON path such as ``reservations[0]`` or ``name.first_name``) of a
  tool's result, counted from that tool's latest result;
* ``call``: an argument of an earlier call to a tool, counted from its latest call.

Binding a template to a new step resolves every slot in the new step's context. A slot that
binds to nothing, or to several values (two tokens of that kind in the user message), makes
the template a miss with that reason: a templated answer is served only when every value it
carries has exactly one source. Values that are not found in the context stay as they are
(constants of the move: ``"cabin": "economy"``); a text answer holding a number found nowhere
in the context (a computed total) is not templated at all, since re-binding could not
recompute it.

Pure functions over plain data: no model, no I/O; the cache tier decides when to use them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from milliwatt.types import Message, content_text

SourceKind = Literal["user", "result", "call"]

_TOKEN = re.compile(r"[\w.@$%+\-/:']+")
_EDGE = ".,:;!?'\"()[]$%/"
_CODE = re.compile(r"^[A-Z]{3,}$")
_NAME = re.compile(r"^[A-Z][a-z]+$")
MAX_SLOTS = 16  # an answer copying more values than this is a document, not a move


@dataclass(frozen=True)
class Source:
    """Where a slot's value is found in a step's context."""

    kind: SourceKind
    path: str  # user: the token's shape; result/call: a JSON path ("" for the whole value)
    tool: str = ""  # result/call: the tool's name
    back: int = 0  # 0: the latest user message / the tool's latest result or call; 1: the one before

    def describe(self) -> str:
        nth = "latest" if self.back == 0 else f"{self.back + 1}th latest"
        if self.kind == "user":
            return f"token shaped {self.path!r} in the {nth} user message"
        what = "result of" if self.kind == "result" else "call to"
        return f"{self.path or 'value'} of the {nth} {what} {self.tool}"

    def to_json(self) -> list[Any]:
        return [self.kind, self.path, self.tool, self.back]

    @classmethod
    def from_json(cls, raw: Sequence[Any]) -> Source:
        kind, path, tool, back = raw
        if kind not in ("user", "result", "call"):
            raise ValueError(f"unknown slot source {kind!r}")
        return cls(kind, str(path), str(tool), int(back))


def shape(token: str) -> str:
    """The kind of a token: its character classes, sorted (``A`` upper, ``a`` lower, ``9``
    digit, other characters as themselves). ``ZFA04Y`` and ``8JX2WO`` are both ``9A``."""
    classes = {"A" if c.isupper() else "a" if c.islower() else "9" if c.isdigit() else c for c in token}
    return "".join(sorted(classes))


def value_tokens(text: str) -> list[str]:
    """Tokens of free text that name something: with a digit, ``_`` or ``@`` (ids, amounts,
    dates, emails), or an upper-case code of 3+ letters (``JFK``); edge punctuation stripped."""
    out = []
    for raw in _TOKEN.findall(text):
        tok = raw.strip(_EDGE)
        if len(tok) >= 2 and (any(c.isdigit() or c in "_@" for c in tok) or _CODE.match(tok)):
            out.append(tok)
    return out


def canonical(value: Any) -> str | None:
    """A leaf value as the string it is matched by (``55.0`` reads as ``55``); None for what
    is never a slot (booleans, null, containers)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return value.strip() or None
    return None


def leaves(value: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(JSON path, canonical value) of every slot-able leaf; dict keys count as leaves too (a
    payment method's id is often a key)."""
    if isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            yield f"{sub}#key", str(k)
            yield from leaves(v, sub)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from leaves(v, f"{path}[{i}]")
    else:
        c = canonical(value)
        if c is not None:
            yield path, c


def _parse_result(content: str) -> Any:
    try:
        return json.loads(content)
    except ValueError:  # JSONDecodeError included: a result that is not JSON
        return None


def _result_fields(text: str) -> dict[str, str]:
    """A tool result's values by path; a result that is not a JSON object or list (an error
    message, a bare number) by the shape of its value tokens, each shape kept only when one
    token has it (a path must name one value)."""
    parsed = _parse_result(text)
    if isinstance(parsed, (dict, list)):
        return dict(leaves(parsed))
    fields: dict[str, str] = {}
    whole = canonical(parsed)
    if whole is not None:
        fields[""] = whole
    by_shape: dict[str, set[str]] = {}
    for tok in value_tokens(text):
        by_shape.setdefault(shape(tok), set()).add(tok)
    fields.update({f"@{sh}": next(iter(toks)) for sh, toks in by_shape.items() if len(toks) == 1})
    return fields


class Context:
    """The values of a step's conversation, indexed by where they are (see ``Source``)."""

    def __init__(self, messages: Sequence[Message]) -> None:
        self.users: list[list[str]] = []  # value tokens per user message, latest first
        self.results: dict[str, list[dict[str, str]]] = {}  # tool -> [{path: value}], latest first
        self.calls: dict[str, list[dict[str, str]]] = {}
        names: dict[str, str] = {}  # tool-call id -> tool name
        for m in messages:
            role = m["role"]
            if role == "user":
                self.users.insert(0, value_tokens(content_text(m.get("content"))))
            elif role == "assistant":
                for call in m.get("tool_calls") or []:
                    name = call["function"]["name"]
                    names[call.get("id", "")] = name
                    args = _parse_result(call["function"].get("arguments") or "{}")
                    self.calls.setdefault(name, []).insert(0, dict(leaves(args)))
            elif role == "tool":
                name = names.get(m.get("tool_call_id", ""), m.get("name") or "?")
                text = content_text(m.get("content"))
                self.results.setdefault(name, []).insert(0, _result_fields(text))

    def find(self, value: str) -> Source | None:
        """The preferred place holding exactly ``value``: the latest user message, then tool
        results (latest first), then earlier calls' arguments, then earlier user messages."""
        if self.users and value in self.users[0]:
            return Source("user", shape(value), back=0)
        for kind, table in (("result", self.results), ("call", self.calls)):
            best: tuple[int, Source] | None = None
            for tool, items in table.items():
                for back, fields in enumerate(items):
                    for path, v in fields.items():
                        if v == value and (best is None or back < best[0]):
                            best = (back, Source(kind, path, tool, back))  # type: ignore[arg-type]
                            break
            if best is not None:
                return best[1]
        for back, tokens in enumerate(self.users[1:], start=1):
            if value in tokens:
                return Source("user", shape(value), back=back)
        return None

    def resolve(self, source: Source) -> list[str]:
        """The values at ``source`` in this context: none, one, or (user tokens) several."""
        if source.kind == "user":
            if source.back >= len(self.users):
                return []
            return list(dict.fromkeys(t for t in self.users[source.back] if shape(t) == source.path))
        table = self.results if source.kind == "result" else self.calls
        items = table.get(source.tool, [])
        if source.back >= len(items) or source.path not in items[source.back]:
            return []
        return [items[source.back][source.path]]


class BindError(Exception):
    """A template does not fit the step: a slot binds to no value or to several."""


@dataclass(frozen=True)
class Template:
    """An answer with slots. ``body`` is, for tool calls, ``[[name, args], ...]`` with each
    slotted leaf replaced by ``{"$slot": i}``; for text, a list of strings and slot numbers."""

    kind: Literal["tool_calls", "text"]
    body: Any
    slots: tuple[Source, ...]
    typed: tuple[str, ...]  # per slot: "str", "int" or "float" (the original leaf's type)

    def bind(self, ctx: Context) -> Message:
        """The answer re-bound to ``ctx``'s values; ``BindError`` naming the slot otherwise."""
        values = []
        for i, src in enumerate(self.slots):
            found = ctx.resolve(src)
            if len(found) != 1:
                what = "nothing" if not found else f"{len(found)} values ({', '.join(found[:3])})"
                raise BindError(f"slot {i} ({src.describe()}) binds to {what}")
            values.append(_typed(found[0], self.typed[i], i, src))
        if self.kind == "text":
            text = "".join(p if isinstance(p, str) else values[p] for p in self.body)
            return {"role": "assistant", "content": text}
        calls = [
            {"id": "", "type": "function", "function": {"name": name, "arguments": json.dumps(_fill(args, values), ensure_ascii=False)}}
            for name, args in self.body
        ]
        return {"role": "assistant", "content": None, "tool_calls": calls}

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "body": self.body, "slots": [s.to_json() for s in self.slots], "typed": list(self.typed)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Template:
        if raw.get("kind") not in ("tool_calls", "text"):
            raise ValueError(f"unknown template kind {raw.get('kind')!r}")
        slots = tuple(Source.from_json(s) for s in raw["slots"])
        typed = tuple(str(t) for t in raw["typed"])
        if len(typed) != len(slots):
            raise ValueError("one type per slot")
        return cls(raw["kind"], raw["body"], slots, typed)


def _typed(value: str, kind: str, i: int, src: Source) -> Any:
    if kind == "str":
        return value
    try:
        return int(value) if kind == "int" else float(value)
    except ValueError:
        raise BindError(f"slot {i} ({src.describe()}) binds to {value!r}, not a number") from None


def _fill(node: Any, values: list[Any]) -> Any:
    if isinstance(node, dict):
        if set(node) == {"$slot"}:
            return values[node["$slot"]]
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    return node


def make_template(messages: Sequence[Message], answer: Message) -> Template | None:
    """The template of ``answer`` given the conversation it answered, or None when it copies
    nothing from the context (the exact entry is all there is) or cannot be re-bound (a text
    answer holding a number the context does not hold, too many slots)."""
    ctx = Context(messages)
    slots: list[Source] = []
    typed: list[str] = []

    def slot_of(value: str, kind: str) -> int | None:
        src = ctx.find(value)
        if src is None:
            return None
        if src in slots and typed[slots.index(src)] == kind:
            return slots.index(src)
        slots.append(src)
        typed.append(kind)
        return len(slots) - 1

    if answer.get("tool_calls"):
        body = []
        for call in answer["tool_calls"]:
            args = _parse_result(call["function"].get("arguments") or "{}")
            body.append([call["function"]["name"], _slotted(args, slot_of)])
        template = Template("tool_calls", body, tuple(slots), tuple(typed))
    else:
        text = content_text(answer.get("content"))
        parts = _slotted_text(text, slot_of)
        if parts is None:
            return None
        template = Template("text", parts, tuple(slots), tuple(typed))
    if not slots or len(slots) > MAX_SLOTS:
        return None
    return template


def _slotted(node: Any, slot_of: Any) -> Any:
    if isinstance(node, dict):
        return {k: _slotted(v, slot_of) for k, v in node.items()}
    if isinstance(node, list):
        return [_slotted(v, slot_of) for v in node]
    value = canonical(node)
    if value is None or (isinstance(node, str) and len(value) < 2):
        return node
    kind = "str" if isinstance(node, str) else "int" if isinstance(node, int) else "float"
    i = slot_of(value, kind)
    return node if i is None else {"$slot": i}


_TEXT_VALUE = re.compile(r"[A-Za-z0-9_@][\w.@\-/:]*[A-Za-z0-9]|\d")


def _slotted_text(text: str, slot_of: Any) -> list[Any] | None:
    """The text as literal strings and slot numbers; None when it holds a number of two or
    more digits that the context does not hold (computed, so not re-bindable)."""
    parts: list[Any] = []
    pos = 0
    for m in _TEXT_VALUE.finditer(text):
        tok = m.group(0)
        candidates = [tok]
        if "." in tok and tok.rstrip("0").endswith("."):  # 55.00 -> 55
            candidates.append(tok.split(".")[0])
        named = any(c.isdigit() or c in "_@" for c in tok) or _CODE.match(tok) or _NAME.match(tok)
        if not named:
            continue
        i = None
        for c in candidates:
            i = slot_of(c, "str")
            if i is not None:
                break
        if i is None:
            if sum(ch.isdigit() for ch in tok) >= 2:
                return None  # a value the answer computed or invented: re-binding cannot redo it
            continue
        parts.append(text[pos : m.start()])
        parts.append(i)
        pos = m.end()
    parts.append(text[pos:])
    return [p for p in parts if p != ""]
