"""A compiled rule set: rules in priority order, matched against a step in microseconds.

Everything a rule needs is compiled when it is loaded (regexes, keyword sets, templates,
and the prefilter index, ``rules/index.py``), so matching looks up the few rules that can
hold for the step (by its shape, its words and its tools) and checks those in priority
order, set lookups first and a regex last. The first that holds and answers wins, exactly
as a walk down every rule would find it (``evaluate(step, linear=True)`` is that walk).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from milliwatt.types import Message, Step, StepMeta

from .actions import Action, Budget, Declined, Reply, Route
from .conditions import Conditions, StepView
from .index import Index
from .templates import MISSING

EMPTY_VERSION = hashlib.sha256(b"").hexdigest()[:12]


@dataclass(frozen=True)
class Rule:
    """One validated, compiled rule, with where it was defined."""

    id: str
    pack: str
    when: Conditions
    action: Action
    priority: int = 0
    description: str = ""
    path: str = ""
    line: int | None = None
    column: int | None = None

    @property
    def qualified_id(self) -> str:
        return f"{self.pack}/{self.id}"


@dataclass(frozen=True)
class RuleMatch:
    """The rule that answered a step: its reply or tool call, or the tier it routes to."""

    rule: Rule
    captures: Mapping[str, str | None]
    message: Message | None  # None for a route or a budget
    skip_to: str | None  # the tier a route rule sends the step to
    forbid: frozenset[str] = frozenset()  # tiers a route rule says not to ask
    token_budget: int | None = None  # a budget rule's cap on later tiers' input tokens

    @property
    def label(self) -> str | None:
        return self.rule.action.label if isinstance(self.rule.action, Reply) else None


@dataclass(frozen=True)
class Evaluation:
    """The outcome of matching one step: the match, and the rules whose conditions held
    but whose action declined the step (with why), for the pass reason."""

    match: RuleMatch | None
    declined: tuple[str, ...] = ()


class RuleSet:
    """Rules sorted by priority (higher first); equal priorities keep their load order.

    ``version``: 12 hex digits of the SHA-256 of the files' bytes, in load order (what the
    ledger records as ``pack_version``)."""

    def __init__(self, rules: Iterable[Rule] = (), *, version: str | None = None) -> None:
        self.rules: tuple[Rule, ...] = tuple(sorted(rules, key=lambda r: -r.priority))
        self.version = version or EMPTY_VERSION
        self.index = Index(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    @property
    def packs(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.pack for r in self.rules))

    def match(self, step: Step) -> RuleMatch | None:
        return self.evaluate(step).match

    def match_text(
        self,
        text: str,
        *,
        meta: StepMeta | None = None,
        tools: Sequence[dict[str, Any]] = (),
        history: Sequence[Message] = (),
    ) -> RuleMatch | None:
        """Which rule would answer this user message (after ``history``): for trying rules
        out before deploying them, in a test or a shell."""
        return self.match(Step.create([*history, {"role": "user", "content": text}], tools=list(tools), meta=meta))

    def evaluate(self, step: Step, *, linear: bool = False) -> Evaluation:
        """The first rule, in priority order, whose conditions hold and whose action answers.
        ``linear``: check every rule instead of the index's candidates (the same outcome)."""
        view = StepView.of(step)
        rules = self.rules
        order: Iterable[Rule] = rules if linear else (rules[i] for i in self.index.candidates(view))
        declined: list[str] = []
        for rule in order:
            captures = rule.when.check(view)
            if captures is None:
                continue
            action = rule.action
            if isinstance(action, Route):
                return Evaluation(RuleMatch(rule, captures, None, action.tier, action.forbid), tuple(declined))
            if isinstance(action, Budget):
                return Evaluation(RuleMatch(rule, captures, None, None, token_budget=action.max_input_tokens), tuple(declined))
            try:
                message = action.render(step, captures, view.result if action.uses_result else MISSING)
            except Declined as why:
                declined.append(f"{rule.qualified_id} ({why})")
                continue
            except Exception as e:  # noqa: BLE001 - a rule that cannot render passes; the step goes on
                declined.append(f"{rule.qualified_id} (could not render: {type(e).__name__}: {e})")
                continue
            return Evaluation(RuleMatch(rule, captures, message, None), tuple(declined))
        return Evaluation(None, tuple(declined))
