"""The accounts of a step: its tokens, its energy and cost, and its counterfactual.

The cascade orchestrates (trim, ask the tiers, write back, hand the record on); this module
keeps the books. The costly parts are tokenising (tiktoken over agent contexts of thousands
of tokens) and EcoLogits' estimate of a new answer length; the cascade runs them in a worker
thread. Once they are memoised, building a record costs ~15 us, less than the hop to a
thread (~65 us), so ``cached_tokens_raw`` and ``can_record_inline`` tell the cascade when
the event loop may do it itself.

Token counts are memoised (``milliwatt.tokens.TokenCounter``, shared with the trimmers): an
agent resends its whole context at every step, so all but the newest messages, and the tool
schemas, were counted at an earlier step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .energy import RemoteEnergyModel
from .ids import new_step_id
from .pricing import cost_usd
from .tokens import PER_MESSAGE, TokenCounter
from .types import Attempt, Energy, Message, Step, StepRecord, TierResult

if TYPE_CHECKING:
    from .trimming import Trimmed


# Step-level ``tier`` of a step no tier answered.
FAILED = "error"
CANCELLED = "cancelled"


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
        counter: TokenCounter | None = None,
    ) -> None:
        self.frontier_model = frontier_model
        self.encoding = encoding
        self.energy_model = energy_model or RemoteEnergyModel()
        # Shared with the trimmers, which count the same messages.
        self.counter = counter or TokenCounter(encoding)
        # Answer lengths whose counterfactual was estimated: EcoLogits' part of the estimate
        # depends only on the length, and milliwatt.energy memoises it.
        self._estimated_lengths: set[int] = set()

    # ------------------------------------------------------------------ tokens

    def tokens_raw(self, step: Step) -> int:
        """Input tokens of the step as the agent sent it (messages, framing, tool schemas)."""
        return self.counter.request(step.messages, step.tools)

    def completion_tokens(self, message: Message) -> int:
        """Output tokens of an assistant message, as ``milliwatt.tokens.count_completion``."""
        return self.counter.message(message) - PER_MESSAGE if message else 0

    def cached_tokens_raw(self, step: Step) -> int | None:
        """``tokens_raw`` when every part of the step was counted before (no tokenising: cheap
        enough for the event loop), else None."""
        return self.counter.cached_request(step.messages, step.tools)

    # ------------------------------------------------------------------ the record

    def can_record_inline(self, tokens_raw: int | None, message: Message | None = None) -> bool:
        """True when ``record`` would neither tokenise nor ask EcoLogits for a new estimate."""
        if tokens_raw is None:
            return False
        if not message:
            return 0 in self._estimated_lengths
        n = self.counter.cached_message(message)
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
        sent: Trimmed | None = None,
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
            input_tokens_sent=sent.tokens_after if answer and sent else 0,
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
            input_tokens_prefix=sent.prefix_tokens if answer and sent else 0,
            trimmed=sent if answer else None,
        )
