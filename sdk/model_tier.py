"""The local and remote tiers: one ``ModelTier`` over a model backend, with or without a gate.

A gated tier (local) answers only when its gate accepts, and turns a backend failure
into a pass: a small model that cannot run a step is a reason to escalate, not a crash.
A model that does not load at all (``ModelLoadError``) is not a pass: it is raised, and the
cascade records it as the tier's ``error`` attempt and goes on to the next tier.
An ungated tier (remote) is the last resort: it always answers, and its typed
``RemoteError``s reach the caller. Either way the energy of the work is charged, also
on a pass, since an escalated local attempt still burned its CPU time.

Write-back: a gated (local) tier's answers are not written back to the cache by default.
The gate judges confidence, not correctness, and a cached answer is served again to every
similar step: an unverified small-model answer must not be multiplied. The ungated remote
tier's answers are. ``write_back`` overrides either (``local.write_back: true``).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace

from .energy import CpuCoefficients, RemoteEnergyModel, cpu_energy, measured_energy
from .errors import BackendError, ModelLoadError
from .gates import Gate, GateDecision
from .local_features import FEATURES_VERSION, answer_features
from .redaction import get_logger, redact
from .streaming import Chunk
from .tier import Completion, CompletionStream, ModelBackend, Tier, TierStream, current_spend
from .types import Energy, Message, Step, TierResult

log = get_logger("milliwatt.tiers")


class ModelTier(Tier):
    def __init__(
        self,
        name: str,
        backend: ModelBackend,
        *,
        gate: Gate | None = None,
        token_budget: int | None = None,
        energy_model: str | None = None,
        remote_energy: RemoteEnergyModel | None = None,
        pass_on_error: bool | None = None,
        cpu: CpuCoefficients | None = None,
        write_back: bool | None = None,
        shadow_share: float = 0.0,
    ) -> None:
        """``energy_model``: the model whose energy estimate is charged when the backend
        reports no CPU time (default: the backend's ``energy_model`` or ``model``).
        ``pass_on_error``: turn a ``BackendError`` into a pass (default: when gated).
        ``write_back``: may this tier's answers be written back to earlier tiers (the
        cache)? Default: not when gated (local), yes when ungated (remote)."""
        self.name = name
        self.backend = backend
        self.gate = gate
        self.token_budget = token_budget
        self.energy_model = energy_model or getattr(backend, "energy_model", None) or backend.model
        self.remote_energy = remote_energy or RemoteEnergyModel()
        self.pass_on_error = gate is not None if pass_on_error is None else pass_on_error
        self.cpu = cpu or CpuCoefficients.of()
        self.write_back = gate is None if write_back is None else write_back
        if not 0 <= shadow_share <= 1:
            raise ValueError(f"shadow_share must be in [0, 1], got {shadow_share}")
        self.shadow_share = shadow_share
        self._draw = random.Random(0).random  # which answers get a shadow check: reproducible
        # Accepted answers awaiting their check, by the step they answered (kept, so its id stays its own).
        self._checking: dict[int, tuple[Step, Message]] = {}

    async def attempt(self, step: Step) -> TierResult:
        t0 = time.perf_counter()
        try:
            completion = await self.backend.complete(step, abort=getattr(self.gate, "hopeless", None))
        except BackendError as e:
            if not self.pass_on_error or isinstance(e, ModelLoadError):  # a broken model is a fault, not a pass
                raise
            return TierResult.passed(self.name, redact(f"{self.name} backend failed: {e}"), model=self.backend.model)
        except asyncio.CancelledError:
            # The backend may have said what CPU time the cut-off call used: charge it at
            # this tier's coefficients (the cascade records the cancelled attempt).
            spend = current_spend()
            if spend is not None and spend.energy is None and spend.cpu_seconds > 0:
                spend.energy = cpu_energy(spend.cpu_seconds, self.cpu)
            raise
        latency = time.perf_counter() - t0
        completion = _with_valid_usage(step, completion)
        if completion.cpu_seconds is not None:
            energy = self._energy(completion, latency)
        else:  # an EcoLogits estimate for the measured latency: ~0.3 ms of CPU, off the loop
            energy = await asyncio.to_thread(self._energy, completion, latency)
        common = dict(
            energy=energy,
            model=completion.model,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_usd=completion.cost_usd,
            label=completion.label,
            cacheable=self.write_back,
        )
        if self.gate is None:  # the route of a fallback (which model answered, which failed) is its evidence
            return TierResult(self.name, completion.message, f"{self.name} model answered", evidence=_route(completion), **common)
        # Judging reads the whole context (schemas, the values it holds): off the event loop.
        decision, features = await asyncio.to_thread(self._judge, step, completion)
        # Every gated answer is kept with what it looked like, accepted or not: a ledger of
        # them, judged against the next tier's answers, is what a gate is calibrated on.
        evidence = {"answer": completion.message, "features": features, "features_version": FEATURES_VERSION, **(decision.evidence or {})}
        if completion.extra.get("decoding"):  # a gate is calibrated for one way of decoding
            evidence["decoding"] = completion.extra["decoding"]
        if not decision.accept:
            return TierResult.passed(self.name, decision.reason, signal=decision.signal, evidence=evidence, **common)
        shadow = self.shadow_share > 0 and self._draw() < self.shadow_share
        if shadow:
            self._checking[id(step)] = (step, completion.message)
            while len(self._checking) > 1024:  # checks that failed never come back
                self._checking.pop(next(iter(self._checking)))
        return TierResult(
            self.name, completion.message, decision.reason, signal=decision.signal, evidence=evidence, shadow=shadow, **common
        )

    async def remember(self, step: Step, message: Message, answered_by: str, *, model: str | None = None) -> None:
        """A later tier's answer to a step this tier was asked: the verdict of a shadow check
        when this tier's answer to it was being checked (the gate sees whether they agree)."""
        checked = self._checking.pop(id(step), None)
        if checked is None or checked[0] is not step:
            return
        from .quality import agreement

        observe = getattr(self.gate, "observe_check", None)
        if observe is not None:  # may compute a binomial bound (scipy): off the event loop
            await asyncio.to_thread(observe, agreement(checked[1], message).agrees)

    def _judge(self, step: Step, completion: Completion) -> tuple[GateDecision, dict[str, float]]:
        assert self.gate is not None
        decision = self.gate.check(step, completion)
        # A gate that scores the features (the calibrated one) hands them back: computed once.
        features = (decision.evidence or {}).get("features") or answer_features(step, completion)
        return decision, features

    def _energy(self, completion: Completion, latency_s: float) -> Energy:
        if completion.joules is not None and completion.meter:
            return measured_energy(completion.joules, completion.meter, self.remote_energy.coefficients, cpu_seconds=completion.cpu_seconds)
        if completion.cpu_seconds is not None:
            return cpu_energy(completion.cpu_seconds, self.cpu)
        # A measured latency describes the model that answered; when the energy is charged
        # for another model (a stand-in's), EcoLogits' own latency model for it applies (and
        # the coefficient set decides whether a measured one is used at all).
        # A fallback backend says which model answered, and the model charged for it.
        energy_model = completion.extra.get("energy_model") or self.energy_model
        answered_by = (completion.extra.get("route") or {}).get("model") or self.backend.model
        measured = latency_s if energy_model == answered_by else None
        return self.remote_energy.estimate(
            energy_model, completion.input_tokens, completion.output_tokens, measured, cached_tokens=completion.cached_tokens
        )

    async def stream(self, step: Step) -> TierResult | TierStream:
        """An ungated tier (remote) streams its backend's answer; a gated one (local) answers
        whole, since its gate judges the whole answer."""
        if self.gate is not None or self.pass_on_error:
            return await self.attempt(step)
        t0 = time.perf_counter()
        opened = await self.backend.stream(step)
        return _ModelTierStream(self, step, opened, t0)

    async def aclose(self) -> None:
        await self.backend.aclose()


