"""Per-step quality: does an answer agree with the step's reference? (docs/replay.md)

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

* ``text_token_f1``: for a free-text step, SQuAD-style token F1 between the answer and the
  recorded text, agreeing at ``TEXT_F1_THRESHOLD`` or more. Weakness: it is lexical. A
  paraphrase with the same meaning can score low, and an answer that flips one word
  ("can" / "cannot") or one number scores high.

An answer of the wrong shape (text where a tool call was recorded, or the reverse)
disagrees under the reference's measure.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

from .types import Message, Quality, content_text

TEXT_F1_THRESHOLD = 0.5


def judge(answer: Message, reference: dict[str, Any], tools: Sequence[dict[str, Any]] = ()) -> Quality:
    """The quality of ``answer`` against a trace reference (see ``milliwatt.importers``)."""
    kind = reference["kind"]
    if kind == "tool_call":
        return tool_call_match(answer, reference["calls"])
    if kind == "bfcl":
        return bfcl_match(answer, reference["ground_truth"], tools)
    if kind == "gsm8k":
        return gsm8k_match(answer, reference["answer"])
    return text_match(answer, reference["text"])


# --------------------------------------------------------------------------- tool calls


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


def text_match(answer: Message, reference: str) -> Quality:
    if answer.get("tool_calls"):
        return Quality("text_token_f1", "proxy", False, 0.0, "answered with a tool call; the reference is text")
    score = token_f1(content_text(answer.get("content")), reference)
    agrees = score >= TEXT_F1_THRESHOLD
    return Quality("text_token_f1", "proxy", agrees, score, f"token F1 {score:.2f} {'>=' if agrees else '<'} {TEXT_F1_THRESHOLD}")
