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
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from .energy import CpuCoefficients, RemoteEnergyModel, cpu_energy
from .ids import new_step_id
from .meters import hardware
from .overheads import overheads
from .pricing import cost_usd
from .tokens import DEFAULT_ENCODING, PER_MESSAGE, TokenCounter, encoding_for_model
from .trimming.prefix import PrefixTracker
from .types import Attempt, Energy, Message, Step, StepRecord, TierResult

if TYPE_CHECKING:
    from .trimming import Trimmed


# Step-level ``tier`` of a step no tier answered.
FAILED = "error"
CANCELLED = "cancelled"


@dataclass(frozen=True)
class Baseline:
    """A step's counterfactual: its energy, cost and the tokens they were computed from."""

    energy: Energy
    cost_usd: float
    input_tokens: int
    cached_tokens: int
    output_tokens: int


class Accountant:
    """Counts a step's tokens and builds its ``StepRecord``.

    ``frontier_model`` is the model of the counterfactual: the untrimmed step answered by it,
    with an answer as long as the one given, estimated by ``energy_model`` (whose coefficient
    set prices every figure of the record). The baseline's tokens are counted with the
    frontier model's own tokenizer where one is known offline, and the provider's prompt cache
    serves it the prefix its previous request in the session shares, as it would have.
    """

    def __init__(
        self,
        frontier_model: str,
        *,
        encoding: str = DEFAULT_ENCODING,
        energy_model: RemoteEnergyModel | None = None,
        counter: TokenCounter | None = None,
    ) -> None:
        self.frontier_model = frontier_model
        self.encoding = encoding
        self.energy_model = energy_model or RemoteEnergyModel()
        self.coefficients = self.energy_model.coefficients
        self.cpu = CpuCoefficients.of(self.coefficients)
        # Shared with the trimmers, which count the same messages.
        self.counter = counter or TokenCounter(encoding)
        baseline_encoding, own = encoding_for_model(frontier_model)
        self.baseline_tokenizer = baseline_encoding if own else f"{baseline_encoding} (approximation)"
        self.baseline_counter = self.counter if baseline_encoding == self.counter.encoding else TokenCounter(baseline_encoding)
        self._baseline_prefix = PrefixTracker()
        # Answer lengths whose counterfactual was estimated: EcoLogits' part of the estimate
        # depends only on the length, and milliwatt.energy memoises it.
        self._estimated_lengths: set[int] = set()

    # ------------------------------------------------------------------ tokens

    def tokens_raw(self, step: Step) -> int:
        """Input tokens of the step as the agent sent it (messages, framing, tool schemas)."""
        return self.counter.request(step.messages, step.tools)

    def completion_tokens(self, message: Message, counter: TokenCounter | None = None) -> int:
        """Output tokens of an assistant message, as ``milliwatt.tokens.count_completion``."""
        return (counter or self.counter).message(message) - PER_MESSAGE if message else 0

    def cached_tokens_raw(self, step: Step) -> int | None:
        """``tokens_raw`` when every part of the step was counted before (no tokenising: cheap
        enough for the event loop), else None."""
        return self.counter.cached_request(step.messages, step.tools)

    # ------------------------------------------------------------------ the record

    def can_record_inline(self, tokens_raw: int | None, message: Message | None = None) -> bool:
        """True when ``record`` would neither tokenise nor ask EcoLogits for a new estimate."""
        if tokens_raw is None or self.baseline_counter is not self.counter:
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
        base = self.baseline(step, message, tokens_raw)
        attempts = tuple(self.priced(a) for a in attempts)
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
            output_tokens=(answer.output_tokens or base.output_tokens) if answer else 0,
            latency_s=latency,
            energy=energy,
            cost_usd=sum(a.cost_usd for a in attempts),
            baseline_energy=base.energy,
            baseline_cost_usd=base.cost_usd,
            baseline_model=self.frontier_model,
            attempts=attempts,
            request=step.to_openai(),
            response=message,
            input_tokens_prefix=sent.prefix_tokens if answer and sent else 0,
            trimmed=sent if answer else None,
            baseline_input_tokens=base.input_tokens,
            baseline_cached_tokens=base.cached_tokens,
            baseline_output_tokens=base.output_tokens,
            baseline_tokenizer=self.baseline_tokenizer,
            coefficients=self.coefficients.version,
            hardware=hardware(),
            overheads=tuple((o, cpu_energy(o.cpu_seconds, self.cpu)) for o in overheads.drain()),
        )

    def baseline(self, step: Step, message: Message, tokens_raw: int | None = None) -> Baseline:
        """The counterfactual of a step: untrimmed, answered by the frontier model with an
        answer as long as ``message``, counted with its tokenizer, the prefix it shares with
        the session's previous step served by the provider's cache. Call it for every step of
        a session, in order (the prefix is tracked here)."""
        if self.baseline_counter is self.counter:
            tokens_in = tokens_raw if tokens_raw is not None else self.tokens_raw(step)
            tokens_out = self.completion_tokens(message)
        else:
            tokens_in = self.baseline_counter.request(step.messages, step.tools)
            tokens_out = self.completion_tokens(message, self.baseline_counter)
        cached = min(self.coefficients.prompt_cache.cached(self._baseline_prefix.observe(step, self.baseline_counter)), tokens_in)
        energy = self.energy_model.estimate(self.frontier_model, tokens_in, tokens_out, cached_tokens=cached)
        if len(self._estimated_lengths) >= 4096:
            self._estimated_lengths.clear()
        self._estimated_lengths.add(tokens_out)
        cost = cost_usd(self.frontier_model, tokens_in, tokens_out, cached, self._price_weight)
        return Baseline(energy, cost, tokens_in, cached, tokens_out)

    @property
    def _price_weight(self) -> float:
        return self.coefficients.prompt_cache.price_weight.value

    def priced(self, a: Attempt) -> Attempt:
        """A remote attempt whose provider did not say what its prompt cache served: the
        prefix it shares with the session's previous request to that tier, as the baseline
        gets, at the cached weight, in energy and in cost. Other attempts are as their tier
        priced them (stamped with the set's version if their tier did not say)."""
        observed = a.energy.observed
        if a.energy.method != "estimate" or observed is None or observed.model is None or observed.cached_tokens is not None:
            # Every figure names the coefficient set, the zero of a skipped attempt included.
            return a if a.energy.version else replace(a, energy=replace(a.energy, version=self.coefficients.version))
        cached = min(self.coefficients.prompt_cache.cached(a.prefix_tokens), a.input_tokens)
        latency = a.latency_s if observed.model == a.model else None
        energy = self.energy_model.estimate(observed.model, a.input_tokens, a.output_tokens, latency, cached_tokens=cached)
        # Stored as not reported (null): the estimate follows from prefix_tokens and the
        # coefficient set, so a recomputation with another set derives it again.
        energy = replace(energy, observed=replace(energy.observed, cached_tokens=None))
        # The list price the provider would bill with its cache (a model litellm does not
        # price, a stand-in's, stays unpriced).
        cost = cost_usd(a.model, a.input_tokens, a.output_tokens, cached, self._price_weight) if a.cost_usd and a.model else a.cost_usd
        return replace(a, energy=energy, cost_usd=cost)
