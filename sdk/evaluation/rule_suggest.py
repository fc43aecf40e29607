"""Rules proposed from recorded traffic: ``milliwatt rules suggest``.

The principle: a step whose recorded (frontier) answer is a *function of the context* needs
no model. Such steps recur: after a tool result of one kind the agent makes the same move
with values copied from that result, or from what the user just typed. The suggester finds
them without knowing any tool, field or word of the agent in advance:

1. **Situations.** Each answered step is placed by what it answers: the last message's role
   and, after a tool result, the tool's name; and by the answer's shape (a call of one tool,
   or a text reply).
2. **Templates.** Within a situation, the cache's template machinery
   (``milliwatt.cache.template.make_template``) turns each answer into a move with slots: each
   value copied from the context is replaced by where it came from. A candidate rule is one
   template that recurs (``min_support`` steps or more) and whose every slot the rule language
   can fill: a field of the latest tool result (``{result.<path>}``) or a token of the last
   user message (a regex capture of the token's kind). An answer copying nothing is a
   constant move, also a candidate.
3. **Conditions.** A candidate fires on every step of its situation; where that is too often
   wrong, conditions are added greedily (at most ``max_conditions``) from what the context
   offers: a field of the latest tool result that exists, does not exist or has a value, a
   word in the last user message or not. Each is chosen for the best lower confidence bound
   on the candidate's agreement with the recorded answers, on the fitting half only.
4. **Held out.** Fitting uses one half of the sessions (split by session, seeded:
   ``milliwatt.calibration.split_sessions``); the candidates, written as a pack, are replayed
   with ``what_if`` on the other half. A rule is kept only when it answers at least
   ``min_support`` held-out steps and agrees with at least ``min_agreement`` of them (98% by
   default), and the Clopper-Pearson lower bound of that agreement (95%) is at least
   ``min_lower_bound``. Dropping a rule changes which rule answers first, so the pack is
   replayed again until it is stable.

The result is a pack (``pack: suggested``) for a person to review before shipping: each rule
says in its description and in comments how often it fired and agreed, fitted and held out.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from milliwatt.calibration import clopper_pearson_upper, split_sessions
from milliwatt.errors import RuleFileError
from milliwatt.types import Message, content_text

from milliwatt.rules.conditions import words_of
from milliwatt.rules.loader import load_rules
from milliwatt.rules.whatif import RecordedStep, WhatIf, judge_answer, what_if

MIN_AGREEMENT = 0.98
CONFIDENCE = 0.95
_SEGMENT = re.compile(r"[A-Za-z0-9_]+")
KEEP_SHARE = 0.5  # each condition keeps at least this share of the steps the move agrees on
_MAX_VALUE_CHARS = 40  # a field value longer than this is content, not a switch a rule keys on


# --------------------------------------------------------------------------- situations


def latest_tool_result(messages: Sequence[Message]) -> tuple[str, Any] | None:
    """(tool name, parsed JSON or None) of the last message when it is a tool result."""
    if not messages or messages[-1]["role"] != "tool":
        return None
    last = messages[-1]
    name = last.get("name")
    call_id = last.get("tool_call_id")
    for m in reversed(messages[:-1]):
        for c in m.get("tool_calls") or []:
            if c.get("id") == call_id:
                name = c["function"]["name"]
                break
        else:
            continue
        break
    try:
        parsed = json.loads(content_text(last.get("content")))
    except ValueError:
        parsed = None
    return name or "?", parsed


def situation_of(messages: Sequence[Message]) -> tuple[str, str]:
    """("user", "") or ("tool", tool name): what the step answers."""
    res = latest_tool_result(messages)
    if res is not None:
        return "tool", res[0]
    return (messages[-1]["role"] if messages else "", "")


def answer_shape(answer: Message) -> str | None:
    calls = answer.get("tool_calls") or []
    if len(calls) > 1:
        return None  # a rule makes one call
    return f"call:{calls[0]['function']['name']}" if calls else "reply"


def field_leaves(value: Any, path: str = "") -> list[tuple[str, Any]]:
    """(dotted path, value) of every scalar leaf and every container of a parsed result; list
    items by index ("reservations.0"). Keys that the dotted path cannot spell are skipped."""
    out: list[tuple[str, Any]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if not _SEGMENT.fullmatch(str(k)):
                continue
            sub = f"{path}.{k}" if path else str(k)
            out.append((sub, v if not isinstance(v, (dict, list)) else _CONTAINER))
            out += field_leaves(v, sub)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            sub = f"{path}.{i}" if path else str(i)
            out.append((sub, v if not isinstance(v, (dict, list)) else _CONTAINER))
            out += field_leaves(v, sub)
    return out


_CONTAINER = object()
_TURN = "#turn"  # the number of user messages, beside a step's result fields (no dotted path has a '#')


# --------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    situation: tuple[str, str]
    shape: str
    template: Any  # milliwatt.cache.template.Template, or None for a constant answer
    constant: Message | None
    slots: list[tuple[str, str]]  # per slot: ("result", dotted path) or ("user", capture name)
    user_shapes: list[str]  # the token shapes of the user captures, in capture order
    support: int = 0
    sessions: set[str] = field(default_factory=set)
    conditions: list[tuple[str, Any]] = field(default_factory=list)  # (kind, spec) added by the search
    fit: dict[str, Any] = field(default_factory=dict)
    held_out: dict[str, Any] = field(default_factory=dict)
    id: str = ""


def _signature(messages: Sequence[Message], answer: Message, situation: tuple[str, str]) -> tuple[Any, ...] | None:
    """What makes two answers the same move, or None when the rule language cannot say it."""
    from milliwatt.cache.template import make_template

    template = make_template(messages, answer)
    if template is None:
        if answer.get("tool_calls"):
            c = answer["tool_calls"][0]["function"]
            body = json.dumps([c["name"], json.loads(c.get("arguments") or "{}")], sort_keys=True)
        else:
            body = content_text(answer.get("content"))
            if not body.strip():
                return None
        return ("constant", body, ())
    slots = []
    for src in template.slots:
        if src.kind == "result" and situation[0] == "tool" and src.tool == situation[1] and src.back == 0:
            path = _dotted(src.path)
            if path is None:
                return None
            slots.append(("result", path))
        elif src.kind == "user" and src.back == 0:
            slots.append(("user", src.path))
        else:
            return None  # an older result, an earlier call's argument, an earlier user message
    return (template.kind, json.dumps(template.body, sort_keys=True), tuple(slots), template.typed)


def _dotted(path: str) -> str | None:
    """A cache template path ("a.b[0].c") as a rule's dotted path ("a.b.0.c"); None for what
    a dotted path cannot name (a dict key as a value, a token found in a non-JSON result)."""
    if not path or "#" in path or path.startswith("@"):
        return None
    dotted = re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")
    return dotted if all(_SEGMENT.fullmatch(s) for s in dotted.split(".")) else None


def _bind(c: Candidate, rec: RecordedStep) -> Message | None:
    """The candidate's answer for a step, or None when it cannot be bound (the rule declines)."""
    if c.constant is not None:
        return c.constant
    from milliwatt.cache.template import BindError, Context

    try:
        return c.template.bind(Context(rec.step.messages))
    except BindError:
        return None


