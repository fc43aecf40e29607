"""The trimming pipeline: strategies applied in order to a working copy of one step.

A ``Strategy`` edits a ``Draft`` (the step's messages and tools, and what they count) in
place: it replaces a message, drops messages, or narrows the tools. The draft keeps the
input-token total up to date from the parts that changed, so a strategy never recounts the
whole request; counts come from the ``TokenCounter`` the accountant shares, and an agent
resends its context every step, so nearly every count is memoised.

The pipeline holds three promises whatever the strategies do (``Draft`` enforces them): the
system and developer prompts and the user's first request are never dropped, and a tool call
is never separated from its results (messages are dropped a call-and-results unit at a time).

A ``Trimmer`` is one tier's pipeline; the cascade holds one per tier. Its last move is the
tier's token budget (``budget.fit``), if it has one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..tokens import TokenCounter
from ..types import Message, Step
from .prefix import PrefixTracker


class Strategy(ABC):
    """One way of removing tokens. Subclasses set ``name`` (the config and ledger key)."""

    name: ClassVar[str]

    @abstractmethod
    def apply(self, draft: Draft) -> None:
        """Edit the draft in place (``replace``, ``drop``, ``offer``)."""

    def learn(self, step: Step, answer: Message) -> None:  # noqa: B027 - most strategies learn nothing
        """Called with each step's verified answer (one the cascade writes back)."""


@dataclass(frozen=True)
class Stage:
    """What one strategy did to one step."""

    strategy: str
    saved: int  # input tokens it removed
    changed: int  # messages it replaced or dropped, or tools it withheld
    step: Step  # the request after it (the audit attributes lost values to the first stage losing them)


@dataclass(frozen=True)
class Trimmed:
    """A step as one tier is sent it, and how it got there."""

    step: Step
    tokens_before: int
    tokens_after: int
    stages: tuple[Stage, ...] = ()
    fits: bool = True  # within the tier's token budget (or it has none)
    prefix_tokens: int = 0  # input tokens repeating the start of the tier's previous request in the session
    raw: Step | None = None  # the step as the agent sent it (None: ``step`` is it)

    @property
    def withheld(self) -> tuple[str, ...]:
        """Names of the agent's tools whose schemas this request does not carry."""
        if self.raw is None:
            return ()
        offered = {t["function"]["name"] for t in self.step.tools}
        return tuple(t["function"]["name"] for t in self.raw.tools if t["function"]["name"] not in offered)


def units(messages: Sequence[Message]) -> list[list[int]]:
    """Indices of the non-system messages grouped so a tool call and its results stay together."""
    out: list[list[int]] = []
    for i, m in enumerate(messages):
        if m["role"] in ("system", "developer"):
            continue
        if m["role"] == "tool" and out and messages[out[-1][0]].get("tool_calls"):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def protected(messages: Sequence[Message]) -> set[int]:
    """Messages no strategy may drop: system and developer prompts, the user's first request."""
    keep = {i for i, m in enumerate(messages) if m["role"] in ("system", "developer")}
    first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), None)
    if first_user is not None:
        keep.add(first_user)
    return keep


def call_names(messages: Iterable[Message]) -> dict[str, str]:
    """The tool name of every call id in the conversation."""
    return {
        c["id"]: c["function"]["name"]
        for m in messages if m["role"] == "assistant"
        for c in m.get("tool_calls") or []
    }  # fmt: skip


