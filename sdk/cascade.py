"""The cascade: trim, then ask each tier in order until one answers; record every attempt.

The cascade knows tiers only through the ``Tier`` seam. It never names a concrete tier,
so adding one is a registry entry (``milliwatt.registry``), not an edit here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol

from .energy import RemoteEnergyModel
from .errors import BackendError, NoTierAnswered, RemoteError
from .ids import new_step_id
from .pricing import cost_usd
from .tier import Tier
from .tokens import count_completion
from .trimming import Trimmer
from .types import Attempt, Energy, Step, StepRecord, StepResult, TierResult

log = logging.getLogger("milliwatt")


class RecordSink(Protocol):
    """Where step records go (the ledger). ``write`` must not block the event loop."""

    async def write(self, record: StepRecord) -> None: ...


class Cascade:
    def __init__(
        self,
        tiers: Sequence[Tier],
        *,
        frontier_model: str,
        trimmer: Trimmer | None = None,
        energy_model: RemoteEnergyModel | None = None,
        sink: RecordSink | None = None,
    ) -> None:
        if not tiers:
            raise ValueError("a cascade needs at least one tier")
        names = [t.name for t in tiers]
        if len(set(names)) != len(names):
            raise ValueError(f"tier names must be unique, got {names}")
        self.tiers = list(tiers)
        self.frontier_model = frontier_model
        self.trimmer = trimmer or Trimmer()
        self.energy_model = energy_model or RemoteEnergyModel()
        self.sink = sink

    async def run(self, step: Step) -> StepResult:
        started_at = time.time()
        t0 = time.perf_counter()
        tokens_raw = self.trimmer.count(step)
        attempts: list[Attempt] = []
        skip_to: str | None = None
        answer: TierResult | None = None
        asked: dict[str, Step] = {}  # the step as each tier was asked it, for write-back
        sent = 0
        for index, tier in enumerate(self.tiers):
            if skip_to is not None and tier.name != skip_to:
                attempts.append(_skipped(tier.name, f"routed to {skip_to}"))
                continue
            skip_to = None
            trimmed = self.trimmer.trim(step, tier.token_budget, tokens_before=tokens_raw)
            asked[tier.name] = trimmed.step
            a0 = time.perf_counter()
            try:
                result = await tier.attempt(trimmed.step)
            except Exception as e:
                attempts.append(_failed(tier.name, e, time.perf_counter() - a0))
                # A backend failing below the last resort is a reason to go on. Anything else
                # (the last resort failing, a bug) fails the step: log it, then tell the caller.
                if not isinstance(e, BackendError) or isinstance(e, RemoteError) or index == len(self.tiers) - 1:
                    await self._log(step, started_at, t0, tokens_raw, 0, None, attempts)
                    raise
                continue
            attempts.append(_attempted(result, trimmed.tokens_after, time.perf_counter() - a0))
            if result.answered:
                answer, sent, answered_at = result, trimmed.tokens_after, index
                break
            # Only a route to a later tier is obeyed: one to a tier this cascade does not
            # have, or one already passed, would skip every later tier and fail the step.
            later = {t.name for t in self.tiers[index + 1 :]}
            skip_to = result.skip_to if result.skip_to in later else None
        if answer is None:
            await self._log(step, started_at, t0, tokens_raw, 0, None, attempts)
            raise NoTierAnswered("every tier passed: " + "; ".join(f"{a.tier}: {a.reason}" for a in attempts))

        message = dict(answer.message or {})
        if answer.cacheable:
            for earlier in self.tiers[:answered_at]:
                if earlier.name not in asked:  # a tier skipped by a route was not asked
                    continue
                try:
                    await earlier.remember(asked[earlier.name], message, answer.tier, model=answer.model)
                except Exception:  # a failed write-back costs a future hit, never this answer
                    log.warning("write-back to %s failed", earlier.name, exc_info=True)
        record = await self._log(step, started_at, t0, tokens_raw, sent, (answer, message), attempts)
        return StepResult(message, record)

    async def _log(
        self,
        step: Step,
        started_at: float,
        t0: float,
        tokens_raw: int,
        tokens_sent: int,
        answer: tuple[TierResult, dict] | None,
        attempts: list[Attempt],
    ) -> StepRecord:
        result, message = answer if answer else (None, {})
        # The counterfactual: the same step, untrimmed, answered by the frontier model with
        # an answer as long as the one given.
        out_tokens = count_completion(message) if message else 0
        baseline = self.energy_model.estimate(self.frontier_model, tokens_raw, out_tokens)
        energy = Energy.zero()
        for a in attempts:
            energy = energy + a.energy
        record = StepRecord(
            step_id=new_step_id(started_at),
            started_at=started_at,
            meta=step.meta,
            tier=result.tier if result else "error",
            model=result.model if result else None,
            label=result.label if result else None,
            input_tokens_raw=tokens_raw,
            input_tokens_sent=tokens_sent,
            output_tokens=(result.output_tokens or out_tokens) if result else 0,
            latency_s=time.perf_counter() - t0,
            energy=energy,
            cost_usd=sum(a.cost_usd for a in attempts),
            baseline_energy=baseline,
            baseline_cost_usd=cost_usd(self.frontier_model, tokens_raw, out_tokens),
            baseline_model=self.frontier_model,
            attempts=tuple(attempts),
            request=step.to_openai(),
            response=message,
        )
        if self.sink is not None:
            await self.sink.write(record)
        return record

    async def aclose(self) -> None:
        """Close every tier, even when one fails to close; then raise the first failure."""
        errors: list[BaseException] = []
        for tier in self.tiers:
            try:
                await tier.aclose()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


def _attempted(r: TierResult, tokens_sent: int, latency: float) -> Attempt:
    return Attempt(
        tier=r.tier,
        outcome="answered" if r.answered else "passed",
        reason=r.reason,
        signal=r.signal,
        model=r.model,
        input_tokens=r.input_tokens or tokens_sent,
        output_tokens=r.output_tokens,
        latency_s=latency,
        energy=r.energy,
        cost_usd=r.cost_usd,
        label=r.label,
    )


def _skipped(tier: str, reason: str) -> Attempt:
    return Attempt(tier, "skipped", reason, None, None, 0, 0, 0.0, Energy.zero(), 0.0)


def _failed(tier: str, error: Exception, latency: float) -> Attempt:
    reason = f"{type(error).__name__}: {error}"
    model = getattr(error, "model", None) or None
    return Attempt(tier, "error", reason, None, model, 0, 0, latency, Energy.zero(), 0.0)