# --------------------------------------------------------------------------- predicates


@dataclass(frozen=True)
class _Pred:
    kind: str  # field_exists, field_missing, field_equals, word, no_word
    key: str
    value: Any = None

    def describe(self) -> str:
        return {"field_exists": f"{self.key} exists", "field_missing": f"{self.key} absent",
                "field_equals": f"{self.key} = {self.value!r}", "word": f"says {self.key!r}",
                "no_word": f"does not say {self.key!r}",
                "turn_max": f"turn <= {self.value}", "turn_min": f"turn >= {self.value}"}[self.kind]  # fmt: skip


def _predicates(rec: RecordedStep) -> tuple[set[_Pred], dict[str, Any], frozenset[str]]:
    """The positive facts of a step (fields that exist or have a value; words said), its
    result's fields, and its words: negative predicates are checked against these."""
    facts: set[_Pred] = set()
    fields: dict[str, Any] = {}
    res = latest_tool_result(rec.step.messages)
    if res is not None and res[1] is not None:
        for path, value in field_leaves(res[1]):
            fields[path] = value
            facts.add(_Pred("field_exists", path))
            if value is not _CONTAINER and (not isinstance(value, str) or len(value) <= _MAX_VALUE_CHARS) and value is not None:
                facts.add(_Pred("field_equals", path, value))
    words = frozenset(words_of(rec.step.last_user_text))
    facts |= {_Pred("word", w) for w in words}
    turn = sum(1 for m in rec.step.messages if m["role"] == "user")
    fields[_TURN] = turn
    facts |= {_Pred("turn_max", "", t) for t in range(turn, turn + 3)} | {_Pred("turn_min", "", t) for t in range(max(turn - 2, 1), turn + 1)}
    return facts, fields, words


