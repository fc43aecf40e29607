"""Per-step quality: does an answer agree with the step's reference? (docs/replay.md)

The replay judges every step with these measures, and the cache judges its candidates with
the same ones (``agreement``) when the next tier's answer is known.

Exact measures, each a yes/no:

* ``tool_call_match``: the same calls, in the same order, each with the same function name
  and JSON-equal arguments (key order and 1 vs 1.0 do not matter; true vs 1 does). Order
  counts because an agent executes calls in order; tau-bench's steps make one call each.
* ``bfcl_ast``: BFCL's AST checker rules for Python: every expected call made (in any order
  when several are expected), required arguments present, each argument of the right type
  (an int passes for a float) and within its list of acceptable values (strings compared
  case-, space- and punctuation-insensitively, as BFCL does), and an argument left out only
  when "" is among its acceptable values.
* ``gsm8k_final_number``: the last number of the answer (commas and currency signs
  ignored) equals the reference number.

A proxy, reported apart and never averaged into the exact measures silently:

* ``text_token_f1``: for a free-text step, two conditions. SQuAD-style token F1 between the
  answer and the recorded text is ``TEXT_F1_THRESHOLD`` or more, and the answer carries the
  same set of salient values as the recorded text: none missing, none added
  (``salient_values``). The score is the token F1; the detail names the values missing or
  added. Weakness: it is lexical. A paraphrase with the same meaning can score low, and an
  answer that flips one word ("can" / "cannot") with every value kept still agrees. The
  value check is what stops a fluent generic reply ("Could you give me your reservation
  id?") from passing for one that names the reservation, the amount and the date.

An answer of the wrong shape (text where a tool call was recorded, or the reverse)
disagrees under the reference's measure.
"""

from __future__ import annotations

import functools
import json
import re
import string
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from milliwatt.types import Message, Quality, content_text

TEXT_F1_THRESHOLD = 0.5


def judge(answer: Message, reference: dict[str, Any], tools: Sequence[dict[str, Any]] = ()) -> Quality:
    """The quality of ``answer`` against a trace reference (see ``milliwatt.evaluation.importers``)."""
    kind = reference["kind"]
    if kind == "tool_call":
        return tool_call_match(answer, reference["calls"])
    if kind == "bfcl":
        return bfcl_match(answer, reference["ground_truth"], tools)
    if kind == "gsm8k":
        return gsm8k_match(answer, reference["answer"])
    return text_match(answer, reference["text"])


# --------------------------------------------------------------------------- tool calls


def agreement(answer: Message, reference: Message) -> Quality:
    """Does ``answer`` agree with another assistant message (the answer of the next tier in a
    shadow check, or the one a later tier gave after a cache miss)? The reference's shape picks
    the measure: ``tool_call_match`` for tool calls, the ``text_token_f1`` proxy for text."""
    calls = reference.get("tool_calls")
    if calls:
        expected = [{"name": c["function"]["name"], "arguments": _parsed(c["function"].get("arguments"))} for c in calls]
        return tool_call_match(answer, expected)
    return text_match(answer, content_text(reference.get("content")))


def _parsed(arguments: str | None) -> Any:
    try:
        return json.loads(arguments or "{}")
    except json.JSONDecodeError:
        return arguments  # compared as given: disagrees with any parsed arguments


def _calls(answer: Message) -> list[tuple[str, Any]] | str:
    """(name, parsed arguments) of each call, or why the calls cannot be read."""
    out = []
    for c in answer.get("tool_calls") or []:
        try:
            out.append((c["function"]["name"], json.loads(c["function"].get("arguments") or "{}")))
        except (KeyError, TypeError, json.JSONDecodeError):
            return "a tool call's arguments are not JSON"
    return out


def json_equal(a: Any, b: Any) -> bool:
    """Equality of JSON values: numbers by value, but a boolean is never a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _exact(metric: str, agrees: bool, detail: str) -> Quality:
    return Quality(metric, "exact", agrees, 1.0 if agrees else 0.0, detail)


def _calls_like(answer: Message, expected: int) -> tuple[list[tuple[str, Any]], str | None]:
    """The answer's calls, or why it cannot match ``expected`` calls at all."""
    calls = _calls(answer)
    if isinstance(calls, str):
        return [], calls
    if not calls:
        return [], "answered with text; the reference is a tool call"
    if len(calls) != expected:
        return [], f"{len(calls)} call(s); the reference has {expected}"
    return calls, None


