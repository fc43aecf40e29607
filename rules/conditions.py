"""The ``when`` part of a rule, and the view of a step that every condition reads.

The view is computed once per step (last user text, its words, who is asking) so that
twenty rules cost twenty cheap checks, not twenty scans of the conversation. Within a
rule the checks run cheapest first and the regex last: set lookups on the message's
words reject most rules before any regex runs.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from milliwatt.quality import json_equal
from milliwatt.types import Message, Step, content_text

from .templates import MISSING, dig

# A word: letters/digits/underscore, with inner apostrophes kept ("can't", "o'clock").
_WORD = re.compile(r"\w+(?:['’]\w+)*")

META_KEYS = ("agent", "tenant", "session_id", "user", "run_id")
_TOKEN = re.compile(r"\w+")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


class StepView:
    """What the conditions of every rule look at, computed once per step (the costlier parts,
    such as the latest tool result's JSON, only when a rule asks for them)."""

    def __init__(self, step: Step) -> None:
        self.step = step
        self.last_role: str = step.messages[-1]["role"]
        self.user_text: str = step.last_user_text  # the last user message ("" if there is none)
        self.folded = self.user_text.casefold()
        ws = _WORD.findall(self.folded)
        self.words: frozenset[str] = frozenset(ws)  # its words, case-folded
        self.padded = " " + " ".join(ws) + " "  # its words joined by single spaces, for phrase search

    @classmethod
    def of(cls, step: Step) -> StepView:
        return cls(step)

    @functools.cached_property
    def tokens(self) -> frozenset[str]:
        """Its words and their parts split at apostrophes (``order's``: ``order``, ``s``), for the index."""
        return self.words | frozenset(_TOKEN.findall(self.folded))

    @functools.cached_property
    def first_turn(self) -> bool:  # no assistant message yet
        return not any(m["role"] == "assistant" for m in self.step.messages)

    @functools.cached_property
    def turn(self) -> int:  # the number of user messages: 1 for the first turn
        return sum(1 for m in self.step.messages if m["role"] == "user")

    @functools.cached_property
    def tools(self) -> frozenset[str]:  # names of the tools the step offers
        return frozenset(t["function"]["name"] for t in self.step.tools)

    @functools.cached_property
    def latest_result_index(self) -> int | None:
        """The position of the last tool-result message (role ``tool``), if any."""
        msgs = self.step.messages
        for i in range(len(msgs) - 1, -1, -1):
            if msgs[i]["role"] == "tool":
                return i
        return None

    @functools.cached_property
    def latest_result_tool(self) -> str | None:
        """The tool whose call the latest tool result answers (by ``tool_call_id``)."""
        i = self.latest_result_index
        return None if i is None else tool_answered(self.step.messages, i)

    @functools.cached_property
    def after_tool(self) -> str | None:
        """The tool the last message answers, when the last message is a tool result."""
        return self.latest_result_tool if self.last_role == "tool" else None

    @functools.cached_property
    def result(self) -> Any:
        """The latest tool result's content parsed as JSON; MISSING when there is none or it is not JSON."""
        i = self.latest_result_index
        if i is None:
            return MISSING
        text = content_text(self.step.messages[i].get("content"))
        try:
            return json.loads(text)
        except ValueError:
            return MISSING


def tool_answered(messages: Sequence[Message], index: int) -> str | None:
    """The name of the tool called by the call that the tool message at ``index`` answers."""
    call_id = messages[index].get("tool_call_id")
    for i in range(index - 1, -1, -1):
        m = messages[i]
        if m["role"] == "assistant" and m.get("tool_calls"):
            for call in m["tool_calls"]:
                if call.get("id") == call_id:
                    return call.get("function", {}).get("name")
    return None


@dataclass(frozen=True)
class FieldTest:
    """One ``tool_result.fields`` entry: a dotted path and what its value must be."""

    path: tuple[str | int, ...]
    equals: tuple[Any, ...] | None = None  # must be JSON-equal to every one of these
    one_of: tuple[Any, ...] | None = None  # must be JSON-equal to one of these (``in``)
    regex: re.Pattern[str] | None = None
    exists: bool | None = None

    def holds(self, result: Any, captures: dict[str, str | None]) -> bool:
        value = dig(result, self.path)
        if self.exists is not None and (value is not MISSING) != self.exists:
            return False
        if value is MISSING:
            return self.equals is None and self.one_of is None and self.regex is None
        if self.equals is not None and not all(json_equal(value, e) for e in self.equals):
            return False
        if self.one_of is not None and not any(json_equal(value, e) for e in self.one_of):
            return False
        if self.regex is not None:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):
                return False
            m = self.regex.search(value if isinstance(value, str) else json.dumps(value))
            if m is None:
                return False
            captures.update(m.groupdict())
        return True