def _holds(p: _Pred, facts: set[_Pred], fields: dict[str, Any], words: frozenset[str]) -> bool:
    if p.kind == "field_missing":
        return p.key not in fields
    if p.kind == "no_word":
        return p.key not in words
    if p.kind == "turn_max":
        return fields[_TURN] <= p.value
    if p.kind == "turn_min":
        return fields[_TURN] >= p.value
    if p.kind == "field_equals":
        v = fields.get(p.key, _CONTAINER)
        return v is not _CONTAINER and type(v) is type(p.value) and v == p.value
    return p in facts


def _lower(agree: int, n: int) -> float:
    return 1.0 - clopper_pearson_upper(n - agree, n, CONFIDENCE) if n else 0.0


# --------------------------------------------------------------------------- the search


@dataclass
class Suggestion:
    pack: str  # the YAML text
    rules: list[Candidate]
    rejected: list[Candidate]
    fit_what_if: WhatIf | None
    held_out_what_if: WhatIf | None
    fit_sessions: int
    held_out_sessions: int
    settings: dict[str, Any]
    candidates_what_if: WhatIf | None = None  # every loadable candidate together, on the held-out half

    def to_json(self) -> dict[str, Any]:
        def one(c: Candidate) -> dict[str, Any]:
            return {"id": c.id, "situation": list(c.situation), "shape": c.shape, "support": c.support,
                    "conditions": [p for p, _ in c.conditions], "fit": c.fit, "held_out": c.held_out}  # fmt: skip

        return {
            "settings": self.settings,
            "sessions": {"fit": self.fit_sessions, "held_out": self.held_out_sessions},
            "rules": [one(c) for c in self.rules],
            "rejected": [one(c) for c in self.rejected],
            "what_if": {
                "fit": self.fit_what_if.to_json() if self.fit_what_if else None,
                "held_out": self.held_out_what_if.to_json() if self.held_out_what_if else None,
                "all_candidates_held_out": self.candidates_what_if.to_json() if self.candidates_what_if else None,
            },
        }