def tool_call_match(answer: Message, expected: Sequence[dict[str, Any]]) -> Quality:
    def verdict(agrees: bool, detail: str) -> Quality:
        return _exact("tool_call_match", agrees, detail)

    calls, problem = _calls_like(answer, len(expected))
    if problem:
        return verdict(False, problem)
    for k, ((name, args), want) in enumerate(zip(calls, expected)):
        if name != want["name"]:
            return verdict(False, f"call {k}: {name} instead of {want['name']}")
        if not json_equal(args, want["arguments"]):
            diff = sorted(
                key for key in set(args) | set(want["arguments"]) if not json_equal(args.get(key), want["arguments"].get(key))
            ) if isinstance(args, dict) else ["(arguments)"]  # fmt: skip
            return verdict(False, f"call {k} {name}: argument(s) {', '.join(diff)} differ")
    return verdict(True, "same calls and arguments")


# --------------------------------------------------------------------------- BFCL

_PY_TYPES: dict[str | None, type | None] = {
    "string": str, "integer": int, "number": float, "boolean": bool, "array": list, "object": dict, None: None,
}  # fmt: skip
_STRIP = re.compile(r"[ ,./\-_*^]")


def _standard(s: str) -> str:
    """BFCL's string normalisation: no spaces or ``,./-_*^``, lower case, ' as "."""
    return _STRIP.sub("", s).lower().replace("'", '"')


def _std(v: Any) -> Any:
    return _standard(v) if isinstance(v, str) else v


def bfcl_match(answer: Message, ground_truth: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]]) -> Quality:
    def verdict(agrees: bool, detail: str) -> Quality:
        return _exact("bfcl_ast", agrees, detail)

    calls, problem = _calls_like(answer, len(ground_truth))
    if problem:
        return verdict(False, problem)
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in tools}
    unmatched = list(range(len(calls)))
    for expected in ground_truth:
        ((name, possible),) = expected.items()
        problems = []
        for i in unmatched:
            problem = _bfcl_call_problem(calls[i], name, possible, schemas.get(name, {}))
            if problem is None:
                unmatched.remove(i)
                break
            problems.append(problem)
        else:
            return verdict(False, problems[0] if len(problems) == 1 else f"no call matches {name}: {problems[0]}")
    return verdict(True, "every argument within its acceptable values")


def _bfcl_call_problem(call: tuple[str, Any], name: str, possible: dict[str, list[Any]], schema: dict[str, Any]) -> str | None:
    got, args = call
    if got != name:
        return f"{got} instead of {name}"
    if not isinstance(args, dict):
        return "arguments are not an object"
    props = schema.get("properties", {})
    for req in schema.get("required", []):
        if req not in args:
            return f"missing required argument {req!r}"
    for param, value in args.items():
        if param not in props or param not in possible:
            return f"unexpected argument {param!r}"
        problem = _bfcl_value_problem(param, value, possible[param], props[param])
        if problem:
            return problem
    for param, values in possible.items():
        if param not in args and "" not in values:
            return f"argument {param!r} left out but not optional"
    return None


def _bfcl_value_problem(param: str, value: Any, acceptable: list[Any], schema: dict[str, Any]) -> str | None:
    want = _PY_TYPES.get(schema.get("type"), None)
    if want is float and type(value) is int:
        value = float(value)  # BFCL allows Python's int -> float promotion
    if want is not None and type(value) is not want:
        return f"argument {param!r} is {type(value).__name__}, expected {schema.get('type')}"
    options = [v for v in acceptable if v != ""]
    if want is dict:
        ok = any(_dict_ok(value, opt) for opt in options if isinstance(opt, dict))
    elif want is list and schema.get("items", {}).get("type") == "object":
        ok = any(isinstance(opt, list) and len(opt) == len(value) and all(_dict_ok(v, o) for v, o in zip(value, opt))
                 for opt in options)  # fmt: skip
    elif want is list:
        ok = [_std(v) for v in value] in [[_std(v) for v in opt] for opt in options if isinstance(opt, list)]
    else:
        ok = _std(value) in [_std(v) for v in options]
    return None if ok else f"argument {param!r} = {value!r} not among {acceptable!r}"


def _dict_ok(value: Any, possible: dict[str, list[Any]]) -> bool:
    """A dict argument against one acceptable dict of {key: [acceptable values]}."""
    if not isinstance(value, dict):
        return False
    for key, v in value.items():
        if key not in possible or _std(v) not in [_std(p) for p in possible[key]]:
            return False
    return all(key in value or "" in values for key, values in possible.items())


# --------------------------------------------------------------------------- GSM8K

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> float | None:
    """The last number in ``text``, commas stripped ("$1,234.50." -> 1234.5); None if none."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def gsm8k_match(answer: Message, expected: str | float) -> Quality:
    want = final_number(str(expected))
    if answer.get("tool_calls"):
        return Quality("gsm8k_final_number", "exact", False, 0.0, "answered with a tool call; the reference is a number")
    got = final_number(content_text(answer.get("content")))
    agrees = got is not None and want is not None and abs(got - want) < 1e-9
    detail = f"final number {got:g} vs {want:g}" if got is not None and want is not None else "no number in the answer"
    return Quality("gsm8k_final_number", "exact", agrees, 1.0 if agrees else 0.0, detail)


# --------------------------------------------------------------------------- free text

_PUNCT = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _tokens(text: str) -> list[str]:
    return _ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split()


def token_f1(answer: str, reference: str) -> float:
    """SQuAD's token F1: lower case, no punctuation or articles, bag-of-words overlap."""
    a, r = _tokens(answer), _tokens(reference)
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


