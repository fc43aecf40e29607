"""The accounts of a step: its tokens, its energy and cost, and its counterfactual.

The cascade orchestrates (trim, ask the tiers, write back, hand the record on); this module
keeps the books. The costly parts are tokenising (tiktoken over agent contexts of thousands
of tokens) and EcoLogits' estimate of a new answer length; the cascade runs them in a worker
thread. Once they are memoised, building a record costs ~15 us, less than the hop to a
thread (~65 us), so ``cached_tokens_raw`` and ``can_record_inline`` tell the cascade when
the event loop may do it itself.

Token counts are memoised: an agent resends its whole context at every step, so all but
the newest messages, and the tool schemas, were counted at an earlier step. A message's
count depends only on its text, its tool calls and whether it has a name, and the memo is
keyed by exactly those, so a memoised count is the count ``milliwatt.tokens`` gives.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

from .energy import RemoteEnergyModel
from .ids import new_step_id
from .pricing import cost_usd
from .tokens import PER_MESSAGE, PER_REPLY, message_tokens, tools_tokens
from .types import Attempt, Energy, Message, Step, StepRecord, TierResult, content_text


# Step-level ``tier`` of a step no tier answered.
FAILED = "error"
CANCELLED = "cancelled"


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

    def put(self, key: Hashable, value: int) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def _message_key(m: Message) -> Hashable:
    # Exactly what milliwatt.tokens.message_tokens reads. Strings are shared with the caller's
    # copy and cache their hash, so building the key costs little for long contents.
    calls = tuple(
        (str((c.get("function") or {}).get("name", "")), str((c.get("function") or {}).get("arguments", "")))
        for c in m.get("tool_calls") or []
    )
    return (content_text(m.get("content")), calls, bool(m.get("name")))


def _tools_key(tools: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(tools), separators=(",", ":"), sort_keys=False, default=str)


class Accountant:
    """Counts a step's tokens and builds its ``StepRecord``.

    ``frontier_model`` is the model of the counterfactual: the untrimmed step answered by it,
    with an answer as long as the one given, estimated by ``energy_model``.
    """

    def __init__(
        self,
        frontier_model: str,
        *,
        encoding: str = "o200k_base",
        energy_model: RemoteEnergyModel | None = None,
        memo_messages: int = 16384,
        memo_tools: int = 256,
    ) -> None:
        self.frontier_model = frontier_model
        self.encoding = encoding
        self.energy_model = energy_model or RemoteEnergyModel()
        self._messages = _Memo(memo_messages)
        self._tools = _Memo(memo_tools)
        # Answer lengths whose counterfactual was estimated: EcoLogits' part of the estimate
        # depends only on the length, and milliwatt.energy memoises it.
        self._estimated_lengths: set[int] = set()

    # ------------------------------------------------------------------ tokens

    def tokens_raw(self, step: Step) -> int:
        """Input tokens of the step as the agent sent it (messages, framing, tool schemas)."""
        total = PER_REPLY
        for m in step.messages:
            total += self._message_tokens(m)
        if step.tools:
            key = _tools_key(step.tools)
            n = self._tools.get(key)
            if n is None:
                n = tools_tokens(step.tools, self.encoding)
                self._tools.put(key, n)
            total += n
        return total

    def _message_tokens(self, m: Message) -> int:
        key = _message_key(m)
        n = self._messages.get(key)
        if n is None:
            n = message_tokens(m, self.encoding)
            self._messages.put(key, n)
        return n

    def completion_tokens(self, message: Message) -> int:
        """Output tokens of an assistant message, as ``milliwatt.tokens.count_completion``."""
        return self._message_tokens(message) - PER_MESSAGE if message else 0

    def cached_tokens_raw(self, step: Step) -> int | None:
        """``tokens_raw`` when every part of the step was counted before (no tokenising: cheap
        enough for the event loop), else None."""
        total = PER_REPLY
        for m in step.messages:
            n = self._messages.get(_message_key(m))
            if n is None:
                return None
            total += n
        if step.tools:
            n = self._tools.get(_tools_key(step.tools))
            if n is None:
                return None
            total += n
        return total

    # ------------------------------------------------------------------ the record

    def can_record_inline(self, tokens_raw: int | None, message: Message | None = None) -> bool:
        """True when ``record`` would neither tokenise nor ask EcoLogits for a new estimate."""
        if tokens_raw is None:
            return False
        if not message:
            return 0 in self._estimated_lengths
        n = self._messages.get(_message_key(message))
        return n is not None and n - PER_MESSAGE in self._estimated_lengths

    def record(
        self,
        step: Step,
        *,
        started_at: float,
        t0: float,
        tokens_raw: int | None,
        attempts: Sequence[Attempt],
        answer: TierResult | None = None,
        message: Message | None = None,
        tokens_sent: int = 0,
        outcome: str = FAILED,
    ) -> StepRecord:
        """The ledger's record of one step.

        ``answer`` and ``message``: the answering tier's result and the message returned (None
        when no tier answered; the step's tier is then ``outcome``: ``error`` or ``cancelled``).
        ``tokens_raw`` None: not counted yet (a step cancelled early); counted here.
        ``t0``: ``time.perf_counter()`` at the start of the step (the latency is taken now).
        """
        latency = time.perf_counter() - t0
        if tokens_raw is None:
            tokens_raw = self.tokens_raw(step)
        message = message if answer is not None and message is not None else {}
        out_tokens = self.completion_tokens(message)
        # The counterfactual: the same step, untrimmed, answered by the frontier model with an
        # answer as long as the one given.
        baseline = self.energy_model.estimate(self.frontier_model, tokens_raw, out_tokens)
        if len(self._estimated_lengths) >= 4096:
            self._estimated_lengths.clear()
        self._estimated_lengths.add(out_tokens)
        energy = Energy.zero()
        for a in attempts:
            energy = energy + a.energy
        return StepRecord(
            step_id=new_step_id(started_at),
            started_at=started_at,
            meta=step.meta,
            tier=answer.tier if answer else outcome,
            model=answer.model if answer else None,
            label=answer.label if answer else None,
            input_tokens_raw=tokens_raw,
            input_tokens_sent=tokens_sent if answer else 0,
            output_tokens=(answer.output_tokens or out_tokens) if answer else 0,
            latency_s=latency,
            energy=energy,
            cost_usd=sum(a.cost_usd for a in attempts),
            baseline_energy=baseline,
            baseline_cost_usd=cost_usd(self.frontier_model, tokens_raw, out_tokens),
            baseline_model=self.frontier_model,
            attempts=tuple(attempts),
            request=step.to_openai(),
            response=message,
        )