def suggest(
    steps: Sequence[RecordedStep],
    *,
    min_support: int = 10,
    min_agreement: float = MIN_AGREEMENT,
    min_lower_bound: float = 0.0,
    max_conditions: int = 3,
    held_out_share: float = 0.5,
    seed: int = 0,
    pack: str = "suggested",
    source: str = "",
    log: Callable[[str], None] | None = None,
) -> Suggestion:
    """Propose rules for the recorded steps whose answers are a function of their context
    (module doc). ``min_support``: the fewest steps a rule must answer, in the fitting half and
    again in the held-out half."""
    settings = {"min_support": min_support, "min_agreement": min_agreement, "min_lower_bound": min_lower_bound,
                "confidence": CONFIDENCE, "max_conditions": max_conditions, "held_out_share": held_out_share,
                "seed": seed, "source": source}  # fmt: skip
    say = log or (lambda _msg: None)
    sessions = {s.session or s.id for s in steps}
    held = split_sessions(sessions, held_out_share, seed)
    fit_steps = [s for s in steps if (s.session or s.id) not in held]
    held_steps = [s for s in steps if (s.session or s.id) in held]
    say(f"{len(steps)} steps in {len(sessions)} sessions: fitting on {len(fit_steps)} steps of {len(sessions) - len(held)} sessions, "
        f"holding out {len(held_steps)} steps of {len(held)}")  # fmt: skip

    # 1-2. situations and recurring templates, on the fitting half
    by_situation: dict[tuple[str, str], list[RecordedStep]] = defaultdict(list)
    groups: dict[tuple[Any, ...], Candidate] = {}
    for rec in fit_steps:
        shape_ = answer_shape(rec.answer)
        sit = situation_of(rec.step.messages)
        if shape_ is None or sit[0] not in ("user", "tool"):
            continue
        by_situation[sit].append(rec)
        sig = _signature(rec.step.messages, rec.answer, sit)
        if sig is None:
            continue
        key = (sit, shape_, sig)
        c = groups.get(key)
        if c is None:
            c = groups[key] = _candidate(rec, sit, shape_, sig)
        if c is None:
            continue
        c.support += 1
        c.sessions.add(rec.session or rec.id)
    candidates = [c for c in groups.values() if c is not None and c.support >= min_support and len(c.sessions) >= 2]
    say(f"{len(groups)} recurring moves, {len(candidates)} with support >= {min_support} in 2+ sessions")

    # 3. conditions, fitted
    facts_of = {id(r): _predicates(r) for rs in by_situation.values() for r in rs}
    fitted: list[Candidate] = []
    for c in candidates:
        if _fit_conditions(c, by_situation[c.situation], facts_of, min_support, min_agreement, max_conditions):
            fitted.append(c)
    for c in candidates:
        say(f"  {c.situation} {c.shape} support {c.support}: {c.fit} conditions {[d for d, _ in c.conditions]}")
    say(f"{len(fitted)} candidates agree on >= {100 * min_agreement:g}% of the fitting half after conditions")
    _name(fitted)

    # 4. held out, through the real rules engine, until the kept set is stable
    kept, rejected = [], []
    for c in fitted:
        try:
            _load_text(render_pack([c], pack=pack, settings=settings))
        except RuleFileError as e:  # the rule language cannot say it (the loader says why)
            c.held_out = {"fired": 0, "agree": 0, "agreement": 0.0, "agreement_lower_95": 0.0, "saved_wh_point": 0.0,
                          "sessions": 0, "error": e.problem}  # fmt: skip
            rejected.append(c)
            say(f"  {c.id} does not load: {e}")
        else:
            kept.append(c)
    fit_w = held_w = first_w = None
    for _ in range(10):
        if not kept:
            break
        text = render_pack(kept, pack=pack, settings=settings)
        rules = _load_text(text)
        held_w = what_if(rules, held_steps)
        fit_w = what_if(rules, fit_steps)
        first_w = first_w or held_w
        _record(kept, fit_w, "fit")
        _record(kept, held_w, "held_out")
        bad = [c for c in kept if not _passes(c.held_out, min_support, min_agreement, min_lower_bound)]
        if not bad:
            break
        rejected += bad
        kept = [c for c in kept if c not in bad]
    if not kept:
        fit_w = held_w = None
    say(f"{len(kept)} rules kept after the held-out check, {len(rejected)} rejected")
    return Suggestion(render_pack(kept, pack=pack, settings=settings) if kept else render_pack([], pack=pack, settings=settings),
                      kept, rejected, fit_w, held_w, len(sessions) - len(held), len(held), settings, first_w)  # fmt: skip