# Salient values: what a reply must get right besides its wording. Generic rules, in order:
#   1. list markers and headings at the start of a line ("- ", "1. ", "## ") are dropped;
#   2. dates become "date:MM-DD", written ISO ("2024-05-18") or with an English month name ("May
#      18th", "18 May 2024"); a year written with the date is dropped with it, so "May 18" and
#      "2024-05-18" are one value. Times ("9:00 AM", "21:05", "9 pm") become "time:HH:MM", 24-hour;
#   3. each remaining token (split at white space and "/", outer punctuation stripped) is
#      - a number if it is one, with an optional currency sign, thousands commas, decimals, %
#        or an ordinal suffix: "$1,234.50" -> "1234.5", "3rd" -> "3";
#      - an id if it has a digit or "_" ("HAT123", "mia_li_3668") or is an ALL-CAPS code of 3+
#        letters ("JFK"): "id:" + lower case;
#      - a name if it is capitalised ("Chen", not "ID"), not the first word of a line or of a
#        sentence or clause (after ".", "!", "?" or ":"), not a word of a line's leading label
#        ("Total Price:", "**Cabin Class:**"), and not in ``_NOT_NAMES``: "name:" + lower
#        case, a trailing "'s" dropped;
#      - else nothing (ordinary words, and ALL-CAPS words of 1 or 2 letters: "ID", "OK").
# Numbers written as words ("two bags") are not values: the rule stays lexical. A single-word
# name right after a colon or at a sentence start is missed: names are the weakest part.
_MONTHS = {m: i for i, ms in enumerate((
    ("jan", "january"), ("feb", "february"), ("mar", "march"), ("apr", "april"), ("may",), ("jun", "june"),
    ("jul", "july"), ("aug", "august"), ("sep", "sept", "september"), ("oct", "october"), ("nov", "november"),
    ("dec", "december"),
), start=1) for m in ms}  # fmt: skip
_MONTH = r"(?P<month>" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\.?"
_DAY = r"(?P<day>[0-3]?\d)(?:st|nd|rd|th)?"
_YEAR = r"(?:,?\s+\d{4}\b)?"
_DATES = [
    re.compile(r"\b\d{4}-(?P<mnum>[01]\d)-(?P<day>[0-3]\d)\b"),
    re.compile(rf"\b{_MONTH}\s+{_DAY}\b{_YEAR}", re.I),
    re.compile(rf"\b{_DAY}\s+(?:of\s+)?{_MONTH}\b{_YEAR}", re.I),
]
_TIMES = [
    re.compile(r"\b(?P<h>[0-2]?\d):(?P<m>[0-5]\d)(?::[0-5]\d)?(?:\s*(?P<ampm>[ap])\.?m\b\.?)?", re.I),
    re.compile(r"\b(?P<h>1[0-2]|0?\d)\s*(?P<ampm>[ap])\.?m\b\.?", re.I),
]
_LINE_MARK = re.compile(r"^[ \t]*(?:[-*+•>#]+|\d+[.)])[ \t]+", re.M)
_LABEL = re.compile(r"[^:\s]+(?:[ \t]+[^:\s]+){0,3}:(?=\W|$)")  # up to 4 words and a colon
_NUMBER_TOKEN = re.compile(r"[$€£]?(?P<n>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(?:%|st|nd|rd|th)?")
_EDGE = "\"'“”‘’()[]{}<>*_`.,;:!?"
# Capitalised words that name nothing: the pronoun I, greetings and courtesy words that start
# a clause after a comma, and titles. Kept small and generic on purpose.
_NOT_NAMES = frozenset(
    "i i'm i'll i've i'd please thank thanks hello hi hey yes no ok okay sure dear mr mrs ms dr".split()
)


def _number(text: str) -> str:
    from decimal import Decimal

    d = Decimal(text.replace(",", ""))
    return str(int(d)) if d == d.to_integral_value() else str(d.normalize())


def _is_id(token: str) -> bool:
    return any(c.isdigit() for c in token) or "_" in token or (len(token) >= 3 and token.isalpha() and token.isupper())


