"""The prefilter: which rules can possibly hold for a step, found by lookups, not by a walk.

Each rule is filed under the **shape** of step it can act on (last message a user message,
or a tool result) and under a set of **keys**, at least one of which every step it holds
for must have: a keyword of ``keywords.any`` (or one of ``keywords.all``, or a phrase's
first word), a whole word the rule's regex must match (``\\border\\b``, ``^(?:hi|hello)\\b``:
a literal word between word boundaries, derived from the parsed regex where that is safe),
the tool the last message answers (``after_tool: [names]``), or the tool of the latest tool
result (``tool_result.tool``). A rule with none of these is checked for every step of its
shape. A step looks up its own keys (its words, split also at apostrophes, and its tools)
and checks only the rules found, in priority order: the keys are necessary conditions, so
the first rule that holds is the one a walk over every rule would find.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from .conditions import Conditions, KeywordSet, StepView
from .redos import C, _flatten, sre_parse

if TYPE_CHECKING:
    from .engine import Rule

Option = frozenset[str]  # keys, any one of which a step must have
_ASCII_WORD = re.compile(r"[a-z0-9_]+")
_W = re.compile(r"\w")
_AFTER, _RESULT = "\0after:", "\0tool:"
_ROLES = ("user", "tool")


class Index:
    """Rules (by position in priority order) filed by step shape and key."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.size = len(rules)
        self.by_key: dict[str, dict[str, list[int]]] = {role: {} for role in _ROLES}
        self.always: dict[str, list[int]] = {role: [] for role in _ROLES}
        self.tool_keys = False  # does any rule need the latest tool result's tool as a key?
        self.keyed = 0
        for pos, rule in enumerate(rules):
            keys = best(options(rule.when))
            if keys is not None:
                self.keyed += 1
                self.tool_keys = self.tool_keys or any(k.startswith(_RESULT) for k in keys)
            for role in ("user", "tool") if rule.when.mid_loop else ("user",):
                if keys is None:
                    self.always[role].append(pos)
                else:
                    for k in keys:
                        self.by_key[role].setdefault(k, []).append(pos)

    def candidates(self, view: StepView) -> list[int]:
        """Positions of the rules that may hold for this step, in priority order."""
        role = view.last_role
        if role not in self.by_key:
            return []
        table = self.by_key[role]
        found = set(self.always[role])
        if table:
            for k in step_keys(view, self.tool_keys):
                hit = table.get(k)
                if hit is not None:
                    found.update(hit)
        return sorted(found)


def step_keys(view: StepView, tool_keys: bool) -> Iterable[str]:
    keys: set[str] | frozenset[str] = view.tokens
    extra = []
    if view.last_role == "tool" and view.after_tool:
        extra.append(_AFTER + view.after_tool)
    if tool_keys and view.latest_result_tool:
        extra.append(_RESULT + view.latest_result_tool)
    if "\u0131" in view.folded or "\u0307" in view.folded:  # (?i) matches i with dotless ı and İ
        extra.extend(re.findall(r"\w+", view.folded.translate({0x131: "i", 0x307: None})))
    return keys.union(extra) if extra else keys


def best(opts: list[Option]) -> Option | None:
    """The option that should find the fewest rules: tool keys first, then the fewest and longest words."""
    if not opts:
        return None
    return min(opts, key=lambda o: (not all(k.startswith("\0") for k in o), len(o), -min(len(k) for k in o)))


def options(c: Conditions) -> list[Option]:
    """Every key set that the conditions make necessary (any one may serve as the rule's keys)."""
    opts: list[Option] = []
    if c.any_keywords is not None:
        opts.append(_keyword_keys(c.any_keywords))
    if c.all_keywords is not None:
        opts.extend(frozenset([k]) for k in _keyword_keys(c.all_keywords))
    if c.regex is not None:
        opts.extend(regex_options(c.regex))
    if c.after_tools:
        opts.append(frozenset(_AFTER + n for n in c.after_tools))
    if c.tool_result is not None and c.tool_result.tools:
        opts.append(frozenset(_RESULT + n for n in c.tool_result.tools))
    for sub in c.all_of:
        opts.extend(options(sub))
    if c.any_of:
        branches = [best(options(sub)) for sub in c.any_of]
        if all(b is not None for b in branches):
            opts.append(frozenset().union(*branches))  # type: ignore[arg-type]
    return [o for o in opts if o]


def _keyword_keys(kw: KeywordSet) -> Option:
    return kw.words | frozenset(p.split()[0] for p in kw.phrases)


# ------------------------------------------------------------------ words a regex must match


def regex_options(pattern: re.Pattern[str]) -> list[Option]:
    """Key sets a match of the regex implies: whole ASCII words it must match, between word
    boundaries (``\\b``, ``^``, ``$``, or a character that is not a word character)."""
    if pattern.flags & re.ASCII:  # \b by ASCII rules: 'order' inside 'éorder' is a word
        return []
    try:
        parsed = sre_parse.parse(pattern.pattern, pattern.flags)
    except re.error:  # pragma: no cover - it compiled
        return []
    return _sequence_options(list(parsed), left=False, right=False)