def _candidate(rec: RecordedStep, sit: tuple[str, str], shape_: str, sig: tuple[Any, ...]) -> Candidate | None:
    from milliwatt.cache.template import make_template

    if sig[0] == "constant":
        answer = {k: v for k, v in rec.answer.items() if k in ("role", "content", "tool_calls")}
        if answer.get("tool_calls"):
            answer["tool_calls"] = [{**answer["tool_calls"][0], "id": ""}]
        return Candidate(sit, shape_, None, answer, [], [])
    template = make_template(rec.step.messages, rec.answer)
    slots, shapes = [], []
    for kind, path in sig[2]:
        if kind == "user":
            if path not in shapes:
                shapes.append(path)
            slots.append(("user", f"v{shapes.index(path)}"))
        else:
            slots.append((kind, path))
    return Candidate(sit, shape_, template, None, slots, shapes)


def _fit_conditions(
    c: Candidate, situation_steps: list[RecordedStep], facts_of: dict[int, Any],
    min_support: int, min_agreement: float, max_conditions: int,
) -> bool:  # fmt: skip
    """Add conditions until the candidate agrees often enough on the fitting half; False when
    it cannot, keeping ``min_support`` answered steps."""
    outcome: list[bool | None] = []  # per step of the situation: agrees, disagrees, or None (declines)
    for rec in situation_steps:
        answer = _bind(c, rec)
        outcome.append(None if answer is None else bool(judge_answer(answer, rec).agrees))
    active = [i for i, o in enumerate(outcome) if o is not None]

    def score(idx: list[int]) -> tuple[float, int]:
        n = len(idx)
        agree = sum(1 for i in idx if outcome[i])
        return (_lower(agree, n) if n >= min_support else -1.0, n)

    chosen: list[_Pred] = []
    best = score(active)
    for _ in range(max_conditions):
        agree = sum(1 for i in active if outcome[i])
        if active and agree / len(active) >= min_agreement and agree == len(active):
            break
        pool: set[_Pred] = set()
        for i in active:
            if outcome[i]:
                facts, fields, words = facts_of[id(situation_steps[i])]
                pool |= facts
        # negatives: a field or word present on some disagreeing step
        for i in active:
            if outcome[i] is False:
                facts, fields, words = facts_of[id(situation_steps[i])]
                pool |= {_Pred("field_missing", p.key) for p in facts if p.kind == "field_exists"}
                pool |= {_Pred("no_word", p.key) for p in facts if p.kind == "word"}
        top: tuple[tuple[float, int], _Pred, list[int]] | None = None
        agreeing = sum(1 for i in active if outcome[i])
        for p in pool:
            if p.kind in ("field_exists", "field_equals", "field_missing") and c.situation[0] != "tool":
                continue
            idx = [i for i in active if _holds(p, *facts_of[id(situation_steps[i])])]
            if sum(1 for i in idx if outcome[i]) < KEEP_SHARE * agreeing:
                continue  # a condition must say what the move needs, not pick a lucky few steps
            s = score(idx)
            if top is None or s > top[0] or (s == top[0] and _simpler(p, top[1])):
                top = (s, p, idx)
        if top is None or top[0] <= best:
            break
        best, active = top[0], top[2]
        chosen.append(top[1])
    n = len(active)
    agree = sum(1 for i in active if outcome[i])
    c.conditions = [(p.describe(), p) for p in chosen]
    c.fit = {"situation_steps": len(situation_steps), "bound": len(outcome) - outcome.count(None),
             "bound_agree": outcome.count(True), "fired": n, "agree": agree}
    return n >= min_support and agree / n >= min_agreement if n else False


def _simpler(a: _Pred, b: _Pred) -> bool:
    """Ties go to the predicate a person reads more easily: a word, then a shorter path."""
    order = {"turn_max": 0, "turn_min": 0, "word": 1, "no_word": 2, "field_exists": 3, "field_missing": 4, "field_equals": 5}
    return (order[a.kind], len(a.key), a.key, str(a.value)) < (order[b.kind], len(b.key), b.key, str(b.value))


def _passes(h: dict[str, Any], min_support: int, min_agreement: float, min_lower_bound: float) -> bool:
    n = h.get("fired", 0)
    return n >= min_support and h["agreement"] >= min_agreement and h["agreement_lower_95"] >= min_lower_bound