class Draft:
    """A working copy of a step: its messages and tools, and their token total, kept current."""

    def __init__(self, step: Step, counter: TokenCounter, tokens: int, reveal: frozenset[str] = frozenset()) -> None:
        self.step = step
        self.counter = counter
        self.reveal = reveal  # tools whose schemas the answering model asked for: never withheld
        self.messages: list[Message | None] = list(step.messages)  # None: dropped
        self.tools: list[dict[str, Any]] = list(step.tools)
        self.tokens = tokens
        self.protected = protected(step.messages)
        self._changed = 0
        self._tools_changed = False

    # ---------------------------------------------------------------- reading

    def live(self) -> Iterable[tuple[int, Message]]:
        """(index, message) of the messages not dropped, in order."""
        return ((i, m) for i, m in enumerate(self.messages) if m is not None)

    def tool_outputs(self) -> list[int]:
        return [i for i, m in self.live() if m["role"] == "tool"]

    def call_names(self) -> dict[str, str]:
        return call_names(m for _, m in self.live())

    def size(self, i: int) -> int:
        m = self.messages[i]
        return 0 if m is None else self.counter.message(m)

    # ---------------------------------------------------------------- editing

    def replace(self, i: int, message: Message) -> None:
        """Put ``message`` in place of message ``i`` (same role; a tool result keeps its call id)."""
        old = self.messages[i]
        if old is None:
            raise ValueError(f"message {i} was dropped")
        if message["role"] != old["role"] or message.get("tool_call_id") != old.get("tool_call_id"):
            raise ValueError(f"message {i}: a replacement keeps the role and the call it answers")
        self.tokens += self.counter.message(message) - self.counter.message(old)
        self.messages[i] = message
        self._changed += 1

    def drop(self, unit: Sequence[int]) -> None:
        """Drop a whole unit (``units``): a message, or a tool call with all its results."""
        if self.protected.intersection(unit):
            raise ValueError(f"messages {sorted(self.protected.intersection(unit))} are never dropped")
        for i in unit:
            if self.messages[i] is not None:
                self.tokens -= self.counter.message(self.messages[i])  # type: ignore[arg-type]
                self.messages[i] = None
                self._changed += 1

    def offer(self, tools: Sequence[dict[str, Any]], extra: Sequence[dict[str, Any]] = ()) -> None:
        """Offer only ``tools`` (a subset of the step's, kept in the step's order), then ``extra``
        (tools of milliwatt's own, such as the index of withheld tools)."""
        names = {t["function"]["name"] for t in tools}
        kept = [t for t in self.step.tools if t["function"]["name"] in names]
        if len(kept) == len(self.step.tools):
            return
        new = kept + list(extra)
        self.tokens += self.counter.tools(new) - self.counter.tools(self.tools)
        self._changed += len(self.step.tools) - len(kept)
        self.tools = new
        self._tools_changed = True

    # ---------------------------------------------------------------- result

    def snapshot(self) -> Step:
        messages = tuple(m for m in self.messages if m is not None)
        if messages == self.step.messages and not self._tools_changed:
            return self.step
        return Step(messages, tuple(self.tools), self.step.tool_choice, self.step.response_format, self.step.options, self.step.meta)

    def take_changed(self) -> int:
        n, self._changed = self._changed, 0
        return n


class Trimmer:
    """One tier's pipeline: ``strategies`` in order, then the tier's token budget.

    ``trim`` is pure CPU over one step (a few hundred microseconds once its messages are
    counted); the cascade runs it off the event loop when it has to tokenise.
    """

    def __init__(
        self,
        strategies: Sequence[Strategy] = (),
        *,
        counter: TokenCounter | None = None,
        keep_tool_results: int = 3,
        prefix: PrefixTracker | None = None,
    ) -> None:
        if keep_tool_results < 0:
            raise ValueError("keep_tool_results must be >= 0")
        names = [s.name for s in strategies]
        if len(set(names)) != len(names):
            raise ValueError(f"a strategy appears twice in {names}")
        self.strategies = tuple(strategies)
        self.counter = counter or TokenCounter()
        self.keep_tool_results = keep_tool_results  # what the token budget masks last
        self.prefix = prefix if prefix is not None else PrefixTracker()

    @property
    def encoding(self) -> str:
        return self.counter.encoding

    def count(self, step: Step) -> int:
        return self.counter.request(step.messages, step.tools)

    def trim(
        self, step: Step, budget: int | None = None, *, tokens_before: int | None = None, reveal: Collection[str] = ()
    ) -> Trimmed:
        """``step`` as the tier is to be sent it. ``reveal``: tools the model asked for after
        a first request without their schemas (``tools.wanted``); they are offered."""
        from .budget import fit

        before = tokens_before if tokens_before is not None else self.count(step)
        if not self.strategies and (budget is None or before <= budget):
            return Trimmed(step, before, before, prefix_tokens=self.prefix.observe(step, self.counter))
        draft = Draft(step, self.counter, before, frozenset(reveal))
        stages: list[Stage] = []
        for strategy in self.strategies:
            start = draft.tokens
            strategy.apply(draft)
            stages.append(Stage(strategy.name, start - draft.tokens, draft.take_changed(), draft.snapshot()))
        if budget is not None and draft.tokens > budget:
            start = draft.tokens
            fit(draft, budget, self.keep_tool_results)
            stages.append(Stage("budget", start - draft.tokens, draft.take_changed(), draft.snapshot()))
        sent = stages[-1].step if stages else step
        return Trimmed(
            sent, before, draft.tokens, tuple(stages), fits=budget is None or draft.tokens <= budget,
            prefix_tokens=self.prefix.observe(sent, self.counter), raw=step,
        )  # fmt: skip

    def learn(self, step: Step, answer: Message) -> None:
        for s in self.strategies:
            s.learn(step, answer)

