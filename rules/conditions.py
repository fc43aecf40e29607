"""The ``when`` part of a rule, and the view of a step that every condition reads.

The view is computed once per step (last user text, its words, who is asking) so that
twenty rules cost twenty cheap checks, not twenty scans of the conversation. Within a
rule the checks run cheapest first and the regex last: set lookups on the message's
words reject most rules before any regex runs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from milliwatt.types import Step

# A word: letters/digits/underscore, with inner apostrophes kept ("can't", "o'clock").
_WORD = re.compile(r"\w+(?:['’]\w+)*")

META_KEYS = ("agent", "tenant", "session_id")


def words_of(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


@dataclass(frozen=True)
class StepView:
    """What the conditions of every rule look at, computed once per step."""

    step: Step
    last_role: str
    user_text: str  # the last user message ("" if there is none)
    words: frozenset[str]  # its words, case-folded
    padded: str  # its words joined by single spaces and padded, for phrase search
    first_turn: bool  # no assistant message yet
    tools: frozenset[str]  # names of the tools the step offers

    @classmethod
    def of(cls, step: Step) -> StepView:
        user_text = step.last_user_text
        ws = words_of(user_text)
        return cls(
            step,
            step.messages[-1]["role"],
            user_text,
            frozenset(ws),
            " " + " ".join(ws) + " ",
            not any(m["role"] == "assistant" for m in step.messages),
            frozenset(t["function"]["name"] for t in step.tools),
        )


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
    """All given conditions must hold. ``check`` returns the regex captures, or None."""

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

    def check(self, view: StepView) -> dict[str, str | None] | None:
        # Mid tool loop (last message a tool result) the agent is waiting for the model to
        # read the result; only rules that opt in with after_tool may act there.
        if view.last_role != "user" and not (self.after_tool and view.last_role == "tool"):
            return None
        meta = view.step.meta
        for attr, allowed in self.meta:
            if getattr(meta, attr) not in allowed:
                return None
        if self.first_turn is not None and view.first_turn != self.first_turn:
            return None
        if self.max_chars is not None and len(view.user_text) > self.max_chars:
            return None
        if not self.tools <= view.tools:
            return None
        if self.any_keywords is not None and not self.any_keywords.any_in(view):
            return None
        if self.all_keywords is not None and not self.all_keywords.all_in(view):
            return None
        if self.no_keywords is not None and self.no_keywords.any_in(view):
            return None
        if self.regex is None:
            return {}
        m = self.regex.search(view.user_text)
        return None if m is None else m.groupdict()
