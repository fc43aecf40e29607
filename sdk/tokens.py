"""Token counts with tiktoken, offline: the encodings are built from litellm's bundled files.

Counts follow OpenAI's chat accounting (a few tokens of framing per message), so the
figure for "input tokens" is comparable with what a provider would bill.

tiktoken finds an encoding's BPE file through ``TIKTOKEN_CACHE_DIR`` or downloads it (and
copies it into a cache folder). milliwatt changes no environment variable and writes no
file: it reads the file litellm ships (found without importing litellm), checks it against
the SHA-256 tiktoken expects, and builds the ``tiktoken.Encoding`` from it with the public
constructor and the parameters of ``tiktoken_ext.openai_public``. An encoding litellm does
not ship falls back to ``tiktoken.get_encoding`` (which may download).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import pickle
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ._offline import litellm_tokenizers_dir
from .types import Message, content_text

PER_MESSAGE = 3  # <|start|>role ... <|end|> framing, as in OpenAI's cookbook
PER_REPLY = 3

_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_ENDOFTEXT = "<|endoftext|>"
_ENDOFPROMPT = "<|endofprompt|>"
# The constructor parameters of tiktoken_ext.openai_public, and the SHA-256 it expects of each file.
_BUNDLED: dict[str, dict[str, Any]] = {
    "o200k_base": {
        "sha256": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
        "pat_str": "|".join(  # noqa: FLY002 - as tiktoken_ext.openai_public writes it
            [
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
                r"""\p{N}{1,3}""",
                r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
                r"""\s*[\r\n]+""",
                r"""\s+(?!\S)""",
                r"""\s+""",
            ]
        ),
        "special_tokens": {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018},
    },
    "cl100k_base": {
        "sha256": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
        "pat_str": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
        "special_tokens": {
            _ENDOFTEXT: 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            _ENDOFPROMPT: 100276,
        },
    },
}


def bundled_bpe_file(name: str) -> Path | None:
    """litellm's copy of an encoding's BPE file (named as tiktoken's cache names it), if shipped."""
    folder = litellm_tokenizers_dir()
    if folder is None or name not in _BUNDLED:
        return None
    path = Path(folder) / hashlib.sha1(_URL.format(name).encode()).hexdigest()
    return path if path.is_file() else None


def _mergeable_ranks(data: bytes) -> dict[bytes, int]:
    """The ``.tiktoken`` format, as ``tiktoken.load.load_tiktoken_bpe`` reads it: "base64-token rank" lines."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


@functools.lru_cache(maxsize=4)
def encoding(name: str = "o200k_base"):  # noqa: ANN201 - tiktoken.Encoding
    import tiktoken

    path = bundled_bpe_file(name)
    if path is not None:
        spec = _BUNDLED[name]
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != spec["sha256"]:
            raise RuntimeError(f"{path}: not the {name} file tiktoken expects (SHA-256 mismatch)")
        return tiktoken.Encoding(
            name, pat_str=spec["pat_str"], mergeable_ranks=_mergeable_ranks(data), special_tokens=spec["special_tokens"]
        )
    if name in _BUNDLED and litellm_tokenizers_dir() is None and not os.environ.get("TIKTOKEN_CACHE_DIR"):
        # Without litellm's files tiktoken would download this one: say what to install instead.
        from ._extras import MissingExtra

        raise MissingExtra(f"counting tokens offline ({name})", "remote", "litellm")
    try:
        return tiktoken.get_encoding(name)
    except Exception as e:
        raise RuntimeError(
            f"tiktoken encoding {name!r} is not available offline: litellm ships only "
            f"{' and '.join(_BUNDLED)} (litellm/litellm_core_utils/tokenizers); for another, set "
            f"TIKTOKEN_CACHE_DIR to a folder holding it"
        ) from e


def count_text(text: str, enc: str = "o200k_base") -> int:
    return len(encoding(enc).encode(text, disallowed_special=())) if text else 0


def message_tokens(m: Message, enc: str = "o200k_base") -> int:
    n = PER_MESSAGE + count_text(content_text(m.get("content")), enc)
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
    return sum(message_tokens(m, enc) for m in messages) + tools_tokens(tools, enc) + PER_REPLY


def count_completion(message: Message, enc: str = "o200k_base") -> int:
    """Output tokens of an assistant message (content and tool calls)."""
    return message_tokens(message, enc) - PER_MESSAGE


class _Memo:
    """A bounded, thread-safe least-recently-used map (counts are computed in worker threads)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[Hashable, int] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> int | None:
        with self._lock:
            value = self._data.get(key)
            if value is not None:
                self._data.move_to_end(key)
            return value

    def get_or_put(self, key: Hashable, compute: Callable[[], int]) -> int:
        """The value of ``key``, computed (outside the lock) and kept when missing."""
        value = self.get(key)
        if value is None:
            value = compute()
            self.put(key, value)
        return value

    def put(self, key: Hashable, value: int) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def message_key(m: Message) -> Hashable:
    # Exactly what message_tokens reads. Strings are shared with the caller's copy and cache
    # their hash, so building the key costs little for long contents.
    calls = tuple(
        (str((c.get("function") or {}).get("name", "")), str((c.get("function") or {}).get("arguments", "")))
        for c in m.get("tool_calls") or []
    )
    return (content_text(m.get("content")), calls, bool(m.get("name")))


def tools_key(tools: Sequence[dict[str, Any]]) -> bytes | str:
    """A memo key of a tool list, in process: its pickle (C code, ~5x faster than JSON for an
    agent's dozen schemas), or its JSON when something in it does not pickle."""
    try:
        return pickle.dumps(tools if isinstance(tools, tuple) else tuple(tools), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - an odd value in a schema: the slower key
        return json.dumps(list(tools), separators=(",", ":"), sort_keys=False, default=str)


class TokenCounter:
    """Memoised token counts of messages and tool lists, exactly as ``message_tokens`` and
    ``tools_tokens`` give them.

    An agent resends its whole context at every step, so all but the newest messages, and
    the tool schemas, were counted before: the accountant (the step's raw tokens) and the
    trimmers (what each strategy saves) share one counter and tokenise each text once.
    A message's count depends only on its text, its tool calls and whether it has a name,
    and the memo is keyed by exactly those.
    """

    def __init__(self, encoding: str = "o200k_base", *, memo_messages: int = 16384, memo_tools: int = 256) -> None:
        self.encoding = encoding
        self._messages = _Memo(memo_messages)
        self._tools = _Memo(memo_tools)

    def message(self, m: Message) -> int:
        return self._messages.get_or_put(message_key(m), lambda: message_tokens(m, self.encoding))

    def tools(self, tools: Sequence[dict[str, Any]], key: Hashable | None = None) -> int:
        """``key``: ``tools_key(tools)`` when the caller has it already."""
        if not tools:
            return 0
        return self._tools.get_or_put(key if key is not None else tools_key(tools), lambda: tools_tokens(tools, self.encoding))

    def request(self, messages: Iterable[Message], tools: Sequence[dict[str, Any]] = ()) -> int:
        """Input tokens of a chat request, as ``count_request``."""
        return PER_REPLY + sum(self.message(m) for m in messages) + self.tools(tools)

    def cached_message(self, m: Message) -> int | None:
        return self._messages.get(message_key(m))

    def cached_request(self, messages: Iterable[Message], tools: Sequence[dict[str, Any]] = ()) -> int | None:
        """``request`` when every part was counted before (no tokenising), else None."""
        total = PER_REPLY
        for m in messages:
            n = self._messages.get(message_key(m))
            if n is None:
                return None
            total += n
        if tools:
            n = self._tools.get(tools_key(tools))
            if n is None:
                return None
            total += n
        return total


DEFAULT_ENCODING = "o200k_base"


def encoding_for_model(model: str) -> tuple[str, bool]:
    """The tiktoken encoding of ``model`` (a litellm id) and whether it is the model's own.

    OpenAI's models have theirs (tiktoken's table); for a model with none available offline
    (Anthropic, Google and open models ship no tiktoken encoding) it is ``o200k_base``, an
    approximation the ledger names (``steps.baseline_tokenizer``)."""
    import tiktoken.model

    name = model.split("/", 1)[1] if "/" in model else model
    try:
        found = tiktoken.model.encoding_name_for_model(name)
    except KeyError:
        return DEFAULT_ENCODING, False
    if found not in _BUNDLED:  # would need a download
        return DEFAULT_ENCODING, False
    return found, True
