"""Strategies over tool outputs: what an agent's context is mostly made of, after its prompt.

* ``CompactJSON`` (lossless): a JSON tool output re-serialised without the spaces after
  ``,`` and ``:``. Same values, same order; about a fifth fewer tokens on tau-bench's outputs.
* ``TruncateOutputs``: an output over ``max_tokens`` keeps its head and tail, with a marker
  saying how much of the middle was cut.
* ``MaskObservations`` ("The Complexity Trap", 2025): outputs older than the newest ``keep``
  are replaced by a placeholder that names the tool and keeps the identifiers in the output
  (reservation and flight numbers, user ids), the values an agent most often refers back
  to. Masking advances ``block`` outputs at a time, so the masked prefix of the request stays
  the same for ``block`` steps (a provider's prompt cache keeps serving it).
* ``DedupeOutputs`` (lossless): an output identical to an earlier one in the request (the
  same reservation fetched twice) is replaced by a pointer to the earlier call.

Outputs that are not strings (content-part lists) are left alone; outputs that are not JSON
are left to truncation and masking.
"""

from __future__ import annotations

import functools
import json
import re
from typing import ClassVar

from ..tokens import encoding
from ..types import Message
from .base import Draft, Strategy

MAX_IDS = 24  # a placeholder keeps at most this many identifiers
_COMPACT_MAX_CHARS = 1_000_000  # longer outputs are truncation's business, not worth parsing
_WORD = re.compile(r"[A-Za-z0-9_@.\-]+")


def identifiers(text: str) -> list[str]:
    """The identifiers of a text, first occurrence first: tokens of 3+ characters mixing
    letters with digits, ``_`` or ``@`` (``HAT030``, ``mia_li_3668``), and upper-case codes
    (``JFK``). Plain numbers (prices, counts) and words are not identifiers."""
    seen: dict[str, None] = {}
    for raw in _WORD.findall(text):
        tok = raw.strip(".-")
        if len(tok) < 3 or tok in seen:
            continue
        letters = any(c.isalpha() for c in tok)
        if (letters and any(c.isdigit() or c in "_@" for c in tok)) or (tok.isalpha() and tok.isupper()):
            seen[tok] = None
    return list(seen)


def masked(message: Message, names: dict[str, str], keep_ids: bool = True) -> Message | None:
    """The masking placeholder for a tool output, or None when it would not be shorter."""
    content = message.get("content")
    if not isinstance(content, str):
        return None
    tool = names.get(message.get("tool_call_id", ""), "a tool")
    ids = identifiers(content)[:MAX_IDS] if keep_ids else []
    note = f"[older output of {tool} omitted to save tokens" + (f"; ids in it: {', '.join(ids)}]" if ids else "]")
    return {**message, "content": note} if len(note) < len(content) else None


@functools.lru_cache(maxsize=4096)
def _compact(content: str) -> str:
    try:
        value = json.loads(content)
    except ValueError:
        return content
    if not isinstance(value, (dict, list)):
        return content
    out = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return out if len(out) < len(content) else content


class CompactJSON(Strategy):
    name: ClassVar[str] = "compact_json"

    def apply(self, draft: Draft) -> None:
        for i in draft.tool_outputs():
            m = draft.messages[i]
            content = m.get("content")  # type: ignore[union-attr]
            if not isinstance(content, str) or len(content) > _COMPACT_MAX_CHARS or content.lstrip()[:1] not in ("{", "["):
                continue
            compact = _compact(content)
            if compact is not content:
                draft.replace(i, {**m, "content": compact})  # type: ignore[dict-item]


class TruncateOutputs(Strategy):
    name: ClassVar[str] = "truncate"

    def __init__(self, max_tokens: int = 2000, head_share: float = 0.7) -> None:
        if max_tokens < 16:
            raise ValueError("truncate.max_tokens must be at least 16")
        if not 0 < head_share < 1:
            raise ValueError("truncate.head_share must be between 0 and 1")
        self.max_tokens = max_tokens
        self.head_share = head_share

    def apply(self, draft: Draft) -> None:
        for i in draft.tool_outputs():
            m = draft.messages[i]
            content = m.get("content")  # type: ignore[union-attr]
            if not isinstance(content, str) or draft.size(i) <= self.max_tokens + 8:
                continue
            draft.replace(i, {**m, "content": self.cut(content, draft.size(i), draft.counter.encoding)})  # type: ignore[dict-item]

    def cut(self, content: str, tokens: int, encoding_name: str) -> str:
        enc = encoding(encoding_name)
        head_n = int(self.max_tokens * self.head_share)
        tail_n = self.max_tokens - head_n
        # Tokenise only the ends: a token is rarely longer than 16 characters, so a 10 MB
        # output costs two small encodes, not one of 10 MB.
        head = enc.encode(content[: head_n * 16], disallowed_special=())[:head_n]
        tail = enc.encode(content[-tail_n * 16 :], disallowed_special=())[-tail_n:] if tail_n else []
        cut = max(tokens - len(head) - len(tail), 0)
        return f"{enc.decode(head)}\n[... {cut:,} tokens of this output cut to save tokens ...]\n{enc.decode(tail)}"


class MaskObservations(Strategy):
    name: ClassVar[str] = "mask"

    def __init__(self, keep: int = 10, block: int = 5, keep_ids: bool = True) -> None:
        if keep < 0 or block < 1:
            raise ValueError("mask.keep must be >= 0 and mask.block >= 1")
        self.keep = keep
        self.block = block
        self.keep_ids = keep_ids  # False: the published placeholder, which keeps nothing

    def apply(self, draft: Draft) -> None:
        outputs = draft.tool_outputs()
        over = len(outputs) - self.keep
        if over <= 0:
            return
        names = draft.call_names()
        for i in outputs[: over - over % self.block]:
            replacement = masked(draft.messages[i], names, self.keep_ids)  # type: ignore[arg-type]
            if replacement is not None:
                draft.replace(i, replacement)


class DedupeOutputs(Strategy):
    name: ClassVar[str] = "dedupe"

    def __init__(self, min_chars: int = 64) -> None:
        self.min_chars = min_chars

    def apply(self, draft: Draft) -> None:
        first: dict[str, str] = {}  # content -> the call id that first returned it
        names = draft.call_names()
        for i in draft.tool_outputs():
            m = draft.messages[i]
            content = m.get("content")  # type: ignore[union-attr]
            if not isinstance(content, str) or len(content) < self.min_chars:
                continue
            earlier = first.setdefault(content, m["tool_call_id"])  # type: ignore[index]
            if earlier != m["tool_call_id"]:  # type: ignore[index]
                note = f"[same output as the earlier call {earlier} of {names.get(earlier, 'a tool')}]"
                draft.replace(i, {**m, "content": note})  # type: ignore[dict-item]
