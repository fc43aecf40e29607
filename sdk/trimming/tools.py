"""Tool-schema selection: send the schemas a conversation needs, not every tool the agent has.

Tool schemas are often the largest part of an agent's request (tau-bench airline: 14 tools,
about 2,000 of 4,800 input tokens, sent at every step), and most conversations use a few of
the tools. ``SelectTools`` withholds the schemas of the tools a conversation is unlikely to
need, and keeps the request's prefix stable, so a provider's prompt cache keeps serving it:

* **Decided per conversation.** At a session's first step, each tool's chance of being
  called in the conversation is estimated from this agent's past sessions (``learn``: the
  tools each session's verified answers called), starting from "needed" with the weight of
  ``prior`` sessions: ``p = (sessions using it + prior) / (sessions + prior)``. Tools are
  withheld largest ``schema tokens / p`` first while the withheld chances sum to at most
  ``risk``: the expected number of times per conversation the model asks for a withheld
  tool. Big schemas that are rarely used go first; small tools stay. With no past sessions
  every tool counts as needed, so nothing is withheld until the agent's traffic says
  otherwise (a tool no session used has ``p = 0.5`` after 5 sessions, 0.05 after 95). A
  tool offered once in a session stays offered, so the tool list, which a provider reads
  first, changes only when one is added.
* **Never out of reach.** The withheld tools are listed by name in one small tool of
  milliwatt's own (``INDEX_TOOL``). A model that needs one calls the index (or the tool);
  the cascade does not hand that answer to the agent but asks again with the schemas asked
  for (``wanted``). A withheld tool costs a second request, never an answer that could not
  use it. With ``index: false``, withheld means withheld, and the audit counts a step whose
  answer calls such a tool as a step that lost content.
* Always offered: the tools already called in the conversation, those the configuration
  names (``always``), the one ``tool_choice`` names, and the ``retrieve`` tools a lexical
  retriever (BM25 over each tool's name, description and parameter names) ranks most
  relevant to the latest user message (RAG-MCP, 2025). Retrieval is off by default: it adds
  tools from step to step, changing the tool list the prompt cache serves (measured in
  docs/benchmarks.md: fewer tokens removed, a slightly higher input cost).

Tools keep the agent's order. Statistics are kept per agent and tool set, never across.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..types import Message, Step, content_text
from .base import Draft, Strategy, Trimmed

_WORD = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be by can do for from i if in is it me my of on or so that the this to was will with you your".split()
)
_QUERY_CHARS = 2000  # the latest user message, at most this much of it
_SCOPES = 1024  # agents (times tool sets) whose statistics are kept
_SESSIONS = 16384  # sessions whose offered tools are kept
_SESSIONS_PER_AGENT = 2000  # the recent sessions an agent's tool usage is estimated from


def _words(text: str) -> list[str]:
    out = []
    for w in _WORD.findall(text.lower().replace("_", " ")):
        if w in _STOP:
            continue
        out.append(w[:-1] if len(w) > 3 and w.endswith("s") else w)  # "reservations" -> "reservation"
    return out


def _tool_text(tool: dict[str, Any]) -> str:
    fn = tool["function"]
    params = (fn.get("parameters") or {}).get("properties") or {}
    return " ".join([fn["name"], str(fn.get("description") or ""), *params])


class Retriever:
    """BM25 (k1 1.2, b 0.75) over the tools of one tool set."""

    def __init__(self, tools: Sequence[dict[str, Any]]) -> None:
        self.names = [t["function"]["name"] for t in tools]
        self.docs = [Counter(_words(_tool_text(t))) for t in tools]
        self.lengths = [sum(d.values()) for d in self.docs]
        self.avg = (sum(self.lengths) / len(self.lengths)) if self.lengths else 1.0
        df = Counter(w for d in self.docs for w in d)
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - c + 0.5) / (c + 0.5)) for w, c in df.items()}

    def rank(self, query: str, k: int) -> list[str]:
        words = set(_words(query))
        scored = []
        for name, doc, length in zip(self.names, self.docs, self.lengths):
            s = 0.0
            for w in words & doc.keys():
                tf = doc[w]
                s += self.idf[w] * tf * 2.2 / (tf + 1.2 * (0.25 + 0.75 * length / self.avg))
            if s > 0:
                scored.append((s, name))
        scored.sort(key=lambda x: -x[0])
        return [name for _, name in scored[:k]]


@dataclass
class _Usage:
    """One agent's (with one tool set) recent sessions, and the tools each has called."""

    sessions: OrderedDict[str, set[str]] = field(default_factory=OrderedDict)
    uses: Counter[str] = field(default_factory=Counter)  # sessions using each tool, over ``sessions``

    def record(self, session: str, tools: set[str]) -> None:
        known = self.sessions.pop(session, None)
        if known is None:
            known = set()
            while len(self.sessions) >= _SESSIONS_PER_AGENT:  # forget the oldest session
                self.uses.subtract(self.sessions.popitem(last=False)[1])
        self.uses.update(tools - known)
        known |= tools
        self.sessions[session] = known


