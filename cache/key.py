"""The key of a step inside its scope: a semantic text, an exact tail and literal guards.

Embedding only the last message gives wrong hits in multi-turn agent contexts, so the key
has three parts besides the scope:

* **semantic text** (embedded, compared by cosine): the last user message. When it is short
  ("yes", "the second one") the previous assistant turn is prepended, because the answer
  depends on what was asked: "Cancel reservation ABC123? yes" is not "Book flight 9? yes".
* **tail** (exact): what happened after the last user message (the assistant's tool calls
  and the tool results), hashed with call ids removed, together with the names of the tools
  called before it, in order. A step that answers tool output only hits an entry made from
  the very same tool output; and "yes, go ahead" only hits an entry from a conversation
  that had got as far (the same tools called), since what "yes" starts depends on it.
* **literals** (exact): tokens containing a digit (IDs, order numbers, dates, amounts) in
  the semantic text must be the same set in query and entry: MiniLM puts "order 123" and
  "order 124" at cosine ~0.98, and an answer about one is wrong for the other.

A fourth guard, **grounding**, covers earlier turns outside the semantic text: a literal of
the stored answer that came from the stored step's context (a user ID the user gave three
turns ago, now an argument of a tool call) must also be in the new step's context.
Literals the model produced itself (a computed total, a phone number) carry no such link.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass

from milliwatt.types import Message, Step, content_text

from .scope import partition_key, scope_key, sha256_hex

SHORT_USER_WORDS = 8  # a user message this short is read together with the turn before it
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


def message_texts(m: Message) -> list[str]:
    """The text a message carries: its content and its tool calls' arguments."""
    texts = [content_text(m.get("content"))]
    for call in m.get("tool_calls") or []:
        texts.append(call["function"].get("arguments") or "")
    return texts


@dataclass(frozen=True)
class StepKey:
    scope: str  # exact, see scope.py
    tail: str  # exact hash of the tools called so far and the messages after the last user message
    text: str  # what is embedded
    literals: frozenset[str]  # digit-bearing tokens of ``text``: must be equal
    context_literals: frozenset[str]  # digit-bearing tokens of the whole step (grounding)

    @property
    def partition(self) -> str:
        return partition_key(self.scope, self.tail)


def step_key(step: Step) -> StepKey:
    """Key a cacheable step (see ``uncacheable_reason``: it has a user message)."""
    msgs = step.messages
    last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    text = content_text(msgs[last_user].get("content")).strip()
    if len(text.split()) < SHORT_USER_WORDS:
        prev = next((m for m in reversed(msgs[:last_user]) if m["role"] == "assistant"), None)
        prev_text = content_text(prev.get("content")).strip() if prev else ""
        if prev_text:
            text = f"{prev_text}\n{text}"
    context = [t for m in msgs for t in message_texts(m)]
    return StepKey(
        scope=scope_key(step),
        tail=tail_hash(msgs[last_user + 1 :], history=_tools_called(msgs[:last_user])),
        text=text,
        literals=literal_tokens(text),
        context_literals=literal_tokens(context),
    )


def _tools_called(messages: Iterable[Message]) -> list[str]:
    return [c["function"]["name"] for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []]


def tail_hash(tail: Iterable[Message], history: Iterable[str] = ()) -> str:
    """Hash of assistant tool calls and tool results, with call ids replaced by their position
    (ids are random per run; which call a result answers is what matters), and of the names
    of the tools called before them."""
    positions: dict[str, int] = {}
    canon: list[dict | list[str]] = [list(history)]
    for m in tail:
        if m["role"] == "assistant":
            calls = []
            for call in m.get("tool_calls") or []:
                positions[call["id"]] = len(positions)
                calls.append([call["function"]["name"], _canonical_args(call["function"].get("arguments"))])
            canon.append({"role": "assistant", "content": content_text(m.get("content")), "calls": calls})
        else:
            canon.append(
                {
                    "role": m["role"],
                    "call": positions.get(m.get("tool_call_id", ""), -1),
                    "content": content_text(m.get("content")),
                }
            )
    return sha256_hex(canon)


EMPTY_TAIL = tail_hash(())  # a step whose last message is the user's


def _canonical_args(arguments: str | None) -> object:
    # Step.create has checked the JSON; key order and spacing must not change the hash.
    return json.loads(arguments or "{}")


def grounded_literals(answer: Message, key: StepKey) -> frozenset[str]:
    """Literals of an answer that were taken from the step's context (so they depend on it)."""
    return literal_tokens(message_texts(answer)) & key.context_literals