def _sequence_options(seq: list[Any], *, left: bool, right: bool) -> list[Option]:
    """``left``/``right``: is there a word boundary just before/after the sequence?"""
    flat = _flatten(seq)
    opts: list[Option] = []
    i = 0
    while i < len(flat):
        op, av = flat[i]
        if op is C.LITERAL and _W.match(chr(av)):
            j = i
            while j < len(flat) and flat[j][0] is C.LITERAL and _W.match(chr(flat[j][1])):
                j += 1
            lb = _bounded(flat, i - 1, -1, left)
            word = "".join(chr(av) for _, av in flat[i:j]).casefold()
            if lb and _bounded(flat, j, 1, right):
                if _ASCII_WORD.fullmatch(word):
                    opts.append(frozenset([word]))
            elif lb and j < len(flat) and _literalish(*flat[j]):  # cancel(?:led)?  h(?:i|ello|ey)
                opt = _expanded(flat, i, lb, right)
                if opt:
                    opts.append(opt)
            i = j
            continue
        if op is C.BRANCH or _literalish(op, av):
            lb = _bounded(flat, i - 1, -1, left)
            opt = _expanded(flat, i, lb, right) if lb else None
            if opt:
                opts.append(opt)
            elif op is C.BRANCH:
                after = _bounded(flat, i + 1, 1, right)
                alts = [best(_sequence_options(list(b), left=lb, right=after)) for b in av[1]]
                if all(a is not None for a in alts):
                    opts.append(frozenset().union(*alts))  # type: ignore[arg-type]
        i += 1
    return opts


def _literalish(op: Any, av: Any) -> bool:
    """A literal, an alternation, or an optional part: what ``_expand`` can spell out."""
    return op is C.LITERAL or op is C.BRANCH or (op in (C.MAX_REPEAT, C.MIN_REPEAT) and av[0] == 0 and av[1] == 1)


def _expanded(flat: list[Any], i: int, left: bool, right: bool) -> Option | None:
    """The first words of every text the literal-ish items from ``flat[i]`` can spell (``h(?:i|ey)``:
    ``hi``, ``hey``), when each is a whole word; else None."""
    strings, j = _expand(flat, i)
    if not strings or j == i or not left:
        return None
    words = set()
    for text in strings:
        m = _W_RUN.match(text)
        if m is None:
            return None
        if m.end() == len(text) and not _bounded(flat, j, 1, right):
            return None
        word = m.group(0).casefold()
        if not _ASCII_WORD.fullmatch(word):
            return None
        words.add(word)
    return frozenset(words)


_W_RUN = re.compile(r"\w+")
_MAX_SPELLINGS = 64


def _expand(flat: list[Any], i: int) -> tuple[set[str] | None, int]:
    """The texts ``flat[i:j]`` can match, for the longest literal-ish stretch from ``i``."""
    strings = {""}
    j = i
    while j < len(flat) and _literalish(*flat[j]):
        op, av = flat[j]
        if op is C.LITERAL:
            strings = {s + chr(av) for s in strings}
        else:
            parts = [list(b) for b in av[1]] if op is C.BRANCH else [list(av[2]), []]
            alts: set[str] = set()
            for part in parts:
                spelled, k = _expand(_flatten(part), 0)
                if spelled is None or k != len(_flatten(part)):
                    return (strings if j > i else None), j
                alts |= spelled
            strings = {s + a for s in strings for a in alts}
        if len(strings) > _MAX_SPELLINGS:
            return None, i
        j += 1
    return strings, j


def _bounded(flat: list[Any], i: int, step: int, edge: bool) -> bool:
    """Walking from ``flat[i]`` away from a literal word: is the word's edge a word boundary?"""
    while 0 <= i < len(flat):
        op, av = flat[i]
        if op is C.AT:
            ok = (C.AT_BOUNDARY, C.AT_BEGINNING, C.AT_BEGINNING_STRING) if step < 0 else (C.AT_BOUNDARY, C.AT_END, C.AT_END_STRING)
            return av in ok
        if op in (C.MAX_REPEAT, C.MIN_REPEAT) and len(av[2]) == 1 and _nonword(*list(av[2])[0]):
            if av[0] >= 1:
                return True  # at least one non-word character there
            i += step  # possibly empty: look further
            continue
        return _nonword(op, av)
    return edge


def _nonword(op: Any, av: Any) -> bool:
    """Does this one-character item match only characters that are not word characters?"""
    if op is C.LITERAL:
        return not _W.match(chr(av))
    if op is C.IN:
        for iop, iav in av:
            if iop is C.LITERAL:
                if _W.match(chr(iav)):
                    return False
            elif iop is C.RANGE:
                lo, hi = iav
                if hi - lo > 2048 or any(_W.match(chr(x)) for x in range(lo, hi + 1)):
                    return False
            elif iop is C.CATEGORY:
                if iav not in (C.CATEGORY_SPACE, C.CATEGORY_NOT_WORD, C.CATEGORY_LINEBREAK):
                    return False
            else:  # NEGATE and the rest
                return False
        return True
    return False
