"""The key of a step inside its scope: the conversation, exactly, and the last user message.

A cached answer may answer a new step only when everything it could depend on is the same,
so the only part of a step compared by similarity is the last user message. Besides the
scope (scope.py: instructions, tools, tenant, end user, answer-shaping options) the key has:

* **history** (exact): every user, assistant and tool message before the last user message,
  content and tool calls included. Two users who looked up their own profiles, or a "yes"
  to two different questions, have different histories and never share an entry.
* **tail** (exact): the assistant's tool calls and the tool results after the last user
  message (and any non-text parts of that message). A step that answers tool output only
  hits an entry made from the very same tool output.
* **semantic text** (embedded, compared by cosine): the text of the last user message.
* **literals** (exact): tokens containing a digit (IDs, order numbers, dates, amounts) in
  the semantic text must be the same set in query and entry: MiniLM puts "order 123" and
  "order 124" at cosine ~0.98, and an answer about one is wrong for the other.

In history and tail, tool-call ids are replaced by their position in the conversation (ids
are random per run; which call a result answers is what matters) and tool-call arguments
are canonical JSON (key order and spacing are cosmetic).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from milliwatt.types import Message, Step, content_text

from .scope import partition_key, scope_key, sha256_hex
from .template import shape, value_tokens

_TOKEN = re.compile(r"[\w.,:/@#$€£%+\-]+")
_STRIP = ".,:;/@#"
_DIGIT = re.compile(r"\d")


def literal_tokens(texts: str | Iterable[str]) -> frozenset[str]:
    """Tokens that contain a digit, with surrounding punctuation stripped; case is kept."""
    if isinstance(texts, str):
        texts = (texts,)
    out: set[str] = set()
    for text in texts:
        for raw in _TOKEN.findall(text):
            tok = raw.strip(_STRIP)
            if _DIGIT.search(tok):
                out.add(tok)
    return frozenset(out)


@dataclass(frozen=True)
class StepKey:
    scope: str  # exact, see scope.py
    history: str  # exact hash of the conversation before the last user message
    tail: str  # exact hash of what follows the last user message
    text: str  # the last user message's text: what is embedded
    literals: frozenset[str]  # digit-bearing tokens of ``text``: must be equal

    @property
    def partition(self) -> str:
        return partition_key(self.scope, self.history, self.tail)

    @property
    def history_key(self) -> str:
        return partition_key(self.scope, self.history)


def step_key(step: Step) -> StepKey:
    """Key a cacheable step (see ``uncacheable_reason``: it has a user message)."""
    msgs = [m for m in step.messages if m["role"] not in ("system", "developer")]  # those are in the scope
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    canon = canonical_messages(msgs)
    # The last user message's text is compared by similarity; anything else it carries
    # (a name, images or files) is compared exactly, with the tail.
    asked = canon[last_user]
    text = content_text(msgs[last_user].get("content")).strip()
    return StepKey(
        scope=scope_key(step),
        history=sha256_hex(canon[:last_user]),
        tail=sha256_hex([_without_text(asked), *canon[last_user + 1 :]]),
        text=text,
        literals=literal_tokens(text),
    )


@dataclass(frozen=True)
class Situation:
    """Where a templated answer may be re-bound: the same scope and the same shape of recent
    turns (exact), and a close enough request (``text``, embedded and compared by cosine)."""

    scope: str
    shape: str  # exact hash of the shape of the recent turns
    text: str  # the previous assistant text and the last user message, values masked

    @property
    def partition(self) -> str:
        return partition_key(self.scope, "situation", self.shape)


def situation(step: Step, scope: str | None = None) -> Situation:
    """The situation of a cacheable step. Its shape is the agent's previous move (text, or
    the tools it called) before the last user message, and what followed that message: the
    tools called since, and whether each result was an error. Values (ids, amounts, dates)
    are masked by their kind in the text (``mask``): re-binding supplies them. ``scope``: the
    step's scope key when the caller has it already (hashing the tool schemas is not free)."""
    msgs = [m for m in step.messages if m["role"] not in ("system", "developer")]
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    before = next((m for m in reversed(msgs[:last_user]) if m["role"] == "assistant"), None)
    if before is None:
        previous, said = "start", ""
    else:
        calls = [c["function"]["name"] for c in before.get("tool_calls") or []]
        previous = ["call", *calls] if calls else "text"
        said = content_text(before.get("content"))
    since: list[str] = []
    for m in msgs[last_user + 1 :]:
        if m["role"] == "assistant":
            since += [c["function"]["name"] for c in m.get("tool_calls") or []]
        elif m["role"] == "tool":
            since.append("error" if content_text(m.get("content")).lstrip().lower().startswith("error") else "result")
    text = f"{mask(said)}\n{mask(content_text(msgs[last_user].get('content')))}".strip()
    return Situation(scope or scope_key(step), sha256_hex({"previous": previous, "since": since}), text)


def mask(text: str) -> str:
    """``text`` with each value token replaced by its kind: ``reservation ZFA04Y`` reads
    ``reservation <9A>``, so two requests that differ only in their values embed alike."""
    for tok in sorted(set(value_tokens(text)), key=len, reverse=True):
        text = text.replace(tok, f"<{shape(tok)}>")
    return text


def canonical_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
    """The messages as plain data that hashes the same whenever they mean the same: tool-call
    ids replaced by their position, arguments parsed, ``None`` content read as empty."""
    positions: dict[str, int] = {}
    out: list[dict[str, Any]] = []
    for m in messages:
        c: dict[str, Any] = {"role": m["role"], "content": _canonical_content(m.get("content"))}
        if m.get("name"):
            c["name"] = m["name"]
        if m["role"] == "assistant":
            calls = []
            for call in m.get("tool_calls") or []:
                positions.setdefault(call["id"], len(positions))
                calls.append([call["function"]["name"], _canonical_args(call["function"].get("arguments"))])
            c["calls"] = calls
            if m.get("refusal"):
                c["refusal"] = m["refusal"]
        elif m["role"] == "tool":
            c["call"] = positions.get(m.get("tool_call_id", ""), -1)
        out.append(c)
    return out


def _canonical_content(content: Any) -> Any:
    """A string for text (plain or in text parts), else the list of parts as given."""
    if content is None or isinstance(content, str):
        return content or ""
    if all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return content_text(content)
    return content


def _without_text(canon: dict[str, Any]) -> dict[str, Any]:
    content = canon["content"]
    parts = [p for p in content if not (isinstance(p, dict) and p.get("type") == "text")] if isinstance(content, list) else []
    return {**canon, "content": parts}


def _canonical_args(arguments: str | None) -> object:
    # Step.create has checked the JSON; key order and spacing must not change the hash.
    return json.loads(arguments or "{}")