def _record(kept: list[Candidate], w: WhatIf, part: str) -> None:
    figures = {f.rule.split("/", 1)[1]: f for f in w.answering}
    for c in kept:
        f = figures.get(c.id)
        n, agree = (f.judged, f.agree) if f else (0, 0)
        fig = {"fired": n, "agree": agree, "agreement": agree / n if n else 0.0,
               "agreement_lower_95": 1.0 - clopper_pearson_upper(n - agree, n, CONFIDENCE) if n else 0.0,
               "saved_wh_point": f.saved_wh[1] if f else 0.0,
               "sessions": len(f.sessions) if f else 0}  # fmt: skip
        if part == "fit":
            c.fit = {**c.fit, **{f"replayed_{k}": v for k, v in fig.items()}}
        else:
            c.held_out = fig


def _name(cands: list[Candidate]) -> None:
    seen: Counter[str] = Counter()
    for c in cands:
        what = c.shape.replace("call:", "call-") if c.shape != "reply" else "reply"
        where = f"after-{c.situation[1]}" if c.situation[0] == "tool" else "on-user"
        base = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{where}-{what}").strip("-").replace("_", "-")
        seen[base] += 1
        c.id = base if seen[base] == 1 else f"{base}-{seen[base]}"


# --------------------------------------------------------------------------- writing the pack


def _user_regex(shapes: list[str]) -> str:
    """A regex with one named group per token kind (``v0``, ``v1``...): a token made only of
    that kind's classes of characters, holding each of them (``9A``: digits and capitals)."""
    parts = []
    for i, sh in enumerate(shapes):
        classes = {"A": "A-Z", "a": "a-z", "9": "0-9"}
        charset = "".join(classes.get(ch, re.escape(ch)) for ch in sh)
        looks = "".join(f"(?=[{charset}]*[{classes.get(ch, re.escape(ch))}])" for ch in sh)
        parts.append(rf"(?<![\w@$%+/:'-])(?P<v{i}>{looks}[{charset}]{{2,}})(?![\w@$%+/:'-])")
    return parts[0] if len(parts) == 1 else "".join(f"(?=.*{p})" for p in parts)


def _fill(body: Any, slots: list[tuple[str, str]]) -> Any:
    """A cache template's tool-call arguments with each slot as a rule template field."""
    if isinstance(body, dict):
        if set(body) == {"$slot"}:
            kind, where = slots[body["$slot"]]
            return f"{{result.{where}}}" if kind == "result" else f"{{{where}}}"
        return {k: _fill(v, slots) for k, v in body.items()}
    if isinstance(body, list):
        return [_fill(v, slots) for v in body]
    if isinstance(body, str):
        return body.replace("{", "{{").replace("}", "}}")
    return body


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def rule_data(c: Candidate, priority: int) -> dict[str, Any]:
    when: dict[str, Any] = {}
    if c.situation[0] == "tool":
        when["after_tool"] = c.situation[1]
    if c.user_shapes:
        when["regex"] = _user_regex(c.user_shapes)
    fields: dict[str, Any] = {}
    words_all, words_none = [], []
    for _, p in c.conditions:
        if p.kind == "field_exists":
            fields[p.key] = {"exists": True}
        elif p.kind == "field_missing":
            fields[p.key] = {"exists": False}
        elif p.kind == "field_equals":
            fields[p.key] = {"equals": p.value}
        elif p.kind == "word":
            words_all.append(p.key)
        elif p.kind == "no_word":
            words_none.append(p.key)
    turns = {p.kind: p.value for _, p in c.conditions if p.kind in ("turn_min", "turn_max")}
    if turns:
        when["turn"] = {k[5:]: v for k, v in sorted(turns.items(), reverse=True)}
    if fields:
        when["tool_result"] = {"tool": c.situation[1], "fields": fields}
    if words_all or words_none:
        when["keywords"] = {k: v for k, v in (("all", words_all), ("none", words_none)) if v}
    if not when:
        when["turn"] = {"min": 1}  # no condition but "the last message is the user's"
    data: dict[str, Any] = {"id": c.id, "description": _description(c), "priority": priority, "when": when}
    if c.constant is not None:
        calls = c.constant.get("tool_calls")
        if calls:
            fn = calls[0]["function"]
            data["tool_call"] = {"name": fn["name"], "arguments": _fill(json.loads(fn.get("arguments") or "{}"), [])}
        else:
            data["reply"] = _escape(content_text(c.constant.get("content")))
    elif c.template.kind == "tool_calls":
        ((name, args),) = c.template.body
        data["tool_call"] = {"name": name, "arguments": _fill(args, c.slots)}
    else:
        text = []
        for part in c.template.body:
            if isinstance(part, str):
                text.append(_escape(part))
            else:
                kind, where = c.slots[part]
                text.append(f"{{result.{where}}}" if kind == "result" else f"{{{where}}}")
        data["reply"] = "".join(text)
    return data


