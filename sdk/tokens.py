"""Token counts with tiktoken, offline (encodings from litellm's bundled files).

Counts follow OpenAI's chat accounting (a few tokens of framing per message), so the
figure for "input tokens" is comparable with what a provider would bill.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Any

from .types import Message, content_text

_PER_MESSAGE = 3  # <|start|>role ... <|end|> framing, as in OpenAI's cookbook
_PER_REPLY = 3


@functools.lru_cache(maxsize=4)
def encoding(name: str = "o200k_base"):  # noqa: ANN201 - tiktoken.Encoding
    import tiktoken

    try:
        return tiktoken.get_encoding(name)
    except Exception as e:  # pragma: no cover - only without litellm's files
        raise RuntimeError(
            f"tiktoken encoding {name!r} is not available offline; set TIKTOKEN_CACHE_DIR to a folder "
            f"holding it (litellm ships one in litellm/litellm_core_utils/tokenizers)"
        ) from e


def count_text(text: str, enc: str = "o200k_base") -> int:
    return len(encoding(enc).encode(text, disallowed_special=())) if text else 0


def message_tokens(m: Message, enc: str = "o200k_base") -> int:
    n = _PER_MESSAGE + count_text(content_text(m.get("content")), enc)
    for call in m.get("tool_calls") or []:
        fn = call.get("function", {})
        n += count_text(fn.get("name", ""), enc) + count_text(fn.get("arguments", ""), enc) + 3
    if m.get("name"):
        n += 1
    return n


def tools_tokens(tools: Iterable[dict[str, Any]], enc: str = "o200k_base") -> int:
    tools = list(tools)
    return count_text(json.dumps(tools, separators=(",", ":")), enc) if tools else 0


def count_request(messages: Iterable[Message], tools: Iterable[dict[str, Any]] = (), enc: str = "o200k_base") -> int:
    """Input tokens of a chat request: the messages, their framing and the tool schemas."""
    return sum(message_tokens(m, enc) for m in messages) + tools_tokens(tools, enc) + _PER_REPLY


def count_completion(message: Message, enc: str = "o200k_base") -> int:
    """Output tokens of an assistant message (content and tool calls)."""
    return message_tokens(message, enc) - _PER_MESSAGE
