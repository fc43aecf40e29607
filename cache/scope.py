"""Exact scope of a step: everything besides the conversation itself that changes the answer.

Two steps may share a cached answer only when their scope keys are equal. The key is the
sha256 of canonical JSON (sorted keys, no whitespace) of:

* the system and developer messages, in order (the agent's instructions);
* the tool schemas, sorted by function name (their order in the list does not change
  which tool fits; their contents do);
* ``tool_choice`` and ``response_format`` (they constrain the shape of the answer);
* the tenant (``step.meta.tenant``) and the end user (``step.meta.user``): no hit ever
  crosses tenants, nor end users when the caller names them;
* the options that change what a correct answer looks like: ``max_tokens`` (a cap
  truncates), ``stop`` and ``parallel_tool_calls``.

Sampling options (temperature, top_p, penalties, seed) are deliberately left out: they
change how varied answers are, not which answer is right, and keying on them would split
one agent's cache by incidental settings. Steps that ask for variety are not cached at
all (see ``uncacheable_reason``). The conversation (every turn before the last user
message, and what follows it) is keyed exactly in key.py.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from milliwatt.types import Step, content_text

# Bump when the key's contents change: entries made under another version never match
# (persist.py drops them at load). 2: the end user in the scope, the whole conversation
# before the last user message in the partition, only the last user message embedded.
SCOPE_VERSION = "mw-cache-scope/2"
# extra_body: a provider's own parameters, which may shape the answer (a step without it keys as before).
_SCOPE_OPTIONS = ("max_tokens", "max_completion_tokens", "stop", "parallel_tool_calls", "extra_body")
MAX_QUERY_CHARS = 16_000  # a longer last user message is not cached (uncacheable_reason)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def sha256_hex(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def scope_key(step: Step) -> str:
    """The exact scope key (64 hex digits) of a step."""
    instructions = [
        [m["role"], content_text(m.get("content"))] for m in step.messages if m["role"] in ("system", "developer")
    ]
    tools = sorted(step.tools, key=lambda t: t["function"]["name"])
    options = {k: step.options[k] for k in _SCOPE_OPTIONS if k in step.options}
    return sha256_hex(
        {
            "v": SCOPE_VERSION,
            "instructions": instructions,
            "tools": tools,
            "tool_choice": step.tool_choice,
            "response_format": step.response_format,
            "tenant": step.meta.tenant,
            "user": step.meta.user,
            "options": options,
        }
    )


def uncacheable_reason(step: Step) -> str | None:
    """Why this step must neither be answered from nor written to the cache; None if it may."""
    last = step.messages[-1]["role"]
    if last not in ("user", "tool"):
        return f"last message is {last}, not user or tool"
    if not any(m["role"] == "user" for m in step.messages):
        return "no user message"
    last_user = next(m for m in reversed(step.messages) if m["role"] == "user")
    size = len(content_text(last_user.get("content")))
    if size > MAX_QUERY_CHARS:
        # MiniLM reads the first 256 word pieces; past a few pages the cosine says nothing of
        # the rest, and storing, hashing and comparing such texts costs more than it saves.
        return f"the last user message has {size:,} characters, the cache compares at most {MAX_QUERY_CHARS:,}"
    opts = step.options
    if (opts.get("n") or 1) > 1:
        return f"n={opts['n']} asks for several answers"
    if opts.get("logprobs"):
        return "logprobs requested; a cached answer has none"
    temperature = opts.get("temperature")
    if temperature is not None and temperature > 0 and opts.get("seed") is None:
        # The caller asked for varied samples; replaying one would defeat that.
        return f"sampling requested (temperature {temperature}, no seed)"
    return None


def partition_key(*parts: str) -> str:
    """The key of a group of exact key parts: (scope, history) or (scope, history, tail).

    Entries are searched only within their (scope, history, tail) partition."""
    return sha256_hex(list(parts))