def _description(c: Candidate) -> str:
    where = f"after a {c.situation[1]} result" if c.situation[0] == "tool" else "on a user message"
    what = f"calls {c.shape[5:]}" if c.shape.startswith("call:") else "replies"
    how = "with values from the context" if c.slots else "always the same"
    text = f"{where.capitalize()}, {what} {how}; fitted on {c.support} recorded steps"
    h = c.held_out
    if h:
        text += f"; held out: {h['agree']}/{h['fired']} agree (lower bound {100 * h['agreement_lower_95']:.1f}% at 95%)"
    return text


def render_pack(cands: list[Candidate], *, pack: str, settings: dict[str, Any]) -> str:
    head = [
        "# Suggested by `milliwatt rules suggest`: REVIEW EVERY RULE BEFORE SHIPPING.",
        f"# Source: {settings.get('source') or '(in memory)'}; sessions split by session id (seed {settings['seed']}),",
        f"# fitted on one part, checked on the held-out part ({100 * settings['held_out_share']:g}% of sessions).",
        f"# Kept: rules answering >= {settings['min_support']} held-out steps with agreement >= {100 * settings['min_agreement']:g}%"
        + (f" and a {100 * settings['confidence']:g}% Clopper-Pearson lower bound >= {100 * settings['min_lower_bound']:g}%."
           if settings["min_lower_bound"] > 0 else f"; each states its {100 * settings['confidence']:g}% Clopper-Pearson lower bound."),
    ]  # fmt: skip
    rules = []
    for k, c in enumerate(cands):
        data = rule_data(c, priority=len(cands) - k)
        text = yaml.safe_dump([data], sort_keys=False, allow_unicode=True, width=1000)
        notes = [f"# {c.id}: fitted support {c.support} steps in {len(c.sessions)} sessions"]
        if c.fit:
            notes.append(f"#   fit: {c.fit.get('replayed_agree', c.fit.get('agree'))}/{c.fit.get('replayed_fired', c.fit.get('fired'))} agree"
                         f" ({c.fit.get('situation_steps')} steps in its situation)")  # fmt: skip
        if c.held_out:
            h = c.held_out
            notes.append(f"#   held out: {h['agree']}/{h['fired']} agree ({100 * h['agreement']:.1f}%, lower bound "
                         f"{100 * h['agreement_lower_95']:.1f}% at 95%) in {h['sessions']} sessions; saves {h['saved_wh_point']:.3g} Wh")  # fmt: skip
        if c.conditions:
            notes.append("#   conditions: " + "; ".join(d for d, _ in c.conditions))
        rules.append("\n".join(notes) + "\n" + text)
    body = "".join("  " + line if line.strip() and not line.startswith("#") else ("  " + line if line.startswith("#") else line)
                   for r in rules for line in r.splitlines(keepends=True))  # fmt: skip
    out = "\n".join(head) + f"\npack: {pack}\n"
    if cands:
        out += "rules:\n" + body
    else:
        out += "rules: []  # nothing passed the held-out check\n"
    return out


def _load_text(text: str) -> Any:
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "suggested.yaml"
        p.write_text(text, encoding="utf-8")
        return load_rules(p)