@dataclass(frozen=True)
class ToolResultTest:
    """``tool_result``: the latest tool result in the step, of one of ``tools`` if given."""

    tools: frozenset[str] | None = None
    fields: tuple[FieldTest, ...] = ()

    def holds(self, view: StepView, captures: dict[str, str | None]) -> bool:
        if view.latest_result_index is None:
            return False
        if self.tools is not None and view.latest_result_tool not in self.tools:
            return False
        result = view.result if self.fields else MISSING
        return all(f.holds(result, captures) for f in self.fields)


@dataclass(frozen=True)
class KeywordSet:
    """Case-insensitive whole-word keywords; a multi-word keyword matches as a phrase."""

    words: frozenset[str] = frozenset()
    phrases: tuple[str, ...] = ()  # padded " talk to a human " for search in StepView.padded

    @classmethod
    def of(cls, keywords: list[str]) -> KeywordSet:
        single, phrases = set(), []
        for k in keywords:
            ws = words_of(k)
            if len(ws) == 1:
                single.add(ws[0])
            else:
                phrases.append(" " + " ".join(ws) + " ")
        return cls(frozenset(single), tuple(phrases))

    def any_in(self, view: StepView) -> bool:
        return not self.words.isdisjoint(view.words) or any(p in view.padded for p in self.phrases)

    def all_in(self, view: StepView) -> bool:
        return self.words <= view.words and all(p in view.padded for p in self.phrases)


@dataclass(frozen=True)
class Conditions:
    """All given conditions must hold. ``check`` returns the captures, or None.

    ``all_of``/``any_of``/``none_of`` are nested conditions (``all``, ``any``, ``not``). Captures
    come from the regexes that held: the rule's, its ``tool_result`` field regexes, and the
    nested conditions' (for ``any``, the first branch that held; never from ``not``).
    """

    regex: re.Pattern[str] | None = None
    any_keywords: KeywordSet | None = None
    all_keywords: KeywordSet | None = None
    no_keywords: KeywordSet | None = None
    # (attribute of StepMeta, allowed values); a pack's ``scope`` adds its own entries.
    meta: tuple[tuple[str, frozenset[str]], ...] = ()
    tools: frozenset[str] = field(default_factory=frozenset)
    first_turn: bool | None = None
    max_chars: int | None = None
    after_tool: bool = False
    after_tools: frozenset[str] | None = None  # ``after_tool: [names]``: the last message answers one of these
    tool_result: ToolResultTest | None = None
    turn_min: int | None = None
    turn_max: int | None = None
    all_of: tuple[Conditions, ...] = ()
    any_of: tuple[Conditions, ...] = ()
    none_of: Conditions | None = None
    # May the rule act when the last message is a tool result (mid tool loop)? Set for the top
    # level when ``after_tool`` is given anywhere in the rule's conditions.
    mid_loop: bool = False

    def __post_init__(self) -> None:
        if self.after_tool or self.after_tools:
            object.__setattr__(self, "mid_loop", True)

    def check(self, view: StepView) -> dict[str, str | None] | None:
        # Mid tool loop (last message a tool result) the agent is waiting for the model to
        # read the result; only rules that opt in with after_tool may act there.
        if view.last_role != "user" and not (self.mid_loop and view.last_role == "tool"):
            return None
        captures: dict[str, str | None] = {}
        return captures if self.holds(view, captures) else None

    def holds(self, view: StepView, captures: dict[str, str | None]) -> bool:
        """Do the conditions hold (the role aside)? Adds the captures to ``captures``."""
        if self.meta:
            meta = view.step.meta
            for attr, allowed in self.meta:
                if getattr(meta, attr) not in allowed:
                    return False
        if self.after_tools is not None and view.after_tool not in self.after_tools:
            return False
        if self.first_turn is not None and view.first_turn != self.first_turn:
            return False
        if self.turn_min is not None and view.turn < self.turn_min:
            return False
        if self.turn_max is not None and view.turn > self.turn_max:
            return False
        if self.max_chars is not None and len(view.user_text) > self.max_chars:
            return False
        if self.tools and not self.tools <= view.tools:
            return False
        if self.any_keywords is not None and not self.any_keywords.any_in(view):
            return False
        if self.all_keywords is not None and not self.all_keywords.all_in(view):
            return False
        if self.no_keywords is not None and self.no_keywords.any_in(view):
            return False
        if self.tool_result is not None and not self.tool_result.holds(view, captures):
            return False
        if self.regex is not None:
            m = self.regex.search(view.user_text)
            if m is None:
                return False
            captures.update(m.groupdict())
        for sub in self.all_of:
            if not sub.holds(view, captures):
                return False
        if self.any_of:
            for sub in self.any_of:
                branch: dict[str, str | None] = {}
                if sub.holds(view, branch):
                    captures.update(branch)
                    break
            else:
                return False
        return self.none_of is None or not self.none_of.holds(view, {})
