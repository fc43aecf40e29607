"""Copy, do not invent: argument values decoded from the candidates the context holds.

A small model chooses and copies well and invents badly: asked for the factorial of 5, it
writes ``{"number": 1}``; asked for a circle's circumference, ``"units": "circle"``. The
grammar it decodes under can forbid that. ``constrain`` rewrites a tool's parameter schema
so that each string or number argument is an ``enum`` of the values the conversation holds:

* a string is a run of up to ``MAX_SPAN_WORDS`` consecutive words of a user message (its
  ends stripped of punctuation: "Boston, MA" is a candidate, "MA?" is not), a quoted
  passage of one whole, or a string leaf of a tool result or an earlier call's arguments
  whole (ids, names, codes, dates as the agent saw them). The system prompt and the
  assistant's prose are instructions and talk, not values to pass on;
* a number is one the text writes in digits (not inside a word: "DNA123" gives none), the
  same as a fraction when written as a percentage ("5%" also gives 0.05), times the scale
  word after it ("213 million"), a number word up to twenty, or a numeric leaf of a tool
  result; an ``integer`` argument gets the integral ones.

What the schema already closes (``enum``, ``const``, booleans) keeps its own alternatives;
the values the schema gives an argument (its ``default``, what its description quotes or
writes in digits) are candidates for it.
Where the context gives no candidate, a required argument stays free (the only case the
model writes a value of its own) and an optional one is dropped from the grammar: its
default applies rather than a guess. Arrays of strings or numbers get the same alternatives
per item; nested objects are left free.

The candidates come newest message first and stop at ``limit``, so a long agent context
costs a bounded grammar. Pure Python, like ``tool_grammar``: testable without a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from milliwatt.quality import json_leaves
from milliwatt.types import Message, content_text

MAX_SPAN_WORDS = 8
DEFAULT_LIMIT = 2048

_EDGE = "\"'“”‘’`()[]{}<>*,.;:!?"
_QUOTED = re.compile(r"\"([^\"\n]{2,200})\"|'([^'\n]{2,200})'(?!\w)|`([^`\n]{1,200})`|“([^”\n]{2,200})”|‘([^’\n]{2,200})’")
# A number not glued to a preceding letter or digit ("DNA123", "v2" give none), with what
# follows it: a percent sign or a scale word.
_NUMBER = re.compile(
    r"(?<![\w.])(?P<n>-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)\s?(?P<after>%|percent\b|thousand\b|million\b|billion\b|trillion\b)?",
    re.I,
)
_SCALES = {"%": 0.01, "percent": 0.01, "thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12}
_WORDS = dict(
    zip(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split(),
        range(21),
        strict=True,
    )
)
_NUMBER_WORD = re.compile(r"\b(" + "|".join(_WORDS) + r")\b", re.I)


@dataclass(frozen=True)
class Candidates:
    """The values a conversation holds, in the order they were found (newest message first)."""

    strings: tuple[str, ...]
    numbers: tuple[int | float, ...]

    def integers(self) -> tuple[int, ...]:
        return tuple(int(n) for n in self.numbers if float(n).is_integer())


def candidates(messages: Iterable[Message], *, limit: int = DEFAULT_LIMIT) -> Candidates:
    """The string and number candidates of ``messages`` (each kind at most ``limit``)."""
    strings: dict[str, None] = {}
    numbers: dict[float, int | float] = {}
    for m in reversed(list(messages)):
        for text, whole in _texts(m):
            if len(numbers) < limit:
                for n in _numbers(text):
                    numbers.setdefault(float(n), n)
            if len(strings) < limit:
                for s in whole:
                    strings.setdefault(s)
                for s in _spans(text):
                    strings.setdefault(s)
        if len(strings) >= limit and len(numbers) >= limit:
            break
    return Candidates(tuple(strings)[:limit], tuple(numbers.values())[:limit])


def _texts(message: Message) -> Iterator[tuple[str, list[str]]]:
    """(text to take spans and numbers from, strings to take whole) of one message. A JSON
    tool result or call gives its leaves: each string leaf whole and as text."""
    bodies = [content_text(message.get("content"))] if message["role"] in ("user", "tool") else []
    bodies += [c["function"].get("arguments") or "" for c in message.get("tool_calls") or []]
    for body in bodies:
        if not body:
            continue
        parsed = _json(body)
        if parsed is None:
            yield body, list(_quoted(body))
            continue
        for leaf in json_leaves(parsed):
            if isinstance(leaf, str):
                yield leaf, [leaf.strip()] if 0 < len(leaf.strip()) <= 200 else []
            else:
                yield json.dumps(leaf), []


def _json(text: str) -> Any:
    if text.lstrip()[:1] not in ("{", "["):
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _quoted(text: str) -> Iterator[str]:
    for m in _QUOTED.finditer(text):
        inner = next(g for g in m.groups() if g is not None).strip()
        if inner:
            yield inner


def _spans(text: str) -> Iterator[str]:
    """Every run of up to MAX_SPAN_WORDS words of each line, its ends stripped of punctuation."""
    for line in text.splitlines():
        words = line.split()
        for i in range(len(words)):
            for j in range(i + 1, min(i + MAX_SPAN_WORDS, len(words)) + 1):
                span = " ".join(words[i:j]).strip(_EDGE).strip()
                # "'s" belongs to the sentence, not to the name it follows
                if span.endswith(("'s", "’s")):
                    span = span[:-2]
                if span:
                    yield span


def _numbers(text: str) -> Iterator[int | float]:
    for m in _NUMBER.finditer(text):
        value = float(m["n"].replace(",", ""))
        yield _plain(value)
        if m["after"]:
            yield _plain(value * _SCALES[m["after"].lower()])
    for m in _NUMBER_WORD.finditer(text):
        yield _WORDS[m[1].lower()]


def _plain(x: float) -> int | float:
    """An integral value as an int (the grammar writes ``5``, not ``5.0``); a fraction rounded
    to 12 significant digits so that 5% is 0.05, not 0.05000000000000000277."""
    if x.is_integer() and abs(x) < 1e15:
        return int(x)
    return float(f"{x:.12g}")


def constrain(parameters: dict[str, Any], found: Candidates) -> dict[str, Any]:
    """``parameters`` (a tool's JSON schema) with its string and number arguments closed to
    ``found`` (rules in the module docstring). The input is not modified."""
    props = parameters.get("properties")
    if not isinstance(props, dict):
        return parameters
    required = set(parameters.get("required") or ())
    out_props: dict[str, Any] = {}
    for name, schema in props.items():
        closed = _closed(schema, found)
        if closed is _DROP:
            if name in required:
                out_props[name] = schema  # nothing to copy: the model writes it
            continue
        out_props[name] = closed
    return {**parameters, "properties": out_props}


_DROP = object()  # no candidate for this argument


def _schema_values(schema: dict[str, Any]) -> Iterator[Any]:
    """The values the schema itself gives an argument: its ``default``, and what its
    description quotes or writes in digits ("Default value is 9.81", "defaults to 'meters'")."""
    if schema.get("default") is not None:
        yield schema["default"]
    description = schema.get("description")
    if isinstance(description, str):
        yield from _quoted(description)
        yield from _numbers(description)


def _fits(value: Any, kind: str) -> bool:
    if kind == "string":
        return isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return kind == "number" or float(value).is_integer()


def _closed(schema: Any, found: Candidates) -> Any:
    if not isinstance(schema, dict) or "enum" in schema or "const" in schema:
        return schema
    kind = schema.get("type")
    if kind == "array" and isinstance(schema.get("items"), dict):
        items = _closed(schema["items"], found)
        return schema if items is _DROP else {**schema, "items": items}
    options: tuple[Any, ...]
    if kind == "string":
        options = found.strings
    elif kind == "integer":
        options = found.integers()
    elif kind == "number":
        options = found.numbers
    else:
        return schema
    own = [v for v in _schema_values(schema) if _fits(v, kind) and v not in options]
    options = (*dict.fromkeys(own), *options)
    if not options:
        return _DROP
    return {k: v for k, v in schema.items() if k not in ("format", "pattern", "minLength", "maxLength")} | {"enum": list(options)}