def _used(messages: Iterable[Message]) -> list[str]:
    return [c["function"]["name"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]


class SelectTools(Strategy):
    name: ClassVar[str] = "select_tools"

    def __init__(
        self,
        always: Sequence[str] = (),
        retrieve: int = 0,
        risk: float = 0.5,
        prior: float = 5.0,
        learn: bool = True,
        index: bool = True,
    ) -> None:
        if retrieve < 0:
            raise ValueError("select_tools.retrieve must be >= 0")
        if risk < 0 or prior <= 0:
            raise ValueError("select_tools.risk must be >= 0 and select_tools.prior > 0")
        self.always = frozenset(always)
        self.retrieve = retrieve
        self.risk = risk
        self.prior = prior
        self.learning = learn
        self.index = index  # offer the index of withheld tools (INDEX_TOOL), so none is out of reach
        self._usage: OrderedDict[str, _Usage] = OrderedDict()  # by agent and tool set
        self._retrievers: OrderedDict[str, Retriever] = OrderedDict()
        self._offered: OrderedDict[str, set[str]] = OrderedDict()  # by session
        self._lock = threading.Lock()

    # ---------------------------------------------------------------- selection

    def chances(self, step: Step) -> dict[str, float]:
        """Each tool's estimated chance of being called in a conversation of this agent."""
        with self._lock:
            usage = self._usage.get(_scope(step)) or _Usage()
            n = len(usage.sessions)
            return {
                t["function"]["name"]: (usage.uses[t["function"]["name"]] + self.prior) / (n + self.prior)
                for t in step.tools
            }  # fmt: skip

    def withhold(self, step: Step, tokens_of: Any) -> list[str]:
        """The tools to withhold; ``tokens_of(tool)`` is a schema's token count."""
        keep = set(self.always) | set(_used(step.messages))
        if isinstance(step.tool_choice, dict):
            keep.add(step.tool_choice["function"]["name"])
        if self.retrieve:
            query = content_text(next((m.get("content") for m in reversed(step.messages) if m["role"] == "user"), ""))
            keep.update(self._retriever(_scope(step), step.tools).rank(query[-_QUERY_CHARS:], self.retrieve))
        chance = self.chances(step)
        ranked = sorted(
            (t for t in step.tools if t["function"]["name"] not in keep),
            key=lambda t: tokens_of(t) / max(chance[t["function"]["name"]], 1e-9),
            reverse=True,
        )
        out, spent, saved = [], 0.0, 0
        for t in ranked:
            p = chance[t["function"]["name"]]
            if spent + p <= self.risk:  # a cheaper, less likely tool further down may still fit
                spent += p
                saved += tokens_of(t)
                out.append(t["function"]["name"])
        if len(out) == len(step.tools):  # offering nothing changes what the request means
            return []
        if out and self.index and tokens_of(index_tool(out)) >= saved:  # listing them costs more
            return []
        return out

    def apply(self, draft: Draft) -> None:
        step = draft.step
        if not step.tools:
            return
        session = step.meta.session_id
        with self._lock:
            offered = self._offered.pop(session, None) if session is not None else None
        if offered is None:  # a new conversation (or one without a session): decide now
            gone = set(self.withhold(step, lambda t: draft.counter.tools([t])))
        else:  # decided at the session's first step; only what was asked for or used is added
            gone = {t["function"]["name"] for t in step.tools} - offered - set(_used(step.messages))
        gone -= draft.reveal
        if session is not None:
            with self._lock:
                self._offered[session] = {t["function"]["name"] for t in step.tools} - gone
                while len(self._offered) > _SESSIONS:
                    self._offered.popitem(last=False)
        if gone:
            names = [t["function"]["name"] for t in step.tools if t["function"]["name"] in gone]
            extra = [index_tool(names)] if self.index else []
            draft.offer([t for t in step.tools if t["function"]["name"] not in gone], extra)

    # ---------------------------------------------------------------- learning

    def learn(self, step: Step, answer: Message) -> None:
        if not self.learning or not step.tools:
            return
        called = {c["function"]["name"] for c in answer.get("tool_calls") or []} | set(_used(step.messages))
        called &= {t["function"]["name"] for t in step.tools}
        scope = _scope(step)
        with self._lock:
            usage = self._usage.get(scope)
            if usage is None:
                usage = self._usage[scope] = _Usage()
            self._usage.move_to_end(scope)
            while len(self._usage) > _SCOPES:
                self._usage.popitem(last=False)
            # A step without a session is a conversation of its own.
            usage.record(step.meta.session_id or f"step-{id(step)}", called)

    def _retriever(self, scope: str, tools: Sequence[dict[str, Any]]) -> Retriever:
        with self._lock:
            r = self._retrievers.get(scope)
            if r is None:
                r = self._retrievers[scope] = Retriever(tools)
                while len(self._retrievers) > _SCOPES:
                    self._retrievers.popitem(last=False)
            return r


INDEX_TOOL = "milliwatt_more_tools"


def index_tool(names: Sequence[str]) -> dict[str, Any]:
    """The tool that lists the withheld tools by name. A model that needs one calls it (or the
    tool itself); the cascade then asks again with those schemas (``wanted``), so a withheld
    tool costs a second request, never an answer that could not use it."""
    return {
        "type": "function",
        "function": {
            "name": INDEX_TOOL,
            "description": (
                f"More tools are available: {', '.join(names)}. To use any of them, call this "
                "with their names first; their definitions are then provided."
            ),
            "parameters": {
                "type": "object",
                "properties": {"names": {"type": "array", "items": {"type": "string"}}},
                "required": ["names"],
            },
        },
    }


def wanted(answer: Message | None, trimmed: Trimmed) -> frozenset[str]:
    """The withheld tools an answer to ``trimmed`` asks for: those it names in a call to the
    index (a call naming none of them asks for all), and those it calls directly. Only a
    request that offered the index can ask: without it, withheld means withheld."""
    withheld = set(trimmed.withheld)
    if not answer or not withheld or INDEX_TOOL not in {t["function"]["name"] for t in trimmed.step.tools}:
        return frozenset()
    out: set[str] = set()
    for call in answer.get("tool_calls") or []:
        name = call["function"]["name"]
        if name == INDEX_TOOL:
            try:
                names = json.loads(call["function"].get("arguments") or "{}").get("names") or []
            except (ValueError, AttributeError):
                names = []
            asked = {n for n in names if isinstance(n, str)} & withheld
            out |= asked or withheld
        elif name in withheld:
            out.add(name)
    return frozenset(out)


def _scope(step: Step) -> str:
    """An agent and its tool set: statistics are never shared across either."""
    names = "\n".join(sorted(t["function"]["name"] for t in step.tools))
    return f"{step.meta.agent or ''}\n{hashlib.sha1(names.encode()).hexdigest()}"


