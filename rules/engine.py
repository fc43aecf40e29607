"""A compiled rule set: rules in priority order, matched against a step in microseconds.

Everything a rule needs is compiled when it is loaded (regexes, keyword sets, templates),
so matching is a walk down the rules with set lookups first and a regex last. At tens of
rules that walk costs less than building an inverted keyword index would save.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from milliwatt.types import Message, Step, StepMeta

from .actions import Action, Declined, Reply, Route
from .conditions import Conditions, StepView


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

    @property
    def qualified_id(self) -> str:
        return f"{self.pack}/{self.id}"


@dataclass(frozen=True)
class RuleMatch:
    """The rule that answered a step: its reply or tool call, or the tier it routes to."""

    rule: Rule
    captures: Mapping[str, str | None]
    message: Message | None  # None for a route
    skip_to: str | None  # the tier a route rule sends the step to

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
    """Rules sorted by priority (higher first); equal priorities keep their load order."""

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(sorted(rules, key=lambda r: -r.priority))

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

    def evaluate(self, step: Step) -> Evaluation:
        view = StepView.of(step)
        declined: list[str] = []
        for rule in self.rules:
            captures = rule.when.check(view)
            if captures is None:
                continue
            action = rule.action
            if isinstance(action, Route):
                return Evaluation(RuleMatch(rule, captures, None, action.tier), tuple(declined))
            try:
                message = action.render(step, captures)
            except Declined as why:
                declined.append(f"{rule.qualified_id} ({why})")
                continue
            return Evaluation(RuleMatch(rule, captures, message, None), tuple(declined))
        return Evaluation(None, tuple(declined))
