"""A static check for regexes that can backtrack exponentially (ReDoS), run when a rule loads.

Python's ``re`` is a backtracking engine: ``(a+)+$`` against thirty ``a`` and a ``!`` tries
about 2^30 ways to split the ``a`` before it fails. A rule's regex runs on every user message
the agent receives, so one such pattern lets any user stall the event loop. The loader refuses
two shapes, the causes of nearly every exponential regex:

1. **A repeated group that contains a variable repeat, with nothing that separates the
   repetitions**: ``(a+)+``, ``(a*)*``, ``(\\w+\\s?)+$``, ``(x+x+)+``, ``(.*a)+``. Each
   repetition of the outer group can take more or fewer characters, so one text splits in
   exponentially many ways. It is safe when the group also has a *mandatory* part that the
   inner repeat cannot match, such as ``(\\w+,)*`` or ``(\\d+\\.)+`` or ``(\\w+\\s)+``: the
   separator pins down where each repetition ends.
2. **A repeated alternation whose branches can match the same text**: ``(a|a)*``,
   ``(a|ab)*``, ``(\\w|\\d)+``. Two literal branches conflict when one is a prefix of the
   other; other branches when they can begin with the same character.

"Repeated" means unbounded (``*``, ``+``, ``{n,}``) or allowing ten or more repetitions.
Possessive repeats and atomic groups (``a++``, ``(?>...)``) cannot backtrack and are
accepted. The check is conservative, so it refuses a few patterns that are in fact fast
(``(?:ab|ac)+``); rewrite them (``a[bc]``). It is a static approximation over a sample of
characters (ASCII, Latin-1 and some others), never a guarantee for every pattern.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Any

try:  # Python 3.11+
    from re import _constants as C  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants as C  # type: ignore[no-redef]
    import sre_parse  # type: ignore[no-redef]

_UNIVERSE = frozenset(
    [chr(i) for i in range(256)] + ["\u0100", "\u0131", "\u03b1", "\u0416", "\u05d0", "\u4e2d", "\u2028", "\u2019", "\u3000", "\uff11", "\U0001f600"]
)
_CATEGORIES = {
    C.CATEGORY_DIGIT: r"\d", C.CATEGORY_NOT_DIGIT: r"\D", C.CATEGORY_SPACE: r"\s", C.CATEGORY_NOT_SPACE: r"\S",
    C.CATEGORY_WORD: r"\w", C.CATEGORY_NOT_WORD: r"\W",
}
_CATEGORY_SETS = {cat: frozenset(c for c in _UNIVERSE if re.fullmatch(rx, c)) for cat, rx in _CATEGORIES.items()}
_OUTER_MAX = 10  # a group repeated this many times or more counts as repeated
_REPEATS = (C.MAX_REPEAT, C.MIN_REPEAT)


def exponential_risk(pattern: str, flags: int = 0) -> str | None:
    """Why ``pattern`` can backtrack exponentially, or None when neither shape is found."""
    try:
        parsed = sre_parse.parse(pattern, flags)
    except re.error:
        return None  # the caller reports the bad regex itself
    all_flags = flags | parsed.state.flags
    checker = _Checker(bool(all_flags & re.IGNORECASE))
    why = checker.first_risk(list(parsed))
    if why:
        return why
    # The parser turns an alternation of single characters into a set ((a|a) becomes [a]), so
    # repeated alternations are also read from the text, each branch parsed on its own.
    for branches in _repeated_alternations(pattern):
        try:
            parsed_branches = [list(sre_parse.parse(b, all_flags & ~re.VERBOSE if "#" in b else all_flags)) for b in branches]
        except re.error:
            continue  # e.g. a branch that refers to a group outside it
        why = checker._branch_risk(parsed_branches)
        if why:
            return why
    return None


_QUANTIFIER = re.compile(r"(?:\*|\+|\{(\d*),(\d*)\})(?![+])")  # not possessive (a trailing +)


def _repeated_alternations(pattern: str) -> Iterator[list[str]]:
    """The branches of every group with an alternation that a quantifier repeats, as text."""
    stack: list[tuple[int, list[int], bool]] = []  # (start of the group's body, positions of its |, counted)
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if c == "[":  # a character class: skip to its closing ]
            j = i + 1
            if j < n and pattern[j] == "^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 2 if pattern[j] == "\\" else 1
            i = j + 1
            continue
        if c == "(":
            body, counted = i + 1, True
            if pattern.startswith("?", body):
                m = re.match(r"\?(?:P<\w+>|:|>|[aiLmsux-]+:)", pattern[body:])
                if m:
                    body += m.end()
                else:  # lookaround, comment, back-reference, conditional: not a repeated branch
                    counted = False
            stack.append((body, [], counted))
        elif c == "|" and stack:
            stack[-1][1].append(i)
        elif c == ")" and stack:
            body, bars, counted = stack.pop()
            q = _QUANTIFIER.match(pattern, i + 1)
            repeated = q is not None and (q.group(0) in "*+" or not q.group(2) or int(q.group(2)) >= _OUTER_MAX)
            if counted and bars and repeated:
                edges = [body - 1, *bars, i]
                yield [pattern[a + 1 : b] for a, b in zip(edges, edges[1:])]
        i += 1


class _Checker:
    def __init__(self, ignorecase: bool) -> None:
        self.ignorecase = ignorecase

    def first_risk(self, seq: list[Any]) -> str | None:
        for op, av in seq:
            if op in _REPEATS:
                hi, body = av[1], list(av[2])
                if hi == C.MAXREPEAT or hi >= _OUTER_MAX:
                    why = self._repeat_risk(body)
                    if why:
                        return why
            for sub in _children(op, av):  # possessive and atomic parts too: backtracking inside them
                why = self.first_risk(sub)
                if why:
                    return why
        return None

    def _repeat_risk(self, body: list[Any]) -> str | None:
        if self._unseparated(body, []):
            return ("nested quantifiers: a repeated group holds a variable-length repeat and nothing that marks "
                    "where one repetition ends (like (a+)+ or (\\w+\\s?)+)")
        for op, av in _flatten(body):
            if op is C.BRANCH:
                why = self._branch_risk([list(b) for b in av[1]])
                if why:
                    return why
        return None

    def _unseparated(self, seq: list[Any], separators: list[frozenset[str]]) -> bool:
        """Does the sequence hold a variable repeat that no mandatory item around it (in the
        sequence, or in the enclosing ones: ``separators``) is disjoint from?"""
        flat = _flatten(seq)
        mandatory = [(j, self.chars([x])) for j, x in enumerate(flat) if not self.nullable([x])]
        for i, (op, av) in enumerate(flat):
            around = separators + [cs for j, cs in mandatory if j != i]
            if op in _REPEATS and av[1] != av[0]:
                inner = self.chars(list(av[2]))
                if not any(cs.isdisjoint(inner) for cs in around):
                    return True
            elif op is C.BRANCH and any(self._unseparated(list(b), around) for b in av[1]):
                return True
        return False

    def _branch_risk(self, branches: list[list[Any]]) -> str | None:
        for i, a in enumerate(branches):
            for b in branches[i + 1 :]:
                ta, tb = self.literal(a), self.literal(b)
                if ta is not None and tb is not None:
                    if self.ignorecase:
                        ta, tb = ta.casefold(), tb.casefold()
                    clash = ta.startswith(tb) or tb.startswith(ta)
                    clash = clash and (ta != "" or tb != "")
                else:
                    clash = not self.first(a).isdisjoint(self.first(b))
                if clash:
                    return ("a repeated alternation whose branches can match the same text (like (a|a)* or (a|ab)*): "
                            "make the branches exclusive")
        return None

    # ---------------------------------------------------------------- character sets

    def chars(self, seq: Iterable[Any]) -> frozenset[str]:
        """Every character the sequence can consume (an over-approximation)."""
        out: set[str] = set()
        for op, av in seq:
            one = self.single(op, av)
            if one is not None:
                out |= one
            else:
                for sub in _children(op, av, lookarounds=False):
                    out |= self.chars(sub)
        return frozenset(out)

    def first(self, seq: list[Any]) -> frozenset[str]:
        """The characters a match of the sequence can begin with."""
        out: set[str] = set()
        for op, av in seq:
            one = self.single(op, av)
            if one is not None:
                out |= one
            elif op in _REPEATS or op is getattr(C, "POSSESSIVE_REPEAT", None):
                out |= self.first(list(av[2]))
            elif op is C.SUBPATTERN:
                out |= self.first(list(av[-1]))
            elif op is C.BRANCH:
                for b in av[1]:
                    out |= self.first(list(b))
            elif op is getattr(C, "ATOMIC_GROUP", None):
                out |= self.first(list(av))
            elif op is C.GROUPREF_EXISTS:
                out |= self.first(list(av[1])) | (self.first(list(av[2])) if av[2] else frozenset())
            elif op is C.GROUPREF:
                return _UNIVERSE
            if not self.nullable([(op, av)]):
                break
        return frozenset(out)

    def single(self, op: Any, av: Any) -> frozenset[str] | None:
        """The characters a one-character item matches; None when it is not one."""
        if op is C.LITERAL:
            return self._case(frozenset(chr(av)))
        if op is C.NOT_LITERAL:
            return _UNIVERSE - self._case(frozenset(chr(av)))
        if op is C.ANY:
            return _UNIVERSE
        if op is C.IN:
            out: set[str] = set()
            negate = False
            for iop, iav in av:
                if iop is C.NEGATE:
                    negate = True
                elif iop is C.LITERAL:
                    out.add(chr(iav))
                elif iop is C.RANGE:
                    lo, hi = iav
                    out |= {c for c in _UNIVERSE if lo <= ord(c) <= hi}
                elif iop is C.CATEGORY:
                    out |= _CATEGORY_SETS.get(iav, _UNIVERSE)
                else:
                    out |= _UNIVERSE
            s = self._case(frozenset(out))
            return _UNIVERSE - s if negate else s
        return None

    def _case(self, s: frozenset[str]) -> frozenset[str]:
        if not self.ignorecase:
            return s
        return s | {c.swapcase() for c in s if len(c.swapcase()) == 1} | {c.casefold() for c in s if len(c.casefold()) == 1}

    def nullable(self, seq: list[Any]) -> bool:
        """Can the sequence match the empty string?"""
        for op, av in seq:
            if self.single(op, av) is not None:
                return False
            if op in _REPEATS or op is getattr(C, "POSSESSIVE_REPEAT", None):
                if av[0] > 0 and not self.nullable(list(av[2])):
                    return False
            elif op is C.SUBPATTERN:
                if not self.nullable(list(av[-1])):
                    return False
            elif op is getattr(C, "ATOMIC_GROUP", None):
                if not self.nullable(list(av)):
                    return False
            elif op is C.BRANCH:
                if not any(self.nullable(list(b)) for b in av[1]):
                    return False
            elif op is C.GROUPREF_EXISTS:
                if not (self.nullable(list(av[1])) or not av[2] or self.nullable(list(av[2]))):
                    return False
            # AT, ASSERT, ASSERT_NOT, GROUPREF: may be empty
        return True

    def literal(self, seq: list[Any]) -> str | None:
        """The text a sequence of plain literals matches (None if it is anything else)."""
        out = []
        for op, av in seq:
            if op is C.LITERAL:
                out.append(chr(av))
            elif op is C.SUBPATTERN:
                inner = self.literal(list(av[-1]))
                if inner is None:
                    return None
                out.append(inner)
            else:
                return None
        return "".join(out)


def _children(op: Any, av: Any, *, lookarounds: bool = True) -> Iterator[list[Any]]:
    """The subpatterns nested in one item (for walking the whole tree)."""
    if op in _REPEATS or op is getattr(C, "POSSESSIVE_REPEAT", None):
        yield list(av[2])
    elif op is C.SUBPATTERN:
        yield list(av[-1])
    elif op is C.BRANCH:
        for b in av[1]:
            yield list(b)
    elif op is getattr(C, "ATOMIC_GROUP", None):
        yield list(av)
    elif op in (C.ASSERT, C.ASSERT_NOT):
        if lookarounds:
            yield list(av[1])
    elif op is C.GROUPREF_EXISTS:
        yield list(av[1])
        if av[2]:
            yield list(av[2])


def _flatten(seq: list[Any]) -> list[Any]:
    """The items of a sequence with plain groups opened up (``((a+),)`` is ``a+ ,``)."""
    out: list[Any] = []
    for op, av in seq:
        if op is C.SUBPATTERN:
            out.extend(_flatten(list(av[-1])))
        else:
            out.append((op, av))
    return out