def salient_values(text: str) -> set[str]:
    """The numbers, ids, codes, dates, times, amounts and names of ``text``, normalised so that
    the same value written two ways is one value (rules above ``_MONTHS``)."""
    values: set[str] = set()
    text = _LINE_MARK.sub("", text)

    def date(m: re.Match[str]) -> str:
        month = int(m["mnum"]) if "mnum" in m.re.groupindex else _MONTHS[m["month"].lower().rstrip(".")]
        day = int(m["day"])
        if not (1 <= month <= 12 and 1 <= day <= 31):
            return m[0]
        values.add(f"date:{month:02d}-{day:02d}")
        return " "

    def time(m: re.Match[str]) -> str:
        hour, ampm = int(m["h"]), (m["ampm"] or "").lower()
        if ampm:
            hour = hour % 12 + (12 if ampm == "p" else 0)
        minute = m.groupdict().get("m") or "00"
        values.add(f"time:{hour:02d}:{minute}")
        return " "

    for pattern in _DATES:
        text = pattern.sub(date, text)
    for pattern in _TIMES:
        text = pattern.sub(time, text)
    for line in text.splitlines():
        label = _LABEL.match(line.lstrip(" \t*_"))
        label_tokens = len(label[0].split()) if label else 0
        sentence_start = True
        for k, raw in enumerate(t for t in re.split(r"[\s/]+", line) if t):
            token = raw.strip(_EDGE)
            if token.endswith(("'s", "’s")):
                token = token[:-2]
            if not token:
                pass
            elif _NUMBER_TOKEN.fullmatch(token):
                values.add(_number(_NUMBER_TOKEN.fullmatch(token)["n"]))  # type: ignore[index]
            elif _is_id(token):
                values.add("id:" + token.lower())
            elif (
                token[0].isupper() and any(c.islower() for c in token) and not sentence_start
                and k >= label_tokens and token.lower() not in _NOT_NAMES
            ):  # fmt: skip
                values.add("name:" + token.lower())
            sentence_start = raw.rstrip("\"'”’)*_").endswith((".", "!", "?", ":"))
    return values


def _value_list(values: set[str]) -> str:
    return ", ".join(v.split(":", 1)[-1] for v in sorted(values))


def text_match(answer: Message, reference: str) -> Quality:
    if answer.get("tool_calls"):
        return Quality("text_token_f1", "proxy", False, 0.0, "answered with a tool call; the reference is text")
    got = content_text(answer.get("content"))
    score = token_f1(got, reference)
    want, have = salient_values(reference), salient_values(got)
    missing, added = want - have, have - want
    detail = f"token F1 {score:.2f} {'>=' if score >= TEXT_F1_THRESHOLD else '<'} {TEXT_F1_THRESHOLD}"
    if missing or added:
        detail += "".join(
            f"; {what} {_value_list(vals)}" for what, vals in (("missing", missing), ("added", added)) if vals
        )  # fmt: skip
    else:
        detail += f"; the same {len(want)} value(s)" if want else "; no values in either"
    agrees = score >= TEXT_F1_THRESHOLD and not missing and not added
    return Quality("text_token_f1", "proxy", agrees, score, detail)


# --------------------------------------------------------------------------- values in context
# What an answer states or passes to a tool, and whether the context holds it: the trimming
# audit (did trimming remove a value the answer used?) and the local gate (did the model copy
# its values, or invent them?) ask the same question.


@functools.lru_cache(maxsize=16384)
def _values(text: str) -> frozenset[str]:
    """The salient values of a text; of a JSON text, those of its leaves (so that the same
    values written compactly or spaced, as ``compact_json`` rewrites them, are the same)."""
    if not text:
        return frozenset()
    if text.lstrip()[:1] in ("{", "["):
        try:
            parsed = json.loads(text)
        except ValueError:
            pass
        else:
            return frozenset().union(*(salient_values(str(leaf)) for leaf in json_leaves(parsed)))
    return frozenset(salient_values(text))


def json_leaves(value: Any) -> Iterator[str | int | float]:
    """The strings and numbers of a parsed JSON value, depth first (booleans and nulls are not
    values an answer states)."""
    if isinstance(value, dict):
        for v in value.values():
            yield from json_leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from json_leaves(v)
    elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
        yield value


def _call_values(message: Message) -> set[str]:
    out: set[str] = set()
    for call in message.get("tool_calls") or []:
        try:
            args = json.loads(call["function"].get("arguments") or "{}")
        except ValueError:
            args = call["function"].get("arguments") or ""
        for leaf in json_leaves(args):
            out |= _values(str(leaf))
    return out


def answer_values(answer: Message) -> set[str]:
    """The values an answer states or passes to a tool (argument values, not their names)."""
    return set(_values(content_text(answer.get("content")))) | _call_values(answer)


def context_values(messages: Iterable[Message]) -> set[str]:
    out: set[str] = set()
    for m in messages:
        out |= _values(content_text(m.get("content")))
        out |= _call_values(m)
    return out