class _ModelTierStream(TierStream):
    """A ``ModelTier``'s streamed answer: the backend's chunks, then the answer charged as
    ``attempt`` charges a whole one (or, after a break or a close, what was received)."""

    def __init__(self, tier: ModelTier, step: Step, stream: CompletionStream, t0: float) -> None:
        self.tier = tier.name
        self._model_tier = tier
        self._step = step
        self._stream = stream
        self._t0 = t0

    async def __anext__(self) -> Chunk:
        return await self._stream.__anext__()

    def _result(self, reason: str) -> TierResult:
        tier = self._model_tier
        completion = _with_valid_usage(self._step, self._stream.completion())  # may tokenise
        # The provider's time to the last chunk, not the consumer's pace of reading.
        latency = completion.extra.get("latency_s", time.perf_counter() - self._t0)
        return TierResult(
            tier.name,
            completion.message,
            reason,
            tier._energy(completion, latency),
            model=completion.model,
            input_tokens=completion.input_tokens,
            output_tokens=completion.output_tokens,
            cost_usd=completion.cost_usd,
            label=completion.label,
            cacheable=tier.write_back,
            evidence=_route(completion),
        )

    async def result(self) -> TierResult:
        return await asyncio.to_thread(self._result, f"{self.tier} model answered (streamed)")

    async def partial(self) -> TierResult:
        return await asyncio.to_thread(self._result, f"{self.tier} model's answer as far as it came")

    async def aclose(self) -> None:
        await self._stream.aclose()


def _route(completion: Completion) -> dict | None:
    """A fallback's account of which model answered and which failed (``milliwatt.remote``)."""
    route = completion.extra.get("route")
    return {"route": route} if route else None


def _with_valid_usage(step: Step, completion: Completion) -> Completion:
    """The completion with token counts fit to charge: a count a provider left out, or gave as
    negative or not a whole number, is counted here (tiktoken), with a warning; a cached count
    beyond the input is dropped. Never a silent zero, never a failed step for its accounts."""
    fixes: dict[str, object] = {}
    for name, count in (("input_tokens", completion.input_tokens), ("output_tokens", completion.output_tokens)):
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            from .tokens import count_completion, count_request

            fixes[name] = count_request(step.messages, step.tools) if name == "input_tokens" else count_completion(completion.message)
            log.warning("%s reported %s=%r; counted %d instead", completion.model, name, count, fixes[name])
    cached = completion.cached_tokens
    if cached is not None and (not isinstance(cached, int) or cached < 0 or cached > fixes.get("input_tokens", completion.input_tokens)):
        log.warning("%s reported cached_tokens=%r; ignored", completion.model, cached)
        fixes["cached_tokens"] = None
    return replace(completion, **fixes) if fixes else completion
