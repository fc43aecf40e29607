"""How much of each request repeats the start of the previous one: what a provider's prompt
cache can serve.

Providers cache the longest prefix a request shares with a recent one (OpenAI from 1,024
tokens, in 128-token steps; Anthropic at marked breakpoints), and bill it at a fraction of
the price. A prefix is compared as the provider reads the request: the tool schemas first,
then the messages in order. A request whose tool list changed shares no prefix at all, which
is why tool selection keeps the list in the agent's order and masking works in blocks.

The count is exact at message granularity (a message that differs ends the prefix, even if
its first tokens agree), so it slightly understates what a provider would cache. What a
cached token is worth is the energy method's concern (issue 10); this module only counts.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..tokens import TokenCounter, message_key, tools_key
from ..types import Step


class PrefixTracker:
    """The last request of each session (as block hashes and token counts) for one tier."""

    def __init__(self, sessions: int = 4096) -> None:
        self.sessions = sessions
        self._last: OrderedDict[str, list[tuple[int, int]]] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, step: Step, counter: TokenCounter) -> int:
        """Input tokens of ``step`` that repeat the start of this session's previous request;
        0 for the first request of a session, or a step with no session id."""
        session = step.meta.session_id
        if session is None:
            return 0
        key = tools_key(step.tools)
        blocks = [(hash(key), counter.tools(step.tools, key))]
        blocks += [(hash((m["role"], m.get("tool_call_id"), message_key(m))), counter.message(m)) for m in step.messages]
        with self._lock:
            previous = self._last.pop(session, None)
            self._last[session] = blocks
            while len(self._last) > self.sessions:
                self._last.popitem(last=False)
        shared = 0
        for (was, _), (now, tokens) in zip(previous or (), blocks):
            if was != now:
                break
            shared += tokens
        return shared
